"""Datasets, seeded splits and the class-balanced P x K batch sampler.

Images are held as loaded, ``(N, H, W, C)``, with a ``scale`` that maps them to [0, 1];
``device_bench.preprocessing.Preprocessing`` turns them into the model's input, on the device as
in training. Nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Sampler

from .errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class ImageSet:
    """A labelled set of same-sized images, ``images`` ``(N, H, W, C)``, ``labels`` ``(N,)`` in 0..C-1."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    scale: float  # multiplies raw values into [0, 1]

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])


MAX_PIXEL = 1e4  # scaled pixel values are meant to lie in [0, 1]; far beyond that they are not pixels


def check_pixels(images: np.ndarray, scale: float, source: str) -> None:
    """Every pixel finite and of a size pixels have after scaling; else a UserError naming the first bad image."""
    if np.issubdtype(images.dtype, np.integer):
        return  # integers are finite, and a uint8 or uint16 image is in range
    flat = images.reshape(len(images), -1).astype(np.float64) * scale
    bad = ~(np.isfinite(flat) & (np.abs(flat) <= MAX_PIXEL))
    if bad.any():
        index = int(np.argwhere(bad.any(axis=1))[0][0])
        value = images.reshape(len(images), -1)[index][bad[index]][0]
        raise UserError(f"{source}: image {index} has the pixel value {value}: pixels must be finite, in [0, 1] for floats or [0, 255] for uint8")


def _check_classes(labels: np.ndarray, class_names: list[str], source: str) -> None:
    counts = np.bincount(labels, minlength=len(class_names))
    if len(class_names) < 2:
        raise UserError(f"{source} has {len(class_names)} class: metric learning needs at least 2")
    for name, count in zip(class_names, counts):
        if count < 2:
            raise UserError(
                f"class {name!r} of {source} has {count} image(s): each class needs at least 2 (add images or remove it)"
            )


def load_digits_dataset() -> ImageSet:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), shipped with it."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return ImageSet(d.images[..., None].astype(np.uint8), d.target.astype(np.int64), [str(c) for c in range(10)], 1 / 16)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR) -> ImageSet:
    """Fashion-MNIST's 70,000 28x28 images (train + test files together; ``split_dataset`` splits)."""
    files = [root / f"{p}-{k}-idx{n}-ubyte.gz" for p in ("train", "t10k") for k, n in (("images", 3), ("labels", 1))]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise UserError(f"Fashion-MNIST not found at {missing[0]}: install it with 'apt-get install dataset-fashion-mnist'")
    try:
        train_x, train_y, test_x, test_y = (_read_idx(f) for f in files)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"Fashion-MNIST files in {root} are corrupt ({exc}): reinstall dataset-fashion-mnist") from None
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    images = np.concatenate([train_x, test_x])[..., None]
    return ImageSet(images, np.concatenate([train_y, test_y]).astype(np.int64), names, 1 / 255)


def _to_nhwc(images: np.ndarray, source: str) -> np.ndarray:
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return images
    raise UserError(f"{source}: images must be (N, H, W) or (N, H, W, C) with C = 1 or 3, got shape {images.shape}")


def load_npz(path: Path) -> ImageSet:
    """An ``.npz`` with ``images`` (N, H, W[, C]) and ``labels`` (N,) arrays; uint8 is scaled by 1/255."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError("it holds one array, not named arrays")
            if "images" not in f or "labels" not in f:
                raise UserError(f"{path} needs arrays named 'images' and 'labels', found: {', '.join(f.files) or 'none'}")
            images, raw_labels = f["images"], f["labels"]
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # EOFError: an empty file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {path} as .npz ({reason}): save it with numpy.savez(images=..., labels=...)") from None
    images = _to_nhwc(images, str(path))
    if raw_labels.shape != (len(images),):
        raise UserError(f"{path}: labels must be (N,) with N = {len(images)}, got shape {raw_labels.shape}")
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise UserError(f"{path}: images must be numbers, got dtype {images.dtype}")
    names, labels = np.unique(raw_labels, return_inverse=True)
    class_names = [str(n) for n in names]
    _check_classes(labels, class_names, str(path))
    scale = 1 / 255 if images.dtype == np.uint8 else 1.0
    check_pixels(images, scale, str(path))
    return ImageSet(images, labels.astype(np.int64), class_names, scale)


def load_image_folder(root: Path) -> ImageSet:
    """One sub-folder per class, all images of one size and one channel count (grey or RGB)."""
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(f"{root} has no class sub-folders: put each class's images in a folder of its own")
    images, labels, first = [], [], None
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
            try:
                with Image.open(path) as im:
                    im = im.convert("L" if im.mode in ("L", "LA", "1", "I", "I;16", "F") else "RGB")
                    array = np.asarray(im, dtype=np.uint8)
            except Image.DecompressionBombError:
                raise UserError(f"{path} has more pixels than are safe to decode (a decompression bomb?): shrink it or remove it") from None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # SyntaxError: Pillow's word for a broken PNG
                raise UserError(f"{path} is not an image this tool can read (empty, truncated or not an image): remove it or convert it to PNG") from None
            array = array[..., None] if array.ndim == 2 else array
            if first is None:
                first = (path, array.shape)
            elif array.shape != first[1]:
                raise UserError(
                    f"mixed image sizes or channels: {path} is {_describe(array.shape)} but {first[0]} is "
                    f"{_describe(first[1])}; convert them all to one size and mode first"
                )
            images.append(array)
            labels.append(label)
    class_names = [p.name for p in class_dirs]
    labels_arr = np.asarray(labels, dtype=np.int64)
    _check_classes(labels_arr, class_names, str(root))
    return ImageSet(np.stack(images), labels_arr, class_names, 1 / 255)


def _describe(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]} {'grey' if shape[2] == 1 else 'RGB'}"


DATASETS = ("digits", "fashion-mnist")


def load_dataset(name: str) -> ImageSet:
    """``digits``, ``fashion-mnist``, an image folder or an ``.npz`` file."""
    if name == "digits":
        return load_digits_dataset()
    if name == "fashion-mnist":
        return load_fashion_mnist()
    path = Path(name)
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix == ".npz" and path.is_file():
        return load_npz(path)
    raise UserError(
        f"unknown dataset {name!r}: use {' or '.join(DATASETS)}, an image folder (one sub-folder per class) or an .npz file"
    )


SPLITS = ("samples", "classes")


def split_dataset(
    labels: np.ndarray, split: str = "samples", test_fraction: float | None = None, val_fraction: float = 0.1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded ``train`` / ``val`` / ``test`` index arrays.

    ``samples`` (closed set): each class is split by ``test_fraction`` (default 0.2).
    ``classes`` (open set, the metric-learning protocol): ``test_fraction`` (default 0.5) of the
    classes are held out whole, never seen in training. ``val`` is ``val_fraction`` of each
    training class's samples in both cases.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use 'samples' (closed set) or 'classes' (open set)")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    if split == "classes":
        fraction = 0.5 if test_fraction is None else test_fraction
        n_test = int(round(fraction * len(classes)))
        if not 2 <= n_test <= len(classes) - 2:
            raise UserError(
                f"a class split needs at least 2 training and 2 test classes; {len(classes)} classes with "
                f"test fraction {fraction} gives {n_test} test classes"
            )
        test_classes = set(rng.permutation(classes)[:n_test].tolist())
    else:
        fraction = 0.2 if test_fraction is None else test_fraction
        test_classes = set()
    for c, idx in by_class.items():
        if c in test_classes:
            parts["test"].append(idx)
            continue
        n_test = 0 if split == "classes" else int(round(fraction * len(idx)))
        n_val = int(round(val_fraction * len(idx)))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


class PKSampler(Sampler[list[int]]):
    """Batches of P classes x K samples each (class-balanced), for in-batch mining.

    A class with fewer than K samples is drawn with replacement. ``set_epoch`` reseeds, so that
    epoch e always yields the same batches (a resumed run sees what it would have seen).
    Usable as a ``DataLoader`` ``batch_sampler``.
    """

    def __init__(self, labels: np.ndarray, classes_per_batch: int, samples_per_class: int, num_batches: int, seed: int = 0):
        self.by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self.classes_per_batch = min(classes_per_batch, len(self.by_class))
        self.samples_per_class = samples_per_class
        self.num_batches = num_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.num_batches):
            batch = []
            for c in rng.choice(len(self.by_class), self.classes_per_batch, replace=False):
                idx = self.by_class[c]
                batch.extend(rng.choice(idx, self.samples_per_class, replace=len(idx) < self.samples_per_class).tolist())
            yield batch
