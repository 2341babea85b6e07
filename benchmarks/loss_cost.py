"""Cost of one forward+backward of a batch-all triplet loss: ours in O(B^2) memory against B^3 ones.

For each method and each (B, D) it measures, on float32 N(0, 1) embeddings with ``requires_grad``
and labels ``arange(B) % 10``, the loss alone (no model):

- ``time_ms``: median wall time of ``--repeats`` forward+backward calls, after one warmup call;
- ``peak_mb``: the peak memory of the warmup call over the memory held just before it
  (CPU: peak RSS, see ``MemoryMeter``; CUDA: ``torch.cuda.max_memory_allocated``).

Methods (all margin 0.2, mean over the active triplets):

- ``shadow``:  edge_siamese ``ShadowLoss``, exact batch-all by sorting + prefix sums, O(B^2) memory;
- ``triplet``: edge_siamese ``TripletMarginLoss``, the same batch-all on the Euclidean distance;
- ``pml``:     pytorch-metric-learning ``TripletMarginLoss`` with ``LpDistance(normalize_embeddings=False)``
  and its default mining of all triplets, which lists every triplet (O(B^3) memory);
- ``dense``:   the textbook batch-all, the ``(B, B, B)`` hinge tensor on our Euclidean distance matrix.

Every case runs in a fresh process (this script with ``--case``, answering one JSON line on
stdout), so that no case inherits another's allocator state or peak. A case whose estimated
peak exceeds ``--mem-cap-gb`` is skipped, not run. For shadow and triplet the child also checks
the loss value against the dense form on the same distance, and the parent checks pml against
triplet (the same loss): the table's ``max abs dloss`` column.

Threads are torch's default; on a shared machine ``OMP_NUM_THREADS=1`` (which the children
inherit) gives steadier times, as a busy core stalls every parallel region of a multi-threaded run.

    python benchmarks/loss_cost.py                       # B 64..4096, D 8..512, CPU
    python benchmarks/loss_cost.py --quick               # smoke run
    python benchmarks/loss_cost.py --device cuda --json runs/loss_cost_cuda.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from edge_siamese.distances import EuclideanDistance
from device_bench.files import write_json
from edge_siamese.losses import ShadowLoss, TripletMarginLoss
from edge_siamese.losses.base import label_masks
from edge_siamese.progress import progress_bar

METHODS = ("shadow", "triplet", "pml", "dense")
OURS = ("shadow", "triplet")
MARGIN = 0.2
NUM_CLASSES = 10
SEED = 0
WARM_BATCH = 32  # a tiny first call that loads kernels and thread pools before anything is measured

# Bytes per unit of the estimated peak, fitted to peaks measured on CPU (B = 256 to 1024) and
# rounded up; they only decide which cases to skip.
OURS_BYTES_PER_PAIR = 96  # a dozen (B, B) float32/int64 matrices, forward and backward
PML_BYTES_PER_CELL = 1  # the (B, B, B) uint8 mask that torch.where turns into the triplet list
PML_BYTES_PER_TRIPLET = 40  # int64 (a, p, n), the gathered distances and their gradients
DENSE_BYTES_PER_CELL = 9  # two float32 (B, B, B) tensors alive at once (relu output and its gradient)

QUICK = {"batch_sizes": [64, 256], "dims": [8, 128], "repeats": 1}


@dataclass
class CaseResult:
    """One (method, B, D) cell; ``status`` is ok, skipped, timeout or failed."""

    method: str
    batch_size: int
    dim: int
    status: str
    est_peak_gb: float
    time_ms: float | None = None
    peak_mb: float | None = None
    loss: float | None = None
    dense_abs_diff: float | None = None  # shadow/triplet: |loss - dense form on the same distance|
    message: str = ""


def make_inputs(batch_size: int, dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(SEED)
    embeddings = torch.randn(batch_size, dim, device=device, requires_grad=True)
    labels = torch.arange(batch_size, device=device) % NUM_CLASSES
    return embeddings, labels


def num_triplets(batch_size: int) -> int:
    """Valid (anchor, positive, negative) triplets for labels ``arange(B) % 10``."""
    counts = [len(range(c, batch_size, NUM_CLASSES)) for c in range(NUM_CLASSES)]
    return sum(n * (n - 1) * (batch_size - n) for n in counts)


def estimate_peak_bytes(method: str, batch_size: int) -> int:
    if method in OURS:
        return OURS_BYTES_PER_PAIR * batch_size**2
    if method == "pml":
        return PML_BYTES_PER_CELL * batch_size**3 + PML_BYTES_PER_TRIPLET * num_triplets(batch_size)
    return DENSE_BYTES_PER_CELL * batch_size**3


def dense_batch_all(dist: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-all through the ``(B, B, B)`` tensor ``relu(d[a, p] + margin - d[a, n])``, mean over its entries > 0.

    Kept as lean as a dense form gets, so that it is a fair reference: invalid triplets are masked
    before the hinge (a ``-inf`` term off the positives and off the negatives), so that their
    entries are 0 with no gradient and no float32 ``B^3`` mask-after tensor is built; and the hinge
    is a sum of ``d[a, p] + margin`` and ``-d[a, n]``, whose backward needs no negated ``B^3`` copy.
    """
    pos_mask, neg_mask = label_masks(labels)
    ap = (dist + margin).masked_fill(~pos_mask, -torch.inf)
    an = (-dist).masked_fill(~neg_mask, -torch.inf)
    hinge = torch.relu(ap[:, :, None] + an[:, None, :])
    return hinge.sum() / torch.count_nonzero(hinge).clamp_min(1)


class DenseTripletLoss(torch.nn.Module):
    """``dense_batch_all`` on the Euclidean distance matrix: the B^3 reference method."""

    def __init__(self, margin: float):
        super().__init__()
        self.distance = EuclideanDistance()
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return dense_batch_all(self.distance(embeddings), labels, self.margin)


def build_loss(method: str) -> torch.nn.Module:
    if method == "shadow":
        return ShadowLoss(margin=MARGIN)
    if method == "triplet":
        return TripletMarginLoss(margin=MARGIN)
    if method == "pml":
        from pytorch_metric_learning import distances, losses

        return losses.TripletMarginLoss(margin=MARGIN, distance=distances.LpDistance(normalize_embeddings=False))
    return DenseTripletLoss(margin=MARGIN)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class MemoryMeter:
    """Peak memory of a block over what the process holds when the block starts.

    CPU: ``ru_maxrss`` cannot be used, it is the peak over the whole process lifetime (imports,
    inputs, the warm call). Writing "5" to ``/proc/self/clear_refs`` (Linux >= 4.0) resets the
    kernel's peak RSS ``VmHWM`` to the current RSS, so ``VmHWM`` read after the block minus
    ``VmRSS`` read at the reset is the block's own peak. RSS counts pages actually touched,
    which every tensor here is. CUDA: the allocator's ``max_memory_allocated`` after
    ``reset_peak_memory_stats``, minus ``memory_allocated`` at the start.
    """

    def __init__(self, device: str):
        self.device = device
        self.baseline = 0

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.baseline = _status_kb("VmRSS") * 1024

    def peak_bytes(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return _status_kb("VmHWM") * 1024 - self.baseline


def forward_backward(loss_fn: torch.nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """One forward+backward; returns the loss value and leaves no graph or gradient behind."""
    loss = loss_fn(embeddings, labels)
    loss.backward()
    embeddings.grad = None
    return loss.item()


def elapsed_ms(fn: Callable[[], object], device: str) -> float:
    """Wall time of ``fn()``, waiting for the device on both ends."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def run_case(method: str, batch_size: int, dim: int, repeats: int, device: str, mem_cap_bytes: int) -> CaseResult:
    """Measure one case in this process (the child side of ``--case``)."""
    loss_fn = build_loss(method)
    forward_backward(loss_fn, *make_inputs(WARM_BATCH, dim, device))
    embeddings, labels = make_inputs(batch_size, dim, device)

    meter = MemoryMeter(device)
    meter.start()
    loss = forward_backward(loss_fn, embeddings, labels)  # the measured call is also the warmup
    peak_bytes = meter.peak_bytes()
    times_ms = [elapsed_ms(lambda: forward_backward(loss_fn, embeddings, labels), device) for _ in range(repeats)]

    dense_abs_diff = None
    if method in OURS and estimate_peak_bytes("dense", batch_size) <= mem_cap_bytes:
        with torch.no_grad():
            reference = dense_batch_all(loss_fn.distance(embeddings), labels, MARGIN).item()
        dense_abs_diff = abs(loss - reference)

    return CaseResult(
        method=method,
        batch_size=batch_size,
        dim=dim,
        status="ok",
        est_peak_gb=estimate_peak_bytes(method, batch_size) / 1e9,
        time_ms=statistics.median(times_ms),
        peak_mb=peak_bytes / 2**20,
        loss=loss,
        dense_abs_diff=dense_abs_diff,
    )


def spawn_case(
    method: str, batch_size: int, dim: int, repeats: int, device: str, mem_cap_gb: float, timeout_s: float
) -> CaseResult:
    """Run one case in a fresh process, or skip it when its estimated peak is over the cap."""
    est_gb = estimate_peak_bytes(method, batch_size) / 1e9
    if est_gb > mem_cap_gb:
        return CaseResult(method, batch_size, dim, "skipped", est_gb, message=f"est. {est_gb:.0f} GB")
    cmd = [
        sys.executable, __file__, "--case", method, str(batch_size), str(dim),
        "--repeats", str(repeats), "--device", device, "--mem-cap-gb", str(mem_cap_gb),
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return CaseResult(method, batch_size, dim, "timeout", est_gb, message=f"over {timeout_s:.0f} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        if done.returncode == -9:
            last = "killed (out of memory?)"
        return CaseResult(method, batch_size, dim, "failed", est_gb, message=last)
    return CaseResult(**json.loads(done.stdout))


def _ratio(num: CaseResult, den: CaseResult, field: str) -> str:
    if num.status != "ok" or den.status != "ok":
        return "—"
    value = getattr(num, field) / max(getattr(den, field), 1e-9)
    return f"{value:.0f}x" if value >= 10 else f"{value:.1f}x"


def _loss_check(row: dict[str, CaseResult]) -> str:
    diffs = [row[m].dense_abs_diff for m in OURS if row[m].dense_abs_diff is not None]
    if row["pml"].status == "ok" and row["triplet"].status == "ok":
        diffs.append(abs(row["pml"].loss - row["triplet"].loss))
    return f"{max(diffs):.0e}" if diffs else "—"


def format_table(results: list[CaseResult]) -> str:
    """One markdown table: a row per (B, D), time and peak per method, pml's ratios, the loss check."""
    cells: dict[tuple[int, int], dict[str, CaseResult]] = {}
    for r in results:
        cells.setdefault((r.batch_size, r.dim), {})[r.method] = r
    header = ["B", "D"]
    for m in METHODS:
        header += [f"{m} time_ms", f"{m} peak_mb"]
    header += ["pml/shadow time", "pml/triplet time", "pml/shadow mem", "pml/triplet mem", "max abs dloss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for (batch_size, dim), row in sorted(cells.items()):
        line = [str(batch_size), str(dim)]
        for m in METHODS:
            r = row[m]
            if r.status == "ok":
                line += [f"{r.time_ms:.1f}", f"{r.peak_mb:.1f}"]
            else:
                line += [f"{r.status} ({r.message})", "—"]
        line += [
            _ratio(row["pml"], row["shadow"], "time_ms"),
            _ratio(row["pml"], row["triplet"], "time_ms"),
            _ratio(row["pml"], row["shadow"], "peak_mb"),
            _ratio(row["pml"], row["triplet"], "peak_mb"),
            _loss_check(row),
        ]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--dims", type=int, nargs="+", default=[8, 32, 128, 512])
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (median), after 1 warmup")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--mem-cap-gb", type=float, default=12.0, help="skip a case whose estimated peak is above this")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-case limit, process start included")
    p.add_argument("--json", type=Path, help="also write every case's result here")
    p.add_argument("--quick", action="store_true", help="smoke run: B 64 256, D 8 128, 1 repeat (unless given)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--case", nargs=3, metavar=("METHOD", "B", "D"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:  # the subset replaces the defaults only: explicit options still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("loss_cost: --device cuda needs a GPU and a CUDA build of torch (torch.cuda.is_available() is False)")
    if args.case:
        method, batch_size, dim = args.case[0], int(args.case[1]), int(args.case[2])
        result = run_case(method, batch_size, dim, args.repeats, args.device, int(args.mem_cap_gb * 1e9))
        print(json.dumps(asdict(result)))
        return
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        sys.exit("loss_cost: the pml method needs pytorch-metric-learning: pip install pytorch-metric-learning")

    cases = [(m, b, d) for b in args.batch_sizes for d in args.dims for m in METHODS]
    results = []
    bar = progress_bar(len(cases), "loss cost", enabled=not args.quiet, unit="case")
    for method, batch_size, dim in cases:
        bar.set_postfix_str(f"{method} B={batch_size} D={dim}")
        results.append(
            spawn_case(method, batch_size, dim, args.repeats, args.device, args.mem_cap_gb, args.timeout_s)
        )
        bar.update()
    bar.close()

    print(format_table(results))
    if args.json:
        write_json(
            args.json,
            {
                "device": args.device,
                "torch": torch.__version__,
                "platform": platform.platform(),
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "mem_cap_gb": args.mem_cap_gb,
                "results": [asdict(r) for r in results],
            },
        )


if __name__ == "__main__":
    main()
