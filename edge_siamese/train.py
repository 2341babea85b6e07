"""The training loop: data -> P x K batches -> model -> (miner) -> loss -> AdamW, one checkpoint per epoch.

Reads top to bottom. Each epoch's batches depend only on (seed, epoch), so a run resumed
from its checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from device_bench.bench import memory_mb, reset_peak_rss
from device_bench.files import write_json
from device_bench.preprocessing import Preprocessing

from . import __version__, distributed, timm_models
from .checkpoints import CHECKPOINT, CONFIG, METRICS, WEIGHTS, build, load_checkpoint, read_config, save_checkpoint, save_weights
from .config import TRAIN_PRECISIONS, TrainConfig
from .data import INDEX, PKSampler
from .errors import UserError
from .evaluate import resolve_device, validation_metrics
from .files import check_replaceable
from .miners import create_miner
from .plots import plot_training_curves
from .progress import progress_bar
from .run import prepare_data, read_index


def peak_memory_mb(device: torch.device) -> dict:
    """Peak memory since ``reset_peak_rss()`` at the start of training (on Linux; the process's otherwise)."""
    out = {"peak_rss_mb": memory_mb()["peak_rss_mb"]}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _not_finite(*modules: torch.nn.Module) -> list[str]:
    """The parameters and buffers (BatchNorm statistics too) that hold NaN or inf."""
    return [name for m in modules for name, t in [*m.named_parameters(), *m.named_buffers()] if t.is_floating_point() and not torch.isfinite(t).all()]


def _stopped(what: str, epoch: int, out: Path, config: TrainConfig) -> UserError:
    kept = f"the last good checkpoint (epoch {epoch}) is kept in {out}" if epoch else "no epoch finished, so nothing is kept"
    return UserError(f"training stopped: {what}; {kept}. Lower --lr (now {config.lr}) and train again")


@contextmanager
def _left_only_if_resumable(out: Path, fresh: bool) -> Iterator[None]:
    """A new run that fails before its first checkpoint leaves nothing behind (there is nothing to resume)."""
    try:
        yield
    except BaseException:
        if fresh and not (out / CHECKPOINT).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def train(config: TrainConfig, out: Path, resume: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Train ``config`` into the run folder ``out``; return its ``metrics.json`` content.

    ``out`` holds ``config.json`` from the start, ``checkpoint.pt`` after each epoch, and
    ``model.safetensors``, ``metrics.json`` and ``training_curves.png`` once training ends.
    Started as one of several processes (``--nproc``, torchrun: ``distributed.world_from_env``),
    each trains on its shard of every batch and rank 0 alone writes; the others return ``{}``.
    """
    out, world = Path(out), distributed.world_from_env()
    try:
        metrics = _train(config, out, resume, force, progress, world)
    except RuntimeError as exc:
        if distributed.peer_lost(exc, world):  # leaving the group would wait for the lost process too
            raise distributed.PeerLost(str(exc)) from None
        distributed.stop(world)
        raise
    except BaseException:
        distributed.stop(world)
        raise
    distributed.stop(world)
    return metrics


def pk_sampler(config: TrainConfig, train_labels: np.ndarray) -> PKSampler:
    """The P x K batches of an epoch as ``config`` sets them: ``batch_size`` images, ``samples_per_class`` per class."""
    classes_per_batch = max(2, config.batch_size // config.samples_per_class)
    num_batches = max(1, len(train_labels) // config.batch_size)
    return PKSampler(train_labels, classes_per_batch, config.samples_per_class, num_batches, seed=config.seed)


def _train(config: TrainConfig, out: Path, resume: bool, force: bool, progress: bool, world: distributed.World) -> dict:
    progress = progress and world.is_main
    if resume:
        config, preprocessing = read_config(out)
        if (out / METRICS).exists():
            raise UserError(f"{out} has finished training: nothing to resume")
        if config.world_size != world.size:
            raise UserError(f"{out} was trained by {config.world_size} process(es): resume it with --nproc {config.world_size}, not {world.size}")
        state, index = load_checkpoint(out / CHECKPOINT), read_index(out)
    else:
        config = replace(config, world_size=world.size)
        if world.is_main:
            check_replaceable(out, CONFIG, force, ", or --resume to continue it")
        preprocessing, state, index = None, None, None
    config.validate()
    if state is None and config.pretrained is not None:
        timm_models.check_pretrained(config.pretrained)  # before the data is indexed
    device = distributed.start(world, resolve_device(config.device))
    reset_peak_rss()  # peak_rss_mb is this training's, not an earlier one's in the same process
    if state is None and not world.is_main:  # rank 0 indexes the data and fits the preprocessing once
        shared = distributed.share(None, world, device)
        config, preprocessing, index = TrainConfig.from_dict(shared["train"]), Preprocessing.from_dict(shared["preprocessing"]), shared["index"]
    data = prepare_data(config, preprocessing, index, progress)

    torch.manual_seed(config.seed)
    model, loss_fn = build(config, data.preprocessing)
    if state is None and config.pretrained is not None:
        timm_models.load_pretrained(model.features, config.backbone, config.pretrained)
    if config.sync_bn:
        model = distributed.convert_sync_batchnorm(model)
    model, loss_fn = model.to(device), loss_fn.to(device)
    miner = create_miner(config.miner, getattr(loss_fn, "margin", 0.2), loss_fn.distance)
    head_params = [p for name, p in model.named_parameters() if not name.startswith("features.")]
    optimizer = torch.optim.AdamW(
        [
            {"params": list(model.features.parameters()), "lr": config.lr * config.backbone_lr_mult},
            {"params": [*head_params, *loss_fn.parameters()]},
        ],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)

    sampler = pk_sampler(config, data.labels("train"))
    num_batches = len(sampler)
    batches = data.train_loader(distributed.ShardedBatches(sampler, world) if world.size > 1 else sampler, config.augment)

    history: list[dict] = []
    start_epoch, elapsed = 0, 0.0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            loss_fn.load_state_dict(state["loss"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, elapsed, history = int(state["epoch"]), float(state["train_time_s"]), list(state["history"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{out / CHECKPOINT} does not belong to the run in {out}/config.json ({first}): train again with --force") from None
    elif world.is_main:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        write_json(out / CONFIG, {"toolkit_version": __version__, "train": config.to_dict(), "preprocessing": data.preprocessing.to_dict()})
        if data.index is not None:
            write_json(out / INDEX, data.index)
        distributed.share({"train": config.to_dict(), "preprocessing": data.preprocessing.to_dict(), "index": data.index}, world, device)

    with _left_only_if_resumable(out, fresh=state is None and world.is_main):
        bar = progress_bar(total=(config.epochs - start_epoch) * num_batches, desc=f"{config.loss} d={config.embedding_dim}", enabled=progress, unit="batch")
        net, wrapped_frozen = model, None
        autocast_dtype = getattr(torch, name) if (name := TRAIN_PRECISIONS[config.precision]) else None
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            frozen = epoch < config.freeze_backbone_epochs  # the backbone's weights and BatchNorm statistics stay
            model.train()
            model.features.requires_grad_(not frozen)
            if frozen:
                model.features.eval()
            if world.size > 1 and frozen != wrapped_frozen:  # DDP syncs the parameters that need gradients when it is made
                net, wrapped_frozen = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None), frozen
                # a 1-channel 3x3 kernel's gradient comes in other (equivalent) strides than its bucket's: a copy, not an error
                warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            batches.batch_sampler.set_epoch(epoch)
            losses = []
            for step, (inputs, labels) in enumerate(batches):
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                    embeddings = net(inputs.to(device))
                embeddings, labels = distributed.gather(embeddings.float(), labels.to(device), world)  # the loss in float32
                indices_tuple = miner(embeddings, labels) if miner is not None else None
                loss = loss_fn(embeddings, labels, indices_tuple=indices_tuple)
                if not torch.isfinite(loss):
                    bar.close()
                    raise _stopped(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}", epoch, out, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            scheduler.step()
            if broken := _not_finite(model, loss_fn):  # a checkpoint is good only when every number in it is finite
                bar.close()
                raise _stopped(f"{broken[0]} became NaN or inf at epoch {epoch + 1}", epoch, out, config)
            if not world.is_main:
                distributed.barrier(world)  # while rank 0 validates and writes the checkpoint
                continue
            val = validation_metrics(model, loss_fn, data, "val", episodes=200)
            elapsed += time.perf_counter() - started
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": float(np.mean(losses)),
                    "val_precision_at_1": val["precision_at_1"],
                    "val_mean_average_precision_at_r": val["mean_average_precision_at_r"],
                    "elapsed_s": elapsed,
                }
            )
            save_checkpoint(
                out / CHECKPOINT,
                {
                    "model": model.state_dict(),
                    "loss": loss_fn.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "train_time_s": elapsed,
                    "history": history,
                },
            )
            distributed.barrier(world)
        bar.close()
        if not world.is_main:
            return {}

        final = validation_metrics(model, loss_fn, data, "val")
        metrics = {
            "final": {f"val_{k}": v for k, v in final.items()},
            "history": history,
            "epochs": config.epochs,
            "train_time_s": elapsed,
            "device": str(device),
            "world_size": world.size,
            "skipped_images": len(data.files.skipped) if data.files else 0,
            **peak_memory_mb(device),
        }
        save_weights(out / WEIGHTS, model, loss_fn)
        plot_training_curves(history, out / "training_curves.png", title=f"{config.loss}, d={config.embedding_dim}")
        write_json(out / METRICS, metrics)
        return metrics

