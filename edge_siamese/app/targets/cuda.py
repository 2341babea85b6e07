"""The ``cuda`` target: the run's PyTorch model on a CUDA GPU at fp32, fp16 and bf16 (CUDA graphs at
batch 1, timed with CUDA events), and the bundle's ONNX files in ONNX Runtime's CUDA provider.

The rows are device_bench's (``docs/bench-schema.md``): golden check, latency, memory and
accuracy on the bundle's eval.npz, in the same document as every other target's.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import numpy as np

from device_bench.bench import GOLDEN_SLACK, eval_accuracy, latency_stats, memory_mb, memory_since
from device_bench.document import result_document
from device_bench.formats import PRECISIONS
from device_bench.manifest import Bundle, read_bundle
from device_bench.metrics import embedding_agreement

from ...checkpoints import WEIGHTS, load_run
from ...errors import UserError

TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
Timer = Callable[[Callable[[], object], int, int], list[float]]


def cuda_event_times_s(fn, warmup: int, runs: int) -> list[float]:
    """Seconds per call of ``fn`` measured with CUDA events (the GPU's own clock)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


class TorchRunner:
    """A PyTorch model behind device_bench's runtime interface (``run(inputs) -> embeddings``)."""

    def __init__(self, model, device, dtype):
        self.model, self.device, self.dtype = model, device, dtype

    def run(self, inputs: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(inputs).to(self.device, self.dtype)).float().cpu().numpy()


def _row(bundle: Bundle, row: dict, runner, required_min_cosine: float, settings, timer: Timer, callable_at) -> dict:
    """Finish a row as device_bench does: golden check, then latency per batch (``callable_at(batch)``
    gives the timed call and extra latency fields), memory, accuracy on eval.npz."""
    before = row.pop("baseline")
    golden = bundle.golden()
    started = time.perf_counter()
    runner.run(golden["inputs"][:1])
    row["first_inference_ms"] = (time.perf_counter() - started) * 1000
    try:
        agreement = embedding_agreement(runner.run(golden["inputs"]), golden["embeddings"])
    except ValueError as exc:  # non-finite embeddings
        return {**row, "status": "failed", "error": f"golden check failed: {exc}"}
    row["golden"] = {
        "min_cosine": agreement["min_cosine"],
        "required_min_cosine": required_min_cosine,
        "preprocessing_max_abs_diff": float(np.abs(bundle.preprocessing(golden["images"]) - golden["inputs"]).max()),
    }
    if not agreement["min_cosine"] >= required_min_cosine:
        return {**row, "status": "failed", "error": f"golden check failed: min cosine {agreement['min_cosine']:.5f} < {required_min_cosine:.5f}"}
    row["latency"] = []
    for batch in settings.batches:
        fn, extra = callable_at(np.ascontiguousarray(np.resize(golden["inputs"], (batch, *golden["inputs"].shape[1:]))))
        row["latency"].append({"batch": batch, **latency_stats(timer(fn, settings.warmup, settings.runs), batch), **extra()})
    row["memory"] = memory_since(before)
    row["accuracy"] = eval_accuracy(bundle, runner)
    row["memory"]["peak_rss_with_eval_and_gallery_mb"] = memory_mb()["peak_rss_mb"]
    return {**row, "gallery": [], "status": "verified"}


def torch_row(bundle: Bundle, run_dir: Path, precision: str, device, settings, timer: Timer) -> dict:
    """One device_bench row for the run's model at ``precision`` on ``device``, timed by ``timer``."""
    import torch

    before = memory_mb()
    started = time.perf_counter()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = copy.deepcopy(load_run(run_dir, device).model).to(dtype)
    runner = TorchRunner(model, device, dtype)
    row = {
        "file": WEIGHTS, "format": "pytorch", "precision": precision, "size_bytes": (run_dir / WEIGHTS).stat().st_size,
        "runtime": f"torch {device.type}", "runtime_version": torch.__version__, "init_ms": (time.perf_counter() - started) * 1000, "baseline": before,
    }

    def callable_at(inputs: np.ndarray):
        x = torch.from_numpy(inputs).to(device, dtype)
        if device.type == "cuda" and len(x) == 1:  # launch overhead dominates at batch 1: replay a CUDA graph
            torch.cuda.reset_peak_memory_stats()
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad():
                model(x)
                torch.cuda.synchronize()
                with torch.cuda.graph(graph):
                    model(x)
            fn = graph.replay
        else:
            def fn():
                with torch.no_grad():
                    model(x)
        cuda = device.type == "cuda"
        return fn, lambda: {"cuda_graph": cuda and len(x) == 1, **({"peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {})}

    return _row(bundle, row, runner, PRECISIONS[precision].min_mean_cosine, settings, timer, callable_at)


class OrtCudaRunner:
    def __init__(self, path: Path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def run(self, inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.name: np.ascontiguousarray(inputs, np.float32)})[0].astype(np.float32)


def ort_cuda_rows(bundle: Bundle, settings) -> list[dict]:
    """The bundle's ONNX files in ONNX Runtime's CUDA provider, when onnxruntime-gpu is installed."""
    import onnxruntime as ort

    entries = [e for e in bundle.files if e["format"] == "onnx"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        reason = "ONNX Runtime's CUDAExecutionProvider is not installed: pip install onnxruntime-gpu"
        return [{"file": e["path"], "format": "onnx", "precision": e["precision"], "size_bytes": e["size_bytes"], "status": "not_measured", "error": reason} for e in entries]
    rows = []
    for entry in entries:
        before = memory_mb()
        started = time.perf_counter()
        runner = OrtCudaRunner(bundle.path / entry["path"])
        row = {
            "file": entry["path"], "format": "onnx", "precision": entry["precision"], "size_bytes": entry["size_bytes"],
            "runtime": "onnxruntime CUDA", "runtime_version": ort.__version__, "init_ms": (time.perf_counter() - started) * 1000, "baseline": before,
        }
        required = entry["fidelity"]["min_cosine"] - GOLDEN_SLACK
        rows.append(_row(bundle, row, runner, required, settings, cuda_event_times_s, lambda x, runner=runner: (lambda: runner.run(x), dict)))
    return rows


def document(bundle: Bundle, rows: list[dict], settings, device_name: str) -> dict:
    """The cuda target's validated device_bench document for ``rows``."""
    measured = {"runtime": "torch", "threads": None, "batch": settings.batches, "warmup": settings.warmup, "runs": settings.runs, "min_seconds": None, "gallery": []}
    return result_document({"name": "cuda", "emulated": False, "device": device_name}, bundle, measured, rows)


def bench(bundle: Path, settings, address: str = "") -> dict:
    """The run's model on the GPU at fp32 / fp16 / bf16, checked against the bundle's golden vectors."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"the cuda target needs a CUDA GPU: none found (torch {torch.__version__}); use --target cpu")
    b = read_bundle(bundle)
    run_dir = resolve_run(bundle, settings.run_dir)
    device = torch.device("cuda")
    rows = [torch_row(b, run_dir, precision, device, settings, cuda_event_times_s) for precision in TORCH_PRECISIONS]
    return document(b, rows + ort_cuda_rows(b, settings), settings, torch.cuda.get_device_name(0))


def resolve_run(bundle: Path, run_dir: Path | None) -> Path:
    """The training run behind a bundle: ``--run``, or the bundle's parent (export's default place)."""
    if run_dir is not None:
        return Path(run_dir)
    if (bundle.parent / "config.json").exists() and (bundle.parent / WEIGHTS).exists():
        return bundle.parent
    raise UserError("the cuda target runs the PyTorch model: pass --run RUN (the folder the bundle was exported from)")
