"""Figures written beside results (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from device_bench.files import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported when a figure is drawn, not when a command
    starts (it costs about half a second)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: list[dict], path: Path, title: str) -> None:
    """Training loss and validation precision@1 / MAP@R per epoch."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker=".")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title=title)
    ax_val.plot(epochs, [h["val_precision_at_1"] for h in history], marker=".", label="precision@1")
    ax_val.plot(epochs, [h["val_mean_average_precision_at_r"] for h in history], marker=".", label="MAP@R")
    ax_val.set(xlabel="epoch", ylabel="validation", ylim=(0, 1.02))
    ax_val.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
