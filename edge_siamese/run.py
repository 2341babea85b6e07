"""The run's data: a config's dataset loaded (or its file index read), split, and preprocessed as
training, evaluation and export all see it, in batches that are decoded on demand."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from device_bench.preprocessing import Preprocessing

from . import loader, timm_models
from .config import TrainConfig
from .data import INDEX, ImageSet, PKSampler, from_index, index_dict, load_dataset, split_dataset
from .errors import UserError

STATS_SAMPLES = 2048  # training images the per-channel mean and std are measured on


@dataclass
class PreparedData:
    """A dataset split and preprocessed as a config says."""

    dataset: ImageSet
    splits: dict[str, np.ndarray]
    preprocessing: Preprocessing
    workers: int
    files: ImageSet | None  # the file set before any cache, for its index; None for arrays

    @property
    def index(self) -> dict | None:
        """A file set's index, what the run folder keeps as index.json; None for arrays."""
        return None if self.files is None else index_dict(self.files)

    def rows(self, split: str, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        return self.splits[split][rows]

    def images(self, split: str, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Raw images of ``split`` (``rows`` of it) at the input size, (n, H, W, C), dtype as stored."""
        return np.stack([self.preprocessing.resized(self.dataset.read(i)) for i in self.rows(split, rows)])

    def inputs(self, split: str, rows: np.ndarray | slice = slice(None)) -> torch.Tensor:
        """The model's input for a few images of ``split`` (``rows`` of it), in memory at once."""
        return torch.from_numpy(self.preprocessing(self.images(split, rows)))

    def labels(self, split: str, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        return self.dataset.labels[self.rows(split, rows)]

    def batches(self, split: str, batch_size: int = 256) -> DataLoader:
        """``(inputs, labels)`` of the whole of ``split`` in order, a batch at a time."""
        return loader.batches(self.dataset, self.rows(split), self.preprocessing, self.workers, batch_size)

    def train_loader(self, sampler: PKSampler, augment: str) -> DataLoader:
        return loader.train_loader(self.dataset, self.rows("train"), self.preprocessing, sampler, augment, self.workers)


def read_index(run_dir: Path) -> dict | None:
    """The file index a run keeps (``index.json``), or None when its dataset is not a file set."""
    path = Path(run_dir) / INDEX
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise UserError(f"{path} is corrupt ({exc}): train the run again") from None


def prepare_data(config: TrainConfig, preprocessing: Preprocessing | None = None, index: dict | None = None, progress: bool = False) -> PreparedData:
    """Load (or, with a run's ``index``, re-open) and split the dataset; measure the preprocessing
    on training images unless one is given."""
    file_workers = config.workers if config.workers is not None else loader.default_workers(False, config.augment)
    if index is not None:
        dataset = from_index(config.dataset, index)
    else:
        dataset = load_dataset(config.dataset, config.skip_bad, file_workers, progress)
    in_memory = dataset.images is not None
    if preprocessing is not None and not in_memory:
        dataset.channels = preprocessing.channels  # files are decoded straight into the model's channels
    workers = config.workers if config.workers is not None else loader.default_workers(in_memory, config.augment)
    size = tuple(preprocessing.resize) if preprocessing else _input_size(config, dataset)
    splits = split_dataset(dataset.labels, config.split, config.test_fraction, config.val_fraction, config.split_seed)
    for name in ("train", "val", "test"):
        _, counts = np.unique(dataset.labels[splits[name]], return_counts=True)
        if len(counts) < 2 or counts.max() < 2:  # what retrieval metrics need: a query with a same-class neighbour
            raise UserError(
                f"the {name} split of {config.dataset} has {counts.sum()} images in {len(counts)} classes, too few to measure "
                "retrieval (it needs 2 classes, one with 2 images): use a larger dataset or other fractions"
            )
    if preprocessing is None:
        preprocessing = _measure(config, dataset, size, splits["train"], workers)
    files = dataset if dataset.images is None else None
    dataset = loader.cache(dataset, preprocessing, config.cache_mb, workers, progress)
    return PreparedData(dataset, splits, preprocessing, workers, files)


def _input_size(config: TrainConfig, dataset: ImageSet) -> tuple[int, int]:
    """``--input-size``, else the input size of the ``--pretrained`` weights, else the images' own
    size when they all share one."""
    if config.input_size:
        return tuple(config.input_size)
    if config.pretrained is not None:
        return timm_models.pretrained_config(config.backbone)["input_size"]
    size = dataset.common_size
    if size is None:
        (h1, w1), (h2, w2) = dataset.sizes[0], dataset.sizes[np.flatnonzero((dataset.sizes != dataset.sizes[0]).any(axis=1))[0]]
        raise UserError(f"the images of {config.dataset} have several sizes (e.g. {h1}x{w1} and {h2}x{w2}, HxW): pass --input-size H[xW], e.g. --input-size 112")
    return size


def _measure(config: TrainConfig, dataset: ImageSet, size: tuple[int, int], train_rows: np.ndarray, workers: int) -> Preprocessing:
    """The preprocessing of a new run: its input size and resize mode, and the per-channel mean
    and std of (at most ``STATS_SAMPLES``) training images at that size; with pretrained weights,
    the mean and std those were trained with (averaged over RGB for grey data)."""
    channels = dataset.channels
    if config.pretrained is not None:
        cfg = timm_models.pretrained_config(config.backbone)
        mean, std = cfg["mean"], cfg["std"]
        if channels != len(mean):
            mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
        return Preprocessing(size, channels, dataset.scale, tuple(map(float, mean)), tuple(map(float, std)), config.resize_mode)
    sample = train_rows
    if len(sample) > STATS_SAMPLES:
        sample = np.sort(np.random.default_rng(config.split_seed).choice(train_rows, STATS_SAMPLES, replace=False))
    unmeasured = Preprocessing(size, channels, dataset.scale, (0.0,) * channels, (1.0,) * channels, config.resize_mode)
    images = np.concatenate([raw.numpy() for raw, _ in loader.batches(dataset, sample, unmeasured, workers, normalise=False)])
    return Preprocessing.fit(images, dataset.scale, config.resize_mode)
