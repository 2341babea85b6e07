"""The export matrix: each backbone fine-tuned briefly on real photos, exported to ONNX and TFLite
at fp32, fp16 and int8, and each file checked, timed on this CPU and counted on emulated aarch64.

For each backbone of ``--backbones`` (``timm:NAME`` for a timm model, built with random weights:
nothing is downloaded; or a built-in, ``mobilenet`` or ``convnet``), four stages:

1. fine-tune: ``edge_siamese.train.train`` on the photo folder of ``benchmarks/sample_photos.py``
   (``--classes`` x ``--per-class`` JPEGs, made once under ``--photos``), RGB at ``--input-size``
   (centre crop), ``--loss`` (triplet) with batch-all mining, embedding_dim 64, ``--epochs``
   epochs of batches of 32 (8 classes x 4), lr 1e-3, seed 0, on the CPU with ``--threads``
   threads (``OMP_NUM_THREADS``; default: torch's own). The split is the library's default: 20 %
   of each class held out for test, 10 % of the rest for validation. ``params``: the parameters
   of the embedding model (backbone and embedding layer); ``train s``: the run's ``train_time_s``
   (its epochs with their validation, not the indexing of the photos); ``torch P@1``: precision_at_1 of the PyTorch model on the test images;
   ``torch cos between images``: the mean cosine between its embeddings of two different test
   images. Near 1, the model maps every image alike and a file's cosine to it says little: the
   default 32 x 32 photos give 23 steps an epoch, enough for BatchNorm's running statistics (what
   the evaluated and exported model uses) to leave their initial values; a few steps do not.
2. export: ``export.exporter.export_run`` writes each (format, precision) file (int8 calibrated on
   ``--calib-samples`` training images) and runs it on the test images (at most 500) in its
   runtime: ``mean cos`` and ``min cos`` of its embeddings to PyTorch's, ``rel err`` the mean
   distance to PyTorch's over the mean distance between two images, ``P@1`` its precision_at_1
   (PyTorch's in brackets); for int8, the recipe ``--int8``'s search chose (``export.quantize``)
   and the share of multiply-accumulates it runs in int8. The status is the exporter's: verified (within the
   precision's tolerances, ``device_bench.formats.PRECISIONS``), degraded (ran but missed one; the
   reason follows) or failed (no file; the reason follows). ``size KB``: the file's size.
3. bench: ``python -m device_bench BUNDLE --batch 1 --runs N --gallery 1000``, which measures each
   file in its own fresh process, ONNX files in ONNX Runtime and TFLite files in LiteRT, with
   ``--threads`` threads (default: the runtimes' own). ``p50 ms``: the median of ``--runs`` timed
   inferences of one image after 5 warm-up ones. ``peak RSS MB``: the peak resident memory of
   that process with the model loaded and timed (Python, numpy and the runtime included; before
   the gallery is built).
4. aarch64: ``edge_siamese.app.targets.instructions.count_instructions``: guest instructions per
   inference of one image on one thread, the same runtimes' aarch64 builds under qemu user-mode
   emulation of a ``--arm64-cpu`` core (two guest runs that differ by ``--arm64-runs``
   inferences; their difference over that number). A deterministic count, not a time.
   ``--no-arm64`` skips it; without qemu or the cached aarch64 userland the column says why.

Fine-tune and export run in a fresh process per backbone (this script with ``--case``), so that a
backbone that fails, or whose converter ends its process, is one row with its reason and the
others still run. A failed stage is the row's or the cell's one-line reason; the script exits 0.

On a shared machine use ``--threads 1``: a busy core stalls every parallel region of a
multi-threaded run (training a 112x112 MobileNetV3 under ``nice`` beside two busy processes took
52 s on 2 threads, 6 s on 1).

    python benchmarks/backbones.py --threads 1 --markdown runs/backbones.md --json runs/backbones.json
    python benchmarks/backbones.py --backbones timm:lcnet_100,mobilenet --input-size 64 --epochs 1 --no-arm64
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

from sample_photos import photo_folder  # beside this script

from device_bench.files import atomic_path, new_file_problem, write_json
from device_bench.formats import FILE_PRECISIONS, FORMATS, file_name
from edge_siamese.errors import UserError, last_line

BACKBONES = (
    "timm:mobilenetv3_small_100", "timm:mobilenetv3_large_100", "timm:mobilenetv4_conv_small", "timm:efficientnet_lite0",
    "timm:lcnet_100", "timm:ghostnet_100", "timm:resnet18", "mobilenet", "convnet",
)  # fmt: skip
PHOTOS = Path.home() / ".cache" / "edge-siamese" / "sample-photos"
EMBEDDING_DIM = 64
BATCH_SIZE = 32
SAMPLES_PER_CLASS = 4
GALLERY = 1000  # device_bench's smallest gallery: the matrix reads no gallery figure
VERSIONS = ("torch", "timm", "onnxruntime", "ai-edge-litert", "litert-torch", "ai-edge-quantizer")


@dataclass
class FileRow:
    """One (format, precision) of one backbone: the exporter's check, then the bench and the count."""

    format: str
    precision: str
    status: str  # the exporter's: verified, degraded or failed
    problem: str = ""  # why degraded or failed
    mean_cosine: float | None = None
    min_cosine: float | None = None
    relative_error: float | None = None
    precision_at_1: float | None = None
    reference_precision_at_1: float | None = None
    size_bytes: int | None = None
    int8_recipe: str = ""  # int8 files: the recipe the int8 search chose (export.quantize)
    int8_mac_fraction: float | None = None  # ... and the share of multiply-accumulates it runs in int8
    p50_ms: float | None = None
    peak_rss_mb: float | None = None
    bench_error: str = ""
    instructions_per_inference: float | None = None
    arm64_error: str = ""  # "not measured: ..." or "failed: ..."


@dataclass
class BackboneResult:
    """One backbone: its fine-tune, and a row per exported file; ``error`` names the stage that failed."""

    backbone: str
    params: int | None = None
    train_s: float | None = None
    # Near 1: the model maps every image alike (BatchNorm's running statistics after too few
    # steps do that), and a file's cosine to PyTorch says little; its P@1 still does.
    pair_cosine: float | None = None
    torch_precision_at_1: float | None = None
    error: str = ""
    bundle: str = ""
    files: list[FileRow] = field(default_factory=list)


def one_line(exc: BaseException) -> str:
    """A UserError's message as it is; any other exception's type and first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, UserError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- the child: fine-tune and export one backbone (this script with --case); it alone imports torch ---


def fine_tune(backbone: str, run_dir: Path, args: argparse.Namespace) -> dict:
    """Train ``backbone`` into ``run_dir``; its metrics.json content."""
    from edge_siamese.config import TrainConfig
    from edge_siamese.train import train

    config = TrainConfig(
        dataset=str(args.photos), backbone=backbone, input_size=[args.input_size, args.input_size], embedding_dim=EMBEDDING_DIM,
        loss=args.loss, epochs=args.epochs, batch_size=BATCH_SIZE, samples_per_class=SAMPLES_PER_CLASS, workers=0, device="cpu",
    )  # fmt: skip
    return train(config, run_dir, force=True, progress=False)


def describe(run_dir: Path) -> tuple[int, float]:
    """The trained model's parameter count, and the mean cosine between its embeddings of two
    different test images (the images the exporter checks files on)."""
    import numpy as np
    import torch

    from edge_siamese.checkpoints import load_run
    from edge_siamese.models import embed
    from edge_siamese.run import prepare_data, read_index
    from export.exporter import EVAL_SAMPLES

    run = load_run(run_dir)
    data = prepare_data(run.config, run.preprocessing, read_index(run_dir))
    embeddings = embed(run.model, torch.from_numpy(data.preprocessing(data.images("test", slice(0, EVAL_SAMPLES))))).numpy()
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosines, n = unit @ unit.T, len(unit)
    return sum(p.numel() for p in run.model.parameters()), float((cosines.sum() - np.trace(cosines)) / (n * (n - 1)))


def export(run_dir: Path, args: argparse.Namespace) -> tuple[list[FileRow], Path | None]:
    """Every (format, precision) of ``args`` for the run, each checked by the exporter."""
    from export.exporter import export_run

    rows, bundle = export_run(
        run_dir, run_dir / "bundle", args.formats, args.precisions, calib_samples=args.calib_samples, force=True, allow_degraded=True, progress=False
    )
    files = []
    for row in rows:
        fidelity = {k: row.fidelity.get(k) for k in ("mean_cosine", "min_cosine", "relative_error", "precision_at_1", "reference_precision_at_1")}
        search = {"int8_recipe": row.int8["recipe"], "int8_mac_fraction": row.int8["int8_mac_fraction"]} if row.int8 else {}
        files.append(FileRow(row.format, row.precision, row.status, row.problem, **fidelity, size_bytes=row.entry.get("size_bytes"), **search))
    return files, bundle


def run_case(backbone: str, run_dir: Path, args: argparse.Namespace) -> BackboneResult:
    """Fine-tune and export one backbone in this process (the child side of ``--case``)."""
    result = BackboneResult(backbone)
    try:
        result.train_s = fine_tune(backbone, run_dir, args)["train_time_s"]
        result.params, result.pair_cosine = describe(run_dir)
    except Exception as exc:  # the backbone's row says why; the parent goes on with the next one
        result.error = f"fine-tune failed: {one_line(exc)}"
        return result
    try:
        result.files, bundle = export(run_dir, args)
    except Exception as exc:
        result.error = f"export failed: {one_line(exc)}"
        return result
    result.bundle = str(bundle or "")
    result.torch_precision_at_1 = next((f.reference_precision_at_1 for f in result.files if f.reference_precision_at_1 is not None), None)
    return result


# --- the parent: one child per backbone, then the bench and the count ---


def spawn_case(backbone: str, run_dir: Path, args: argparse.Namespace) -> BackboneResult:
    """``run_case`` in a fresh process; a crash is the backbone's row, at the stage it reached."""
    cmd = [
        sys.executable, __file__, "--case", backbone, str(run_dir), "--photos", str(args.photos), "--input-size", str(args.input_size),
        "--epochs", str(args.epochs), "--loss", args.loss, "--formats", ",".join(args.formats),
        "--precisions", ",".join(args.precisions), "--calib-samples", str(args.calib_samples),
    ]  # fmt: skip
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return BackboneResult(backbone, error=f"fine-tune and export took over {args.timeout_s:.0f} s")
    if done.returncode == 0 and done.stdout.strip():
        got = json.loads(done.stdout.strip().splitlines()[-1])
        return BackboneResult(**{**got, "files": [FileRow(**f) for f in got["files"]]})
    stage = "export" if (run_dir / "metrics.json").exists() else "fine-tune"  # metrics.json is written when training ends
    return BackboneResult(backbone, error=f"{stage} crashed: {'killed (out of memory?)' if done.returncode == -9 else last_line(done)}")


def device_bench_rows(bundle: str, args: argparse.Namespace) -> tuple[dict, str]:
    """``python -m device_bench``'s rows by (format, precision), or why there are none."""
    cmd = [
        sys.executable, "-m", "device_bench", bundle, "--json", "-", "--quiet",
        "--batch", "1", "--runs", str(args.runs), "--gallery", str(GALLERY), *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return {}, f"device_bench took over {args.timeout_s:.0f} s"
    try:  # it exits 1 when a row is not verified, and still writes every row
        return {(r["format"], r["precision"]): r for r in json.loads(done.stdout)["rows"]}, ""
    except (json.JSONDecodeError, KeyError):
        return {}, f"device_bench failed: {last_line(done)}"


def bench(result: BackboneResult, args: argparse.Namespace) -> None:
    """p50 latency at batch 1 and peak RSS of each file of the bundle."""
    rows, problem = device_bench_rows(result.bundle, args)
    for f in result.files:
        if f.size_bytes is None:
            continue
        row = rows.get((f.format, f.precision), {"status": "failed", "error": problem or "not in device_bench's result"})
        if row["status"] == "verified":
            f.p50_ms, f.peak_rss_mb = row["latency"][0]["p50_ms"], row["memory"]["peak_rss_mb"]
        else:
            f.bench_error = f"{row['status']}: {row.get('error', '')}"


def arm64_problem(cpu: str) -> str:
    """Why no instruction can be counted here ('' when qemu and the aarch64 userland are there)."""
    from edge_siamese.app.targets import (
        rootfs,  # the app's targets import torch: only when counting
    )

    try:
        rootfs.qemu_binary()
        rootfs.prepare_rootfs(cpu=cpu, progress=False)  # built once (needs the network), then reused from the cache
    except UserError as exc:
        return str(exc)
    return ""


def count(result: BackboneResult, args: argparse.Namespace) -> None:
    """Guest instructions per inference of each file of the bundle, on emulated aarch64."""
    from edge_siamese.app.targets import instructions

    for f in result.files:
        if f.size_bytes is None:
            continue
        try:
            counted = instructions.count_instructions(Path(result.bundle), file_name(f.format, f.precision), runs=args.arm64_runs, cpu=args.arm64_cpu)
            f.instructions_per_inference = counted["instructions_per_inference"]
        except Exception as exc:  # this cell says why; the other files are still counted
            f.arm64_error = f"failed: {one_line(exc)}"


# --- the tables ---


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _num(value: float | None, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def backbone_table(results: list[BackboneResult]) -> str:
    lines = ["| backbone | params (M) | train s | torch P@1 | torch cos between images | result |", "|---|---:|---:|---:|---:|---|"]
    for r in results:
        written = sum(f.size_bytes is not None for f in r.files)
        outcome = r.error or f"{written} of {len(r.files)} files written, {sum(f.status == 'verified' for f in r.files)} verified"
        params = None if r.params is None else r.params / 1e6
        cells = [r.backbone, _num(params, ".2f"), _num(r.train_s, ".1f"), _num(r.torch_precision_at_1, ".3f"), _num(r.pair_cosine, ".3f"), outcome]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines)


def _status(f: FileRow) -> str:
    return f.status if f.status == "verified" else f"{f.status}: {f.problem}"


def matrix_table(results: list[BackboneResult], cpu: str) -> str:
    header = ["backbone", "format", "precision", "status", "int8 recipe (MACs in int8)", "mean cos", "min cos", "rel err", "P@1 (torch)", "size KB", "p50 ms", "peak RSS MB", f"aarch64 M instr ({cpu})"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|---|---|" + "---:|" * (len(header) - 5)]
    for r in results:
        if r.error and not r.files:
            lines.append("| " + " | ".join(map(_cell, [r.backbone, "—", "—", r.error, *["—"] * (len(header) - 4)])) + " |")
        for f in r.files:
            p_at_1 = "—" if f.precision_at_1 is None else f"{f.precision_at_1:.3f} ({f.reference_precision_at_1:.3f})"
            size_kb = None if f.size_bytes is None else f.size_bytes / 1024
            instr = None if f.instructions_per_inference is None else f.instructions_per_inference / 1e6
            recipe = f"{f.int8_recipe} ({f.int8_mac_fraction:.0%})" if f.int8_recipe else "—"
            cells = [
                r.backbone, f.format, f.precision, _status(f), recipe, _num(f.mean_cosine, ".6f"), _num(f.min_cosine, ".6f"), _num(f.relative_error, ".4f"), p_at_1,
                _num(size_kb, ",.0f"), _num(f.p50_ms, ".2f", f.bench_error or "—"), _num(f.peak_rss_mb, ".0f", "—"),
                _num(instr, ".1f", f.arm64_error or "—"),
            ]  # fmt: skip
            lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines)


def machine() -> str:
    """CPU model, cores, RAM, the date, and the versions of what ran."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.machine())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in VERSIONS)
    return (
        f"{cpu}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the start), {mem_kb / 2**20:.1f} GiB RAM, "
        f"{date.today().isoformat()}; Python {platform.python_version()}, {versions}"
    )


def document(results: list[BackboneResult], args: argparse.Namespace, machine_line: str, command: str, wall_s: float) -> str:
    return (
        f"Machine: {machine_line}.\n\nCommand ({wall_s / 60:.0f} min; load average {os.getloadavg()[0]:.1f} at the end): `{command}`\n\n"
        f"Per backbone ({args.input_size}x{args.input_size} RGB, {args.loss} loss, {args.epochs} epoch(s) from random weights, "
        f"{args.classes} classes x {args.per_class} photos):\n\n{backbone_table(results)}\n\n"
        f"Per file (p50 and peak RSS: batch 1, {args.runs} runs, {args.threads or 'default'} thread(s), ONNX Runtime for onnx, LiteRT for tflite):\n\n"
        f"{matrix_table(results, args.arm64_cpu)}\n"
    )


# --- the command ---


def _names(allowed: tuple[str, ...]):
    """A comma-separated list of names of ``allowed``, in its order (the exporter makes fp16 and int8 from fp32)."""

    def parse(text: str) -> list[str]:
        names = {n.strip() for n in text.split(",") if n.strip()}
        if not names or not names <= set(allowed):
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)}")
        return [n for n in allowed if n in names]

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated backbones (default: the nine of the doc)")
    p.add_argument("--input-size", type=int, default=112, help="square RGB input side, in pixels")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--loss", default="triplet")
    p.add_argument("--formats", type=_names(tuple(FORMATS)), default=list(FORMATS), help="comma-separated (default: onnx,tflite)")
    p.add_argument("--precisions", type=_names(FILE_PRECISIONS), default=list(FILE_PRECISIONS), help="comma-separated (default: fp32,fp16,int8)")
    p.add_argument("--calib-samples", type=int, default=256, help="training images int8 is calibrated on")
    p.add_argument("--classes", type=int, default=32, help="classes of the photo folder")
    p.add_argument("--per-class", type=int, default=32, help="photos per class")
    p.add_argument("--photos", type=Path, help=f"the photo folder (made there unless already made; default {PHOTOS}/CLASSESxPER_CLASS)")
    p.add_argument("--runs", type=int, default=50, help="timed inferences per file (device_bench --runs)")
    p.add_argument("--threads", type=int, help="threads of training and of the runtimes (default: their own; 1 on a shared machine)")
    p.add_argument("--no-arm64", action="store_true", help="do not count aarch64 instructions")
    p.add_argument("--arm64-cpu", default="cortex-a72", help="the core qemu models: cortex-a72 (Pi 4) or cortex-a76 (Pi 5)")
    p.add_argument("--arm64-runs", type=int, default=20, help="inferences the two guest runs differ by")
    p.add_argument("--work", type=Path, default=Path("runs/backbones"), help="where the runs and bundles go (one folder per backbone)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="limit of one backbone's fine-tune and export, and of its bench")
    p.add_argument("--markdown", type=Path, help="write the tables here as markdown")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --markdown or --json")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--case", nargs=2, metavar=("BACKBONE", "RUN_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.backbones = list(dict.fromkeys(b.strip() for b in args.backbones.split(",") if b.strip()))
    args.photos = args.photos or PHOTOS / f"{args.classes}x{args.per_class}"
    if not args.no_arm64 and not args.case:
        from edge_siamese.app.targets.rootfs import (
            CPUS,  # the app's targets import torch: only when counting
        )

        if args.arm64_cpu not in CPUS:
            p.error(f"--arm64-cpu {args.arm64_cpu!r}: choose {' or '.join(CPUS)}")
    if "fp32" not in args.precisions:
        p.error("--precisions needs fp32: the exporter makes the fp16 and int8 files from the fp32 one")
    for path in (args.markdown, args.json):
        if path and (problem := new_file_problem(path, args.force)):
            p.error(problem)
    return args


def progress(args: argparse.Namespace, started: float, done: int, text: str) -> None:
    """One line on stderr: where the matrix is, the time spent, and the time left at the pace so far."""
    if args.quiet:
        return
    elapsed = time.perf_counter() - started
    eta = f", about {elapsed / done * (len(args.backbones) - done) / 60:.0f} min left" if done else ""
    print(f"[{done + 1}/{len(args.backbones)}] {text} ({elapsed / 60:.1f} min{eta})", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(asdict(run_case(args.case[0], Path(args.case[1]), args))))
        return
    started = time.perf_counter()
    machine_line = machine()
    photo_folder(args.photos, args.classes, args.per_class)
    arm64_skipped = "not measured: --no-arm64" if args.no_arm64 else ""  # why the column is empty, '' when it is counted
    if not arm64_skipped and (problem := arm64_problem(args.arm64_cpu)):
        arm64_skipped = f"not measured: {problem}"

    results = []
    for i, backbone in enumerate(args.backbones):
        progress(args, started, i, f"{backbone}: fine-tune and export")
        result = spawn_case(backbone, args.work / backbone.replace(":", "_"), args)
        if result.bundle:
            progress(args, started, i, f"{backbone}: bench")
            bench(result, args)
            if arm64_skipped:
                for f in result.files:
                    f.arm64_error = arm64_skipped if f.size_bytes is not None else ""
            else:
                progress(args, started, i, f"{backbone}: aarch64 instructions")
                count(result, args)
        results.append(result)

    wall_s = time.perf_counter() - started
    command = shlex.join(["python", "benchmarks/backbones.py", *(sys.argv[1:] if argv is None else argv)])
    text = document(results, args, machine_line, command, wall_s)
    print(text)
    if args.markdown:
        with atomic_path(args.markdown) as tmp:
            tmp.write_text(text)
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "case"}
        write_json(args.json, {"machine": machine_line, "command": command, "wall_s": wall_s, "settings": settings, "backbones": [asdict(r) for r in results]})


if __name__ == "__main__":
    main()
