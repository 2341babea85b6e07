"""``edge-siamese bench --target``: where a bundle is measured from the workstation.

- ``cpu``: ``python -m device_bench`` in a subprocess here;
- ``cuda``: the run's PyTorch model on a CUDA GPU (fp32, fp16, bf16; CUDA graphs at batch 1),
  timed with CUDA events, and ONNX Runtime's CUDA provider when installed;
- ``arm64-emulated``: device_bench under qemu in an aarch64 userland (``edge_siamese.arm64``);
- ``ssh://user@host[:port]``: device_bench on a real device, copied there with the bundle.

Every target returns device_bench's JSON document (``docs/bench-schema.md``).
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_bench.bench import latency_stats, validate_result
from device_bench.manifest import read_bundle
from device_bench.metrics import embedding_agreement

from .errors import UserError, last_line

TARGETS = ("cpu", "cuda", "arm64-emulated", "ssh://user@host")


@dataclass
class BenchSettings:
    """What to measure on any target: device_bench's options, and the cuda target's subset of them."""

    batches: list[int] = field(default_factory=lambda: [1])
    warmup: int = 5
    runs: int = 50
    gallery: list[int] = field(default_factory=lambda: [1000, 10000, 100000])
    threads: int | None = None
    formats: str | None = None
    precision: str | None = None

    def args(self) -> list[str]:
        """The ``python -m device_bench`` options."""
        args = ["--batch", ",".join(map(str, self.batches)), "--warmup", str(self.warmup), "--runs", str(self.runs), "--gallery", ",".join(map(str, self.gallery))]
        args += (["--format", self.formats] if self.formats else []) + (["--precision", self.precision] if self.precision else [])
        return args + (["--threads", str(self.threads)] if self.threads else [])


def run_target(
    target: str,
    bundle: Path,
    settings: BenchSettings,
    run_dir: Path | None = None,
    cpu: str = "cortex-a72",
    instructions: bool = False,
    remote_python: str = "python3",
) -> dict:
    """Benchmark ``bundle`` on ``target`` (one of TARGETS); ``instructions`` adds guest instruction
    counts per inference to the arm64-emulated rows."""
    if instructions and target != "arm64-emulated":
        raise UserError("--instructions counts guest instructions under qemu: use it with --target arm64-emulated")
    if target == "cpu":
        return bench_cpu(bundle, settings.args())
    if target == "cuda":
        return bench_cuda(bundle, run_dir, settings.batches, settings.warmup, settings.runs)
    if target == "arm64-emulated":
        from .arm64 import count_instructions, run_device_bench

        result = run_device_bench(bundle, settings.args(), cpu=cpu)
        if instructions:
            for row in result["rows"]:
                if row["status"] == "ok":
                    row["guest_instructions_per_inference"] = count_instructions(bundle, row["file"], cpu=cpu)["instructions_per_inference"]
        return result
    if target.startswith("ssh://"):
        return bench_ssh(bundle, target, settings.args(), remote_python)
    raise UserError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")


def _device_bench_package() -> Path:
    import device_bench

    return Path(device_bench.__file__).parent


def bench_cpu(bundle: Path, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = {**os.environ, "DEVICE_BENCH_TARGET": "cpu"}
        proc = subprocess.run([sys.executable, "-m", "device_bench", str(bundle), *args, "--quiet", "--json", str(out)], env=env, capture_output=True, text=True)
        if not out.exists():
            raise UserError(last_line(proc).replace(" (see 'python -m device_bench --help')", ""))
        return validate_result(json.loads(out.read_text()))


def bench_ssh(bundle: Path, url: str, args: list[str], python: str = "python3") -> dict:
    """Copy device_bench and the bundle to ``user@host`` (a temporary folder there), run, fetch the JSON."""
    address = url.removeprefix("ssh://")
    host, _, port = address.partition(":")
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", *(["-p", port] if port else []), host]
    scp = ["scp", "-q", "-r", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", *(["-P", port] if port else [])]
    for tool in ("ssh", "scp"):
        if shutil.which(tool) is None:
            raise UserError(f"the ssh target needs {tool}: apt-get install openssh-client")

    def call(cmd: list[str], what: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode not in ok:
            raise UserError(f"{cmd[0]} to {host} failed ({what}): {last_line(proc)}")
        return proc

    remote = call([*ssh, "mktemp -d"], "making a temporary folder").stdout.strip()
    try:
        call([*scp, str(_device_bench_package()), str(bundle), f"{host}:{remote}/"], "copying device_bench and the bundle")
        bench = " ".join(shlex.quote(a) for a in [*args, "--quiet", "--json", f"{remote}/bench.json"])
        # device_bench exits 1 when a row failed; its JSON still counts. Without the JSON, its error does.
        run = call([*ssh, f"cd {shlex.quote(remote)} && DEVICE_BENCH_TARGET=ssh {python} -m device_bench {shlex.quote(bundle.name)} {bench}"], "device_bench", (0, 1))
        fetched = subprocess.run([*ssh, f"cat {shlex.quote(remote)}/bench.json"], capture_output=True, text=True, timeout=600)
        if fetched.returncode != 0:
            raise UserError(f"device_bench on {host} wrote no result: {last_line(run)}")
        result = json.loads(fetched.stdout)
    finally:
        subprocess.run([*ssh, f"rm -rf {shlex.quote(remote)}"], capture_output=True, timeout=60)
    return validate_result(result)


def _cuda_event_times_s(fn, warmup: int, runs: int) -> list[float]:
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


def bench_cuda(bundle: Path, run_dir: Path | None, batches: list[int], warmup: int, runs: int) -> dict:
    """The run's model on the GPU at fp32 / fp16 / bf16, checked against the bundle's golden vectors."""
    import torch

    from .checkpoints import load_run

    if not torch.cuda.is_available():
        raise UserError(f"the cuda target needs a CUDA GPU: none found (torch {torch.__version__}); use --target cpu")
    b = read_bundle(bundle)
    golden = b.golden()
    run = load_run(resolve_run(bundle, run_dir), "cuda")
    device = torch.device("cuda")
    rows = []
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model = copy.deepcopy(run.model).to(dtype)
        x_golden = torch.from_numpy(golden["inputs"]).to(device, dtype)
        with torch.no_grad():
            out = model(x_golden).float().cpu().numpy()
        golden_min_cosine = embedding_agreement(out, golden["embeddings"])["min_cosine"]
        row = {"file": "model.safetensors", "format": "pytorch", "precision": precision, "runtime": f"torch {torch.__version__}", "status": "ok", "golden_min_cosine": golden_min_cosine, "latency": []}
        for batch in batches:
            x = x_golden[:1].expand(batch, *x_golden.shape[1:]).contiguous()
            torch.cuda.reset_peak_memory_stats()
            if batch == 1:  # launch overhead dominates at batch 1: replay a captured CUDA graph
                graph, static_x = torch.cuda.CUDAGraph(), x.clone()
                with torch.no_grad():
                    model(static_x)
                    torch.cuda.synchronize()
                    with torch.cuda.graph(graph):
                        model(static_x)
                fn = graph.replay
            else:
                def fn(model=model, x=x):
                    with torch.no_grad():
                        model(x)
            times = _cuda_event_times_s(fn, warmup, runs)
            row["latency"].append({"batch": batch, "cuda_graph": batch == 1, "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20, **latency_stats(times, batch)})
        rows.append(row)
    rows += _ort_cuda_rows(b, batches, warmup, runs)
    return {
        "target": {"name": "cuda", "emulated": False, "device": torch.cuda.get_device_name(0)},
        "bundle": {"path": str(bundle), "loss": b.manifest["training"]["loss"], "embedding_dim": b.manifest["embedding"]["dim"]},
        "rows": rows,
    }


def _ort_cuda_rows(b, batches: list[int], warmup: int, runs: int) -> list[dict]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return [{"format": "onnx", "runtime": "onnxruntime CUDA", "status": "skipped", "error": "CUDAExecutionProvider not installed: pip install onnxruntime-gpu"}]
    rows = []
    golden = b.golden()["inputs"]
    for entry in [e for e in b.files if e["format"] == "onnx"]:
        session = ort.InferenceSession(str(b.path / entry["path"]), providers=["CUDAExecutionProvider"])
        name = session.get_inputs()[0].name
        row = {"file": entry["path"], "format": "onnx", "precision": entry["precision"], "runtime": "onnxruntime CUDA", "status": "ok", "latency": []}
        for batch in batches:
            x = np.ascontiguousarray(np.resize(golden, (batch, *golden.shape[1:])))
            times = _cuda_event_times_s(lambda x=x: session.run(None, {name: x}), warmup, runs)
            row["latency"].append({"batch": batch, **latency_stats(times, batch)})
        rows.append(row)
    return rows


def resolve_run(bundle: Path, run_dir: Path | None) -> Path:
    """The training run behind a bundle: ``--run``, or the bundle's parent (export's default place)."""
    if run_dir is not None:
        return run_dir
    if (bundle.parent / "config.json").exists() and (bundle.parent / "model.safetensors").exists():
        return bundle.parent
    raise UserError("the cuda target runs the PyTorch model: pass --run RUN (the folder the bundle was exported from)")
