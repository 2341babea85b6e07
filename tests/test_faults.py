"""Faults from outside: kill -9 of ``export`` and of ``compare`` while it benchmarks, and a full
disk. Afterwards nothing of the killed command keeps running, nothing half-written stays or passes
for a result, and the same command run again succeeds."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLI, assert_one_line_error, run_cli

TINY_COMPARE = ["compare", "--seeds", "1", "--epochs", "1", "--trials", "1", "--dims", "4", "--losses", "shadow", "--baseline-dim", "8", "--formats", "onnx", "--quiet"]
QUICK_BENCH = ["--format", "onnx", "--precision", "fp32", "--warmup", "0", "--runs", "1", "--gallery", "10", "--batch", "1"]
TEMPORARY_NAME = re.compile(r"tmp|temp|staging|partial", re.IGNORECASE)
# What this project's code would name a temporary in $TMPDIR: tempfile's default names, or its own
# names. (Libraries' persistent caches there, e.g. torchinductor_root, are not temporaries.)
OURS_IN_TMPDIR = re.compile(r"^tmp[\w-]{8}$|edge|siamese|device_bench|bench|staging", re.IGNORECASE)


def processes() -> dict[int, dict]:
    """Every process now: its parent, its session and its command line (from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if fields[0] == "Z":  # a zombie has finished; only its parent's wait() is missing
            continue
        out[int(entry.name)] = {"ppid": int(fields[1]), "sid": int(fields[3]), "cmdline": cmdline}
    return out


def descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid`` (children, their children, ...) with their command lines."""
    table = processes()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, info in table.items():
            if info["ppid"] == parent and child not in found:
                found[child] = info["cmdline"]
                frontier.append(child)
    return found


def survivors(session: int, recorded: dict[int, str], seconds: float) -> dict[int, str]:
    """The processes of ``session`` or of ``recorded`` (same pid and command line) still running
    after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        table = processes()
        alive = {pid: info["cmdline"] for pid, info in table.items() if info["sid"] == session}
        alive |= {pid: cmd for pid, cmd in recorded.items() if pid in table and table[pid]["cmdline"] == cmd}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def process_state(pid: int) -> str | None:
    """The state letter of ``/proc/PID/stat`` (R, S, T, Z, ...), or None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def sigterm_pending(pid: int) -> bool:
    """Whether SIGTERM waits to be delivered to ``pid`` (its own or its thread group's pending set)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    bit = 1 << (signal.SIGTERM - 1)
    return any(int(status[key].strip(), 16) & bit for key in ("SigPnd", "ShdPnd"))


def named_with_pid(name: str, pids) -> bool:
    return any(re.search(rf"(?<!\d){pid}(?!\d)", name) for pid in pids)


def temporaries_in_tmpdir(tmp: Path, pids=()) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if OURS_IN_TMPDIR.search(p.name) or named_with_pid(p.name, pids))


def strict_json(path: Path):
    """``path`` parsed as JSON that other readers accept too: a NaN or Infinity literal fails."""
    def refuse(literal):
        raise AssertionError(f"{path} holds the non-JSON literal {literal}")

    return json.loads(path.read_text(), parse_constant=refuse)


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(find, proc: subprocess.Popen, timeout: float, what: str):
    """Poll ``find()`` until it returns something; fail if ``proc`` ends or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"it ended (exit {proc.returncode}) before {what}: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    pytest.fail(f"no {what} within {timeout:.0f} s")


def start(args, **kwargs) -> subprocess.Popen:
    """The CLI in a session of its own (so that its descendants can be found), its output kept."""
    return subprocess.Popen(
        [str(CLI), *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **kwargs,
    )


# --- kill -9 of export -------------------------------------------------------------------------


def test_a_killed_export_leaves_no_process_its_staging_is_no_bundle_and_the_next_export_cleans_up(shadow_run, client_bundle, tmp_path):
    out = tmp_path / "bundle"
    before = {p.name for p in tmp_path.iterdir()}
    proc = start(["export", shadow_run, "--format", "onnx", "--int8", "--quiet", "--out", out])
    try:
        staging = wait_for(lambda: [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.staging-")], proc, 120, "staging folder beside --out")
        recorded = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert survivors(proc.pid, recorded, 5) == {}
    finally:
        kill_all([proc.pid, *descendants(proc.pid)])
        proc.stderr.close()
    assert len(staging) == 1 and staging[0].is_dir(), staging
    staging = staging[0]
    assert not out.exists()

    # Killed after its manifest was written: every file of a bundle is there, under the staging name.
    for path in client_bundle.iterdir():
        shutil.copy2(path, staging / path.name)
    refused = subprocess.run([sys.executable, "-m", "device_bench", staging, "--quiet", *QUICK_BENCH], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert_one_line_error(refused, staging.name)
    refused = run_cli("bench", staging, *QUICK_BENCH, check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert_one_line_error(refused, staging.name)

    run_cli("export", shadow_run, "--format", "onnx", "--int8", "--quiet", "--out", out)
    assert strict_json(out / "manifest.json")["files"]
    assert {p.name for p in tmp_path.iterdir()} == before | {out.name}  # the dead export's staging folder is gone too


# --- kill -9 of compare while it benchmarks ----------------------------------------------------


def test_a_compare_killed_while_benchmarking_leaves_no_benchmark_running_no_temporaries_and_resumes(tmp_path):
    out, tmp = tmp_path / "report", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}  # its own: whatever is left in it, this compare left
    proc = start([*TINY_COMPARE, "--out", out], env=env)
    recorded: dict[int, str] = {}

    def bench_child():
        return [pid for pid, info in processes().items() if info["ppid"] == proc.pid and "-m device_bench" in info["cmdline"]]

    def stopped_bench_child():
        # Stopped, the child cannot finish its benchmark meanwhile: whether it was told to end
        # with its parent is then a fact to read (a pending SIGTERM), not a race against a clock.
        # SIGSTOP takes effect asynchronously, so wait for the stopped state; a child that ends
        # first (its benchmark done) is passed over for the next one.
        for pid in bench_child():
            os.kill(pid, signal.SIGSTOP)
            for _ in range(500):
                state = process_state(pid)
                if state in ("T", None, "Z"):
                    break
                time.sleep(0.01)
            if state == "T":
                return [pid]
        return []

    try:
        (child,) = wait_for(stopped_bench_child, proc, 400, "a stopped python -m device_bench child")
        recorded = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert sigterm_pending(child), "the device_bench child was not told to end with its parent"
        os.kill(child, signal.SIGCONT)
        left = survivors(proc.pid, recorded, 60)
        assert left == {}, f"still running after compare was killed: {left}"
    finally:
        kill_all([*descendants(proc.pid), *recorded])
        proc.stderr.close()

    pids = {proc.pid, *recorded}
    assert temporaries_in_tmpdir(tmp, pids) == [], "temporaries of the killed compare left in TMPDIR"
    theirs = [str(p.relative_to(out)) for p in out.rglob("*") if TEMPORARY_NAME.search(p.name) and named_with_pid(p.name, pids)]
    assert theirs == [], f"temporaries of the killed processes left in --out: {theirs}"

    again = subprocess.run([str(CLI), *map(str, TINY_COMPARE), "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert strict_json(out / "results.json")["summary"]["rows"]  # one seed: no interval, and no NaN literal for it
    assert [str(p.relative_to(out)) for p in out.rglob("*") if TEMPORARY_NAME.search(p.name)] == []
    assert temporaries_in_tmpdir(tmp) == []


# --- a full disk -------------------------------------------------------------------------------

FREE_BYTES = 400 * 1024  # less than a checkpoint (~700 KB) or an ONNX and a TFLite file together (~470 KB)
FILE_SIZE_LIMIT = 100 * 1024  # less than any checkpoint or model file


def _mount_small_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(path)], capture_output=True).returncode == 0


def _rlimit_works() -> bool:
    try:
        import resource

        return hasattr(resource, "RLIMIT_FSIZE")
    except ImportError:
        return False


@pytest.fixture
def full_disk(tmp_path):
    """(folder, preexec_fn, what the error line must say): a 3 MB tmpfs with FREE_BYTES left when
    mount works (root), else a per-file size limit (RLIMIT_FSIZE) of FILE_SIZE_LIMIT."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if _mount_small_tmpfs(disk):
        try:
            st = os.statvfs(disk)
            (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - FREE_BYTES))
            yield disk, None, re.compile("no space left", re.IGNORECASE)
        finally:
            if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(disk)], capture_output=True)
        return
    if not _rlimit_works():
        pytest.skip("neither a tmpfs mount nor RLIMIT_FSIZE is available to fill a disk")
    (disk / "filler").write_bytes(b"")

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))

    yield disk, limit, re.compile("no space left|file too large|file size limit|disk is full|disk full", re.IGNORECASE)


def assert_disk_full_refusal(proc: subprocess.CompletedProcess, said: re.Pattern, disk: Path) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"exit {proc.returncode}: {proc.stderr!r}"
    assert lines[0].startswith("error: ") and said.search(lines[0]), lines[0]
    assert "Traceback" not in proc.stderr
    left = sorted(str(p.relative_to(disk)) for p in disk.rglob("*"))
    assert left == ["filler"], f"left on the full disk: {left}; {lines[0]!r}"


def test_train_on_a_full_disk_is_one_line_and_leaves_nothing(full_disk):
    disk, preexec, said = full_disk
    proc = subprocess.run(
        [str(CLI), "train", "--epochs", "1", "--quiet", "--out", str(disk / "run")], capture_output=True, text=True, preexec_fn=preexec, timeout=300
    )
    assert_disk_full_refusal(proc, said, disk)


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(shadow_run, full_disk):
    if importlib.util.find_spec("litert_torch") is None:
        pytest.skip("the tflite extra is not installed")
    disk, preexec, said = full_disk
    proc = subprocess.run(
        [str(CLI), "export", str(shadow_run), "--format", "onnx,tflite", "--quiet", "--out", str(disk / "bundle")],
        capture_output=True, text=True, preexec_fn=preexec, timeout=300,
    )
    assert_disk_full_refusal(proc, said, disk)
