"""The arm64-emulated target (``edge_siamese.app.targets``: ``rootfs``, ``arm64``, ``instructions``): a real bundle and ``device_bench`` on aarch64 under qemu user-mode emulation.

The aarch64 userland is built once into the user's cache (``EDGE_SIAMESE_ARM64_CACHE`` moves it)
and reused by later runs; CI installs the tools with ``apt-get install qemu-user mmdebstrap gcc``.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from conftest import assert_one_line_error, run_cli

from edge_siamese.app.targets import arm64, instructions, rootfs
from edge_siamese.errors import UserError

HAVE_QEMU = bool(shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")) and bool(shutil.which("mmdebstrap"))
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu user-mode emulation and mmdebstrap: apt-get install qemu-user mmdebstrap")


def _qemu_loads_plugins() -> bool:
    qemu = shutil.which("qemu-aarch64")
    return bool(qemu and shutil.which("gcc")) and "-plugin" in subprocess.run([qemu, "--help"], capture_output=True, text=True).stdout


needs_plugins = pytest.mark.skipif(
    not (HAVE_QEMU and _qemu_loads_plugins()), reason="counting instructions needs qemu-aarch64 with TCG plugins and gcc: apt-get install qemu-user gcc"
)


@pytest.fixture(scope="module")
def arm_bundle(tmp_path_factory):
    """Shadow d=8 on digits, 2 epochs, exported to ONNX and TFLite at fp32 and int8."""
    pytest.importorskip("litert_torch", reason="TFLite export needs the tflite extra: pip install 'edge-siamese[tflite]'")
    run = tmp_path_factory.mktemp("arm64") / "shadow-d8"
    run_cli("train", "--dataset", "digits", "--loss", "shadow", "--dim", "8", "--epochs", "2", "--quiet", "--out", run)
    run_cli("export", run, "--int8", "--format", "onnx,tflite", "--quiet")
    return run / "bundle"


def test_unknown_cpu_and_not_a_bundle_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="cortex-a72 or cortex-a76"):
        arm64.run_device_bench(tmp_path, [], cpu="cortex-a53")
    with pytest.raises(UserError, match="not a bundle"):
        arm64.run_device_bench(tmp_path, [])


def test_missing_tools_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(rootfs.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="apt-get install qemu-user mmdebstrap"):
        rootfs.prepare_rootfs(tmp_path / "cache", progress=False)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()], "a failed build leaves no rootfs behind"


@needs_qemu
def test_guest_runs_aarch64_python_with_both_runtimes():
    built = rootfs.prepare_rootfs(progress=False)
    assert rootfs.prepare_rootfs(progress=False) == built  # built once, then reused
    code = (
        "import json, platform, sys, numpy, onnxruntime; from ai_edge_litert.interpreter import Interpreter; "
        "print(json.dumps({'machine': platform.machine(), 'python': sys.version.split()[0], 'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__}))"
    )
    proc = rootfs.run_guest_python(["-c", code], progress=False)
    assert proc.returncode == 0, proc.stderr
    guest = json.loads(proc.stdout)
    assert guest["machine"] == "aarch64"
    assert guest["python"].startswith(rootfs.GUEST_PYTHON + ".")
    assert f"numpy=={guest['numpy']}" in rootfs.GUEST_WHEELS and f"onnxruntime=={guest['onnxruntime']}" in rootfs.GUEST_WHEELS


@needs_qemu
def test_bench_cli_on_emulated_arm64(arm_bundle, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", arm_bundle, "--target", "arm64-emulated", "--warmup", "1", "--runs", "2", "--gallery", "100", "--json", out)
    assert "emulated" in proc.stdout
    result = json.loads(out.read_text())
    assert result["target"]["name"] == "arm64-emulated" and result["target"]["emulated"] is True
    assert result["target"]["cpu_model"] == "cortex-a72" and result["target"]["note"] == rootfs.NOTE
    assert result["environment"]["machine"] == "aarch64"
    rows = {(r["format"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "int8")}
    for (fmt, precision), row in rows.items():
        assert row["status"] == "verified", row
        assert row["runtime"] == ("onnxruntime" if fmt == "onnx" else "litert")
        assert row["golden"]["min_cosine"] >= row["golden"]["required_min_cosine"]
        assert row["golden"]["min_cosine"] > (0.99999 if precision == "fp32" else 0.99)


@needs_plugins
def test_instruction_counts_are_positive_repeatable_and_lower_with_dot_product_instructions(arm_bundle):
    """Counted twice on the Pi 4's A72, once on the Pi 5's A76: the A76 has the dot-product
    instructions that ONNX Runtime's int8 kernels use; the A72 does not."""
    first, second = (instructions.count_instructions(arm_bundle, "model_int8.onnx", runs=200, cpu="cortex-a72") for _ in range(2))
    assert first["runtime"] == "onnxruntime" and first["target"]["emulated"] is True
    assert first["golden_min_cosine"] > 0.99
    assert first["instructions_per_inference"] > 10_000
    assert abs(first["instructions_per_inference"] - second["instructions_per_inference"]) <= 0.01 * first["instructions_per_inference"]
    a76 = instructions.count_instructions(arm_bundle, "model_int8.onnx", runs=200, cpu="cortex-a76")
    assert a76["instructions_per_inference"] < 0.8 * first["instructions_per_inference"]


@needs_plugins
def test_bench_cli_counts_instructions_per_file(arm_bundle, tmp_path):
    out = tmp_path / "bench.json"
    args = ["--format", "tflite", "--precision", "int8", "--runs", "2", "--gallery", "10", "--instructions", "--json", out]
    proc = run_cli("bench", arm_bundle, "--target", "arm64-emulated", *args)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["file"] == "model_int8.tflite" and row["guest_instructions_per_inference"] > 10_000
    assert "guest instructions per inference" in proc.stdout
    assert_one_line_error(run_cli("bench", arm_bundle, "--instructions", check=False), "--target arm64-emulated")
