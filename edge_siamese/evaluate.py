"""Evaluation: the torch-free metrics the device also uses, on a model's embeddings under the
distance its loss trains, and the device that computes them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from device_bench.metrics import check_finite, retrieval_metrics, rowwise_distances, verification_metrics

from .checkpoints import load_run
from .config import check_device
from .data import ImageSet, read_list
from .distances import BaseDistance
from .errors import UserError
from .loader import batches, default_workers
from .models import embed
from .run import PreparedData, prepare_data, read_index

SPLIT_NAMES = ("test", "val", "train")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a user error."""
    if check_device(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available (torch {torch.__version__}, no GPU found): use --device cpu or auto")
    return torch.device(name)


def _finite(embeddings: np.ndarray) -> np.ndarray:
    """``embeddings`` if every value is finite, else a UserError: NaN would pass every metric's gate."""
    try:
        return check_finite(embeddings, "the model's embeddings")
    except ValueError as exc:
        raise UserError(f"{exc}: the model's weights are not finite; train it again with a lower --lr") from None


def embedding_metrics(embeddings: np.ndarray, labels: np.ndarray, distance: BaseDistance, **kwargs) -> dict:
    """Every retrieval metric of ``embeddings`` under ``distance``, as a device computes it."""
    _finite(embeddings)
    return retrieval_metrics(embeddings, labels, distance.name, distance.weights_array(), **kwargs)


def embed_batches(model: nn.Module, batches: Iterable) -> np.ndarray:
    """Embeddings of ``(inputs, labels)`` batches: the images are never all in memory."""
    return np.concatenate([embed(model, inputs).numpy() for inputs, _ in batches])


def embed_split(model: nn.Module, data: PreparedData, split: str) -> np.ndarray:
    return embed_batches(model, data.batches(split))


def validation_metrics(model: nn.Module, loss: nn.Module, data: PreparedData, split: str, **kwargs) -> dict:
    """Every retrieval metric of ``split``'s embeddings under the distance the loss trains."""
    return embedding_metrics(embed_split(model, data, split), data.labels(split), loss.distance, **kwargs)


def evaluate_run(run_dir: Path, split: str = "test", device: str = "auto") -> dict:
    """Retrieval and verification metrics of ``split``'s embeddings, under the loss's own distance."""
    run = load_run(run_dir, resolve_device(device))
    data = prepare_data(run.config, run.preprocessing, read_index(run_dir))
    metrics = validation_metrics(run.model, run.loss, data, split)
    return {
        "run": str(run_dir),
        "split": split,
        "dataset": run.config.dataset,
        "loss": run.config.loss,
        "embedding_dim": run.config.embedding_dim,
        "distance": run.loss.distance.name,
        **metrics,
    }


PAIRS_HEADER = ("path1", "path2", "same")
SAME = {"1": True, "true": True, "same": True, "0": False, "false": False, "different": False}


def evaluate_pairs(run_dir: Path, pairs: Path, device: str = "auto") -> dict:
    """Verification on a pairs list (``path1,path2,same``, LFW style; paths relative to the list):
    ROC AUC, EER, TAR at FAR 1e-2 / 1e-3 and the thresholds, under the loss's own distance
    (``path1`` is the anchor of the anchor-relative ones)."""
    run = load_run(run_dir, resolve_device(device))
    rows = read_list(Path(pairs), PAIRS_HEADER)
    same = []
    for n, (_, _, flag) in enumerate(rows, 1):
        if flag.lower() not in SAME:
            raise UserError(f"{pairs}: pair {n} has same={flag!r}: write 1 or 0 (or true/false, same/different)")
        same.append(SAME[flag.lower()])
    same = np.asarray(same)
    if same.all() or not same.any():
        raise UserError(f"{pairs} has only {'same' if same.all() else 'different'}-identity pairs: verification needs both")
    files = sorted({p for row in rows for p in row[:2]})
    images = ImageSet(np.zeros(len(files), dtype=np.int64), ["pairs"], 1 / 255, run.preprocessing.channels,
                      root=Path(pairs).parent, paths=np.asarray(files), sizes=np.zeros((len(files), 2), dtype=np.int64))
    emb = _finite(embed_batches(run.model, batches(images, np.arange(len(files)), run.preprocessing, default_workers(False))))
    where = {p: i for i, p in enumerate(files)}
    first, second = (np.asarray([where[row[k]] for row in rows]) for k in (0, 1))
    d = rowwise_distances(emb[first], emb[second], run.loss.distance.name, run.loss.distance.weights_array())
    return {
        "run": str(run_dir),
        "pairs": str(pairs),
        "num_pairs": len(rows),
        "num_same": int(same.sum()),
        "num_images": len(files),
        "distance": run.loss.distance.name,
        **verification_metrics(d[same], d[~same]),
    }


def default_output(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / ("evaluation.json" if split == "test" else f"evaluation-{split}.json")
