"""Peak memory of training on an image folder: every image in memory (before) against streamed from disk (after).

The folders: N JPEGs of 112x112 RGB, ``PER_CLASS`` (100) a class, each an 8x8 random pattern of
its class, perturbed per image and upscaled (bicubic), so that a file is a few KB. They are made
once and kept under ``~/.cache/edge-siamese/bench-photos/N``; a rerun reuses them.

For each N, two fresh processes, each run with ``PYTHONPATH`` set to the code it measures and its
working folder outside the repository (the child checks that ``edge_siamese.__file__`` is there),
both with the config ``TrainConfig(dataset=FOLDER, split="samples", batch_size=64,
samples_per_class=4, epochs=1, device="cpu")``:

- ``before``: ``edge_siamese`` at ``--before`` (default 1d5f068, the last commit that loaded an
  image folder into memory), extracted with ``git archive``. ``prepare_data(config)``
  (``load_image_folder`` decodes every file into one uint8 array; ``Preprocessing.fit`` measures
  the whole training split), then ``x_train = data.inputs("train")`` and ``data.inputs("val")``,
  float32 tensors of the whole splits held as that commit's ``train.py`` held them, then
  ``--steps`` training steps on P x K batches indexed from ``x_train``.
- ``after``: the working tree. ``prepare_data(config, None, None)`` with ``workers=0`` (the file
  index is built, and the batches are decoded, in the measured process itself: no memory hides
  in worker processes), then ``--steps`` training steps from ``data.train_loader(sampler, "none")``.

Both train the default model (``checkpoints.build``: convnet, shadow loss, batch-all) with AdamW,
as ``train.py`` does, on the CPU with torch's default threads. Reported from ``/proc/self/status``:

- ``baseline MB``: ``VmRSS`` after the imports (python, numpy, torch, edge_siamese);
- ``peak MB``: the peak resident memory of the whole process (``VmHWM``; for after, the larger
  of the two peaks below);
- ``before: data held MB``: what the in-memory path holds through training, the uint8 images
  plus the float32 ``x_train`` and ``x_val`` (``nbytes``);
- ``after: prepare_data peak``: ``VmHWM`` after ``prepare_data``; ``training peak``: the peak of
  the training steps alone (``VmHWM`` restarted from the current RSS by writing 5 to
  ``/proc/self/clear_refs`` before them); ``held MB``: ``VmRSS`` at the end;
- ``after: index B/image``: the file index the streaming path holds, per image: the
  ``ImageSet``'s paths, labels and sizes arrays (``nbytes``) + ``PreparedData.index``, the same
  as Python lists (``sys.getsizeof`` of each list, str and int in it, each object once);
- ``before load s`` / ``after index s``: wall time of ``load_dataset`` inside ``prepare_data``
  (before: every image decoded into memory; after: every file decoded once for its size).

Below the table, the claim to check: the growth of the streaming path's memory from the smallest
to the largest N, against the size of the index it holds.

Every child runs under ``RLIMIT_AS`` = ``--mem-cap-gb`` (default: 80% of ``MemAvailable`` at the
start): a run that would need more address space stops with a MemoryError, reported as "exceeded the N GB cap",
with the step and function it was in and the resident memory it had reached, and (for before)
its need scaled linearly from the largest N that ran, as everything it holds grows with N; the
other rows still run. Files are read through the page cache (generating or indexing them has
just read them). The training peak varies by about 100 MB from run to run (the allocator), which
is more than the index adds.

    python benchmarks/data_memory.py            # N 10,000, 50,000, 100,000, 20 steps (first run: ~3 min more to make the images)
    python benchmarks/data_memory.py --quick    # N 2,000, 5,000, 5 steps
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device_bench.files import write_json
from edge_siamese.progress import progress_bar

CACHE = Path.home() / ".cache" / "edge-siamese" / "bench-photos"
PER_CLASS = 100
SIDE = 112
# The last commit whose prepare_data decodes an image folder into one uint8 array.
IN_MEMORY_REV = "1d5f06822e30796f9adc81ddf09f19a401908421"
SIZES = (10_000, 50_000, 100_000)
QUICK_SIZES = (2_000, 5_000)
STEPS, QUICK_STEPS = 20, 5  # a step of the convnet at 112x112, batch 64, takes seconds on 2 cores
CONFIG = {"split": "samples", "batch_size": 64, "samples_per_class": 4, "epochs": 1, "device": "cpu"}

# One measured process: argv = version (before/after), folder, steps, the code root it must import.
# Prints one JSON line. Written against both versions' API (run.prepare_data, checkpoints.build,
# data.PKSampler, miners.create_miner), so that it is the same code for both.
CHILD = r"""
import json, sys, time, traceback
from pathlib import Path

def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

version, folder, steps, code_root, config_json = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
import numpy as np
import torch
import edge_siamese
from edge_siamese import run
from edge_siamese.checkpoints import build
from edge_siamese.config import TrainConfig
from edge_siamese.data import PKSampler
from edge_siamese.miners import create_miner

if not Path(edge_siamese.__file__).resolve().is_relative_to(Path(code_root).resolve()):
    sys.exit(f"edge_siamese imported from {edge_siamese.__file__}, not from {code_root}")
out = {"code": edge_siamese.__file__, "baseline_rss_mb": status_mb("VmRSS")}

def deep_bytes(obj, seen):
    # sys.getsizeof of obj and of every list, dict and str in it, each object once
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_bytes(k, seen) + deep_bytes(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        size += sum(deep_bytes(v, seen) for v in obj)
    return size

load_dataset = run.load_dataset
def timed_load(*args, **kwargs):
    start = time.perf_counter()
    try:
        return load_dataset(*args, **kwargs)
    finally:
        out["load_s"] = time.perf_counter() - start
run.load_dataset = timed_load

step = "prepare_data"
try:
    extra = {"workers": 0, "augment": "none"} if version == "after" else {}
    config = TrainConfig(dataset=folder, **json.loads(config_json), **extra)
    data = run.prepare_data(config) if version == "before" else run.prepare_data(config, None, None, progress=False)
    out["prepare_peak_mb"] = status_mb("VmHWM")
    images = data.dataset
    if version == "after":
        out["index_array_bytes"] = images.paths.nbytes + images.labels.nbytes + images.sizes.nbytes
        out["index_dict_bytes"] = deep_bytes(data.index, set())

    step = "model"
    torch.manual_seed(config.seed)
    model, loss_fn = build(config, data.preprocessing)
    miner = create_miner(config.miner, getattr(loss_fn, "margin", 0.2), loss_fn.distance)
    optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=config.lr, weight_decay=config.weight_decay)
    train_labels = data.labels("train")
    classes_per_batch = max(2, config.batch_size // config.samples_per_class)
    sampler = PKSampler(train_labels, classes_per_batch, config.samples_per_class, steps, seed=config.seed)
    if version == "before":
        step = "x_train, x_val"
        x_train, y_train = data.inputs("train"), torch.from_numpy(train_labels)
        x_val, y_val = data.inputs("val"), data.labels("val")
        out["held_data_bytes"] = images.images.nbytes + x_train.nbytes + x_val.nbytes
        sampler.set_epoch(0)
        batches = ((x_train[idx], y_train[idx]) for idx in map(torch.as_tensor, sampler))
    else:
        batches = data.train_loader(sampler, config.augment)
        batches.batch_sampler.set_epoch(0)

    step = "training"
    out["pre_training_peak_mb"] = status_mb("VmHWM")
    open("/proc/self/clear_refs", "w").write("5")
    model.train()
    start = time.perf_counter()
    for inputs, labels in batches:
        embeddings = model(inputs)
        indices_tuple = miner(embeddings, labels) if miner is not None else None
        loss = loss_fn(embeddings, labels, indices_tuple=indices_tuple)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    out["train_s"] = time.perf_counter() - start
    out["training_peak_mb"] = status_mb("VmHWM")
    out["status"] = "ok"
except (MemoryError, RuntimeError) as exc:
    if not isinstance(exc, MemoryError) and "alloc" not in str(exc):
        raise
    root = Path(code_root).resolve()
    ours = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve().is_relative_to(root)]
    out["status"], out["step"] = "exceeded", f"{step}: {Path(ours[-1].filename).stem}.{ours[-1].name}" if ours else step
out["rss_mb"] = status_mb("VmRSS")
out["peak_rss_mb"] = max(status_mb("VmHWM"), out.get("pre_training_peak_mb", 0))
print(json.dumps(out))
"""


@dataclass
class Run:
    """One (version, N) process; ``status`` is ok, exceeded, timeout or failed."""

    version: str
    num_images: int
    status: str
    baseline_rss_mb: float | None = None
    peak_rss_mb: float | None = None
    prepare_peak_mb: float | None = None
    training_peak_mb: float | None = None
    rss_mb: float | None = None
    load_s: float | None = None
    train_s: float | None = None
    held_data_bytes: int | None = None  # before: the uint8 images, x_train and x_val
    index_array_bytes: int | None = None  # after: the ImageSet's paths, labels and sizes arrays
    index_dict_bytes: int | None = None  # after: PreparedData.index, the same as Python lists (index.json's content)
    step: str = ""
    code: str = ""
    message: str = ""


def photo_folder(num_images: int, progress: bool = True) -> Path:
    """A class-per-folder tree of ``num_images`` 112x112 RGB JPEGs (``PER_CLASS`` a class) under
    ``CACHE``, made once: written under a hidden name and renamed when whole."""
    if num_images % PER_CLASS:
        raise SystemExit(f"N {num_images} is not a multiple of {PER_CLASS} images a class")
    folder = CACHE / str(num_images)
    if folder.is_dir():
        return folder
    from PIL import Image

    partial = CACHE / f".{num_images}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    rng = np.random.default_rng(num_images)
    bar = progress_bar(num_images, f"making {num_images:,} JPEGs in {folder}", progress, unit="image")
    for c in range(num_images // PER_CLASS):
        class_dir = partial / f"c{c:05d}"
        class_dir.mkdir(parents=True)
        pattern = rng.integers(0, 256, (8, 8, 3))
        for i in range(PER_CLASS):
            small = np.clip(pattern + rng.integers(-48, 49, pattern.shape), 0, 255).astype(np.uint8)
            Image.fromarray(small).resize((SIDE, SIDE), Image.Resampling.BICUBIC).save(class_dir / f"{i:03d}.jpg", quality=90)
        bar.update(PER_CLASS)
    bar.close()
    partial.rename(folder)
    return folder


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for d in folder.iterdir() for f in d.iterdir()) / 2**20


def _meminfo_kb(field: str) -> int:
    return next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith(field + ":"))


def machine() -> str:
    """CPU model, cores (and how busy they were), RAM, and the Python, torch and numpy that ran."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.machine())
    load = os.getloadavg()[0]
    return (
        f"{cpu}, {os.cpu_count()} cores shared with other jobs (load average {load:.1f} at the start), "
        f"{_meminfo_kb('MemTotal') / 2**20:.1f} GiB RAM ({_meminfo_kb('MemAvailable') / 2**20:.1f} GiB available at the start); "
        f"Python {platform.python_version()}, torch {importlib.metadata.version('torch')}, "
        f"torchvision {importlib.metadata.version('torchvision')}, numpy {np.__version__}"
    )


def spawn(version: str, code_root: Path, cwd: Path, folder: Path, steps: int, mem_cap_gb: float, timeout_s: float) -> Run:
    """One measured process under the memory cap and the time limit."""
    cmd = [sys.executable, "-c", CHILD, version, str(folder), str(steps), str(code_root), json.dumps(CONFIG)]
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    cap = int(mem_cap_gb * 1e9)
    num_images = int(folder.name)
    try:
        done = subprocess.run(
            cmd, cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=timeout_s,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)),
        )
    except subprocess.TimeoutExpired:
        return Run(version, num_images, "timeout", message=f"over {timeout_s:.0f} s")
    if done.returncode != 0 or not done.stdout.strip():
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return Run(version, num_images, "failed", message="killed (out of memory?)" if done.returncode == -9 else last)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    run = Run(version, num_images, **{k: v for k, v in got.items() if k != "pre_training_peak_mb"})
    if run.status == "exceeded":
        run.message = f"exceeded the {mem_cap_gb:.1f} GB address-space cap (in {run.step}, at {run.peak_rss_mb:,.0f} MB resident)"
    return run


def _mb(run: Run, field: str) -> str:
    value = getattr(run, field)
    return f"{value:,.0f}" if value is not None else "—"


def format_table(runs: list[Run], disk_mb: dict[int, float]) -> str:
    """One markdown table, a row per N: before's and after's memory side by side."""
    header = [
        "N", "images on disk MB", "before baseline MB", "before peak MB", "before: data held MB", "after baseline MB", "after peak MB",
        "after: prepare_data peak MB", "after: training peak MB", "after held MB", "after: index B/image (arrays + dict)",
        "before load s", "after index s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    by_n: dict[int, dict[str, Run]] = {}
    for r in runs:
        by_n.setdefault(r.num_images, {})[r.version] = r
    measured = sorted((r for r in runs if r.version == "before" and r.status == "ok"), key=lambda r: r.num_images)
    for n, row in by_n.items():
        before, after = row["before"], row["after"]
        cells = [f"{n:,}", f"{disk_mb[n]:,.0f}", _mb(before, "baseline_rss_mb")]
        if before.status == "ok":
            cells.append(_mb(before, "peak_rss_mb"))
        elif before.status == "exceeded" and measured:
            # Everything before holds grows with N (images, x_train, Preprocessing.fit's float64 copies):
            # its need, scaled from the largest N it ran.
            ref = measured[-1]
            need_gb = (ref.baseline_rss_mb + (ref.peak_rss_mb - ref.baseline_rss_mb) * n / ref.num_images) / 1024
            cells.append(f"{before.message}; ~{need_gb:.0f} GB scaled from N {ref.num_images:,}")
        else:
            cells.append(before.message)
        cells.append(f"{before.held_data_bytes / 2**20:,.0f}" if before.held_data_bytes else "—")
        cells.append(_mb(after, "baseline_rss_mb"))
        cells.append(_mb(after, "peak_rss_mb") if after.status == "ok" else after.message)
        cells += [_mb(after, "prepare_peak_mb"), _mb(after, "training_peak_mb"), _mb(after, "rss_mb")]
        cells.append(f"{after.index_array_bytes / n:.0f} + {after.index_dict_bytes / n:.0f}" if after.index_array_bytes else "—")
        cells += [f"{r.load_s:.1f}" if r.load_s is not None else "—" for r in (before, after)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def growth_line(runs: list[Run]) -> str:
    """The claim to check: after's memory grows with N only by the index. Its growth from the
    smallest to the largest N, against the index it holds at the largest."""
    after = sorted((r for r in runs if r.version == "after" and r.status == "ok"), key=lambda r: r.num_images)
    if len(after) < 2:
        return ""
    lo, hi = after[0], after[-1]
    more = hi.num_images - lo.num_images
    grew = {f: getattr(hi, f) - getattr(lo, f) for f in ("peak_rss_mb", "prepare_peak_mb", "training_peak_mb", "rss_mb")}
    index_mb = (hi.index_array_bytes + hi.index_dict_bytes) / 2**20
    return (
        f"After, from N {lo.num_images:,} to {hi.num_images:,} ({more:,} more images): peak {grew['peak_rss_mb']:+,.0f} MB "
        f"({grew['peak_rss_mb'] * 2**20 / more:+,.0f} bytes per image), prepare_data peak {grew['prepare_peak_mb']:+,.0f} MB, "
        f"training peak {grew['training_peak_mb']:+,.0f} MB, held {grew['rss_mb']:+,.0f} MB; the index it holds at "
        f"{hi.num_images:,}: {index_mb:,.1f} MB ({hi.index_array_bytes / 2**20:,.1f} MB of arrays + "
        f"{hi.index_dict_bytes / 2**20:,.1f} MB of Python lists in PreparedData.index)."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"N {', '.join(f'{n:,}' for n in QUICK_SIZES)} instead of {', '.join(f'{n:,}' for n in SIZES)}")
    p.add_argument("--sizes", type=int, nargs="+", help=f"the N to run (multiples of {PER_CLASS})")
    p.add_argument("--steps", type=int, help=f"training steps in each process (default {STEPS}; {QUICK_STEPS} with --quick)")
    p.add_argument("--before", default=IN_MEMORY_REV, help="git revision whose edge_siamese is 'before' (default: the in-memory one)")
    p.add_argument("--mem-cap-gb", type=float, help="address-space limit of each child (RLIMIT_AS); default 80%% of MemAvailable")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="limit of each child, process start included")
    p.add_argument("--json", type=Path, help="also write every run here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not Path("/proc/self/status").exists():
        sys.exit("data_memory: needs Linux /proc (VmHWM)")
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    args.steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    mem_cap_gb = args.mem_cap_gb or 0.8 * _meminfo_kb("MemAvailable") * 1024 / 1e9
    machine_line = machine()
    folders = {n: photo_folder(n, not args.quiet) for n in sizes}
    disk_mb = {n: folder_mb(f) for n, f in folders.items()}

    runs = []
    with tempfile.TemporaryDirectory(prefix="data-memory-") as tmp:
        before_root = Path(tmp) / "before"
        before_root.mkdir()
        archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, check=False, capture_output=True)
        if archive.returncode != 0:
            sys.exit(f"data_memory: cannot read {args.before}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(before_root)], input=archive.stdout, check=True)
        bar = progress_bar(2 * len(sizes), "data memory", enabled=not args.quiet, unit="run")
        for n in sizes:
            for version, code_root in (("before", before_root), ("after", ROOT)):
                bar.set_postfix_str(f"{version} N={n:,}")
                runs.append(spawn(version, code_root, Path(tmp), folders[n], args.steps, mem_cap_gb, args.timeout_s))
                bar.update()
        bar.close()

    print(
        f"Machine: {machine_line}. Each run: a fresh process under RLIMIT_AS {mem_cap_gb:.1f} GB, {args.steps} training steps "
        f"of {CONFIG['batch_size']} (P x K = {CONFIG['batch_size'] // CONFIG['samples_per_class']} x {CONFIG['samples_per_class']}), "
        f"112x112 RGB JPEGs, {PER_CLASS} a class. Before: edge_siamese at {args.before[:7]}, "
        "every image in memory. After: the working tree, streamed, workers=0 (index and batches decoded in the measured process).\n"
    )
    print(format_table(runs, disk_mb))
    failed = [r for r in runs if r.status in ("failed", "timeout")]
    for r in failed:
        print(f"\n{r.version} N={r.num_images:,}: {r.status}: {r.message}")
    if line := growth_line(runs):
        print(f"\n{line}")
    if args.json:
        write_json(args.json, {"machine": machine_line, "before": args.before, "mem_cap_gb": mem_cap_gb, "config": CONFIG, "steps": args.steps, "disk_mb": disk_mb, "runs": [asdict(r) for r in runs]})


if __name__ == "__main__":
    main()
