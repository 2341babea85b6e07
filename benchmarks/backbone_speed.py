"""MobileNetV3-small at 112x112 RGB on this CPU: torch eager, ONNX Runtime and LiteRT, fp32 and int8.

All side by side in one run, and beside them four ONNX int8 recipes against each other.

The models: for each ``--dims`` value, ``timm:mobilenetv3_small_100`` (random init, no pretrained
weights) trained 2 epochs (batch 32, 4 per class, Shadow loss) on a folder of real photos made by
``benchmarks/sample_photos.py`` (32 classes x 32 crops of scikit-learn's two sample photographs),
then ``export_run(..., ["onnx", "tflite"], ["fp32", "int8"], allow_degraded=True)``: what the
shipped exporter writes, whatever its fidelity. A run and bundle already in ``--work`` with the
same config are reused (``--rebuild`` to make them again).

Every measurement is a fresh process, so that its peak RSS is its own:

- ONNX Runtime and LiteRT: ``python -m device_bench BUNDLE --format F --precision P --threads T
  --batch 1,8 --runs N --gallery 1000 --json - --quiet``, ONNX Runtime once with its default session
  memory and once with ``--ort-memory lean`` (no CPU arena, no memory pattern:
  ``device_bench.runtimes.ORT_MEMORY``). Latency is the row's ``p50_ms``/``p99_ms`` per batch (5
  warm-up runs, then N timed runs of one ``run`` call on the bundle's golden inputs), peak RSS its
  ``memory.peak_rss_mb``: ``VmHWM`` after loading, the golden check, warm-up and timing, before
  ``eval.npz`` and the gallery (python + numpy + the runtime + the model; see docs/bench-schema.md).
  The TFLite files have a batch of 1: a LiteRT "batch 8" is 8 invokes in one ``run`` call.
- torch eager: this script's ``--case torch`` child: ``load_run``, ``torch.set_num_threads(T)``,
  ``torch.inference_mode``, the same golden inputs, warm-up and N timed runs per batch, then
  ``VmHWM`` (python + torch + timm + the model).
- The ONNX int8 recipes (first of ``--dims`` only): ``onnxruntime.quantization.quantize_static``
  of the bundle's ``model_fp32.onnx`` with the shipped settings (QDQ, per-channel int8 weights,
  ``reduce_range`` as ``export.onnx.cpu_needs_reduce_range()``, MinMax calibration on the same 256
  training images export used) except for two: activations int8 (S8S8) or uint8 (U8S8, VNNI's
  native u8 x s8), and all op types or only Conv/Gemm/MatMul. "u8s8 all" is the bundle's own
  ``model_int8.onnx``. Each is timed by the ``--case ort`` child (``device_bench``'s ONNX Runtime
  adapter, default session memory) beside the fp32 file; fidelity is against the torch model on
  the run's held-out test split (cosine per image, precision@1 there). The table also counts the
  Q/DQ nodes in each file and, in the graph ONNX Runtime's optimizer leaves (saved through
  ``SessionOptions.optimized_model_filepath``), the Convs fused into QLinearConv, the Convs left
  float, the Q/DQ nodes left and the layout Transposes it added.

"All cores" is ``os.cpu_count()``. The cases run in ``--rounds`` rounds, in a shuffled order each
round, an fp32 file right beside its int8 file (the order flipped every other round), so that load
from other jobs falls on both alike. Reported: the median over rounds of each figure, and the
int8/fp32 ratio of the median p50s (with the range of the per-round ratios), against the targets:
int8 p50 at most 0.3x fp32 p50, and int8 peak RSS at most 64 MB.

    python benchmarks/backbone_speed.py --json runs/backbone_speed.json
    python benchmarks/backbone_speed.py --dims 8 --rounds 1 --runs 20      # smoke run
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Only numpy and device_bench at the top: the --case children import no more than they measure.
from device_bench.bench import latency_stats  # noqa: E402
from device_bench.files import write_json  # noqa: E402
from device_bench.runtimes import ORT_MEMORY, open_runtime  # noqa: E402

BACKBONE = "timm:mobilenetv3_small_100"
PHOTO_CLASSES, PHOTOS_PER_CLASS = 32, 32
CALIB_SAMPLES = 256
BATCHES = (1, 8)
WARMUP = 5
GALLERY = 1000
TARGET_RATIO = 0.3  # int8 p50 / fp32 p50
TARGET_RSS_MB = 64.0  # int8 peak RSS
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]
# name -> (activation type, op types to quantize: None = all); SHIPPED is what export writes.
VARIANTS = {
    "s8s8-all": ("QInt8", None),
    "u8s8-all": ("QUInt8", None),
    "s8s8-conv": ("QInt8", QUANTIZED_OPS),
    "u8s8-conv": ("QUInt8", QUANTIZED_OPS),
}
SHIPPED = "u8s8-all"
CASE_TIMEOUT_S = 300


@dataclass
class Case:
    """One measured process: a runtime running one file at one thread count."""

    group: str  # main | variant
    dim: int
    runtime: str  # torch | onnxruntime | litert
    precision: str  # fp32 | int8 (main); fp32 or a VARIANTS key (variant)
    ort_memory: str  # default | lean | "" (not ONNX Runtime)
    threads: int
    path: str = ""  # the bundle (main), or the .onnx file (variant); the run for torch

    @property
    def key(self) -> tuple:
        return (self.group, self.dim, self.runtime, self.precision, self.ort_memory, self.threads)


@dataclass
class Measured:
    case: Case
    round: int
    status: str = "ok"  # ok | failed
    p50_ms: dict[int, float] = field(default_factory=dict)
    p99_ms: dict[int, float] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    runtime_version: str = ""
    message: str = ""


# ---------------------------------------------------------------- children (--case)


def status_mb(name: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{name} not in /proc/self/status")


def time_batches(run, inputs: np.ndarray, runs: int) -> dict:
    """p50/p99 per batch of ``run(x)`` on ``inputs`` repeated to each batch size, as device_bench times."""
    out = {}
    for size in BATCHES:
        x = np.ascontiguousarray(np.resize(inputs, (size, *inputs.shape[1:])))
        for _ in range(WARMUP):
            run(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
        stats = latency_stats(times, size)
        out[size] = {"p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"]}
    return out


def torch_case(run_dir: str, bundle: str, threads: int, runs: int) -> dict:
    import torch

    from edge_siamese.checkpoints import load_run

    torch.set_num_threads(threads)
    model = load_run(Path(run_dir)).model
    inputs = np.load(Path(bundle) / "golden.npz")["inputs"]
    with torch.inference_mode():
        latency = time_batches(lambda x: model(torch.from_numpy(x)), inputs, runs)
    return {"latency": latency, "peak_rss_mb": status_mb("VmHWM"), "runtime_version": torch.__version__}


def ort_case(path: str, bundle: str, threads: int, runs: int) -> dict:
    model = open_runtime(Path(path), "onnx", "onnxruntime", threads)
    inputs = np.load(Path(bundle) / "golden.npz")["inputs"]
    latency = time_batches(model.run, inputs, runs)
    return {"latency": latency, "peak_rss_mb": status_mb("VmHWM"), "runtime_version": model.version}


# ---------------------------------------------------------------- the parent: build


def build_model(work: Path, dim: int, input_size: list[int], rebuild: bool) -> tuple[Path, Path]:
    """Train and export one model into ``work`` (or reuse one trained there with the same config)."""
    from sample_photos import photo_folder

    from edge_siamese.checkpoints import read_config
    from edge_siamese.config import TrainConfig
    from edge_siamese.train import train
    from export.exporter import export_run

    folder = photo_folder(work / "photos", PHOTO_CLASSES, PHOTOS_PER_CLASS)
    config = TrainConfig(
        dataset=str(folder), backbone=BACKBONE, input_size=list(input_size), embedding_dim=dim,
        epochs=2, batch_size=32, samples_per_class=4, workers=0, device="cpu",
    )  # fmt: skip
    run_dir = work / f"d{dim}-{input_size[0]}x{input_size[1]}"
    bundle = run_dir / "bundle"
    reusable = (bundle / "manifest.json").exists() and (run_dir / "model.safetensors").exists()
    if not rebuild and reusable and read_config(run_dir)[0] == config.validate():
        return run_dir, bundle
    train(config, run_dir, force=True, progress=False)
    rows, written = export_run(
        run_dir, bundle, ["onnx", "tflite"], ["fp32", "int8"], calib_samples=CALIB_SAMPLES,
        force=True, allow_degraded=True, progress=False,
    )  # fmt: skip
    if written is None:
        raise RuntimeError(f"export of d={dim} wrote no bundle: " + "; ".join(f"{r.format} {r.precision}: {r.problem}" for r in rows))
    return run_dir, bundle


def export_fidelity(bundle: Path) -> dict:
    """(format, precision) -> the fidelity export measured, from the bundle's manifest."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {f"{e['format']} {e['precision']}": {**e["fidelity"], "status": e["status"], "size_bytes": e["size_bytes"]} for e in manifest["files"]}


def op_counts(proto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def optimized_op_counts(path: Path, scratch: Path) -> dict[str, int]:
    """The op types of the graph ONNX Runtime runs, after its optimizer has fused Q/DQ pairs into
    QLinear* ops where its CPU kernels allow (what tells the recipes apart)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(scratch)
    options.log_severity_level = 3  # not the warning that the saved graph is hardware-specific
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = op_counts(onnx.load(str(scratch)))
    scratch.unlink()
    return counts


def quantize_variants(run_dir: Path, bundle: Path) -> dict[str, dict]:
    """The ONNX int8 recipes of VARIANTS, each with its file, size, Q/DQ count and fidelity to torch."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from device_bench.metrics import embedding_agreement
    from edge_siamese.checkpoints import load_run
    from edge_siamese.models import embed
    from edge_siamese.run import prepare_data, read_index
    from export.onnx import INPUT_NAME, cpu_needs_reduce_range

    run = load_run(run_dir)
    data = prepare_data(run.config, run.preprocessing, read_index(run_dir))
    # The calibration images export_run chose (the same rng, the same draw).
    rng = np.random.default_rng(0)
    calibration = data.inputs("train", np.sort(rng.choice(len(data.splits["train"]), CALIB_SAMPLES, replace=False))).numpy()
    test_x, test_y = data.inputs("test"), data.labels("test")
    reference = embed(run.model, test_x).numpy()
    distance, weights = run.loss.distance.name, run.loss.distance.weights_array()

    class Reader(CalibrationDataReader):  # as export.onnx.export_int8 batches it
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 32)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    folder = run_dir / "int8-variants"
    folder.mkdir(exist_ok=True)
    files = {"fp32": bundle / "model_fp32.onnx", SHIPPED: bundle / "model_int8.onnx"}
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice to pre-process, twice per file
    try:
        for name, (activations, ops) in VARIANTS.items():
            if name in files:
                continue
            files[name] = folder / f"{name}.onnx"
            quantize_static(
                str(files["fp32"]), str(files[name]), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=ops,
                per_channel=True, reduce_range=cpu_needs_reduce_range(), activation_type=getattr(QuantType, activations),
                weight_type=QuantType.QInt8,
            )  # fmt: skip
    finally:
        logging.getLogger().setLevel(level)
    out = {}
    for name, path in files.items():
        outputs = open_runtime(path, "onnx", "onnxruntime").run(test_x.numpy())
        fid = embedding_agreement(outputs, reference, test_y, distance, weights)
        out[name] = {
            "path": str(path),
            "size_bytes": path.stat().st_size,
            "ops_in_file": op_counts(onnx.load(str(path))),
            "ops_after_ort_optimizer": optimized_op_counts(path, folder / "optimized.onnx"),
            **{k: fid[k] for k in ("num_samples", "mean_cosine", "min_cosine", "precision_at_1", "reference_precision_at_1")},
        }
    return out


# ---------------------------------------------------------------- the parent: measure


def rounds_of_cases(models: dict[int, tuple[Path, Path]], variants: dict[str, dict], variant_dim: int | None, thread_counts: list[int]) -> list[list[Case]]:
    """The cases in groups that run back to back: torch alone, an fp32 file beside its int8 file,
    the int8 recipes beside their fp32 file."""
    groups = []
    for dim, (run_dir, bundle) in models.items():
        for t in thread_counts:
            groups.append([Case("main", dim, "torch", "fp32", "", t, str(run_dir))])
            for memory in ("default", "lean"):
                groups.append([Case("main", dim, "onnxruntime", p, memory, t, str(bundle)) for p in ("fp32", "int8")])
            groups.append([Case("main", dim, "litert", p, "", t, str(bundle)) for p in ("fp32", "int8")])
            if dim == variant_dim:
                groups.append([Case("variant", dim, "onnxruntime", name, "default", t, v["path"]) for name, v in variants.items()])
    return groups


def order_round(groups: list[list[Case]], round_index: int) -> list[Case]:
    """This round's order: the groups shuffled, each group's cases rotated by the round."""
    shuffled = list(groups)
    random.Random(round_index).shuffle(shuffled)
    out = []
    for g in shuffled:
        k = round_index % len(g)
        out += g[k:] + g[:k]
    return out


def device_bench_case(case: Case, runs: int) -> dict:
    fmt = "onnx" if case.runtime == "onnxruntime" else "tflite"
    cmd = [
        sys.executable, "-m", "device_bench", case.path, "--format", fmt, "--precision", case.precision,
        "--runtime", case.runtime, "--threads", str(case.threads), "--batch", ",".join(map(str, BATCHES)),
        "--runs", str(runs), "--gallery", str(GALLERY), "--json", "-", "--quiet",
    ]  # fmt: skip
    if case.ort_memory:
        cmd += ["--ort-memory", case.ort_memory]
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    if not done.stdout.strip():
        raise RuntimeError((done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1])
    row = json.loads(done.stdout)["rows"][0]
    if row["status"] != "verified":
        raise RuntimeError(f"{row['status']}: {row.get('error', '')}")
    latency = {r["batch"]: {"p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"]} for r in row["latency"]}
    return {"latency": latency, "peak_rss_mb": row["memory"]["peak_rss_mb"], "runtime_version": row["runtime_version"]}


def child_case(case: Case, bundle: Path, runs: int) -> dict:
    kind = "torch" if case.runtime == "torch" else "ort"
    cmd = [sys.executable, __file__, "--case", kind, case.path, str(bundle), str(case.threads), "--runs", str(runs)]
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(case: Case, round_index: int, bundle: Path, runs: int) -> Measured:
    result = Measured(case, round_index)
    try:
        if case.group == "main" and case.runtime != "torch":
            got = device_bench_case(case, runs)
        else:
            got = child_case(case, bundle, runs)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
        result.status, result.message = "failed", str(exc)[:300]
        return result
    result.p50_ms = {int(b): v["p50_ms"] for b, v in got["latency"].items()}
    result.p99_ms = {int(b): v["p99_ms"] for b, v in got["latency"].items()}
    result.peak_rss_mb, result.runtime_version = got["peak_rss_mb"], got["runtime_version"]
    return result


# ---------------------------------------------------------------- the parent: report


@dataclass
class Summary:
    """A case's medians over the rounds it ran without failing."""

    case: Case
    rounds: int
    p50_ms: dict[int, float]
    p99_ms: dict[int, float]
    peak_rss_mb: float | None
    per_round_p50_ms: dict[int, list[float]]


def summarize(results: list[Measured]) -> dict[tuple, Summary]:
    by_key: dict[tuple, list[Measured]] = {}
    for r in results:
        by_key.setdefault(r.case.key, []).append(r)
    out = {}
    for key, rs in by_key.items():
        ok = [r for r in rs if r.status == "ok"]
        per_round = {b: [r.p50_ms[b] for r in ok] for b in BATCHES}
        out[key] = Summary(
            rs[0].case,
            len(ok),
            {b: statistics.median(v) for b, v in per_round.items() if v},
            {b: statistics.median(r.p99_ms[b] for r in ok) for b in BATCHES if ok},
            statistics.median(r.peak_rss_mb for r in ok) if ok else None,
            {b: [r.p50_ms[b] for r in sorted(ok, key=lambda r: r.round)] for b in BATCHES},
        )
    return out


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _mb(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def main_table(summaries: dict[tuple, Summary], failures: dict[tuple, int]) -> str:
    header = ["d", "runtime", "precision", "ORT memory", "threads"]
    header += [f"{s} b={b}" for b in BATCHES for s in ("p50 ms", "p99 ms")] + ["peak RSS MB", "rounds"]
    lines = ["| " + " | ".join(header) + " |", "|---:|---|---|---|---:|" + "---:|" * (len(header) - 5)]
    order = {"torch": 0, "onnxruntime": 1, "litert": 2}
    rows = sorted((s for s in summaries.values() if s.case.group == "main"), key=lambda s: (-s.case.dim, order[s.case.runtime], s.case.ort_memory, s.case.threads, s.case.precision))
    for s in rows:
        c = s.case
        cells = [str(c.dim), c.runtime + (" (eager)" if c.runtime == "torch" else ""), c.precision, c.ort_memory or "—", str(c.threads)]
        cells += [_ms(v.get(b)) for b in BATCHES for v in (s.p50_ms, s.p99_ms)]
        failed = failures.get(c.key, 0)
        cells += [_mb(s.peak_rss_mb), f"{s.rounds}" + (f" ({failed} failed)" if failed else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(summaries: dict[tuple, Summary]) -> list[dict]:
    """int8/fp32 per (d, runtime, ORT memory, threads): ratio of median p50s, per-round range, targets."""
    out = []
    for key, fp32 in summaries.items():
        group, dim, runtime, precision, memory, threads = key
        int8 = summaries.get((group, dim, runtime, "int8", memory, threads))
        if group != "main" or precision != "fp32" or int8 is None:
            continue
        row = {"dim": dim, "runtime": runtime, "ort_memory": memory, "threads": threads, "int8_peak_rss_mb": int8.peak_rss_mb, "fp32_peak_rss_mb": fp32.peak_rss_mb}
        for b in BATCHES:
            if b in int8.p50_ms and b in fp32.p50_ms:
                pairs = [i / f for i, f in zip(int8.per_round_p50_ms[b], fp32.per_round_p50_ms[b])]
                row[f"ratio_b{b}"] = int8.p50_ms[b] / fp32.p50_ms[b]
                row[f"ratio_b{b}_range"] = [min(pairs), max(pairs)] if pairs else None
        out.append(row)
    order = {"onnxruntime": 0, "litert": 1}
    return sorted(out, key=lambda r: (-r["dim"], order[r["runtime"]], r["ort_memory"], r["threads"]))


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else "PASS" if ok else "MISS"


def ratio_table(rows: list[dict]) -> str:
    header = ["d", "runtime", "ORT memory", "threads"]
    for b in BATCHES:
        header += [f"int8/fp32 p50 b={b}", "per-round range", f"≤ {TARGET_RATIO}x"]
    header += ["fp32 peak RSS MB", "int8 peak RSS MB", f"≤ {TARGET_RSS_MB:.0f} MB"]
    lines = ["| " + " | ".join(header) + " |", "|---:|---|---|---:|" + "---:|---:|:---:|" * len(BATCHES) + "---:|---:|:---:|"]
    for r in rows:
        cells = [str(r["dim"]), r["runtime"], r["ort_memory"] or "—", str(r["threads"])]
        for b in BATCHES:
            ratio, span = r.get(f"ratio_b{b}"), r.get(f"ratio_b{b}_range")
            cells += [
                "—" if ratio is None else f"{ratio:.2f}x",
                "—" if not span else f"{span[0]:.2f}-{span[1]:.2f}",
                _verdict(None if ratio is None else ratio <= TARGET_RATIO),
            ]
        rss = r["int8_peak_rss_mb"]
        cells += [_mb(r["fp32_peak_rss_mb"]), _mb(rss), _verdict(None if rss is None else rss <= TARGET_RSS_MB)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """One line per target: which (d, runtime, ORT memory, threads, batch) cells meet it."""
    lines = []
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        cells = [(r, b) for r in rows if r["runtime"] == runtime for b in BATCHES if r.get(f"ratio_b{b}") is not None]
        met = [c for c in cells if c[0][f"ratio_b{c[1]}"] <= TARGET_RATIO]
        lines.append(f"int8 p50 <= {TARGET_RATIO}x fp32, {runtime}: {len(met)} of {len(cells)} cells ({_verdict(bool(cells) and len(met) == len(cells))})")
    for dim in dict.fromkeys(r["dim"] for r in rows):
        under = [f"{r['runtime']}{' ' + r['ort_memory'] if r['ort_memory'] else ''} t={r['threads']} ({r['int8_peak_rss_mb']:.1f} MB)"
                 for r in rows if r["dim"] == dim and r["int8_peak_rss_mb"] is not None and r["int8_peak_rss_mb"] <= TARGET_RSS_MB]
        lines.append(f"int8 peak RSS <= {TARGET_RSS_MB:.0f} MB, d={dim}: {', '.join(under) if under else 'none'} ({_verdict(bool(under))})")
    return lines


def _qdq(ops: dict[str, int]) -> int:
    return ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0)


def variant_table(summaries: dict[tuple, Summary], variants: dict[str, dict], dim: int, thread_counts: list[int]) -> str:
    header = ["recipe", "activations", "ops quantized", "size KB", "Q+DQ in file", "ORT runs: QLinearConv / Conv / Q+DQ / Transpose"]
    header += [f"p50 ms b={b} t={t} (x fp32)" for t in thread_counts for b in BATCHES]
    header += ["mean cos", "min cos", "P@1 (torch's)"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|---:|---:|---:|" + "---:|" * (len(header) - 6)]
    for name, v in variants.items():
        activations, ops = VARIANTS.get(name, ("float32", None))
        kind = "—" if name == "fp32" else {"QInt8": "int8 (S8S8)", "QUInt8": "uint8 (U8S8)"}[activations]
        cells = [name + (" (shipped)" if name == SHIPPED else ""), kind, "—" if name == "fp32" else "/".join(ops) if ops else "all", f"{v['size_bytes'] / 1024:.0f}"]
        run_ops = v["ops_after_ort_optimizer"]
        cells += [str(_qdq(v["ops_in_file"])), " / ".join(str(run_ops.get(op, 0)) for op in ("QLinearConv", "Conv")) + f" / {_qdq(run_ops)} / {run_ops.get('Transpose', 0)}"]
        for t in thread_counts:
            s = summaries.get(("variant", dim, "onnxruntime", name, "default", t))
            ref = summaries.get(("variant", dim, "onnxruntime", "fp32", "default", t))
            for b in BATCHES:
                if s is None or b not in s.p50_ms:
                    cells.append("—")
                    continue
                rel = f" ({s.p50_ms[b] / ref.p50_ms[b]:.2f}x)" if ref and b in ref.p50_ms and name != "fp32" else ""
                cells.append(_ms(s.p50_ms[b]) + rel)
        cells += [f"{v['mean_cosine']:.4f}", f"{v['min_cosine']:.4f}", f"{v['precision_at_1']:.3f} ({v['reference_precision_at_1']:.3f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    """CPU model and flags that matter here, cores, RAM, and the versions that ran."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), platform.machine())
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    versions = {}
    for package in ("torch", "timm", "onnxruntime", "ai-edge-litert", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "vnni": any(f in cpuinfo for f in ("avx512_vnni", "avx_vnni")),
        "cores": os.cpu_count(),
        "ram_gib": int(meminfo["MemTotal"].split()[0]) / 2**20,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 8], help="embedding dims; the first also gets the int8 recipe table")
    p.add_argument("--rounds", type=int, default=3, help="times each case runs (medians over them)")
    p.add_argument("--runs", type=int, default=200, help="timed runs per batch size in each case")
    p.add_argument("--input-size", type=int, nargs=2, default=[112, 112], metavar=("H", "W"))
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "backbone_speed", help="photos, runs and bundles (reused)")
    p.add_argument("--rebuild", action="store_true", help="train and export again even when --work has the models")
    p.add_argument("--no-variants", action="store_true", help="skip the ONNX int8 recipe table")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--case", nargs=4, metavar=("KIND", "PATH", "BUNDLE", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.runs < 1:
        p.error("--rounds and --runs must be at least 1")
    return args


def say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case:
        kind, path, bundle, threads = args.case
        child = torch_case if kind == "torch" else ort_case
        print(json.dumps(child(path, bundle, int(threads), args.runs)))
        return
    if not Path("/proc/self/status").exists():
        sys.exit("backbone_speed: needs Linux /proc (VmHWM)")

    started = time.perf_counter()
    info = machine()
    thread_counts = sorted({1, os.cpu_count() or 1})
    models, variants = {}, {}
    for dim in args.dims:
        say(args.quiet, f"d={dim}: training and exporting {BACKBONE} at {args.input_size[0]}x{args.input_size[1]} (reused when in {args.work}) ({time.perf_counter() - started:.0f} s)")
        models[dim] = build_model(args.work, dim, args.input_size, args.rebuild)
    variant_dim = None if args.no_variants else args.dims[0]
    if variant_dim is not None:
        say(args.quiet, f"d={variant_dim}: quantizing the ONNX int8 recipes ({time.perf_counter() - started:.0f} s)")
        variants = quantize_variants(*models[variant_dim])
    fidelity = {dim: export_fidelity(bundle) for dim, (_, bundle) in models.items()}
    build_s = time.perf_counter() - started

    groups = rounds_of_cases(models, variants, variant_dim, thread_counts)
    total = args.rounds * sum(len(g) for g in groups)
    results, loads, measure_started = [], [os.getloadavg()[0]], time.perf_counter()
    for round_index in range(args.rounds):
        for case in order_round(groups, round_index):
            done = len(results)
            elapsed = time.perf_counter() - measure_started
            eta = f", about {elapsed / done * (total - done):.0f} s left" if done else ""
            say(args.quiet, f"[{done + 1}/{total}] round {round_index + 1}: d={case.dim} {case.runtime} {case.precision} {case.ort_memory} t={case.threads} ({elapsed:.0f} s{eta})")
            results.append(measure(case, round_index, models[case.dim][1], args.runs))
            loads.append(os.getloadavg()[0])
            if results[-1].status != "ok":
                say(args.quiet, f"  failed: {results[-1].message}")
    measure_s = time.perf_counter() - measure_started

    summaries = summarize(results)
    failures: dict[tuple, int] = {}
    for r in results:
        if r.status != "ok":
            failures[r.case.key] = failures.get(r.case.key, 0) + 1
    ratio_rows = ratios(summaries)
    load = {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    print(
        f"{info['cpu']} ({'AVX-512 VNNI' if info['vnni'] else 'no VNNI'}), {info['cores']} cores, {info['ram_gib']:.1f} GiB RAM; "
        f"1-min load average over the measurement {load['min']:.1f}-{load['max']:.1f} (median {load['median']:.1f}); "
        f"Python {info['python']}, {versions}; {info['date_utc']}"
    )
    print(f"build {build_s:.0f} s, measurement {measure_s:.0f} s ({args.rounds} rounds, {args.runs} runs per batch)\n")
    print(main_table(summaries, failures) + "\n")
    print(ratio_table(ratio_rows) + "\n")
    print("\n".join(verdicts(ratio_rows)) + "\n")
    if variant_dim is not None:
        print(f"ONNX int8 recipes, d={variant_dim}, ONNX Runtime default session memory:\n")
        print(variant_table(summaries, variants, variant_dim, thread_counts) + "\n")
    print("export's own fidelity checks (held-out test split):")
    for dim, files in fidelity.items():
        print(f"  d={dim}: " + "; ".join(f"{k} {v['status']} mean cos {v['mean_cosine']:.4f} min {v['min_cosine']:.4f} P@1 {v['precision_at_1']:.3f} ({v['reference_precision_at_1']:.3f})" for k, v in files.items()))
    if args.json:
        write_json(
            args.json,
            {
                "machine": info,
                "load_average_1min": {**load, "samples": loads},
                "settings": {"dims": args.dims, "rounds": args.rounds, "runs": args.runs, "warmup": WARMUP, "batches": list(BATCHES),
                             "threads": thread_counts, "input_size": args.input_size, "gallery": GALLERY, "calib_samples": CALIB_SAMPLES,
                             "ort_memory_options": ORT_MEMORY},
                "build_s": build_s,
                "measure_s": measure_s,
                "export_fidelity": fidelity,
                "variants": variants,
                "ratios": ratio_rows,
                "summaries": [{**asdict(s.case), "rounds": s.rounds, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "peak_rss_mb": s.peak_rss_mb} for s in summaries.values()],
                "results": [asdict(r) for r in results],
            },
        )


if __name__ == "__main__":
    main()
