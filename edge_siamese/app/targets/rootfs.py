"""The aarch64 userland the arm64-emulated target runs in, and the qemu runner.

A Debian bookworm arm64 userland (the base of Raspberry Pi OS bookworm: Python 3.11) is extracted
with mmdebstrap and given aarch64 wheels of numpy, onnxruntime and ai-edge-litert; it is built
once into a cache folder and reused. Programs run in it with qemu's user-mode emulation
(``qemu-aarch64 -L ROOTFS``), which serves a file from ROOTFS when it is there and from the host
otherwise, so the host's temporary folders, where the bundle and ``device_bench`` are copied, have
the same path on both sides. ``CPUS`` is the table of cores the guest's ``/proc/cpuinfo`` can name.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import device_bench
from device_bench.manifest import MANIFEST

from ...errors import UserError
from ...progress import progress_bar

GUEST_SUITE = "bookworm"
GUEST_PYTHON = "3.11"
GUEST_DEBS = ("python3-minimal", f"libpython{GUEST_PYTHON}-stdlib", "libstdc++6")
# Pinned so that a cost figure measured today is measured again tomorrow; a change rebuilds the cache.
GUEST_WHEELS = ("numpy==2.4.6", "onnxruntime==1.32.0", "ai-edge-litert==2.3.0")
WHEEL_PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_27_aarch64", "manylinux_2_28_aarch64")
GUEST_SITE = "/opt/edge-siamese/site"  # the wheels, as the guest sees them
GUEST_PYTHON_WRAPPER = "opt/edge-siamese/bin/python3"  # the guest's sys.executable, inside the rootfs
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_HINT = "apt-get install qemu-user mmdebstrap"


@dataclass(frozen=True)
class ArmCpu:
    """What ``/proc/cpuinfo`` says on a board with this core (ONNX Runtime reads it to pick kernels)."""

    part: str
    variant: str
    revision: str
    features: str  # as qemu's model of the core reports them in HWCAP
    board: str


CPUS = {
    "cortex-a72": ArmCpu("0xd08", "0x0", "3", "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid", "Raspberry Pi 4 class"),
    "cortex-a76": ArmCpu(
        "0xd0b", "0x4", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp", "Raspberry Pi 5 class"
    ),
}

# A plugin that adds each translated block's instruction count every time the block runs, and
# writes the total to out=FILE when the guest exits. Only the few API calls it needs are declared,
# so that no qemu headers are needed (Debian ships none).
def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$EDGE_SIAMESE_ARM64_CACHE``, else ``$XDG_CACHE_HOME/edge-siamese/arm64``."""
    if cache_dir is None and os.environ.get("EDGE_SIAMESE_ARM64_CACHE"):
        cache_dir = Path(os.environ["EDGE_SIAMESE_ARM64_CACHE"])
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-siamese" / "arm64"
    return Path(cache_dir).absolute()  # qemu's -L and the guest's sys.executable need absolute paths


def find_tool(*names: str, hint: str = APT_HINT) -> str:
    for name in names:
        if path := shutil.which(name):
            return path
    raise UserError(f"the arm64-emulated target needs {' or '.join(names)}: {hint}")


def qemu_binary() -> str:
    """qemu-user's ``qemu-aarch64`` (it loads plugins), else qemu-user-static's."""
    return find_tool("qemu-aarch64", "qemu-aarch64-static")


def qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"version (\d+(?:\.\d+)*)", out)
    return match[1] if match else "unknown"


def _debian_mirror() -> str:
    """``$EDGE_SIAMESE_ARM64_MIRROR``, else the host's own Debian mirror (its apt sources), else deb.debian.org."""
    if os.environ.get("EDGE_SIAMESE_ARM64_MIRROR"):
        return os.environ["EDGE_SIAMESE_ARM64_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    text = "\n".join(p.read_text(errors="replace") for p in sources if p.is_file())
    match = re.search(r"^(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(https?://\S+/debian)/?\s", text, re.MULTILINE)
    return match[1] if match else DEFAULT_MIRROR


def _rootfs_path(cache_dir: Path | None) -> Path:
    """The rootfs folder; its name changes with what goes into it, so a new pin builds a new one."""
    key = "-".join([GUEST_SUITE, *GUEST_DEBS, *GUEST_WHEELS]).replace("==", "-")
    return cache_root(cache_dir) / f"rootfs-{GUEST_SUITE}-py{GUEST_PYTHON}-{digest(key)}"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``path``: one build at a time, and one run per /proc/cpuinfo."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def arm_cpu(cpu: str) -> ArmCpu:
    if cpu not in CPUS:
        raise UserError(f"unknown cpu model {cpu!r}: choose {' or '.join(CPUS)}")
    return CPUS[cpu]


def _write_cpuinfo(rootfs: Path, cpu: str) -> None:
    """A four-core board's ``/proc/cpuinfo``; without an ARM one, ``import onnxruntime`` crashes under qemu."""
    c = arm_cpu(cpu)
    core = (
        "processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {c.features}\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU variant\t: {c.variant}\nCPU part\t: {c.part}\nCPU revision\t: {c.revision}\n"
    )
    text = "\n".join(core.format(i=i, c=c) for i in range(4)) + f"\nModel\t\t: qemu-user emulated {cpu} ({c.board})\n"
    target = rootfs / "proc" / "cpuinfo"
    target.parent.mkdir(exist_ok=True)
    if not target.exists() or target.read_text() != text:
        tmp = target.with_name(f".cpuinfo.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, target)


def prepare_rootfs(cache_dir: Path | None = None, cpu: str = "cortex-a72", progress: bool = True) -> Path:
    """The cached aarch64 userland (built on first use, whole or not at all); its ``/proc/cpuinfo`` says ``cpu``."""
    arm_cpu(cpu)
    rootfs = _rootfs_path(cache_dir)
    with _locked(rootfs):
        if not rootfs.is_dir():
            _build_rootfs(rootfs, progress)
        _write_cpuinfo(rootfs, cpu)
    return rootfs


def _build_rootfs(rootfs: Path, progress: bool) -> None:
    mmdebstrap = find_tool("mmdebstrap")
    qemu_binary()  # fail before the download, not after
    tmp = rootfs.with_name(f".{rootfs.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    mirror = _debian_mirror()
    started = time.perf_counter()
    bar = progress_bar(2, "arm64 userland", enabled=progress, unit="step")
    try:
        # extract: unpack the packages and their dependencies, run no maintainer scripts (no emulation needed)
        proc = subprocess.run(
            [mmdebstrap, "--quiet", "--arch=arm64", "--variant=extract", f"--include={','.join(GUEST_DEBS)}", GUEST_SUITE, str(tmp), f"deb {mirror} {GUEST_SUITE} main"],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not (tmp / "usr" / "bin" / f"python{GUEST_PYTHON}").exists():
            tail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise UserError(f"mmdebstrap could not build the arm64 userland from {mirror} ({tail}): set EDGE_SIAMESE_ARM64_MIRROR to a Debian mirror that apt reaches")
        bar.update()
        site = tmp / GUEST_SITE.lstrip("/")
        platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:", *platforms, "--python-version", GUEST_PYTHON, "--implementation", "cp", "--target", str(site), *GUEST_WHEELS],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise UserError(f"pip could not fetch the aarch64 wheels ({tail}): check that pip reaches PyPI")
        bar.update()
        # Empty site folders in the rootfs, so that the guest never sees the host's (x86) packages there.
        for folder in (f"usr/local/lib/python{GUEST_PYTHON}/dist-packages", "usr/lib/python3/dist-packages"):
            (tmp / folder).mkdir(parents=True, exist_ok=True)
        _write_python_wrapper(tmp)
        info = {"suite": GUEST_SUITE, "mirror": mirror, "debs": list(GUEST_DEBS), "wheels": list(GUEST_WHEELS), "build_s": round(time.perf_counter() - started, 1)}
        (tmp / "opt" / "edge-siamese" / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        os.rename(tmp, rootfs)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _write_python_wrapper(rootfs: Path) -> None:
    """The guest's ``sys.executable``: a host shell script that starts qemu again, so that guest code
    that runs ``sys.executable`` (device_bench measures each file in a fresh process) works without
    binfmt_misc. qemu's settings reach it through the environment that the guest inherits."""
    wrapper = rootfs / GUEST_PYTHON_WRAPPER
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text('#!/bin/sh\nexec "$EDGE_SIAMESE_QEMU" -0 "$0" "$QEMU_LD_PREFIX/usr/bin/python3" "$@"\n')
    wrapper.chmod(0o755)


def _guest_env(rootfs: Path, cpu: str, qemu: str, pythonpath: list[Path], extra: dict | None = None) -> dict:
    """A clean environment: nothing of the host's Python settings leaks into the guest."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TERM")}
    return {
        **keep,
        "QEMU_LD_PREFIX": str(rootfs),
        "QEMU_CPU": cpu,
        "EDGE_SIAMESE_QEMU": qemu,
        "PYTHONHOME": "/usr",
        "PYTHONPATH": ":".join([GUEST_SITE, *map(str, pythonpath)]),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        **(extra or {}),
    }


def run_guest_python(
    args: list[str],
    cpu: str = "cortex-a72",
    cache_dir: Path | None = None,
    pythonpath: Sequence[Path] = (),
    env: dict | None = None,
    plugin: list[str] | None = None,
    timeout: float = 600,
    progress: bool = True,
) -> subprocess.CompletedProcess:
    """Run the guest's ``python3 ARGS`` under qemu (``plugin``: qemu ``-plugin`` arguments)."""
    qemu = qemu_binary()
    rootfs = prepare_rootfs(cache_dir, cpu, progress)
    command = [qemu, *(["-plugin", ",".join(plugin)] if plugin else []), "-0", str(rootfs / GUEST_PYTHON_WRAPPER), str(rootfs / "usr" / "bin" / "python3"), *args]
    with _locked(rootfs):
        _write_cpuinfo(rootfs, cpu)  # again: another run may have switched the core since prepare_rootfs
        try:
            return subprocess.run(command, env=_guest_env(rootfs, cpu, qemu, list(pythonpath), env), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"the emulated aarch64 run took longer than {timeout:.0f} s: ask for fewer runs, or raise the timeout") from None


@contextmanager
def host_copy(bundle: Path) -> Iterator[Path]:
    """A temporary folder with copies of ``device_bench/`` and the bundle, as they would be copied to a Pi."""
    bundle = Path(bundle)
    if not (bundle / MANIFEST).is_file():
        raise UserError(f"{bundle} is not a bundle (no {MANIFEST}): make one with 'edge-siamese export RUN'")
    with tempfile.TemporaryDirectory(prefix="edge-siamese-arm64-") as tmp:
        work = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(Path(device_bench.__file__).parent, work / "device_bench", ignore=ignore)
        shutil.copytree(bundle, work / bundle.name, ignore=ignore)
        yield work


NOTE = "times are emulated, not device latency"


def target_info(cpu: str) -> dict:
    """The result's ``target`` block for this emulated target."""
    return {"name": "arm64-emulated", "emulated": True, "cpu_model": cpu, "board": arm_cpu(cpu).board, "qemu": qemu_version(qemu_binary()), "note": NOTE}
