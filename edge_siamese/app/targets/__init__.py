"""``edge-siamese bench --target``: where a bundle is measured from the workstation, one table.

Every target returns device_bench's JSON document (``docs/bench-schema.md``), validated against
its schema: the cuda target builds the same document around the PyTorch model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ...errors import UserError
from . import arm64, cpu, cuda, ssh


@dataclass
class BenchSettings:
    """What to measure on any target: device_bench's options, and each target's own."""

    batches: list[int] = field(default_factory=lambda: [1])
    warmup: int = 5
    runs: int = 50
    gallery: list[int] = field(default_factory=lambda: [1000, 10000, 100000])
    threads: int | None = None
    ort_memory: str = "default"  # a key of device_bench.runtimes.ORT_MEMORY
    formats: str | None = None
    precision: str | None = None
    run_dir: Path | None = None  # cuda: the training run behind the bundle
    cpu_model: str = "cortex-a72"  # arm64-emulated: the core qemu models
    instructions: bool = False  # arm64-emulated: also count guest instructions per inference
    remote_python: str = "python3"  # ssh: the device's Python
    progress: bool = True  # cpu: show device_bench's progress line per file

    def device_bench_args(self) -> list[str]:
        """The ``python -m device_bench`` options."""
        args = ["--batch", ",".join(map(str, self.batches)), "--warmup", str(self.warmup), "--runs", str(self.runs), "--gallery", ",".join(map(str, self.gallery))]
        args += (["--format", self.formats] if self.formats else []) + (["--precision", self.precision] if self.precision else [])
        args += ["--ort-memory", self.ort_memory] if self.ort_memory != "default" else []
        return args + (["--threads", str(self.threads)] if self.threads else [])


@dataclass(frozen=True)
class Target:
    """A place to benchmark: ``run(bundle, settings, address)`` returns device_bench's document."""

    run: Callable[[Path, BenchSettings, str], dict]
    summary: str
    in_compare: bool  # compare can measure every seed-0 bundle there unattended


TARGETS: dict[str, Target] = {
    "cpu": Target(cpu.bench, "python -m device_bench in a subprocess on this machine", True),
    "cuda": Target(cuda.bench, "the run's PyTorch model on a CUDA GPU (fp32, fp16, bf16), and ONNX Runtime's CUDA provider", True),
    "arm64-emulated": Target(arm64.bench, "device_bench in an aarch64 userland under qemu (instructions, not latency)", True),
    "ssh": Target(ssh.bench, "device_bench on a real device over ssh://user@host[:port]", False),
}


def target_name(target: str) -> tuple[str, str]:
    """``(name in TARGETS, address)``: ``ssh://pi@host`` is the ssh target at ``pi@host``."""
    name, sep, address = target.partition("://")
    if not sep:
        name, address = target, ""
    if name not in TARGETS or (name == "ssh") != bool(sep):
        names = ", ".join("ssh://user@host[:port]" if n == "ssh" else n for n in TARGETS)
        raise UserError(f"unknown target {target!r}: choose one of {names}")
    return name, address


def run_target(target: str, bundle: Path, settings: BenchSettings) -> dict:
    """Benchmark ``bundle`` on ``target`` (a TARGETS name, or ``ssh://user@host[:port]``)."""
    name, address = target_name(target)
    if settings.instructions and name != "arm64-emulated":
        raise UserError("--instructions counts guest instructions under qemu: use it with --target arm64-emulated")
    return TARGETS[name].run(Path(bundle), settings, address)
