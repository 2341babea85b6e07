"""Evaluate a finished run on one of its splits with the torch-free metrics the device also uses."""

from __future__ import annotations

from pathlib import Path

from .checkpoints import load_run
from .train import prepare_data, resolve_device, validation_metrics

SPLIT_NAMES = ("test", "val", "train")


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
