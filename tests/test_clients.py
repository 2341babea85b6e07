"""The Node client (clients/node/verify.mjs) on a real bundle: it accepts it, rejects a tampered
copy, and agrees with device_bench's golden check."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from device_bench.manifest import read_bundle
from device_bench.metrics import embedding_agreement
from device_bench.runtimes import open_runtime

from conftest import run_cli

NODE_CLIENT = Path(__file__).resolve().parents[1] / "clients" / "node"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (the Node client needs Node >= 18)"),
    pytest.mark.skipif(
        not (NODE_CLIENT / "node_modules" / "onnxruntime-node").is_dir(),
        reason="clients/node/node_modules is absent: run npm ci --prefix clients/node --onnxruntime-node-install=skip",
    ),
]


def verify(bundle: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the Node verifier on ``bundle``; its stdout is one JSON object whatever the outcome."""
    proc = subprocess.run([NODE, str(NODE_CLIENT / "verify.mjs"), str(bundle)], capture_output=True, text=True, timeout=60)
    return proc, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A 2-epoch digits run exported to fp32 and int8 ONNX."""
    root = tmp_path_factory.mktemp("clients")
    run_cli("train", "--dataset", "digits", "--epochs", "2", "--quiet", "--out", root / "run")
    run_cli("export", root / "run", "--int8", "--format", "onnx", "--quiet", "--out", root / "bundle")
    return root / "bundle"


@pytest.fixture(scope="module")
def report(bundle) -> dict:
    proc, out = verify(bundle)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_node_accepts_the_bundle(report, bundle):
    assert report["ok"] is True
    assert report["bundle"] == str(bundle)
    assert "error" not in report
    assert set(report["files"]) == {"model_fp32.onnx", "model_int8.onnx"}
    assert all(row["ok"] for row in report["files"].values())
    assert report["files"]["model_fp32.onnx"]["min_cosine"] > 0.99999
    assert report["skipped"] == []


def test_node_matches_device_bench(report, bundle):
    manifest = read_bundle(bundle)
    golden = manifest.golden()
    for entry in manifest.files:
        python = embedding_agreement(open_runtime(bundle / entry["path"], "onnx").run(golden["inputs"]), golden["embeddings"])
        node = report["files"][entry["path"]]
        assert node["min_cosine"] == pytest.approx(python["min_cosine"], abs=1e-5)
        assert node["max_abs_diff"] == pytest.approx(python["max_abs_diff"], abs=1e-5)


def test_node_rejects_a_tampered_file(bundle, tmp_path):
    tampered = tmp_path / "bundle"
    shutil.copytree(bundle, tampered)
    model = tampered / "model_int8.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))

    proc, out = verify(tampered)
    assert proc.returncode != 0
    assert out["ok"] is False
    assert "sha256" in out["error"] and "model_int8.onnx" in out["error"]
    assert "\n" not in out["error"]
    assert "Error:" not in proc.stderr and "    at " not in proc.stderr  # no stack trace
