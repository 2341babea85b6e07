"""``edge-siamese bench --target``: this CPU, the CUDA gate, and a real ssh target (an sshd on loopback,
started and stopped here), each through the real CLI; bad targets and options give one line."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli
from device_bench.document import validate_result
from device_bench.manifest import MANIFEST, sha256_file
from test_device_bench import altered_copy, bench_bundle  # noqa: F401  (the shared bundle fixture)

SSHD = Path("/usr/sbin/sshd")
SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/lib/ssh/sftp-server")


def test_cpu_target_writes_a_valid_document(bench_bundle, tmp_path):  # noqa: F811
    out = tmp_path / "bench.json"
    out.write_text("an older result\n")
    proc = run_cli("bench", bench_bundle, "--target", "cpu", "--runs", "3", "--gallery", "100", "--json", out, "--force", timeout=180)
    result = validate_result(json.loads(out.read_text()))
    assert result["target"] == {"name": "cpu", "emulated": False}
    assert result["bundle"]["manifest_sha256"] == sha256_file(bench_bundle / MANIFEST)
    assert result["settings"] == {
        "runtime": None, "threads": None, "ort_memory": "default", "batch": [1], "warmup": 5, "runs": 3, "min_seconds": None, "gallery": [100]
    }
    assert [r["status"] for r in result["rows"]] == ["verified"] * 4
    for row in result["rows"]:
        assert [lat["runs"] for lat in row["latency"]] == [3]
        assert [(g["size"], g["bytes"]) for g in row["gallery"]] == [(100, 100 * 8 * (1 if row["precision"] == "int8" else 4))]
    assert proc.stdout.count("✅") == 4 and f"wrote {out}" in proc.stdout


def test_an_existing_json_is_kept_without_force(bench_bundle, tmp_path):  # noqa: F811
    out = tmp_path / "bench.json"
    out.write_text("keep me\n")
    assert_one_line_error(run_cli("bench", bench_bundle, "--json", out, check=False), f"{out} already exists", "--force")
    assert out.read_text() == "keep me\n"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--target", "tpu"], ["unknown target 'tpu'", "cpu, cuda, arm64-emulated, ssh://user@host"]),
        (["--runs", "0"], ["--runs 0: use at least 1"]),
        (["--batch", "0"], ["--batch '0'", "positive integers"]),
        (["--target", "cuda", "--batch", "1,x"], ["--batch '1,x'", "positive integers"]),
        (["--precision", "fp16"], ["has no onnx/tflite file at fp16"]),
    ],
)
def test_bad_targets_and_options_give_one_line(bench_bundle, tmp_path, args, fragments):  # noqa: F811
    out = tmp_path / "bench.json"
    proc = run_cli("bench", bench_bundle, *args, "--gallery", "10", "--json", out, check=False, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, *fragments)
    assert not out.exists()


def test_cuda_target_without_a_gpu_says_so(bench_bundle, shadow_run):  # noqa: F811
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    proc = run_cli("bench", bench_bundle, "--target", "cuda", "--run", shadow_run, check=False, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, "the cuda target needs a CUDA GPU", "--target cpu")


def wall_clock_times_s(fn, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def test_cuda_target_builds_device_benchs_document(bench_bundle, shadow_run):  # noqa: F811
    """The document the cuda target returns, built here on the CPU: its PyTorch rows with a wall-clock
    timer in place of CUDA events, and its ONNX Runtime CUDA rows (not measured without the provider)."""
    import torch

    from device_bench.manifest import read_bundle
    from edge_siamese.app.targets import BenchSettings, cuda

    bundle = read_bundle(bench_bundle)
    settings = BenchSettings(batches=[1, 4], warmup=1, runs=3)
    rows = [cuda.torch_row(bundle, shadow_run, p, torch.device("cpu"), settings, wall_clock_times_s) for p in ("fp32", "bf16")]
    rows += cuda.ort_cuda_rows(bundle, settings)
    result = validate_result(cuda.document(bundle, rows, settings, "cpu, for the test"))
    fp32, bf16 = result["rows"][:2]
    assert (fp32["status"], fp32["format"], fp32["file"]) == ("verified", "pytorch", "model.safetensors")
    assert fp32["golden"]["min_cosine"] > 1 - 1e-6 and fp32["golden"]["required_min_cosine"] == 1 - 1e-6
    assert bf16["status"] == "verified" and 0.99 < bf16["golden"]["min_cosine"] < fp32["golden"]["min_cosine"]
    assert [lat["batch"] for lat in fp32["latency"]] == [1, 4] and all(lat["runs"] == 3 and not lat["cuda_graph"] for lat in fp32["latency"])
    assert fp32["accuracy"]["num_samples"] == bundle.manifest["eval"]["num_samples"]
    # the same model on the same held-out images as export's reference
    assert fp32["accuracy"]["precision_at_1"] == pytest.approx(bundle.file("onnx", "fp32")["fidelity"]["reference_precision_at_1"], abs=0.005)
    onnx_rows = result["rows"][2:]
    assert [(r["file"], r["status"]) for r in onnx_rows] == [("model_fp32.onnx", "not_measured"), ("model_int8.onnx", "not_measured")]
    assert all("onnxruntime-gpu" in r["error"] for r in onnx_rows)
    assert result["target"] == {"name": "cuda", "emulated": False, "device": "cpu, for the test"}


def test_cpu_target_exits_1_when_a_row_failed_like_device_bench(bench_bundle, tmp_path):  # noqa: F811
    copy = altered_copy(bench_bundle, tmp_path / "bundle", "model_int8.onnx", b"not an onnx model" * 64)
    proc = run_cli("bench", copy, "--format", "onnx", "--runs", "2", "--gallery", "10", "--json", tmp_path / "bench.json", check=False, timeout=120)
    assert [r["status"] for r in json.loads((tmp_path / "bench.json").read_text())["rows"]] == ["verified", "failed"]
    assert proc.returncode == 1


# --- ssh://user@127.0.0.1:PORT against an sshd started here ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd on a free loopback port that accepts one temporary key for this user, and ssh/scp on PATH that use it.

    The target builds plain ``ssh``/``scp`` command lines (BatchMode, the default key and
    config), and ssh reads ``~`` from the password database, not $HOME. So ``ssh`` and ``scp``
    wrappers that add ``-F`` with a temporary client config go first on PATH. On the server,
    ForceCommand runs every command (and the sftp subsystem that scp uses) with this
    interpreter's bin folder first on PATH, after whatever the login shell's rc files did.
    The target's remote ``python3`` is then this venv's, with numpy and the runtimes.
    """
    sftp_server = next((p for p in SFTP_SERVERS if Path(p).exists()), None)
    if not SSHD.exists() or sftp_server is None or not all(shutil.which(t) for t in ("ssh", "scp", "ssh-keygen")):
        pytest.skip("apt-get install openssh-server openssh-client")
    root = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True, timeout=30)
    shutil.copy(root / "client_key.pub", root / "authorized_keys")
    remote_shell = root / "remote_shell"
    remote_shell.write_text(f'#!/bin/sh\nPATH={Path(sys.executable).parent}:/usr/bin:/bin\nexport PATH\nexec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n')
    remote_shell.chmod(0o755)
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\n{'PermitRootLogin yes' if os.geteuid() == 0 else ''}\n"
        f"ForceCommand {remote_shell}\nSubsystem sftp {sftp_server}\n"
    )
    (root / "ssh_config").write_text(
        f"Host *\n  Port {port}\n  IdentityFile {root / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {root / 'known_hosts'}\n  StrictHostKeyChecking no\n  LogLevel ERROR\n"
    )
    wrappers = root / "bin"
    wrappers.mkdir()
    for tool in ("ssh", "scp"):
        (wrappers / tool).write_text(f'#!/bin/sh\nexec {shutil.which(tool)} -F {root / "ssh_config"} "$@"\n')
        (wrappers / tool).chmod(0o755)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder, which systemd would make
    log = open(root / "sshd.log", "w")
    server = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(root / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {(root / 'sshd.log').read_text()}") from None
                time.sleep(0.1)
        yield {"url": f"ssh://{getpass.getuser()}@127.0.0.1:{port}", "path": f"{wrappers}{os.pathsep}{os.environ['PATH']}", "log": root / "sshd.log"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


def test_ssh_target_copies_runs_and_fetches_the_document(sshd, bench_bundle, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PATH", sshd["path"])
    leftovers_before = {p for p in Path("/tmp").glob("tmp.*") if (p / "device_bench").exists()}
    out = tmp_path / "bench.json"
    proc = run_cli("bench", bench_bundle, "--target", sshd["url"], "--format", "onnx", "--runs", "3", "--gallery", "100", "--json", out, timeout=180)
    result = validate_result(json.loads(out.read_text()))
    assert result["target"] == {"name": "ssh", "emulated": False}
    assert result["bundle"]["path"] == bench_bundle.name  # the copy in the remote temporary folder
    assert result["bundle"]["manifest_sha256"] == sha256_file(bench_bundle / MANIFEST)
    assert [(r["file"], r["status"]) for r in result["rows"]] == [("model_fp32.onnx", "verified"), ("model_int8.onnx", "verified")]
    assert f"wrote {out}" in proc.stdout and proc.stdout.count("✅") == 2
    assert "Accepted publickey" in sshd["log"].read_text()
    leftovers = {p for p in Path("/tmp").glob("tmp.*") if (p / "device_bench").exists()}
    assert leftovers <= leftovers_before, "the remote temporary folder was not removed"


def test_ssh_target_that_refuses_gives_one_line(bench_bundle, tmp_path):  # noqa: F811
    if shutil.which("ssh") is None:
        pytest.skip("apt-get install openssh-client")
    proc = run_cli("bench", bench_bundle, "--target", f"ssh://nobody@127.0.0.1:{free_port()}", "--json", tmp_path / "b.json", check=False, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, "ssh to nobody@127.0.0.1 failed", "Connection refused")
    assert not (tmp_path / "b.json").exists()
