"""From an ``ImageSet`` to batches of model inputs, decoded on demand in worker processes.

``ImageDataset`` reads, resizes (or augments) and normalises the images of one split, a whole
batch per call; ``KeyedBatches`` gives each sample of the P x K batches its own augmentation
seed; ``batches`` and ``train_loader`` wrap them in torch DataLoaders; ``cache`` decodes a file
set once into memory when it fits a budget.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from device_bench.preprocessing import ImageError, Preprocessing

from .augment import augmentation
from .data import ImageSet, PKSampler, whole_batch
from .errors import UserError
from .progress import progress_bar


def default_workers(in_memory: bool, augment: str = "none") -> int:
    """Loader processes: none for images already in memory and not augmented, else one per core
    but one (at most 8). Augmenting in the training process is slow: its torch ops compete
    for the threads training uses."""
    return 0 if in_memory and augment == "none" else max(1, min(8, (os.cpu_count() or 1) - 1))


class ImageDataset(Dataset):
    """Rows of an ``ImageSet`` -> ``(inputs (B, C, H, W) float32, labels (B,))``, a batch at a time.

    A key is a row number, or ``(row, seed)`` when the batch is augmented: that sample's random
    crop, flip and colour jitter are drawn from ``seed`` alone.
    """

    def __init__(self, images: ImageSet, rows: np.ndarray, preprocessing: Preprocessing, augment: str = "none", normalise: bool = True):
        self.images, self.rows, self.preprocessing, self.normalise = images, rows, preprocessing, normalise
        self.augment = augmentation(augment, preprocessing.resize)

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, key) -> np.ndarray:
        if self.augment is None:
            return self.preprocessing.resized(self.images.read(self.rows[key]))
        row, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.augment(self.preprocessing.with_channels(self.images.read(self.rows[row])))

    def __getitems__(self, keys: list) -> tuple[torch.Tensor, torch.Tensor] | str:
        """The batch, or the message of its first unreadable image (a worker's exception would
        reach the main process as a traceback)."""
        rows = [k[0] if isinstance(k, tuple) else k for k in keys]
        try:
            images = np.stack([self._image(k) for k in keys])
        except ImageError as exc:
            return str(exc)
        inputs = self.preprocessing(images) if self.normalise else images
        return torch.from_numpy(inputs), torch.from_numpy(self.images.labels[self.rows[rows]])


class Batches(DataLoader):
    """A DataLoader of ``ImageDataset`` batches that raises an unreadable image's message as one line."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, str):
                raise UserError(batch)
            yield batch


class KeyedBatches(Sampler[list[tuple[int, int]]]):
    """A ``PKSampler``'s batches with a seed per sample, drawn from (seed, epoch): ``set_epoch`` as the sampler's."""

    def __init__(self, sampler: PKSampler):
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.sampler.seed, self.sampler.epoch, 1])
        for batch in self.sampler:
            yield list(zip(batch, rng.integers(1, 2**62, size=len(batch)).tolist()))


def train_loader(images: ImageSet, rows: np.ndarray, preprocessing: Preprocessing, sampler: PKSampler, augment: str, workers: int) -> DataLoader:
    """The training batches of ``sampler`` (call ``loader.batch_sampler.set_epoch`` before each epoch)."""
    dataset = ImageDataset(images, rows, preprocessing, augment)
    batch_sampler = sampler if dataset.augment is None else KeyedBatches(sampler)
    return Batches(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=whole_batch)


def batches(images: ImageSet, rows: np.ndarray, preprocessing: Preprocessing, workers: int, batch_size: int = 256, normalise: bool = True) -> DataLoader:
    """``rows`` in order, preprocessed as in evaluation, in batches of ``batch_size``; with
    ``normalise=False`` the raw images at the input size, (B, H, W, C)."""
    sampler = BatchSampler(range(len(rows)), batch_size, drop_last=False)
    dataset = ImageDataset(images, rows, preprocessing, normalise=normalise)
    return Batches(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=whole_batch)


def cache(images: ImageSet, preprocessing: Preprocessing, budget_mb: float, workers: int, progress: bool) -> ImageSet:
    """A file set decoded once at the input size into one uint8 array, when it fits ``budget_mb``;
    else (or for a set already in memory) ``images`` unchanged. Augmentation then crops from
    the cached input-size images instead of the files."""
    height, width = preprocessing.resize
    needed_mb = len(images) * height * width * preprocessing.channels / 2**20
    if images.images is not None or needed_mb > budget_mb:
        return images
    held = np.empty((len(images), height, width, preprocessing.channels), dtype=np.uint8)
    bar = progress_bar(len(images), f"caching {needed_mb:.0f} MB of images", progress, unit="image")
    start = 0
    for raw, _ in batches(images, np.arange(len(images)), preprocessing, workers, normalise=False):
        held[start : start + len(raw)] = raw.numpy()
        start += len(raw)
        bar.update(len(raw))
    bar.close()
    return ImageSet(images.labels, images.class_names, images.scale, images.channels, images=held, skipped=images.skipped)
