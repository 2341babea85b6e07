"""Datasets, splits and the P x K sampler, on real data and real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_siamese.data import (
    FASHION_MNIST_DIR,
    PKSampler,
    from_index,
    index_dict,
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


def photo_folder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """Class folders of JPEG and PNG files of mixed sizes and modes (RGB, grey, RGBA, palette)."""
    rng = np.random.default_rng(1)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(12, 40, 2)
            image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            mode, suffix = [("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("P", "png")][i % 4]
            image.convert(mode).save(root / f"class{c}" / f"{i}.{suffix}")
    return root


def test_image_folder_of_mixed_sizes_is_indexed_not_loaded(tmp_path):
    root = photo_folder(tmp_path / "photos")
    (root / "class0" / ".DS_Store").write_bytes(b"\0")
    ds = load_dataset(str(root))
    assert ds.images is None and len(ds) == 12 and ds.channels == 3 and ds.common_size is None
    assert ds.class_names == ["class0", "class1", "class2"] and ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.paths[0] == "class0/0.jpg" and ds.read(1).shape == (*ds.sizes[1], 3)
    again = from_index(str(root), json.loads(json.dumps(index_dict(ds))))  # as index.json keeps it
    assert np.array_equal(again.read(5), ds.read(5)) and again.class_names == ds.class_names


def test_a_list_file_names_images_relative_to_itself(tmp_path):
    root = photo_folder(tmp_path / "photos")
    rows = [f"photos/class{c}/{i}.{'jpg' if i % 4 == 0 else 'png'},label{c}" for c in range(3) for i in range(4)]
    for name, sep, header in (("list.csv", ",", "path,label"), ("list.tsv", "\t", "path\tlabel")):
        (tmp_path / name).write_text("\n".join([header] + [r.replace(",", sep) for r in rows]) + "\n")
        ds = load_dataset(str(tmp_path / name))
        assert ds.class_names == ["label0", "label1", "label2"] and len(ds) == 12
        assert np.array_equal(ds.read(0), load_dataset(str(root)).read(0))


def test_all_grey_files_make_a_grey_dataset(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(np.full((9, 11), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = load_dataset(str(tmp_path))
    assert ds.channels == 1 and ds.common_size == (9, 11) and ds.read(1).shape == (9, 11, 1)


def test_skip_bad_leaves_unreadable_files_out_and_counts_them(tmp_path):
    root = photo_folder(tmp_path / "photos", per_class=3)
    (root / "class1" / "empty.jpg").write_bytes(b"")
    (root / "class2" / "truncated.png").write_bytes((root / "class2" / "1.png").read_bytes()[:60])
    with pytest.raises(UserError, match=r"empty\.jpg is not an image.*--skip-bad"):
        load_dataset(str(root))
    ds = load_dataset(str(root), skip_bad=True)
    assert len(ds) == 9 and len(ds.skipped) == 2 and all("is not an image" in s for s in ds.skipped)


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


@pytest.mark.parametrize("edit", [
    lambda i: i.pop("sizes"),
    lambda i: i.update(labels=[7] * len(i["labels"])),
    lambda i: i.update(paths=i["paths"][:-1]),
    lambda i: i["paths"].__setitem__(0, "../../etc/passwd"),
    lambda i: i["paths"].__setitem__(0, "/etc/passwd"),
])
def test_a_corrupt_index_is_one_clear_error(tmp_path, edit):
    index = index_dict(load_dataset(str(photo_folder(tmp_path / "photos"))))
    edit(index)
    with pytest.raises(UserError, match="index.json is corrupt.*train the run again"):
        from_index(str(tmp_path / "photos"), index)
