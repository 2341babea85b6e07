"""Guest instructions per inference on emulated aarch64: the deterministic ARM cost of a model file.

A small qemu TCG plugin (``insn_count.c``, shipped beside this module) is compiled here on first
use into the arm64 cache; the guest runs ``count_driver.py`` twice, with two numbers of inferences.
"""

from __future__ import annotations

import json
import os
import subprocess
from importlib import resources
from pathlib import Path

from device_bench.manifest import read_bundle

from ...errors import UserError, last_line
from .rootfs import cache_root, digest, find_tool, host_copy, qemu_binary, qemu_version, run_guest_python, target_info

PLUGIN_SOURCE = resources.files(__package__).joinpath("insn_count.c").read_text()
COUNT_DRIVER = resources.files(__package__).joinpath("count_driver.py").read_text()


def _plugin(cache_dir: Path | None, qemu: str) -> Path:
    """The instruction-count plugin, compiled once per plugin API version into the cache."""
    help_text = subprocess.run([qemu, "--help"], capture_output=True, text=True).stdout
    if "-plugin" not in help_text:
        raise UserError(f"{qemu} was built without TCG plugin support, needed to count instructions: apt-get install qemu-user (Debian bookworm's loads plugins)")
    # qemu < 9.0 accepts API version 0-1; from 9.0 the oldest it accepts is 2. The calls used here are in both.
    major = qemu_version(qemu).split(".")[0]
    api = 1 if major.isdigit() and int(major) < 9 else 2
    path = cache_root(cache_dir) / "plugins" / f"insn-count-api{api}-{digest(PLUGIN_SOURCE)}.so"
    if path.exists():
        return path
    gcc = find_tool("gcc", "cc", hint="apt-get install gcc")
    path.parent.mkdir(parents=True, exist_ok=True)
    source = path.with_suffix(".c")
    source.write_text(PLUGIN_SOURCE)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    proc = subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-fvisibility=hidden", f"-DPLUGIN_API_VERSION={api}", "-o", str(tmp), str(source)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise UserError(f"compiling the qemu instruction-count plugin failed: {last_line(proc)}")
    os.replace(tmp, path)
    return path


def count_instructions(
    bundle: Path,
    file: str,
    runs: int = 200,
    cpu: str = "cortex-a72",
    cache_dir: Path | None = None,
    warmup: int = 2,
    runtime: str | None = None,
    timeout: float = 1800,
) -> dict:
    """Guest instructions per inference of one model file at batch 1, on one thread.

    Two guest runs that differ only in the number of inferences: (count with warmup + ``runs``
    inferences - count with ``warmup``) / ``runs``. What both runs share (Python start-up, imports,
    loading the model, the golden check) cancels; what stays is one call of the runtime adapter
    ``model.run(x)``, the cost an app pays per embedding. The count is qemu's model of the core,
    not cycles: a relative cost between files, runtimes and cores, not a latency.
    """
    if runs < 1 or warmup < 0:
        raise UserError(f"runs {runs}, warmup {warmup}: use runs >= 1 and warmup >= 0")
    qemu = qemu_binary()
    plugin = _plugin(cache_dir, qemu)
    files = [e["path"] for e in read_bundle(bundle).files]
    if file not in files:
        raise UserError(f"{bundle} has no model file {file!r}: choose one of {', '.join(files)}")
    counts, info = [], {}
    with host_copy(bundle) as work:
        driver = work / "count_driver.py"
        driver.write_text(COUNT_DRIVER)
        for iterations in (warmup, warmup + runs):
            out = work / f"count-{iterations}.txt"
            args = [str(driver), str(work / Path(bundle).name), file, runtime or "", str(iterations)]
            env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # one thread: no spinning pools in the count
            proc = run_guest_python(args, cpu, cache_dir, [work], env, plugin=[str(plugin), f"out={out}"], timeout=timeout)
            if proc.returncode != 0 or not out.exists():
                raise UserError(f"counting instructions of {file} on emulated aarch64 failed: {last_line(proc)}")
            counts.append(int(out.read_text()))
            info = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "file": file,
        **info,
        "cpu_model": cpu,
        "batch": 1,
        "threads": 1,
        "warmup": warmup,
        "runs": runs,
        "instructions_per_inference": (counts[1] - counts[0]) / runs,
        "instructions_total": {"warmup_only": counts[0], "warmup_and_runs": counts[1]},
        "target": target_info(cpu),
    }
