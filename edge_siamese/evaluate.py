"""Evaluation: the torch-free metrics the device also uses, on a model's embeddings under the
distance its loss trains, and the device that computes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from device_bench.metrics import check_finite, retrieval_metrics

from .checkpoints import load_run
from .config import check_device
from .distances import BaseDistance
from .errors import UserError
from .models import embed
from .run import prepare_data

SPLIT_NAMES = ("test", "val", "train")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a user error."""
    if check_device(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available (torch {torch.__version__}, no GPU found): use --device cpu or auto")
    return torch.device(name)


def embedding_metrics(embeddings: np.ndarray, labels: np.ndarray, distance: BaseDistance, **kwargs) -> dict:
    """Every retrieval metric of ``embeddings`` under ``distance``, as a device computes it."""
    try:
        check_finite(embeddings, "the model's embeddings")
    except ValueError as exc:
        raise UserError(f"{exc}: the model's weights are not finite; train it again with a lower --lr") from None
    return retrieval_metrics(embeddings, labels, distance.name, distance.weights_array(), **kwargs)


def validation_metrics(model: nn.Module, loss: nn.Module, inputs: torch.Tensor, labels: np.ndarray, **kwargs) -> dict:
    """Every retrieval metric of ``inputs``' embeddings under the distance the loss trains."""
    return embedding_metrics(embed(model, inputs).numpy(), labels, loss.distance, **kwargs)


def evaluate_run(run_dir: Path, split: str = "test", device: str = "auto") -> dict:
    """Retrieval and verification metrics of ``split``'s embeddings, under the loss's own distance."""
    run = load_run(run_dir, resolve_device(device))
    data = prepare_data(run.config, run.preprocessing)
    metrics = validation_metrics(run.model, run.loss, data.inputs(split), data.labels(split))
    return {
        "run": str(run_dir),
        "split": split,
        "dataset": run.config.dataset,
        "loss": run.config.loss,
        "embedding_dim": run.config.embedding_dim,
        "distance": run.loss.distance.name,
        **metrics,
    }


def default_output(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / ("evaluation.json" if split == "test" else f"evaluation-{split}.json")
