"""edge_siamese.loader and augment: batches decoded from files equal the in-memory path, worker
processes change nothing, augmentation is seeded per sample and reaches training batches only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from device_bench.preprocessing import Preprocessing
from edge_siamese.augment import AUGMENTS, augmentation
from edge_siamese.data import PKSampler, load_dataset
from edge_siamese.loader import batches, cache, train_loader

SIZE = (16, 16)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """12 RGB JPEG/PNG files of mixed sizes in 3 class folders."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(4):
            h, w = rng.integers(14, 40, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.{'jpg' if i % 2 else 'png'}")
    return load_dataset(str(root))


def preprocessing(channels: int = 3) -> Preprocessing:
    return Preprocessing(SIZE, channels, 1 / 255, (0.5,) * channels, (0.25,) * channels)


def as_array(loader) -> tuple[np.ndarray, np.ndarray]:
    parts = list(loader)
    return torch.cat([x for x, _ in parts]).numpy(), torch.cat([y for _, y in parts]).numpy()


def test_batches_from_files_equal_the_images_preprocessed_at_once(photos):
    pre, rows = preprocessing(), np.arange(len(photos))
    expected = pre([photos.read(i) for i in rows])
    for workers in (0, 2):
        inputs, labels = as_array(batches(photos, rows, pre, workers, batch_size=5))
        np.testing.assert_array_equal(inputs, expected)
        np.testing.assert_array_equal(labels, photos.labels)


def test_the_cache_holds_what_the_files_give(photos):
    pre = preprocessing()
    held = cache(photos, pre, budget_mb=1, workers=0, progress=False)
    assert held.images is not None and held.images.shape == (12, *SIZE, 3) and held.images.dtype == np.uint8
    np.testing.assert_array_equal(as_array(batches(held, np.arange(12), pre, 0))[0], as_array(batches(photos, np.arange(12), pre, 0))[0])
    assert cache(photos, pre, budget_mb=12 * 16 * 16 * 3 / 2**20 * 0.99, workers=0, progress=False) is photos  # does not fit: streamed


def epoch_of(photos, augment: str, workers: int, epoch: int, seed: int = 0):
    sampler = PKSampler(photos.labels, 3, 2, num_batches=3, seed=seed)
    loader = train_loader(photos, np.arange(len(photos)), preprocessing(), sampler, augment, workers)
    loader.batch_sampler.set_epoch(epoch)
    return as_array(loader)


def test_augmentation_is_seeded_per_sample_so_workers_and_resumes_change_nothing(photos):
    first = epoch_of(photos, "standard", workers=0, epoch=1)
    np.testing.assert_array_equal(epoch_of(photos, "standard", workers=2, epoch=1)[0], first[0])
    assert not np.array_equal(epoch_of(photos, "standard", workers=0, epoch=2)[0], first[0])
    plain = epoch_of(photos, "none", workers=0, epoch=1)
    np.testing.assert_array_equal(plain[1], first[1])  # the same P x K batches, augmented or not
    assert not np.array_equal(plain[0], first[0])


@pytest.mark.parametrize("name", [n for n, spec in AUGMENTS.items() if spec.crop_scale])
@pytest.mark.parametrize("channels", [1, 3])
def test_each_policy_keeps_the_input_size_and_dtype(name, channels):
    image = np.random.default_rng(1).integers(0, 256, (30, 50, channels), dtype=np.uint8)
    torch.manual_seed(0)
    out = augmentation(name, SIZE)(image)
    assert out.shape == (*SIZE, channels) and out.dtype == np.uint8
    assert augmentation("none", SIZE) is None
