"""Datasets, seeded splits and the class-balanced P x K batch sampler.

Images are held as loaded, ``(N, H, W, C)``, with a ``scale`` that maps them to [0, 1];
``device_bench.preprocessing.Preprocessing`` turns them into the model's input, on the device as
in training. Nothing here downloads anything.
"""

from __future__ import annotations

import csv
import gzip
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from device_bench.preprocessing import ImageError, read_image

from .errors import UserError
from .progress import progress_bar

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class ImageSet:
    """A labelled set of images: held in memory (``images`` (N, H, W, C)) or read from files on
    demand (``paths`` under ``root``, decoded by ``device_bench.preprocessing.read_image``).

    Paths are a numpy string array, not a list: worker processes then share its pages instead of
    copying a Python object per file.
    """

    labels: np.ndarray  # (N,) in 0..C-1
    class_names: list[str]
    scale: float  # multiplies raw values into [0, 1]
    channels: int
    images: np.ndarray | None = None
    root: Path | None = None
    paths: np.ndarray | None = None
    sizes: np.ndarray | None = None  # (N, 2) height and width of each file
    skipped: list[str] = field(default_factory=list)  # "path: reason" for each file --skip-bad left out

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> np.ndarray:
        """Image ``i`` as stored: (H, W, C), uint8 for files."""
        if self.images is not None:
            return self.images[i]
        return read_image(self.root / str(self.paths[i]), self.channels)

    @property
    def common_size(self) -> tuple[int, int] | None:
        """(H, W) when every image has it, else None."""
        if self.images is not None:
            return int(self.images.shape[1]), int(self.images.shape[2])
        first = self.sizes[0]
        return (int(first[0]), int(first[1])) if (self.sizes == first).all() else None


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
    return ImageSet(d.target.astype(np.int64), [str(c) for c in range(10)], 1 / 16, 1, images=d.images[..., None].astype(np.uint8))


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
    return ImageSet(np.concatenate([train_y, test_y]).astype(np.int64), names, 1 / 255, 1, images=images)


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
    return ImageSet(labels.astype(np.int64), class_names, scale, int(images.shape[3]), images=images)


def whole_batch(batch):
    """A DataLoader's ``collate_fn`` for datasets that hand over their batches already made."""
    return batch


class _Probe(TorchDataset):
    """Each file decoded once: ``(height, width, channels)`` as stored, or why it cannot be read."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, int, int] | str:
        try:
            return read_image(self.files[i], None).shape
        except ImageError as exc:
            return str(exc)


def _index_files(source: str, root: Path, relative: list[str], labels: list[str], skip_bad: bool, workers: int, progress: bool) -> ImageSet:
    """Decode every file once (in ``workers`` processes): the readable ones with their sizes and
    labels; an unreadable one is a UserError, or with ``skip_bad`` left out and counted."""
    files = [root / r for r in relative]
    loader = DataLoader(_Probe(files), batch_size=64, num_workers=workers, collate_fn=whole_batch)
    bar = progress_bar(len(files), f"indexing {source}", progress, unit="image")
    results = []
    for batch in loader:
        for result in batch:
            if isinstance(result, str) and not skip_bad:
                bar.close()
                raise UserError(f"{result}; or pass --skip-bad to leave unreadable images out")
            results.append(result)
        bar.update(len(batch))
    bar.close()
    good = [i for i, r in enumerate(results) if not isinstance(r, str)]
    skipped = [results[i] for i, r in enumerate(results) if isinstance(r, str)]
    if not good:
        raise UserError(f"{source} has no readable images: {skipped[0] if skipped else 'it is empty'}")
    names, inverse = np.unique(np.asarray(labels)[good], return_inverse=True)
    shapes = np.asarray([results[i] for i in good], dtype=np.int64)
    image_set = ImageSet(
        inverse.astype(np.int64), [str(n) for n in names], 1 / 255, 1 if (shapes[:, 2] == 1).all() else 3,
        root=root, paths=np.asarray([relative[i] for i in good]), sizes=shapes[:, :2], skipped=skipped,
    )
    _check_classes(image_set.labels, image_set.class_names, source)
    return image_set


def _folder_files(root: Path) -> tuple[list[str], list[str]]:
    """Every non-hidden file of each class sub-folder: (paths relative to ``root``, class names)."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(f"{root} has no class sub-folders: put each class's images in a folder of its own")
    relative, labels = [], []
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        if len(files) < 2:
            raise UserError(f"class {class_dir.name!r} of {root} has {len(files)} image(s): each class needs at least 2 (add images or remove the folder)")
        relative += [f"{class_dir.name}/{p.name}" for p in files]
        labels += [class_dir.name] * len(files)
    return relative, labels


def stays_inside(relative: str) -> bool:
    """Whether a path read from a file (a list, an index) names something under its folder."""
    parts = Path(relative).parts
    return bool(parts) and not Path(relative).is_absolute() and ".." not in parts


def read_list(path: Path, header: tuple[str, ...]) -> list[list[str]]:
    """The rows of a CSV or TSV list (tab-separated when its first line has a tab), each with
    ``len(header)`` fields; a first row equal to ``header`` is skipped. Paths in it are relative
    to the list's folder, and each must exist."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file: write the list as UTF-8 CSV ({','.join(header)})") from None
    lines = text.splitlines()
    delimiter = "\t" if lines and "\t" in lines[0] else ","
    rows = [(n, [f.strip() for f in row]) for n, row in enumerate(csv.reader(lines, delimiter=delimiter), 1) if row and any(row)]
    if rows and [f.lower() for f in rows[0][1]] == list(header):
        rows = rows[1:]
    if not rows:
        raise UserError(f"{path} lists nothing: write one '{','.join(header)}' row per line")
    out = []
    for n, row in rows:
        if len(row) != len(header):
            raise UserError(f"{path}:{n} has {len(row)} field(s) where {len(header)} ({','.join(header)}) are expected: fix that line")
        for name, value in zip(header, row):
            if name.startswith("path") and not stays_inside(value):
                raise UserError(f"{path}:{n}: {value} leaves the list's folder: write paths relative to {path.parent}, without '..'")
            if name.startswith("path") and not (path.parent / value).is_file():
                raise UserError(f"{path}:{n}: {value} does not exist (paths are relative to {path.parent}): fix the list or move the file")
        out.append(row)
    return out


def _list_files(path: Path) -> tuple[list[str], list[str]]:
    rows = read_list(path, ("path", "label"))
    return [r[0] for r in rows], [r[1] for r in rows]


LISTS = (".csv", ".tsv", ".txt")
INDEX = "index.json"  # the file index a run keeps, so that its images are not scanned again


def load_files(name: str, skip_bad: bool = False, workers: int = 0, progress: bool = False) -> ImageSet:
    """An image folder (one sub-folder per class) or a CSV/TSV list (``path,label``), indexed."""
    path = Path(name)
    root, (relative, labels) = (path, _folder_files(path)) if path.is_dir() else (path.parent, _list_files(path))
    return _index_files(name, root, relative, labels, skip_bad, workers, progress)


def index_dict(images: ImageSet) -> dict:
    """A file set's index, as the run folder's ``index.json`` keeps it (paths relative to its root)."""
    return {
        "channels": images.channels,
        "class_names": images.class_names,
        "paths": images.paths.tolist(),
        "labels": images.labels.tolist(),
        "sizes": images.sizes.tolist(),
        "skipped": images.skipped,
    }


def from_index(name: str, index: dict) -> ImageSet:
    """The file set ``index_dict`` describes, its files under ``name`` (a folder, or a list's folder)."""
    path = Path(name)
    root = path if path.is_dir() or not path.suffix else path.parent
    try:
        labels = np.asarray(index["labels"], dtype=np.int64)
        images = ImageSet(labels, [str(c) for c in index["class_names"]], 1 / 255, int(index["channels"]), root=root,
                          paths=np.asarray(index["paths"], dtype=str), sizes=np.asarray(index["sizes"], dtype=np.int64).reshape(-1, 2),
                          skipped=[str(s) for s in index["skipped"]])
        if not (len(images.paths) == len(labels) == len(images.sizes)) or labels.min() < 0 or labels.max() >= len(images.class_names):
            raise ValueError("its paths, labels and sizes do not match")
        if outside := [p for p in images.paths if not stays_inside(str(p))][:1]:
            raise ValueError(f"{outside[0]} is not under the dataset's folder")
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"the run's {INDEX} is corrupt ({exc}): train the run again") from None
    return images


DATASETS = ("digits", "fashion-mnist")


def load_dataset(name: str, skip_bad: bool = False, workers: int = 0, progress: bool = False) -> ImageSet:
    """``digits``, ``fashion-mnist``, an ``.npz`` file, an image folder or a CSV/TSV list of images."""
    if name == "digits":
        return load_digits_dataset()
    if name == "fashion-mnist":
        return load_fashion_mnist()
    path = Path(name)
    if path.suffix == ".npz" and path.is_file():
        return load_npz(path)
    if path.is_dir() or (path.suffix in LISTS and path.is_file()):
        return load_files(name, skip_bad, workers, progress)
    raise UserError(
        f"unknown dataset {name!r}: use {' or '.join(DATASETS)}, an image folder (one sub-folder per class), "
        f"a CSV/TSV list (path,label) or an .npz file"
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
