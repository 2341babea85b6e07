"""Training on several processes: torch.distributed (torchrun or ``--nproc``), DDP, and the exact
batch-all over the global batch.

Every rank draws the same P x K batch (same seed, same epoch) and embeds its contiguous shard of
it; ``gather`` concatenates every rank's embeddings and labels in rank order, so the loss sees the
single-process batch, in its order. ``torch.distributed.nn.functional.all_gather`` carries
gradients back: its backward sums the ranks' (identical) gradients of that loss, world_size times
a rank's own share, and DistributedDataParallel's average over ranks divides it out, so the
model's gradients equal the single-process ones. The loss's own parameters see the whole batch
on every rank and need no averaging. BatchNorm normalises each rank's shard alone, as DDP does,
unless ``--sync-bn`` (``convert_sync_batchnorm``): then its statistics are the global batch's.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError

# A rank that waits this long for the others ends the run with one line. Long enough for rank 0
# to index a large image folder while the others wait for it.
TIMEOUT_S = float(os.environ.get("EDGE_SIAMESE_TIMEOUT_S", 1800))


class PeerLost(RuntimeError):
    """This process lost the others: one of them stopped, or hung past ``TIMEOUT_S``. Its reason is
    that process's to say; this one exits quietly (``EXIT_PEER_LOST``)."""


EXIT_PEER_LOST = 3
# What Gloo and NCCL say when a peer's connection closes or a collective times out.
_PEER_LOST = ("closed by peer", "reset by peer", "broken pipe", "timed out", "timeout", "connection refused")


def peer_lost(exc: BaseException, world: "World") -> bool:
    """Whether ``exc`` (raised in a collective) means another process is gone."""
    return world.size > 1 and isinstance(exc, RuntimeError) and any(words in str(exc).lower() for words in _PEER_LOST)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (a single process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder and reports progress."""
        return self.rank == 0


def world_from_env() -> World:
    """The world torchrun (or ``--nproc``) describes in RANK, WORLD_SIZE and LOCAL_RANK."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers: start several processes with --nproc or torchrun") from None


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, one GPU per local rank; Gloo on the CPU); return the
    device this rank trains on."""
    if world.size == 1:
        return device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} found): start at most that many processes per machine")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=TIMEOUT_S))
    return device


def stop(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def share(value: dict | None, world: World, device: torch.device) -> dict | None:
    """Rank 0's ``value`` (JSON-able) on every rank, sent as UTF-8 bytes through the process group
    (no pickle, no shared disk: ranks on other machines get it too)."""
    if world.size == 1:
        return value
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8) if world.is_main else None
    size = torch.tensor([0 if data is None else len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    buffer = data.to(device) if data is not None else torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, 0)
    return json.loads(bytes(buffer.cpu().numpy()).decode())


def shard(batch: list[int], world: World) -> list[int]:
    """This rank's contiguous part of a global batch (the ranks' parts, in rank order, are the batch)."""
    if len(batch) % world.size:
        raise UserError(f"a batch of {len(batch)} does not split over {world.size} processes: choose a --batch-size divisible by --nproc")
    step = len(batch) // world.size
    return batch[world.rank * step : (world.rank + 1) * step]


class ShardedBatches:
    """A batch sampler's batches, each cut to this rank's shard (``set_epoch`` passes through)."""

    def __init__(self, sampler, world: World):
        self.sampler, self.world = sampler, world

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            yield shard(batch, self.world)


def gather(embeddings: torch.Tensor, labels: torch.Tensor, world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's embeddings (with their gradients) and labels, concatenated in rank order."""
    if world.size == 1:
        return embeddings, labels
    from torch.distributed.nn.functional import all_gather

    every_label = [torch.empty_like(labels) for _ in range(world.size)]
    dist.all_gather(every_label, labels)
    with warnings.catch_warnings():  # deprecated for _functional_collectives, whose backward needs reduce_scatter: Gloo has none
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(embeddings)), torch.cat(every_label)


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on any backend (torch's own SyncBatchNorm runs on GPUs only):
    each rank's sums and sums of squares are all-reduced with their gradients, then normalised
    as ``BatchNorm`` does (biased variance; the unbiased one updates ``running_var``)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims, channels = [0, *range(2, x.dim())], x.shape[1]
        wide = x.double()  # sums of squares lose digits in float32
        count = torch.tensor([float(x.numel() // channels)], dtype=torch.float64, device=x.device)
        with warnings.catch_warnings():  # as in gather
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(torch.cat([wide.sum(dims), (wide * wide).sum(dims), count]))
        total = stats[-1]
        mean64 = stats[:channels] / total
        var64 = stats[channels : 2 * channels] / total - mean64 * mean64
        mean, var = mean64.to(x.dtype), var64.to(x.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * (var64 * total / (total - 1)).to(x.dtype))
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every BatchNorm replaced by ``SyncBatchNorm`` (same parameters and statistics)."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        sync.load_state_dict(module.state_dict())
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module
