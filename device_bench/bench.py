"""What ``python -m device_bench`` measures: per model file, in a fresh process each, the cost of
loading and running it, its accuracy on the bundle's ``eval.npz``, and 1:N gallery search.

Timing follows TFLite's ``benchmark_model``: init, first inference, then warm-up runs and timed
runs (p50/p90/p99/mean/std). Memory is read from the OS (``/proc/self/status``: VmRSS, VmHWM).
A file that fails its golden check is reported as failed and never timed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .embedder import Gallery
from .manifest import read_bundle
from .metrics import embedding_agreement, retrieval_metrics
from .runtimes import open_runtime

GOLDEN_SLACK = 1e-3  # a file may fall this far below the min cosine export measured (float32 vs float64, runtimes)


def memory_mb() -> dict:
    """Current and peak resident memory of this process (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024}
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
        return {"rss_mb": peak, "peak_rss_mb": peak}


ACCURACY = ("num_samples", "precision_at_1", "mean_average_precision_at_r", "tar_at_far_1e-3")


def eval_accuracy(bundle, model) -> dict:
    """``model`` (an opened runtime) on the bundle's eval.npz: the retrieval metrics a row reports."""
    eval_set = bundle.eval_set()
    embedding = bundle.manifest["embedding"]
    emb = model.run(bundle.preprocessing(eval_set["images"]))
    metrics = retrieval_metrics(emb, eval_set["labels"], embedding["distance"], embedding["distance_weights"], episodes=200)
    return {k: metrics[k] for k in ACCURACY}


def memory_since(before: dict) -> dict:
    """Current and peak RSS, with the increase over ``before`` (an earlier ``memory_mb()``)."""
    after = memory_mb()
    return {**after, "rss_increase_mb": after["rss_mb"] - before["rss_mb"], "baseline_rss_mb": before["rss_mb"]}


def reset_peak_rss() -> None:
    """Start this process's peak RSS (``VmHWM``) over from its current RSS (Linux >= 4.0, by
    writing 5 to ``/proc/self/clear_refs``), so that a later ``memory_mb()`` gives the peak of what
    ran since; elsewhere the peak stays the lifetime one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def latency_stats(times_s: list[float], batch: int) -> dict:
    # Percentiles by linear interpolation on the sorted times (np.percentile's default rule):
    # np.percentile itself pulls in numpy.ma, 1.2 MB of RSS in the measured process.
    ms = np.sort(np.asarray(times_s)) * 1000
    ranks = np.arange(len(ms))

    def pct(q: float) -> float:
        return float(np.interp(q / 100 * (len(ms) - 1), ranks, ms))

    return {
        "runs": len(ms),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std()),
        "items_per_s": float(batch * len(ms) / (ms.sum() / 1000)),
    }


def _timed_runs(fn, warmup: int, runs: int | None, min_seconds: float | None) -> list[float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while not times or (runs is not None and len(times) < runs) or (runs is None and time.perf_counter() - started < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_file(
    bundle_path: Path,
    file: str,
    runtime: str | None,
    threads: int | None,
    batch: list[int],
    warmup: int,
    runs: int | None,
    min_seconds: float | None,
    gallery: list[int],
    ort_memory: str = "default",
) -> dict:
    """One model file, measured in this process (the parent gives each file a fresh one)."""
    before = memory_mb()
    bundle = read_bundle(bundle_path, verify_sha256=False)
    entry = next(e for e in bundle.files if e["path"] == file)
    row: dict = {"file": file, "format": entry["format"], "precision": entry["precision"], "size_bytes": entry["size_bytes"]}
    t0 = time.perf_counter()
    model = open_runtime(bundle.path / file, entry["format"], runtime, threads, ort_memory)
    row["runtime"], row["runtime_version"] = model.name, model.version
    row["init_ms"] = (time.perf_counter() - t0) * 1000

    golden = bundle.golden()
    t0 = time.perf_counter()
    golden_out = model.run(golden["inputs"][:1])
    row["first_inference_ms"] = (time.perf_counter() - t0) * 1000
    golden_out = np.concatenate([golden_out, model.run(golden["inputs"][1:])])
    embedding = bundle.manifest["embedding"]
    weights = embedding["distance_weights"]
    bar = entry["fidelity"]["min_cosine"] - GOLDEN_SLACK
    try:
        check = embedding_agreement(golden_out, golden["embeddings"], None, embedding["distance"], weights)
    except ValueError as exc:  # non-finite outputs: no figure to report, the row fails
        return {**row, "status": "failed", "error": f"golden check failed: {exc}; this runtime or model computes non-finite values", "memory": memory_since(before)}
    preprocessed = bundle.preprocessing(golden["images"])
    row["golden"] = {
        "min_cosine": check["min_cosine"],
        "required_min_cosine": bar,
        "preprocessing_max_abs_diff": float(np.abs(preprocessed - golden["inputs"]).max()),
    }
    if not check["min_cosine"] >= bar:
        error = f"golden check failed: min cosine {check['min_cosine']:.5f} < {bar:.5f}; this runtime miscomputes the model"
        return {**row, "status": "failed", "error": error, "memory": memory_since(before)}

    row["latency"] = []
    for size in batch:
        x = np.ascontiguousarray(np.resize(golden["inputs"], (size, *golden["inputs"].shape[1:])))
        times = _timed_runs(lambda: model.run(x), warmup, runs, min_seconds)
        row["latency"].append({"batch": size, **latency_stats(times, size)})
    # The model's own footprint: loaded and run, before eval.npz and the galleries are touched.
    row["memory"] = memory_since(before)

    row["accuracy"] = eval_accuracy(bundle, model)

    row["gallery"] = []
    dim = embedding["dim"]
    precision = "int8" if entry["precision"] == "int8" else "fp32"
    rng = np.random.default_rng(0)
    for n in gallery:
        store = Gallery(dim, embedding["distance"], precision, None if weights is None else np.asarray(weights), int8_scale=1 / 127)
        for start in range(0, n, Gallery.CHUNK):  # generated chunk by chunk: no N x dim float64 at once
            chunk = rng.normal(size=(min(Gallery.CHUNK, n - start), dim)).astype(np.float32)
            store.enroll(chunk / np.linalg.norm(chunk, axis=1, keepdims=True), np.arange(start, start + len(chunk)))
        query = golden_out[:1]  # one real embedding of this model as the probe
        times = _timed_runs(lambda: store.search(query, 1), max(1, warmup), runs or 20, None)
        row["gallery"].append({"size": n, "precision": precision, "bytes": store.nbytes, **latency_stats(times, 1)})
    row["memory"]["peak_rss_with_eval_and_gallery_mb"] = memory_mb()["peak_rss_mb"]
    row["status"] = "verified"
    return row


def main(argv: list[str]) -> int:
    """Child entry: ``python -m device_bench.bench BUNDLE FILE SETTINGS_JSON`` prints the file's row.

    Kept apart from ``__main__`` so that the measured process imports no more than it needs.
    """
    bundle, file, settings = argv
    try:
        row = bench_file(Path(bundle), file, **json.loads(settings))
    except Exception as exc:  # reported in this file's row; the parent goes on with the others
        row = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
