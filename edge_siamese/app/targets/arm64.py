"""The ``arm64-emulated`` target: a bundle and the torch-free ``device_bench`` on aarch64 under qemu.

Emulated time is not device time: the result is marked ``emulated``. The deterministic cost
figure is the guest instruction count per inference (``instructions.count_instructions``),
added to each verified row with ``--instructions``.
"""

from __future__ import annotations

import json
from pathlib import Path

from device_bench.document import validate_result

from ...errors import UserError, last_line
from .instructions import count_instructions
from .rootfs import arm_cpu, host_copy, run_guest_python, target_info


def run_device_bench(bundle: Path, args: list[str], cpu: str = "cortex-a72", cache_dir: Path | None = None, timeout: float = 3600) -> dict:
    """``python -m device_bench BUNDLE ARGS`` on emulated aarch64; its JSON document, marked emulated."""
    arm_cpu(cpu)
    with host_copy(bundle) as work:
        out = work / "bench.json"
        bench_args = ["-m", "device_bench", str(work / Path(bundle).name), *args, "--quiet", "--json", str(out)]
        env = {"DEVICE_BENCH_TARGET": "arm64-emulated", "DEVICE_BENCH_EMULATED": "1"}
        proc = run_guest_python(bench_args, cpu, cache_dir, [work], env, timeout=timeout)
        if not out.exists():
            raise UserError(f"device_bench failed on emulated aarch64: {last_line(proc)}")
        result = json.loads(out.read_text())
    result["target"] = target_info(cpu)
    return validate_result(result)


def bench(bundle: Path, settings, address: str = "") -> dict:
    """device_bench on emulated aarch64; with ``settings.instructions``, guest instructions per inference per verified row."""
    result = run_device_bench(bundle, settings.device_bench_args(), cpu=settings.cpu_model)
    if settings.instructions:
        for row in result["rows"]:
            if row["status"] == "verified":
                row["guest_instructions_per_inference"] = count_instructions(bundle, row["file"], cpu=settings.cpu_model)["instructions_per_inference"]
    return result
