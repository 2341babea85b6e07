"""The run's data: a config's dataset loaded, split and preprocessed, as training, evaluation and
export all see it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from device_bench.preprocessing import Preprocessing

from .config import TrainConfig
from .data import ImageSet, load_dataset, split_dataset
from .errors import UserError


@dataclass
class PreparedData:
    """A dataset split and preprocessed as a config says."""

    dataset: ImageSet
    splits: dict[str, np.ndarray]
    preprocessing: Preprocessing

    def images(self, split: str, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Raw images of ``split`` (``rows`` of it), as the dataset holds them."""
        return self.dataset.images[self.splits[split][rows]]

    def inputs(self, split: str, rows: np.ndarray | slice = slice(None)) -> torch.Tensor:
        """The model's input for ``split`` (``rows`` of it): only those images are preprocessed."""
        return torch.from_numpy(self.preprocessing(self.images(split, rows)))

    def labels(self, split: str, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        return self.dataset.labels[self.splits[split][rows]]


def prepare_data(config: TrainConfig, preprocessing: Preprocessing | None = None) -> PreparedData:
    """Load and split the dataset; fit the preprocessing on the training split unless one is given."""
    dataset = load_dataset(config.dataset)
    splits = split_dataset(dataset.labels, config.split, config.test_fraction, config.val_fraction, config.split_seed)
    for name in ("train", "val", "test"):
        _, counts = np.unique(dataset.labels[splits[name]], return_counts=True)
        if len(counts) < 2 or counts.max() < 2:  # what retrieval metrics need: a query with a same-class neighbour
            raise UserError(
                f"the {name} split of {config.dataset} has {counts.sum()} images in {len(counts)} classes, too few to measure "
                "retrieval (it needs 2 classes, one with 2 images): use a larger dataset or other fractions"
            )
    if preprocessing is None:
        preprocessing = Preprocessing.fit(dataset.images[splits["train"]], dataset.scale)
    elif (preprocessing.resize, preprocessing.channels) != (dataset.input_size, dataset.channels):
        raise UserError(
            f"{config.dataset} now holds {dataset.input_size} images with {dataset.channels} channel(s), "
            f"but the run was trained on {preprocessing.resize} with {preprocessing.channels}"
        )
    return PreparedData(dataset, splits, preprocessing)
