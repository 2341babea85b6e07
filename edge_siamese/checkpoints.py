"""A run directory on disk: its config, its weights (safetensors) and the resumable checkpoint.

Nothing here unpickles: weights are safetensors and the resume checkpoint is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from device_bench.files import atomic_path
from device_bench.preprocessing import Preprocessing

from .config import TrainConfig
from .errors import UserError
from .losses import create_loss
from .models import EmbeddingNet, create_model

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"


@dataclass
class Run:
    """A trained run, rebuilt: what evaluation and export need."""

    path: Path
    config: TrainConfig
    preprocessing: Preprocessing
    model: EmbeddingNet
    loss: nn.Module


def build(config: TrainConfig, preprocessing: Preprocessing) -> tuple[EmbeddingNet, nn.Module]:
    """The model and the loss a config describes (with fresh weights)."""
    model = create_model(
        config.backbone, preprocessing.channels, preprocessing.resize, config.embedding_dim, config.resolved_head
    )
    return model, create_loss(config.loss, config.embedding_dim, config.margin)


def save_weights(path: Path, model: nn.Module, loss: nn.Module) -> None:
    """Model and loss parameters (Koch's head lives in the loss) in one safetensors file."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"loss.{k}": v.detach().cpu().contiguous() for k, v in loss.state_dict().items()}
    data = save(tensors, metadata={"format": "edge-siamese"})  # bytes, written by Python (see save_checkpoint)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def load_weights(path: Path, model: nn.Module, loss: nn.Module) -> None:
    try:
        tensors = load_file(str(path))
        for prefix, module in (("model.", model), ("loss.", loss)):
            module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    except (SafetensorError, OSError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is corrupt or does not match its config.json ({first_line}): train the run again") from None


def read_config(run_dir: Path) -> tuple[TrainConfig, Preprocessing]:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir} is not a training run (no {CONFIG}): pass the --out folder of 'edge-siamese train'")
    try:
        data = json.loads(path.read_text())
        config, preprocessing = TrainConfig.from_dict(data["train"]), Preprocessing.from_dict(data["preprocessing"])
    except UserError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is corrupt ({exc}): train the run again") from None
    try:
        return config.validate(), preprocessing
    except UserError as exc:
        raise UserError(f"{path} holds a setting this toolkit refuses ({exc}): train the run again") from None


def load_run(run_dir: Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild a finished run's model and loss from its config and weights."""
    run_dir = Path(run_dir)
    config, preprocessing = read_config(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{run_dir} is unfinished (no {WEIGHTS}): resume it with 'edge-siamese train --resume --out {run_dir}'")
    model, loss = build(config, preprocessing)
    load_weights(weights, model, loss)
    return Run(run_dir, config, preprocessing, model.to(device).eval(), loss.to(device))


def save_checkpoint(path: Path, state: dict) -> None:
    # Serialised in memory, written by Python: a full disk is then an OSError naming the file,
    # where torch's own writer raises a RuntimeError about stream positions.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path} to resume from: train without --resume") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise UserError(f"checkpoint {path} is corrupt ({type(exc).__name__}): train again with --force") from None
