"""Datasets, splits and the P x K sampler, on real data and real files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edge_siamese.data import (
    FASHION_MNIST_DIR,
    PKSampler,
    load_dataset,
    load_fashion_mnist,
    load_npz,
    split_dataset,
)
from edge_siamese.errors import UserError


def test_digits_is_the_embedded_default():
    ds = load_dataset("digits")
    assert ds.images.shape == (1797, 8, 8, 1) and ds.labels.shape == (1797,)
    assert ds.class_names == [str(i) for i in range(10)]
    assert ds.images.max() * ds.scale == pytest.approx(1.0)


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="apt-get install dataset-fashion-mnist (CI installs it)")
def test_fashion_mnist_from_the_debian_package():
    ds = load_dataset("fashion-mnist")
    assert ds.images.shape == (70000, 28, 28, 1) and ds.images.dtype == np.uint8
    assert np.bincount(ds.labels).tolist() == [7000] * 10
    assert ds.class_names[9] == "Ankle boot"


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_npz_round_trip_with_string_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (12, 10, 10, 3), dtype=np.uint8)
    labels = np.array(["cat", "dog", "owl"] * 4)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.class_names == ["cat", "dog", "owl"] and ds.channels == 3 and ds.scale == pytest.approx(1 / 255)
    assert np.array_equal(ds.images, images) and ds.labels.tolist() == [0, 1, 2] * 4


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"x": np.zeros((4, 8, 8))}, "'images' and 'labels'"),
        ({"images": np.zeros((4, 8)), "labels": np.arange(4) % 2}, "(N, H, W)"),
        ({"images": np.zeros((4, 8, 8)), "labels": np.arange(3)}, "labels must be (N,)"),
        ({"images": np.zeros((4, 8, 8)), "labels": np.array([0, 0, 0, 1])}, "needs at least 2"),
        ({"images": np.array([None] * 4, dtype=object), "labels": np.arange(4) % 2}, "cannot read"),
    ],
)
def test_bad_npz_files(tmp_path, arrays, fragment):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError) as err:
        load_npz(tmp_path / "bad.npz")
    assert fragment in str(err.value)


def test_image_folder_rgb(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("left", "right"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "left" / ".DS_Store").write_bytes(b"\0")
    ds = load_dataset(str(tmp_path))
    assert ds.images.shape == (6, 9, 11, 3) and ds.class_names == ["left", "right"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("split", ["samples", "classes"])
def test_splits_are_seeded_disjoint_and_complete(split):
    labels = load_dataset("digits").labels
    a = split_dataset(labels, split, seed=3)
    assert all(np.array_equal(a[k], v) for k, v in split_dataset(labels, split, seed=3).items())
    assert not np.array_equal(a["test"], split_dataset(labels, split, seed=4)["test"])
    everything = np.concatenate(list(a.values()))
    assert len(everything) == len(labels) == len(np.unique(everything))
    train_classes, test_classes = set(labels[a["train"]]), set(labels[a["test"]])
    if split == "classes":
        assert len(test_classes) == 5 and not train_classes & test_classes
        assert set(labels[a["val"]]) <= train_classes
    else:
        assert train_classes == test_classes == set(range(10))
        assert len(a["test"]) == pytest.approx(0.2 * len(labels), abs=10)


def test_class_split_needs_enough_classes():
    with pytest.raises(UserError, match="at least 2 training and 2 test classes"):
        split_dataset(np.repeat(np.arange(3), 5), "classes")


def test_pk_sampler_batches_are_class_balanced_and_seeded():
    labels = np.repeat(np.arange(10), [30] * 9 + [3])
    sampler = PKSampler(labels, classes_per_batch=4, samples_per_class=5, num_batches=20, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    for batch in batches:
        counts = np.bincount(labels[batch], minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [5, 5, 5, 5]
    assert batches == list(sampler)
    sampler.set_epoch(1)
    assert batches != list(sampler)
