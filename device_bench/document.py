"""The benchmark's JSON document: its schema, the machine it ran on, and the table it prints.

Every target's result is one of these (``docs/bench-schema.md``), validated before it is
written. The measured child process (``device_bench.bench``) never imports this module.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np

from .manifest import MANIFEST, NUMBER, Bundle, BundleError, Optional, check_schema, sha256_file

BENCH_SCHEMA_VERSION = 2  # 2: row statuses are STATUSES' words (verified, failed, not_measured)
ROW_STATUSES = ("verified", "failed", "not_measured")
# The schema: dicts list required keys, tuples the types a value may take.
LATENCY = {"runs": (int,), "p50_ms": NUMBER, "p90_ms": NUMBER, "p99_ms": NUMBER, "mean_ms": NUMBER, "std_ms": NUMBER, "items_per_s": NUMBER}
ROW_FAILED = {"file": (str,), "format": (str,), "precision": (str,), "size_bytes": (int,), "status": (str,), "error": (str,)}
ROW_VERIFIED = {
    "file": (str,),
    "format": (str,),
    "precision": (str,),
    "size_bytes": (int,),
    "status": (str,),
    "runtime": (str,),
    "runtime_version": (str,),
    "init_ms": NUMBER,
    "first_inference_ms": NUMBER,
    "golden": {"min_cosine": NUMBER, "required_min_cosine": NUMBER, "preprocessing_max_abs_diff": NUMBER},
    "latency": (list,),
    "memory": {"rss_mb": NUMBER, "peak_rss_mb": NUMBER, "rss_increase_mb": NUMBER, "baseline_rss_mb": NUMBER, "peak_rss_with_eval_and_gallery_mb": NUMBER},
    "accuracy": {"num_samples": (int,), "precision_at_1": NUMBER, "mean_average_precision_at_r": NUMBER, "tar_at_far_1e-3": NUMBER},
    "gallery": (list,),
}
RESULT = {
    "schema_version": (int,),
    "target": {"name": (str,), "emulated": (bool,)},
    "bundle": {"path": (str,), "manifest_sha256": (str,), "loss": (str,), "embedding_dim": (int,), "distance": (str,)},
    "settings": {"runtime": (str, type(None)), "threads": (int, type(None)), "ort_memory": Optional((str,)), "batch": (list,), "warmup": (int,), "runs": (int, type(None)), "min_seconds": (float, int, type(None)), "gallery": (list,)},
    "environment": {"machine": (str,), "cpu": (str,), "cores": (int, type(None)), "ram_mb": (float, int, type(None)), "os": (str,), "python": (str,), "numpy": (str,), "threads": (int, type(None))},
    "rows": (list,),
}


def validate_result(result: dict) -> dict:
    """Check a benchmark JSON document against its schema; return it."""
    check_schema(result, RESULT)
    if result["schema_version"] != BENCH_SCHEMA_VERSION:
        raise BundleError(f"benchmark schema version {result['schema_version']} is not {BENCH_SCHEMA_VERSION}")
    for i, row in enumerate(result["rows"]):
        check_schema(row, ROW_VERIFIED if row.get("status") == "verified" else ROW_FAILED, f"rows[{i}]")
        if row["status"] not in ROW_STATUSES:
            raise BundleError(f"rows[{i}].status must be one of {', '.join(ROW_STATUSES)}, got {row['status']!r}")
        for j, lat in enumerate(row.get("latency", [])):
            check_schema(lat, {"batch": (int,), **LATENCY}, f"rows[{i}].latency[{j}]")
        for j, gal in enumerate(row.get("gallery", [])):
            check_schema(gal, {"size": (int,), "precision": (str,), "bytes": (int,), **LATENCY}, f"rows[{i}].gallery[{j}]")
    return result


def environment(threads: int | None) -> dict:
    """Where this ran: CPU, cores, RAM, OS, Python and library versions, and a Pi's throttling state."""
    cpu = platform.processor() or platform.machine()
    try:
        info = dict(
            (k.strip().lower(), v.strip()) for k, v in (l.split(":", 1) for l in Path("/proc/cpuinfo").read_text().splitlines() if ":" in l)
        )
        # x86 names the CPU in "model name"; a Raspberry Pi names the board in "Model".
        cpu = info.get("model name") or info.get("model") or info.get("hardware") or cpu
    except OSError:
        pass
    ram_mb = None
    try:
        ram_mb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        pass
    env = {
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_mb": ram_mb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "threads": threads,
    }
    if shutil.which("vcgencmd"):
        try:
            env["throttled"] = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["throttled"] = "unknown"
    return env


def result_document(target: dict, bundle: Bundle, settings: dict, rows: list[dict]) -> dict:
    """The validated document for ``rows`` measured from ``bundle`` on ``target`` (``name``, ``emulated``, ...)."""
    manifest = bundle.manifest
    return validate_result(
        {
            "schema_version": BENCH_SCHEMA_VERSION,
            "target": target,
            "bundle": {
                "path": str(bundle.path),
                "manifest_sha256": sha256_file(bundle.path / MANIFEST),
                "loss": manifest["training"]["loss"],
                "embedding_dim": manifest["embedding"]["dim"],
                "distance": manifest["embedding"]["distance"],
            },
            "settings": settings,
            "environment": environment(settings["threads"]),
            "rows": rows,
        }
    )


def table(result: dict) -> str:
    """The document as the table ``python -m device_bench`` and ``edge-siamese bench`` print."""
    head = f"{'Format':<7} {'Precision':<9} {'Runtime':<14} {'Status':<6} {'Size KB':>8} {'Init ms':>8} {'Batch':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'items/s':>9} {'Peak RSS MB':>11} {'P@1':>6} {'cos golden':>10}"
    lines = [head]
    for row in result["rows"]:
        mark = {"verified": "✅", "failed": "❌"}.get(row["status"], "–")
        base = f"{row.get('format', '?'):<7} {row.get('precision', '?'):<9} {row.get('runtime', '-'):<14} {mark:<5} {row.get('size_bytes', 0) / 1024:8.1f}"
        if row["status"] != "verified":
            lines.append(f"{base} {row['status']}: {row.get('error', '')}")
            continue
        for lat in row["latency"]:
            lines.append(
                f"{base} {row['init_ms']:8.1f} {lat['batch']:>5} {lat['p50_ms']:8.3f} {lat['p90_ms']:8.3f} {lat['p99_ms']:8.3f} "
                f"{lat['items_per_s']:9.1f} {row['memory']['peak_rss_mb']:11.1f} {row['accuracy']['precision_at_1']:6.4f} "
                f"{row['golden']['min_cosine']:10.6f}"
            )
        for g in row["gallery"]:
            lines.append(f"{'':<7} gallery {g['size']:>8} x {g['precision']}: {g['bytes'] / 2**20:.2f} MB, 1:N search p50 {g['p50_ms']:.3f} ms")
    return "\n".join(lines)
