"""Peak memory of device_bench's retrieval_metrics: the full-matrix rank metrics against the chunked ones.

For each case (N embeddings in C classes), two fresh processes run ``retrieval_metrics(embeddings,
labels)`` with its defaults (euclidean, knn_k 5): "before", with ``device_bench/metrics.py`` as it
was at ``--before`` (``git show REV:device_bench/metrics.py``, loaded from a temporary file), and
"after", with the working tree's. The inputs are float32 N(0, 1) embeddings of dimension 8
(``retrieval_metrics`` turns them into float64) and labels ``arange(N) % C`` shuffled, so every
class has N / C samples; both from a fixed seed.

- ``peak MB``: the child's ``VmHWM`` from ``/proc/self/status`` after the call, the peak resident
  memory of the whole process (python, numpy, the inputs and the call).
- ``time s``: wall time of the call.
- ``max abs diff``: the largest difference between before's and after's rank metrics.

Each child runs under ``RLIMIT_AS`` = ``--mem-cap-gb`` and ``--timeout-s``: a run that would need
more memory stops with a MemoryError, reported as "exceeded N GB", and the other rows still run.

    python benchmarks/metrics_memory.py                 # N 35,000 in 5 classes, N 100,000 in 10,000
    python benchmarks/metrics_memory.py --quick         # N 10,000 in 2 classes, N 20,000 in 4,000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device_bench.files import write_json
from edge_siamese.progress import progress_bar

METRICS = Path("device_bench/metrics.py")
# The last commit to change metrics.py before it was chunked: (N, depth) neighbour arrays, an (N, classes) vote table.
FULL_MATRIX_REV = "068d2af748c2999fca3f46b52e5909f0543c9bbe"
RANK_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r", "knn_accuracy")
DIM = 8
SEED = 0
CASES = [(35_000, 5), (100_000, 10_000)]
QUICK_CASES = [(10_000, 2), (20_000, 4_000)]


@dataclass
class Run:
    """One (version, N, classes) process; ``status`` is ok, exceeded, timeout or failed."""

    version: str
    num_samples: int
    num_classes: int
    status: str
    peak_rss_mb: float | None = None
    time_s: float | None = None
    metrics: dict | None = None
    message: str = ""


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(module_path: Path, num_samples: int, num_classes: int) -> dict:
    """The child side of ``--case``: one ``retrieval_metrics`` call with the metrics.py at ``module_path``."""
    spec = importlib.util.spec_from_file_location("metrics_under_test", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(SEED)
    embeddings = rng.standard_normal((num_samples, DIM), dtype=np.float32)
    labels = rng.permutation(np.arange(num_samples) % num_classes)
    start = time.perf_counter()
    got = module.retrieval_metrics(embeddings, labels)
    time_s = time.perf_counter() - start
    return {"peak_rss_mb": _status_mb("VmHWM"), "time_s": time_s, "metrics": {k: got[k] for k in RANK_METRICS}}


def _limit_address_space(cap_bytes: int):
    """A ``preexec_fn`` capping the child's address space: an allocation past the cap raises
    MemoryError in the child, instead of the machine running out of memory."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))


def spawn_case(version: str, module_path: Path, num_samples: int, num_classes: int, mem_cap_gb: float, timeout_s: float) -> Run:
    """Run one case in a fresh process under the memory cap and the time limit."""
    cmd = [sys.executable, __file__, "--case", str(module_path), str(num_samples), str(num_classes)]
    limit = _limit_address_space(int(mem_cap_gb * 1e9))
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return Run(version, num_samples, num_classes, "timeout", message=f"over {timeout_s:.0f} s")
    if done.returncode != 0:
        if "MemoryError" in done.stderr:
            return Run(version, num_samples, num_classes, "exceeded", message=f"exceeded {mem_cap_gb:g} GB")
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        if done.returncode == -9:
            last = "killed (out of memory?)"
        return Run(version, num_samples, num_classes, "failed", message=last)
    return Run(version, num_samples, num_classes, "ok", **json.loads(done.stdout))


def machine() -> str:
    """CPU model, cores and RAM from /proc, and the Python and numpy that ran."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.machine())
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    return f"{cpu}, {os.cpu_count()} cores, {mem_kb / 2**20:.1f} GiB RAM; Python {platform.python_version()}, numpy {np.__version__}"


def _max_abs_diff(before: Run, after: Run) -> str:
    if before.status != "ok" or after.status != "ok":
        return "—"
    return f"{max(abs(before.metrics[k] - after.metrics[k]) for k in RANK_METRICS):.0e}"


def format_table(runs: list[Run]) -> str:
    """One markdown table, a row per case: before's and after's peak and time side by side."""
    header = ["N", "classes", "before peak MB", "after peak MB", "before time s", "after time s", "max abs diff"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    by_case: dict[tuple[int, int], dict[str, Run]] = {}
    for r in runs:
        by_case.setdefault((r.num_samples, r.num_classes), {})[r.version] = r
    for (num_samples, num_classes), row in by_case.items():
        cells = [f"{num_samples:,}", f"{num_classes:,}"]
        before, after = row["before"], row["after"]
        cells += [f"{r.peak_rss_mb:,.0f}" if r.status == "ok" else r.message for r in (before, after)]
        cells += [f"{r.time_s:.1f}" if r.status == "ok" else "—" for r in (before, after)]
        cells.append(_max_abs_diff(before, after))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"smaller cases: {QUICK_CASES} as (N, classes)")
    p.add_argument("--before", default=FULL_MATRIX_REV, help="git revision whose metrics.py is 'before' (default: the full-matrix one)")
    p.add_argument("--mem-cap-gb", type=float, default=12.0, help="address-space limit of each child (RLIMIT_AS)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="limit of each child, process start included")
    p.add_argument("--json", type=Path, help="also write every run here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--case", nargs=3, metavar=("METRICS_PY", "N", "CLASSES"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not Path("/proc/self/status").exists():
        sys.exit("metrics_memory: needs Linux /proc (VmHWM)")
    if args.case:
        print(json.dumps(run_case(Path(args.case[0]), int(args.case[1]), int(args.case[2]))))
        return
    shown = subprocess.run(["git", "show", f"{args.before}:{METRICS}"], check=False, cwd=ROOT, capture_output=True, text=True)
    if shown.returncode != 0:
        sys.exit(f"metrics_memory: cannot read {METRICS} at {args.before}: {shown.stderr.strip()}")

    cases = QUICK_CASES if args.quick else CASES
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        before_path = Path(tmp) / "metrics_before.py"
        before_path.write_text(shown.stdout)
        bar = progress_bar(2 * len(cases), "metrics memory", enabled=not args.quiet, unit="run")
        for num_samples, num_classes in cases:
            for version, path in (("before", before_path), ("after", ROOT / METRICS)):
                bar.set_postfix_str(f"{version} N={num_samples} classes={num_classes}")
                runs.append(spawn_case(version, path, num_samples, num_classes, args.mem_cap_gb, args.timeout_s))
                bar.update()
        bar.close()

    print(f"Machine: {machine()}. Before: {METRICS} at {args.before[:10]}.\n")
    print(format_table(runs))
    if args.json:
        runs_json = [asdict(r) for r in runs]
        write_json(args.json, {"machine": machine(), "before": args.before, "mem_cap_gb": args.mem_cap_gb, "runs": runs_json})


if __name__ == "__main__":
    main()
