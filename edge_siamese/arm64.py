"""``--target arm64-emulated``: a bundle and the torch-free ``device_bench`` on aarch64 under qemu.

A Debian bookworm arm64 userland (the base of Raspberry Pi OS bookworm: Python 3.11) is extracted
with mmdebstrap and given aarch64 wheels of numpy, onnxruntime and ai-edge-litert; it is built
once into a cache folder and reused. Programs run in it with qemu's user-mode emulation
(``qemu-aarch64 -L ROOTFS``), which serves a file from ROOTFS when it is there and from the host
otherwise, so the host's temporary folders, where the bundle and ``device_bench`` are copied, have
the same path on both sides.

Emulated time is not device time: ``run_device_bench`` marks its result ``emulated``. The
deterministic cost figure is ``count_instructions``: guest instructions per inference, counted by
a small TCG plugin compiled here on first use.
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
from device_bench.bench import validate_result
from device_bench.manifest import MANIFEST, read_bundle

from .errors import UserError, last_line
from .progress import progress_bar

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
NOTE = "times are emulated, not device latency"


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
PLUGIN_SOURCE = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <stddef.h>

typedef uint64_t plugin_id;
struct qemu_plugin_tb;
void qemu_plugin_register_vcpu_tb_trans_cb(plugin_id, void (*)(plugin_id, struct qemu_plugin_tb *));
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *, void (*)(unsigned int, void *), int flags, void *);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
void qemu_plugin_register_atexit_cb(plugin_id, void (*)(plugin_id, void *), void *);

__attribute__((visibility("default"))) int qemu_plugin_version = PLUGIN_API_VERSION;

static uint64_t executed;
static char out_path[4096];

static void block_ran(unsigned int vcpu, void *n_insns) {
    __atomic_fetch_add(&executed, (uint64_t)(uintptr_t)n_insns, __ATOMIC_RELAXED);
}

static void block_translated(plugin_id id, struct qemu_plugin_tb *tb) {
    qemu_plugin_register_vcpu_tb_exec_cb(tb, block_ran, 0 /* no registers */, (void *)(uintptr_t)qemu_plugin_tb_n_insns(tb));
}

static void guest_exited(plugin_id id, void *unused) {
    FILE *f = fopen(out_path, "w");
    if (f) {
        fprintf(f, "%llu\n", (unsigned long long)__atomic_load_n(&executed, __ATOMIC_RELAXED));
        fclose(f);
    }
}

__attribute__((visibility("default"))) int qemu_plugin_install(plugin_id id, const void *info, int argc, char **argv) {
    for (int i = 0; i < argc; i++)
        if (strncmp(argv[i], "out=", 4) == 0)
            snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
    if (!out_path[0])
        return -1;
    qemu_plugin_register_vcpu_tb_trans_cb(id, block_translated);
    qemu_plugin_register_atexit_cb(id, guest_exited, NULL);
    return 0;
}
"""

# Run in the guest by count_instructions: open one model file as device_bench does, check it on the
# golden vectors, then run it ITERATIONS more times at batch 1.
COUNT_DRIVER = """
import json, sys
import numpy as np
from device_bench.manifest import read_bundle
from device_bench.metrics import embedding_agreement
from device_bench.runtimes import open_runtime

bundle_path, file, runtime, iterations = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4])
bundle = read_bundle(bundle_path)
entry = next(e for e in bundle.files if e["path"] == file)
model = open_runtime(bundle.path / file, entry["format"], runtime, threads=1)
golden = bundle.golden()
embedding = bundle.manifest["embedding"]
check = embedding_agreement(model.run(golden["inputs"]), golden["embeddings"], None, embedding["distance"], embedding["distance_weights"])
x = np.ascontiguousarray(golden["inputs"][:1])
for _ in range(iterations):
    model.run(x)
print(json.dumps({"format": entry["format"], "precision": entry["precision"], "runtime": model.name, "runtime_version": model.version, "golden_min_cosine": check["min_cosine"]}))
"""


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$EDGE_SIAMESE_ARM64_CACHE``, else ``$XDG_CACHE_HOME/edge-siamese/arm64``."""
    if cache_dir is None and os.environ.get("EDGE_SIAMESE_ARM64_CACHE"):
        cache_dir = Path(os.environ["EDGE_SIAMESE_ARM64_CACHE"])
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-siamese" / "arm64"
    return Path(cache_dir).absolute()  # qemu's -L and the guest's sys.executable need absolute paths


def _tool(*names: str, hint: str = APT_HINT) -> str:
    for name in names:
        if path := shutil.which(name):
            return path
    raise UserError(f"the arm64-emulated target needs {' or '.join(names)}: {hint}")


def _qemu() -> str:
    """qemu-user's ``qemu-aarch64`` (it loads plugins), else qemu-user-static's."""
    return _tool("qemu-aarch64", "qemu-aarch64-static")


def _qemu_version(qemu: str) -> str:
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
    return cache_root(cache_dir) / f"rootfs-{GUEST_SUITE}-py{GUEST_PYTHON}-{_digest(key)}"


def _digest(text: str) -> str:
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


def _cpu(cpu: str) -> ArmCpu:
    if cpu not in CPUS:
        raise UserError(f"unknown cpu model {cpu!r}: choose {' or '.join(CPUS)}")
    return CPUS[cpu]


def _write_cpuinfo(rootfs: Path, cpu: str) -> None:
    """A four-core board's ``/proc/cpuinfo``; without an ARM one, ``import onnxruntime`` crashes under qemu."""
    c = _cpu(cpu)
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
    _cpu(cpu)
    rootfs = _rootfs_path(cache_dir)
    with _locked(rootfs):
        if not rootfs.is_dir():
            _build_rootfs(rootfs, progress)
        _write_cpuinfo(rootfs, cpu)
    return rootfs


def _build_rootfs(rootfs: Path, progress: bool) -> None:
    mmdebstrap = _tool("mmdebstrap")
    _qemu()  # fail before the download, not after
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
    qemu = _qemu()
    rootfs = prepare_rootfs(cache_dir, cpu, progress)
    command = [qemu, *(["-plugin", ",".join(plugin)] if plugin else []), "-0", str(rootfs / GUEST_PYTHON_WRAPPER), str(rootfs / "usr" / "bin" / "python3"), *args]
    with _locked(rootfs):
        _write_cpuinfo(rootfs, cpu)  # again: another run may have switched the core since prepare_rootfs
        try:
            return subprocess.run(command, env=_guest_env(rootfs, cpu, qemu, list(pythonpath), env), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"the emulated aarch64 run took longer than {timeout:.0f} s: ask for fewer runs, or raise the timeout") from None


@contextmanager
def _host_copy(bundle: Path) -> Iterator[Path]:
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


def target_info(cpu: str) -> dict:
    """The result's ``target`` block for this emulated target."""
    return {"name": "arm64-emulated", "emulated": True, "cpu_model": cpu, "board": _cpu(cpu).board, "qemu": _qemu_version(_qemu()), "note": NOTE}


def run_device_bench(bundle: Path, args: list[str], cpu: str = "cortex-a72", cache_dir: Path | None = None, timeout: float = 3600) -> dict:
    """``python -m device_bench BUNDLE ARGS`` on emulated aarch64; its JSON document, marked emulated."""
    _cpu(cpu)
    with _host_copy(bundle) as work:
        out = work / "bench.json"
        bench_args = ["-m", "device_bench", str(work / Path(bundle).name), *args, "--quiet", "--json", str(out)]
        env = {"DEVICE_BENCH_TARGET": "arm64-emulated", "DEVICE_BENCH_EMULATED": "1"}
        proc = run_guest_python(bench_args, cpu, cache_dir, [work], env, timeout=timeout)
        if not out.exists():
            raise UserError(f"device_bench failed on emulated aarch64: {last_line(proc)}")
        result = json.loads(out.read_text())
    result["target"] = target_info(cpu)
    return validate_result(result)


def _plugin(cache_dir: Path | None, qemu: str) -> Path:
    """The instruction-count plugin, compiled once per plugin API version into the cache."""
    help_text = subprocess.run([qemu, "--help"], capture_output=True, text=True).stdout
    if "-plugin" not in help_text:
        raise UserError(f"{qemu} was built without TCG plugin support, needed to count instructions: apt-get install qemu-user (Debian bookworm's loads plugins)")
    # qemu < 9.0 accepts API version 0-1; from 9.0 the oldest it accepts is 2. The calls used here are in both.
    major = _qemu_version(qemu).split(".")[0]
    api = 1 if major.isdigit() and int(major) < 9 else 2
    path = cache_root(cache_dir) / "plugins" / f"insn-count-api{api}-{_digest(PLUGIN_SOURCE)}.so"
    if path.exists():
        return path
    gcc = _tool("gcc", "cc", hint="apt-get install gcc")
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
    qemu = _qemu()
    plugin = _plugin(cache_dir, qemu)
    files = [e["path"] for e in read_bundle(bundle).files]
    if file not in files:
        raise UserError(f"{bundle} has no model file {file!r}: choose one of {', '.join(files)}")
    counts, info = [], {}
    with _host_copy(bundle) as work:
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
