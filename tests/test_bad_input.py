"""Bad input through the real commands (``edge-siamese``, ``python -m device_bench``, the Node
verifier): one line on stderr starting with ``error: `` that says what is wrong, exit status 2, no
traceback, and nothing half-written where the output would have gone.

The Node verifier has its own convention for an unusable bundle: exit 1 and one JSON object on
stdout whose ``error`` is one line (exit 2 is for a usage mistake).

Each case builds its bad input in a folder of its own and names the command to run there. The
cases are independent subprocesses, so the module runs the selected ones together (a few at a
time: most of each run is importing torch) and each test then reads its case's outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CLI, copy_bundle

ROOT = Path(__file__).resolve().parents[1]
VERIFY = ROOT / "clients" / "node" / "verify.mjs"
PAGE_MODULES = ROOT / "edge_siamese" / "app" / "web" / "node_modules"
NODE = shutil.which("node")
WORKERS = max(2, min(6, os.cpu_count() or 2))

# Any one of these says that a value is NaN or infinite.
NON_FINITE = ("nan", "inf", "finite")
# python -m device_bench options that keep a benchmark short: one file, one run, a tiny gallery.
QUICK_DEVICE_BENCH = ["--format", "onnx", "--precision", "fp32", "--warmup", "0", "--gallery", "10", "--batch", "1"]
QUICK_BENCH = ["--format", "onnx", "--precision", "fp32", "--warmup", "0", "--runs", "1", "--gallery", "10", "--batch", "1"]
# The smallest compare: two 1-epoch runs, ONNX only.
TINY_COMPARE = {"--seeds": "1", "--epochs": "1", "--trials": "1", "--dims": "4", "--losses": "shadow", "--baseline-dim": "8", "--formats": "onnx"}


@dataclass
class Case:
    """A command expected to refuse its input.

    ``fragments``: each must appear in the error line (case-insensitive); a tuple of strings is
    any one of them. ``stdout_lacks``: what must not be printed (the results of work that should
    not have started).
    ``node``: the Node verifier's convention instead (one JSON object on stdout, exit 1).
    """

    command: list[str]
    fragments: tuple = ()
    status: int = 2
    cwd: Path | None = None
    timeout: float = 120
    stdout_lacks: tuple[str, ...] = ()
    node: bool = False


@dataclass
class Outcome:
    case: Case | None = None
    skip: str = ""
    setup_error: str = ""
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    stragglers: bool = False
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)


class Skip(Exception):
    """A case that cannot be set up on this machine."""


def edge_siamese(*args) -> list[str]:
    return [str(CLI), *map(str, args)]


def device_bench(*args) -> list[str]:
    return [sys.executable, "-m", "device_bench", *map(str, args)]


def verify_mjs(bundle: Path) -> list[str]:
    if NODE is None:
        raise Skip("node is not installed")
    return [NODE, str(VERIFY), str(bundle)]


def demo(bundle: Path) -> list[str]:
    if not (PAGE_MODULES / "onnxruntime-web" / "package.json").is_file():
        raise Skip("the page's node_modules is absent: run npm ci --prefix edge_siamese/app/web")
    return edge_siamese("demo", bundle, "--port", "0")


def tiny_compare(out: Path, **changes: str) -> list[str]:
    options = {**TINY_COMPARE, **{f"--{k.replace('_', '-')}": v for k, v in changes.items()}}
    return edge_siamese("compare", *[x for kv in options.items() for x in kv], "--quiet", "--out", out)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``, hidden ones too: files by (size, mtime), folders and links by kind."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            out[str(path.relative_to(root))] = (kind, st.st_size, st.st_mtime_ns) if stat.S_ISREG(kind) else (kind,)
    return out


def describe_change(before: dict, after: dict) -> str:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"new: {new}; removed: {gone}; changed: {changed}"


class Ctx:
    """What a case builds its input from: its own folder, the shared run and bundle (read only:
    copied before any change), cheap bad files, and read-only mounts (undone after the module)."""

    def __init__(self, root: Path, request, mounts: list[Path], shared: dict[str, Path]):
        self.root = root
        self.request = request
        self.mounts = mounts
        self.shared = shared

    def _fixture(self, name: str) -> Path:
        self.shared[name] = self.request.getfixturevalue(name)
        return self.shared[name]

    @property
    def run(self) -> Path:
        return self._fixture("shadow_run")

    @property
    def bundle(self) -> Path:
        return self._fixture("client_bundle")

    def path(self, name: str) -> Path:
        return self.root / name

    def file(self, name: str, data: bytes = b"") -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True)
        return path

    def run_copy(self, name: str = "run", skip: tuple[str, ...] = ()) -> Path:
        """The shared run's files (not its bundle, other folders, or the evaluation results other
        modules' tests may have written into it) in a folder of this case."""
        dest = self.folder(name)
        for path in self.run.iterdir():
            if path.is_file() and path.name not in skip and not path.name.startswith("evaluation"):
                shutil.copy2(path, dest / path.name)
        return dest

    def interrupted_run(self) -> Path:
        """A copy of the run as an interrupted one is left: config.json and checkpoint.pt."""
        return self.run_copy("run", skip=("metrics.json", "model.safetensors", "training_curves.png", "evaluation.json"))

    def bundle_copy(self, edit=None, name: str = "bundle") -> Path:
        return copy_bundle(self.bundle, self.root / name, edit)

    def read_only(self, name: str = "readonly-mount") -> Path:
        """An empty folder nothing can be written to: a read-only tmpfs as root (permissions do
        not stop root), mode 0o555 otherwise."""
        path = self.folder(name)
        if os.geteuid() != 0:
            path.chmod(0o555)
            return path
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise Skip(f"cannot mount a read-only tmpfs: {proc.stderr.strip()}")
        self.mounts.append(path)
        return path

    def npz(self, name: str, **arrays) -> Path:
        path = self.root / name
        np.savez(path, **arrays)
        return path


def good_images(n_classes: int = 4, per_class: int = 20, dtype=np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """A small dataset that trains: 8x8 grey images, ``n_classes`` classes."""
    images = np.random.default_rng(0).integers(0, 255, (n_classes * per_class, 8, 8)).astype(dtype)
    return images, np.repeat(np.arange(n_classes), per_class)


def float_images_with(value: float, where=(0, 3, 3)) -> tuple[np.ndarray, np.ndarray]:
    images, labels = good_images(dtype=np.float64)
    images /= 255
    images[where] = value
    return images, labels


def png_bytes(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A grey 1-bit PNG's bytes: its header says ``width`` x ``height`` whatever ``idat`` holds."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat if idat is not None else zlib.compress(b"")) + chunk(b"IEND", b"")


def image_folder(t: Ctx, per_class: dict[str, int] | None = None) -> Path:
    """An image folder that trains: classes a and b of 8x8 grey PNGs (``per_class`` images each)."""
    root = t.folder("images")
    rng = np.random.default_rng(0)
    for name, n in (per_class or {"a": 4, "b": 4}).items():
        (root / name).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def train(t: Ctx, *args) -> list[str]:
    return edge_siamese("train", "--epochs", "1", "--quiet", "--out", t.path("run"), *args)


def train_on(t: Ctx, dataset: Path) -> Case:
    return Case(train(t, "--dataset", dataset), (dataset.name,))


CASES = {}


def case(name: str):
    def register(build):
        assert name not in CASES, name
        CASES[name] = build
        return build

    return register


# --- train: datasets ---------------------------------------------------------------------------


@case("train-npz-zero-bytes")
def _(t):
    return train_on(t, t.file("zero-bytes.npz"))


@case("train-npz-truncated")
def _(t):
    images, labels = good_images()
    data = t.npz("whole.npz", images=images, labels=labels).read_bytes()
    t.path("whole.npz").unlink()
    return train_on(t, t.file("truncated.npz", data[: len(data) // 2]))


@case("train-npz-nan-pixel")
def _(t):
    images, labels = float_images_with(np.nan)
    return Case(train(t, "--dataset", t.npz("nan-pixel.npz", images=images, labels=labels)), ("nan-pixel.npz", NON_FINITE))


@case("train-npz-inf-pixel")
def _(t):
    images, labels = float_images_with(np.inf)
    return Case(train(t, "--dataset", t.npz("inf-pixel.npz", images=images, labels=labels)), ("inf-pixel.npz", NON_FINITE))


@case("train-npz-1e300-pixels")
def _(t):
    images, labels = good_images(dtype=np.float64)
    images *= 1e300 / 255
    return train_on(t, t.npz("huge-values.npz", images=images, labels=labels))


@case("train-npz-pickled-object-array")
def _(t):
    images = np.empty(80, dtype=object)
    images[:] = [np.zeros((8, 8)) for _ in range(80)]
    path = t.path("pickled.npz")
    np.savez(path, images=images, labels=np.repeat(np.arange(4), 20), allow_pickle=True)
    return train_on(t, path)


@case("train-png-20000x20000")
def _(t):
    root = image_folder(t)
    (root / "b" / "bomb.png").write_bytes(png_bytes(20000, 20000))
    return Case(train(t, "--dataset", root), ("bomb.png",))


@case("train-png-zero-bytes")
def _(t):
    root = image_folder(t)
    (root / "a" / "empty.png").write_bytes(b"")
    return Case(train(t, "--dataset", root), ("empty.png",))


@case("train-png-corrupt")
def _(t):
    root = image_folder(t)
    (root / "a" / "corrupt.png").write_bytes(png_bytes(8, 8, idat=b"\x78\x9c not deflate data at all"))
    return Case(train(t, "--dataset", root), ("corrupt.png",))


@case("train-folder-class-with-one-image")
def _(t):
    return Case(train(t, "--dataset", image_folder(t, {"a": 4, "lonely": 1})), ("'lonely'",))


@case("train-folder-empty")
def _(t):
    return Case(train(t, "--dataset", t.folder("empty-folder")), ("empty-folder",))


@case("train-folder-of-mixed-sizes-without-input-size")
def _(t):
    root = image_folder(t)
    Image.fromarray(np.zeros((12, 9), np.uint8)).save(root / "a" / "larger.png")
    return Case(train(t, "--dataset", root), ("several sizes", "--input-size"))


@case("train-list-naming-a-missing-file")
def _(t):
    root = image_folder(t)
    rows = [f"{p.relative_to(root.parent)},{p.parent.name}" for p in sorted(root.rglob("*.png"))] + ["images/a/gone.png,a"]
    (root.parent / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return Case(train(t, "--dataset", root.parent / "list.csv"), ("list.csv:10", "gone.png", "does not exist"))


@case("train-list-naming-a-file-outside-its-folder")
def _(t):
    root = image_folder(t)
    outside = t.folder("elsewhere")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside / "x.png")
    rows = [f"{p.relative_to(root.parent)},{p.parent.name}" for p in sorted(root.rglob("*.png"))] + [f"{outside}/x.png,a"]
    (root.parent / "list.csv").write_text("\n".join(rows) + "\n")
    return Case(train(t, "--dataset", root.parent / "list.csv"), ("list.csv:9", "leaves the list's folder"))


@case("train-list-with-a-missing-column")
def _(t):
    root = image_folder(t)
    (root.parent / "list.csv").write_text("images/a/0.png,a\nimages/a/1.png\n")
    return Case(train(t, "--dataset", root.parent / "list.csv"), ("list.csv:2", "1 field"))


@case("train-input-size-not-a-size")
def _(t):
    return Case(train(t, "--input-size", "big"), ("--input-size", "112"))


@case("train-input-size-too-small")
def _(t):
    return Case(train(t, "--input-size", "2x2"), ("--input-size",))


@case("train-workers-negative")
def _(t):
    return Case(train(t, "--workers", "-1"), ("--workers",))


def pairs_file(t: Ctx, rows: list[str]) -> Path:
    root = image_folder(t)
    path = root.parent / "pairs.csv"
    path.write_text("path1,path2,same\n" + "\n".join(rows) + "\n")
    return path


@case("evaluate-pairs-naming-a-missing-file")
def _(t):
    path = pairs_file(t, ["images/a/0.png,images/a/1.png,1", "images/a/0.png,images/b/gone.png,0"])
    return Case(edge_siamese("evaluate", t.run, "--pairs", path, "--json", t.path("e.json")), ("pairs.csv:3", "gone.png"))


@case("evaluate-pairs-without-different-pairs")
def _(t):
    path = pairs_file(t, ["images/a/0.png,images/a/1.png,1", "images/b/0.png,images/b/1.png,true"])
    return Case(edge_siamese("evaluate", t.run, "--pairs", path, "--json", t.path("e.json")), ("pairs.csv", "only same"))


@case("evaluate-pairs-same-not-a-flag")
def _(t):
    path = pairs_file(t, ["images/a/0.png,images/a/1.png,maybe", "images/a/0.png,images/b/0.png,0"])
    return Case(edge_siamese("evaluate", t.run, "--pairs", path, "--json", t.path("e.json")), ("pair 1", "maybe"))


@case("evaluate-pairs-with-a-corrupt-image")
def _(t):
    path = pairs_file(t, ["images/a/0.png,images/a/1.png,1", "images/a/0.png,images/b/0.png,0"])
    (path.parent / "images" / "b" / "0.png").write_bytes(b"\x89PNG broken")
    return Case(edge_siamese("evaluate", t.run, "--pairs", path, "--json", t.path("e.json")), ("0.png", "not an image"))


# --- train: options ----------------------------------------------------------------------------


def train_option(option: str, value: str, fragment: str | None = None):
    @case(f"train{option}={value}")
    def _(t):
        return Case(train(t, option, value), (fragment or option,))


train_option("--margin", "nan")
train_option("--margin", "-1")
train_option("--lr", "inf")
train_option("--lr", "0")
train_option("--seed", "-1")
train_option("--seed", "100000000000000000000000")
train_option("--dim", "0", "--dim 0")
train_option("--epochs", "0")


@case("train-out-under-a-regular-file")
def _(t):
    t.file("blocker-file", b"not a folder")
    return Case(edge_siamese("train", "--epochs", "1", "--quiet", "--out", t.path("blocker-file") / "run"), ("blocker-file",))


@case("train-out-read-only")
def _(t):
    return Case(edge_siamese("train", "--epochs", "1", "--quiet", "--out", t.read_only() / "run"), ("readonly-mount",))


@case("train-out-dot-force-in-a-folder-that-is-not-a-run")
def _(t):
    photos = t.folder("photos")
    (photos / "holiday.jpg").write_bytes(b"not a run")
    (photos / ".hidden").write_text("mine")
    return Case(edge_siamese("train", "--epochs", "1", "--quiet", "--out", ".", "--force"), ("--out",), cwd=photos)


# --- train: timm backbones and their pretrained weights ------------------------------------------

TIMM = ["--backbone", "timm:mobilenetv3_small_050", "--input-size", "16"]


@case("train-timm-unknown-model")
def _(t):
    return Case(train(t, "--backbone", "timm:mobilenetv3_smal_050"), ("mobilenetv3_smal_050", "did you mean"))


@case("train-pretrained-missing-file")
def _(t):
    return Case(train(t, *TIMM, "--pretrained", t.path("gone.safetensors")), ("gone.safetensors", "no such file"))


@case("train-pretrained-hub-name")
def _(t):
    return Case(train(t, *TIMM, "--pretrained", "hf-hub:timm/mobilenetv3_small_050.lamb_in1k"), ("never downloads", "--pretrained FILE"))


@case("train-pretrained-pickle-only")
def _(t):
    import torch

    torch.save(torch.nn.Linear(2, 2), t.path("whole-model.pth"))  # a pickled module, not a state_dict
    return Case(train(t, *TIMM, "--pretrained", t.path("whole-model.pth")), ("whole-model.pth", "pickled", "state_dict"))


@case("train-pretrained-other-architecture")
def _(t):
    import torch
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(2, 8)}, str(t.path("resnet.safetensors")))
    return Case(train(t, *TIMM, "--pretrained", t.path("resnet.safetensors")), ("resnet.safetensors", "does not hold mobilenetv3_small_050 weights"))


@case("train-pretrained-with-a-built-in-backbone")
def _(t):
    return Case(train(t, "--backbone", "convnet", "--pretrained", t.file("w.safetensors")), ("--pretrained", "timm:NAME"))


# --- train --resume ----------------------------------------------------------------------------


def edit_config(run: Path, edit) -> None:
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))


def edit_checkpoint(run: Path, edit) -> None:
    import torch

    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    state = edit(state)
    torch.save(state, run / "checkpoint.pt")


def resume(run: Path) -> list[str]:
    return edge_siamese("train", "--resume", "--quiet", "--out", run)


@case("resume-checkpoint-of-another-run")
def _(t):
    from edge_siamese.checkpoints import build, read_config

    run = t.interrupted_run()
    config, preprocessing = read_config(run)
    other, _ = build(replace(config, embedding_dim=16), preprocessing)

    def other_model(state):
        state["model"] = other.state_dict()
        return state

    edit_checkpoint(run, other_model)
    return Case(resume(run), ("checkpoint.pt",))


@case("resume-checkpoint-missing-keys")
def _(t):
    run = t.interrupted_run()
    edit_checkpoint(run, lambda state: {k: v for k, v in state.items() if k not in ("optimizer", "scheduler")})
    return Case(resume(run), ("checkpoint.pt",))


@case("resume-config-epochs-of-wrong-type")
def _(t):
    run = t.interrupted_run()
    edit_config(run, lambda c: c["train"].update(epochs="twenty"))
    return Case(resume(run), ("config.json", "epochs"))


# --- evaluate ----------------------------------------------------------------------------------


def nan_weights(run: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(run / "model.safetensors"))
    for name, value in tensors.items():
        if name.startswith("model.") and name.endswith("weight") and value.dtype.kind == "f":
            tensors[name] = np.full_like(value, np.nan)
    save_file(tensors, str(run / "model.safetensors"), metadata={"format": "edge-siamese"})


@case("evaluate-config-embedding-dim-eight")
def _(t):
    run = t.run_copy()
    edit_config(run, lambda c: c["train"].update(embedding_dim="eight"))
    return Case(edge_siamese("evaluate", run), ("config.json", "embedding_dim"))


@case("evaluate-config-without-preprocessing")
def _(t):
    run = t.run_copy()
    edit_config(run, lambda c: c.pop("preprocessing"))
    return Case(edge_siamese("evaluate", run), ("config.json",))


@case("evaluate-config-mean-of-wrong-type")
def _(t):
    run = t.run_copy()
    edit_config(run, lambda c: c["preprocessing"].update(mean="grey"))
    return Case(edge_siamese("evaluate", run), ("config.json",))


@case("evaluate-json-a-folder-with-force")
def _(t):
    target = t.folder("json-dir")
    (target / "keep.txt").write_text("mine")
    return Case(edge_siamese("evaluate", t.run, "--json", target, "--force"), ("json-dir",), stdout_lacks=("precision_at_1",))


@case("evaluate-json-read-only")
def _(t):
    return Case(edge_siamese("evaluate", t.run, "--json", t.read_only() / "e.json"), ("readonly-mount",), stdout_lacks=("precision_at_1",))


@case("evaluate-nan-weights")
def _(t):
    run = t.run_copy()
    nan_weights(run)
    return Case(edge_siamese("evaluate", run), (NON_FINITE,))


@case("evaluate-inf-pixel-in-the-test-split")
def _(t):
    from sklearn.datasets import load_digits

    from edge_siamese.data import split_dataset

    digits = load_digits()
    images = digits.images.astype(np.float64)
    images[split_dataset(digits.target)["test"][0], 4, 4] = np.inf
    data = t.npz("digits-inf.npz", images=images, labels=digits.target)
    run = t.run_copy()
    edit_config(run, lambda c: c["train"].update(dataset=str(data)))
    return Case(edge_siamese("evaluate", run), (NON_FINITE,))


# --- export ------------------------------------------------------------------------------------


def export(run: Path, *args) -> list[str]:
    return edge_siamese("export", run, "--format", "onnx", "--quiet", *args)


@case("export-config-not-json")
def _(t):
    run = t.run_copy()
    (run / "config.json").write_text("{not json")
    return Case(export(run), ("config.json",))


@case("export-metrics-not-json")
def _(t):
    run = t.run_copy()
    (run / "metrics.json").write_text('{"final": {"val_precision_at_1": 0.9')
    return Case(export(run), ("metrics.json",))


@case("export-metrics-without-final")
def _(t):
    run = t.run_copy()
    (run / "metrics.json").write_text(json.dumps({"history": []}))
    return Case(export(run), ("metrics.json",))


@case("export-out-under-a-regular-file")
def _(t):
    t.file("blocker-file", b"not a folder")
    return Case(export(t.run, "--out", t.path("blocker-file") / "bundle"), ("blocker-file",))


@case("export-out-read-only")
def _(t):
    return Case(export(t.run, "--out", t.read_only() / "bundle"), ("readonly-mount",))


@case("export-nan-weights")
def _(t):
    run = t.run_copy()
    nan_weights(run)
    return Case(export(run), (NON_FINITE,))


# --- bench -------------------------------------------------------------------------------------


def bench(bundle: Path, *args) -> list[str]:
    return edge_siamese("bench", bundle, *QUICK_BENCH, *args)


@case("bench-batch-empty")
def _(t):
    return Case(edge_siamese("bench", t.bundle, "--batch", ""), ("--batch",))


@case("bench-threads-0")
def _(t):
    return Case(bench(t.bundle, "--threads", "0", "--json", t.path("bench.json")), ("--threads",))


@case("bench-json-a-folder-with-force")
def _(t):
    target = t.folder("json-dir")
    return Case(bench(t.bundle, "--json", target, "--force"), ("json-dir",), stdout_lacks=("model_fp32.onnx",))


@case("bench-json-read-only")
def _(t):
    return Case(bench(t.bundle, "--json", t.read_only() / "bench.json"), ("readonly-mount",), stdout_lacks=("model_fp32.onnx",))


def outside_path(manifest) -> None:
    """The ONNX fp32 entry points to ../x.onnx, beside the bundle (where the file is moved)."""
    next(e for e in manifest["files"] if e["path"] == "model_fp32.onnx")["path"] = "../x.onnx"


def bundle_with_outside_path(t: Ctx) -> Path:
    bundle = t.bundle_copy(outside_path)
    shutil.move(bundle / "model_fp32.onnx", t.path("x.onnx"))
    return bundle


@case("bench-manifest-path-dot-dot")
def _(t):
    return Case(bench(bundle_with_outside_path(t)), ("../x.onnx",))


# --- python -m device_bench --------------------------------------------------------------------


def device_bench_option(option: str, value: str, timeout: float = 120):
    @case(f"device_bench{option}={value}")
    def _(t):
        return Case(device_bench(t.bundle, *QUICK_DEVICE_BENCH, "--quiet", option, value), (option,), timeout=timeout)


device_bench_option("--min-seconds", "inf", timeout=30)
device_bench_option("--min-seconds", "nan")
device_bench_option("--min-seconds", "-1")
device_bench_option("--runs", "0")
device_bench_option("--threads", "0")
device_bench_option("--warmup", "-1")


@case("device_bench--batch-empty")
def _(t):
    return Case(device_bench(t.bundle, "--format", "onnx", "--precision", "fp32", "--runs", "1", "--gallery", "10", "--batch", "", "--quiet"), ("--batch",))


@case("device_bench--batch-0")
def _(t):
    return Case(device_bench(t.bundle, "--batch", "0"), ("--batch",))


@case("device_bench--gallery-empty")
def _(t):
    return Case(device_bench(t.bundle, "--format", "onnx", "--precision", "fp32", "--runs", "1", "--batch", "1", "--gallery", "", "--quiet"), ("--gallery",))


# Fails before the work: had the benchmark started, its progress lines would break the one-line rule.
@case("device_bench-json-a-folder-with-force")
def _(t):
    target = t.folder("json-dir")
    command = device_bench(t.bundle, *QUICK_DEVICE_BENCH, "--min-seconds", "8", "--json", target, "--force")
    return Case(command, ("json-dir",))


@case("device_bench-json-read-only")
def _(t):
    command = device_bench(t.bundle, *QUICK_DEVICE_BENCH, "--min-seconds", "8", "--json", t.read_only() / "bench.json")
    return Case(command, ("readonly-mount",))


@case("device_bench-manifest-path-dot-dot")
def _(t):
    return Case(device_bench(bundle_with_outside_path(t), *QUICK_DEVICE_BENCH, "--runs", "1"), ("../x.onnx",))


def etc_passwd(manifest) -> None:
    entry = next(e for e in manifest["files"] if e["path"] == "model_fp32.onnx")
    entry.update(path="/etc/passwd", sha256=sha256(Path("/etc/passwd")), size_bytes=Path("/etc/passwd").stat().st_size)


@case("device_bench-manifest-path-etc-passwd")
def _(t):
    return Case(device_bench(t.bundle_copy(etc_passwd), *QUICK_DEVICE_BENCH, "--runs", "1"), ("/etc/passwd",))


def eval_outside(t: Ctx) -> Path:
    def edit(manifest):
        manifest["eval"]["path"] = "../eval.npz"

    bundle = t.bundle_copy(edit)
    shutil.move(bundle / "eval.npz", t.path("eval.npz"))
    return bundle


@case("device_bench-manifest-eval-path-dot-dot")
def _(t):
    return Case(device_bench(eval_outside(t), *QUICK_DEVICE_BENCH, "--runs", "1"), ("../eval.npz",))


def nan_fidelity(manifest) -> None:
    manifest["files"][0]["fidelity"]["mean_cosine"] = float("nan")  # json.dumps writes the literal NaN


def infinite_threshold(manifest) -> None:
    manifest["thresholds"]["far_1e-2"] = float("inf")  # json.dumps writes the literal Infinity


@case("device_bench-manifest-with-NaN")
def _(t):
    return Case(device_bench(t.bundle_copy(nan_fidelity), *QUICK_DEVICE_BENCH, "--runs", "1"), ("manifest",))


@case("device_bench-manifest-with-Infinity")
def _(t):
    return Case(device_bench(t.bundle_copy(infinite_threshold), *QUICK_DEVICE_BENCH, "--runs", "1"), ("manifest",))


@case("device_bench-bundle-a-regular-file")
def _(t):
    return Case(device_bench(t.file("bundle-file", b"{}")), ("bundle-file",))


# --- compare -----------------------------------------------------------------------------------


@case("compare--baseline-dim-0")
def _(t):
    return Case(tiny_compare(t.path("report"), baseline_dim="0"), ("--baseline-dim",))


@case("compare--trials-0")
def _(t):
    return Case(tiny_compare(t.path("report"), trials="0"), ("tuning trial",))


@case("compare--dims-4,4")
def _(t):
    return Case(tiny_compare(t.path("report"), dims="4,4"), ("--dims",))


@case("compare--losses-shadow,shadow")
def _(t):
    return Case(tiny_compare(t.path("report"), losses="shadow,shadow"), ("--losses",))


@case("compare-out-under-a-regular-file")
def _(t):
    t.file("blocker-file", b"not a folder")
    return Case(tiny_compare(t.path("blocker-file") / "report"), ("blocker-file",))


@case("compare-out-read-only")
def _(t):
    return Case(tiny_compare(t.read_only() / "report"), ("readonly-mount",))


@case("compare-out-an-existing-regular-file")
def _(t):
    return Case(tiny_compare(t.file("results-file", b"my notes")), ("results-file",))


@case("compare-a-missing-dataset-writes-nothing")
def _(t):
    return Case(tiny_compare(t.path("report"), dataset=str(t.path("missing.npz"))), ("missing.npz",))


# --- demo --------------------------------------------------------------------------------------


def corrupt_onnx(t: Ctx) -> Path:
    """A bundle whose model_fp32.onnx is garbage that its manifest's sha256 vouches for."""
    bundle = t.bundle_copy()
    model = bundle / "model_fp32.onnx"
    model.write_bytes(b"this is not an ONNX model" * 100)
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = next(e for e in manifest["files"] if e["path"] == "model_fp32.onnx")
    entry.update(sha256=sha256(model), size_bytes=model.stat().st_size)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


@case("demo-corrupt-onnx")
def _(t):
    return Case(demo(corrupt_onnx(t)), ("model_fp32.onnx",), timeout=60)


@case("demo-manifest-path-dot-dot")
def _(t):
    return Case(demo(bundle_with_outside_path(t)), ("../x.onnx",), timeout=60)


@case("demo-manifest-with-NaN")
def _(t):
    return Case(demo(t.bundle_copy(nan_fidelity)), ("manifest",), timeout=60)


# --- node clients/node/verify.mjs (exit 1 and one JSON object for an unusable bundle) ----------


@case("verify.mjs-manifest-path-dot-dot")
def _(t):
    return Case(verify_mjs(bundle_with_outside_path(t)), ("../x.onnx",), status=1, node=True)


@case("verify.mjs-manifest-path-etc-passwd")
def _(t):
    return Case(verify_mjs(t.bundle_copy(etc_passwd)), ("/etc/passwd",), status=1, node=True)


@case("verify.mjs-manifest-eval-path-dot-dot")
def _(t):
    return Case(verify_mjs(eval_outside(t)), ("../eval.npz",), status=1, node=True)


@case("verify.mjs-manifest-with-NaN")
def _(t):
    return Case(verify_mjs(t.bundle_copy(nan_fidelity)), ("manifest",), status=1, node=True)


@case("verify.mjs-bundle-a-regular-file")
def _(t):
    return Case(verify_mjs(t.file("bundle-file", b"{}")), ("bundle-file",), status=1, node=True)


# --- running the cases -------------------------------------------------------------------------


def execute(case: Case, root: Path) -> Outcome:
    """Run ``case`` in its own process group; whatever of it outlives the command is killed."""
    outcome = Outcome(case, before=tree(root))
    proc = subprocess.Popen(
        case.command, cwd=case.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        outcome.stdout, outcome.stderr = proc.communicate(timeout=case.timeout)
    except subprocess.TimeoutExpired:
        outcome.timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        outcome.stdout, outcome.stderr = proc.communicate()
    outcome.returncode = proc.returncode
    try:
        os.killpg(proc.pid, 0)
        outcome.stragglers = True
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    outcome.after = tree(root)
    return outcome


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Every selected case, built one after the other, then run a few at a time. Under
    ``"shared"``: the trees of the session's run and bundle before and after them all."""
    this = request.module.__name__
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.module.__name__ == this and hasattr(item, "callspec") and "name" in item.callspec.params]
    mounts: list[Path] = []
    shared: dict[str, Path] = {}
    results: dict = {}
    prepared = []
    try:
        for name in dict.fromkeys(selected):
            root = tmp_path_factory.mktemp("bad-input")
            try:
                prepared.append((name, CASES[name](Ctx(root, request, mounts, shared)), root))
            except Skip as exc:
                results[name] = Outcome(skip=str(exc))
            except Exception as exc:  # one case's set-up (or a shared fixture) failing fails that case only
                results[name] = Outcome(setup_error=f"{type(exc).__name__}: {exc}")
        shared = list(shared.values())
        before = [tree(root) for root in shared]
        with ThreadPoolExecutor(WORKERS) as pool:
            for name, outcome in zip([p[0] for p in prepared], pool.map(lambda p: execute(p[1], p[2]), prepared)):
                results[name] = outcome
        results["shared"] = list(zip(shared, before, [tree(root) for root in shared]))
        yield results
    finally:
        for path in mounts:
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)


def error_line(outcome: Outcome) -> str:
    """The one line a refusal prints (the Node verifier: its report's ``error``), after the
    checks every refusal must pass; otherwise the test fails saying what came instead."""
    case, status = outcome.case, outcome.returncode
    lines = outcome.stderr.strip().splitlines()
    shown = f"exit {status}, {len(lines)} stderr line(s), last: {(lines or [''])[-1][:400]!r}; stdout: {outcome.stdout.strip()[-300:]!r}"
    if outcome.timed_out:
        pytest.fail(f"still running after {case.timeout:.0f} s (killed); {shown}", pytrace=False)
    if "Traceback" in outcome.stderr:
        pytest.fail(f"a traceback: {shown}", pytrace=False)
    if status != case.status:
        pytest.fail(f"exit status {status}, not {case.status}: {shown}", pytrace=False)
    if case.node:
        report = json.loads(outcome.stdout.strip().splitlines()[-1])
        if "    at " in outcome.stdout + outcome.stderr or report["ok"] is not False or "\n" in report.get("error", "\n"):
            pytest.fail(f"not a one-line rejection: {shown}", pytrace=False)
        return report["error"]
    if len(lines) != 1 or not lines[0].startswith("error: "):
        pytest.fail(f"not one 'error: ' line: {outcome.stderr.strip()[-1500:]!r}", pytrace=False)
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(outcomes, name):
    outcome = outcomes[name]
    if outcome.skip:
        pytest.skip(outcome.skip)
    if outcome.setup_error:
        pytest.fail(f"could not build the case: {outcome.setup_error}", pytrace=False)
    line = error_line(outcome)
    problems = []
    for fragment in outcome.case.fragments:
        options = fragment if isinstance(fragment, tuple) else (fragment,)
        if not any(o.lower() in line.lower() for o in options):
            problems.append(f"{' or '.join(options)!r} not in it")
    if any(text in outcome.stdout for text in outcome.case.stdout_lacks):
        problems.append(f"it did the work before refusing (stdout {outcome.stdout[-300:]!r})")
    if outcome.stragglers:
        problems.append("a process of it was still running after it exited")
    if outcome.after != outcome.before:
        problems.append(f"the output place changed ({describe_change(outcome.before, outcome.after)})")
    if problems:
        pytest.fail(f"{'; '.join(problems)}: {line!r}", pytrace=False)


def test_there_are_at_least_60_distinct_cases():
    assert len(CASES) >= 60


def test_the_shared_run_and_bundle_are_untouched(outcomes):
    """Cases read the session's run and bundle in place; none may write there."""
    for root, before, after in outcomes.get("shared", []):
        assert after == before, f"{root}: {describe_change(before, after)}"
