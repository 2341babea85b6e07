"""The Node client (clients/node/verify.mjs, on edge_siamese/app/web/bundle.mjs) on a real bundle:
it accepts it, agrees with device_bench's golden check, handles int8 input/output, and rejects a
tampered or inconsistent bundle, a model or manifest with non-finite numbers and a manifest path
that leaves the bundle folder, with one clear line."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_bench.manifest import read_bundle
from device_bench.metrics import embedding_agreement
from device_bench.runtimes import open_runtime

from conftest import BAD_MANIFESTS, copy_bundle, flip_byte

NODE_CLIENT = Path(__file__).resolve().parents[1] / "clients" / "node"
READER = Path(__file__).resolve().parents[1] / "edge_siamese" / "app" / "web" / "bundle.mjs"
NODE = shutil.which("node")
NODE_VERSION = tuple(int(v) for v in subprocess.run([NODE, "-p", "process.versions.node"], capture_output=True, text=True).stdout.split(".")[:2]) if NODE else (0, 0)

pytestmark = [
    pytest.mark.skipif(NODE_VERSION < (20, 12), reason="the Node client needs Node >= 20.12 (node is absent or older)"),
    pytest.mark.skipif(
        not (NODE_CLIENT / "node_modules" / "onnxruntime-node").is_dir(),
        reason="clients/node/node_modules is absent: run npm ci --prefix clients/node",
    ),
]


def verify(bundle: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the Node verifier on ``bundle``; its stdout is one JSON object whatever the outcome."""
    proc = subprocess.run([NODE, str(NODE_CLIENT / "verify.mjs"), str(bundle)], capture_output=True, text=True, timeout=60)
    return proc, json.loads(proc.stdout)


def assert_rejected(proc: subprocess.CompletedProcess, report: dict, *fragments: str) -> None:
    """Exit 1, ok false, one line of error naming the fragments, and no stack trace."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert report["ok"] is False
    assert "\n" not in report["error"]
    for fragment in fragments:
        assert fragment in report["error"], report["error"]
    assert "    at " not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def report(client_bundle) -> dict:
    proc, out = verify(client_bundle)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_node_accepts_the_bundle(report, client_bundle):
    assert report["ok"] is True
    assert report["bundle"] == str(client_bundle)
    assert "error" not in report
    assert set(report["files"]) == {"model_fp32.onnx", "model_int8.onnx"}
    assert all(row["ok"] and row["runtime"].startswith("onnxruntime-node ") for row in report["files"].values())
    assert report["files"]["model_fp32.onnx"]["min_cosine"] > 0.99999
    assert {row["path"] for row in report["skipped"]} == {"model_fp32.tflite", "model_int8.tflite"}
    assert all("LiteRT" in row["reason"] for row in report["skipped"])


def test_node_preprocessing_matches_python(report):
    assert report["preprocessing"]["ok"] is True
    assert report["preprocessing"]["max_abs_diff"] < 1e-5


def test_node_matches_device_bench(report, client_bundle):
    bundle = read_bundle(client_bundle)
    golden = bundle.golden()
    for entry in bundle.files:
        if entry["format"] != "onnx":
            continue
        python = embedding_agreement(open_runtime(client_bundle / entry["path"], "onnx").run(golden["inputs"]), golden["embeddings"])
        node = report["files"][entry["path"]]
        assert node["min_cosine"] == pytest.approx(python["min_cosine"], abs=1e-5)
        assert node["max_abs_diff"] == pytest.approx(python["max_abs_diff"], abs=1e-5)
        assert node["required_min_cosine"] == pytest.approx(entry["fidelity"]["min_cosine"] - 1e-3)


def test_node_rejects_a_tampered_file(client_bundle, tmp_path):
    tampered = copy_bundle(client_bundle, tmp_path / "bundle")
    flip_byte(tampered / "model_int8.onnx")
    assert_rejected(*verify(tampered), "sha256", "model_int8.onnx")


@pytest.mark.parametrize("edit, fragments", BAD_MANIFESTS, ids=lambda v: getattr(v, "__name__", ""))
def test_node_rejects_an_inconsistent_bundle(client_bundle, tmp_path, edit, fragments):
    assert_rejected(*verify(copy_bundle(client_bundle, tmp_path / "bundle", edit)), *fragments)


# --- non-finite numbers: a NaN passes no gate -----------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def relist(bundle: Path, path: str) -> None:
    """Update the sha256 and size of ``path`` in manifest.json after changing the file."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = next(e for e in manifest["files"] if e["path"] == path)
    entry.update(sha256=sha256_of(bundle / path), size_bytes=(bundle / path).stat().st_size)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_node_fails_a_model_that_computes_nan(client_bundle, tmp_path):
    bundle = copy_bundle(client_bundle, tmp_path / "bundle")
    model = onnx.load(bundle / "model_fp32.onnx")
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and len(init.dims) > 1:
            init.CopyFrom(numpy_helper.from_array(np.full(tuple(init.dims), np.nan, np.float32), init.name))
    onnx.save(model, bundle / "model_fp32.onnx")
    relist(bundle, "model_fp32.onnx")
    golden = np.load(bundle / "golden.npz")
    assert np.isnan(open_runtime(bundle / "model_fp32.onnx", "onnx").run(golden["inputs"])).all()  # the file really computes NaN

    proc, report = verify(bundle)
    assert_rejected(proc, report, "model_fp32.onnx: min cosine is NaN", "non-finite embeddings")
    row = report["files"]["model_fp32.onnx"]
    assert row["ok"] is False
    assert row["min_cosine"] is None  # NaN has no JSON spelling
    assert row["error"].startswith("min cosine is NaN")
    assert report["files"]["model_int8.onnx"]["ok"] is True  # the other file is still checked


def locate(manifest: dict, field: str) -> tuple[dict | list, str | int]:
    """The container and key of the manifest's ``field``, named as the clients name it (files[1].fidelity.min_cosine)."""
    *parents, last = [int(key) if key.isdigit() else key for key in re.split(r"[.\[\]]+", field) if key]
    return functools.reduce(lambda value, key: value[key], parents, manifest), last


def set_infinity(bundle: Path, field: str) -> None:
    """Set manifest.json's ``field`` to 1e999, which JSON.parse reads as Infinity (json.dumps cannot write it)."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    container, key = locate(manifest, field)
    container[key] = "__INFINITY__"
    path.write_text(json.dumps(manifest).replace('"__INFINITY__"', "1e999"))


@pytest.mark.parametrize("field", [
    "thresholds.far_1e-3", "thresholds.far_1e-2", "files[1].fidelity.min_cosine", "preprocessing.scale", "preprocessing.std[0]", "preprocessing.mean[0]",
])
def test_node_rejects_an_infinite_manifest_number(client_bundle, tmp_path, field):
    bundle = copy_bundle(client_bundle, tmp_path / "bundle")
    set_infinity(bundle, field)
    proc, report = verify(bundle)
    assert_rejected(proc, report, f"{field} is Infinity, not a finite number")
    assert report["files"] == {}  # refused before anything ran


def test_node_rejects_an_infinite_int8_scale(client_bundle, tmp_path):
    bundle = copy_bundle(client_bundle, tmp_path / "bundle")
    add_int8_io_model(bundle)
    set_infinity(bundle, "files[0].output.scale")
    assert_rejected(*verify(bundle), "files[0].output.scale is Infinity, not a finite number")


def test_the_verdict_refuses_a_non_finite_distance():
    """The page's verdict is a gate too: a NaN distance (NaN embeddings) is an error, not "Different"."""
    code = f"""
        import {{ verdict }} from {json.dumps(READER.as_uri())};
        const outcome = (d) => {{ try {{ return verdict(d, {{ "far_1e-3": 0.5 }}).accept; }} catch (err) {{ return err.message; }} }};
        console.log(JSON.stringify([0.1, 0.9, NaN, -Infinity].map(outcome)));
    """
    proc = subprocess.run([NODE, "--input-type=module", "-e", code], capture_output=True, text=True, timeout=60)
    assert json.loads(proc.stdout) == [True, False, *(f"the distance is {d}: the model computes non-finite embeddings" for d in ("NaN", "-Infinity"))]


# --- manifest paths stay inside the bundle folder -------------------------------------------------------

# ../ and %2e%2e/ (a browser's ..) reach a copy of the listed file beside the bundle; %, ? and # mean
# other files to a URL than to a file system; C: is a drive letter or a URL scheme.
OUTSIDE_PATHS = ["../x.onnx", "/etc/passwd", "sub/../model_fp32.onnx", "./model_fp32.onnx", "a\\b", "%2e%2e/x.onnx", "x.onnx?v=1", "C:x.onnx"]


@pytest.mark.parametrize("field", ["files[0].path", "eval.path", "golden.path"])
@pytest.mark.parametrize("path", OUTSIDE_PATHS)
def test_node_refuses_a_path_outside_the_bundle(client_bundle, tmp_path, field, path):
    """Each path with the sha256 of the file it reaches, where it reaches one, so that only the path check can refuse it."""
    bundle = copy_bundle(client_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry, _ = locate(manifest, field)
    shutil.copy(bundle / entry["path"], tmp_path / "x.onnx")
    reached = Path(os.path.normpath(bundle / path))
    entry.update(path=path, sha256=sha256_of(reached) if reached.is_file() else entry["sha256"])
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    proc, report = verify(bundle)
    assert_rejected(proc, report, field, json.dumps(path), "relative")
    assert "sha256" not in report["error"]  # refused before the file was read
    assert report["files"] == {}


@pytest.mark.parametrize("target", ["../outside.onnx", "/etc/passwd"])
def test_node_refuses_a_symlink_out_of_the_bundle(client_bundle, tmp_path, target):
    bundle = copy_bundle(client_bundle, tmp_path / "bundle")
    shutil.copy(bundle / "model_fp32.onnx", tmp_path / "outside.onnx")
    (bundle / "link.onnx").symlink_to(target)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][0].update(path="link.onnx", sha256=sha256_of(bundle / "link.onnx"))
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    proc, report = verify(bundle)
    assert_rejected(proc, report, "files[0].path", '"link.onnx"', "outside the bundle folder")
    assert "sha256" not in report["error"]


def test_node_follows_symlinks_inside_the_bundle(client_bundle, tmp_path):
    """A symlink that stays inside the bundle is fine, and so is a bundle folder reached through one."""
    bundle = copy_bundle(client_bundle, tmp_path / "bundle")
    (bundle / "models").mkdir()
    (bundle / "models" / "link.onnx").symlink_to("../model_fp32.onnx")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][0]["path"] = "models/link.onnx"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "alias").symlink_to(bundle)
    proc, report = verify(tmp_path / "alias")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["files"]["models/link.onnx"]["ok"] is True


def test_node_usage_mistake_exits_2(tmp_path):
    proc = subprocess.run([NODE, str(NODE_CLIENT / "verify.mjs")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: ")
    proc, report = verify(tmp_path)
    assert_rejected(proc, report, "no manifest.json")


# --- int8 input and output ----------------------------------------------------------------------------


def quantize(x: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(x / scale), -128, 127).astype(np.int8)


def add_int8_io_model(bundle: Path) -> tuple[str, float]:
    """Wrap model_fp32.onnx as a model with int8 input and output (DequantizeLinear in front,
    QuantizeLinear behind), list it in the manifest, and return its name and the min cosine
    numpy's own quantization gives it on the golden set."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = json.loads(json.dumps(next(e for e in manifest["files"] if e["path"] == "model_fp32.onnx")))
    golden = np.load(bundle / "golden.npz")
    in_scale, out_scale = float(np.abs(golden["inputs"]).max()) / 127, 1 / 127
    model = onnx.load(bundle / "model_fp32.onnx")
    graph = model.graph
    in_name, out_name = graph.input[0].name, graph.output[0].name
    for node in graph.node:
        node.input[:] = [f"{name}_float" if name == in_name else name for name in node.input]
        node.output[:] = [f"{name}_float" if name == out_name else name for name in node.output]
    graph.initializer.extend([
        numpy_helper.from_array(np.array(in_scale, np.float32), "in_scale"),
        numpy_helper.from_array(np.array(out_scale, np.float32), "out_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero_point"),
    ])
    graph.node.insert(0, helper.make_node("DequantizeLinear", [in_name, "in_scale", "zero_point"], [f"{in_name}_float"]))
    graph.node.append(helper.make_node("QuantizeLinear", [f"{out_name}_float", "out_scale", "zero_point"], [out_name]))
    graph.input[0].type.tensor_type.elem_type = TensorProto.INT8
    graph.output[0].type.tensor_type.elem_type = TensorProto.INT8
    path = bundle / "model_int8io.onnx"
    onnx.save(model, path)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    codes = session.run(None, {in_name: quantize(golden["inputs"], in_scale)})[0]
    min_cosine = embedding_agreement(codes.astype(np.float32) * np.float32(out_scale), golden["embeddings"])["min_cosine"]
    entry.update(path=path.name, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size_bytes=path.stat().st_size, precision="int8")
    entry["input"].update(dtype="int8", scale=in_scale, zero_point=0)
    entry["output"].update(dtype="int8", scale=out_scale, zero_point=0)
    entry["fidelity"]["min_cosine"] = min_cosine
    manifest["files"] = [entry]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return path.name, min_cosine


def test_node_quantizes_int8_input_and_output_as_numpy(client_bundle, tmp_path):
    bundle = copy_bundle(client_bundle, tmp_path / "bundle")
    name, python_min_cosine = add_int8_io_model(bundle)
    proc, report = verify(bundle)
    assert proc.returncode == 0, proc.stdout
    assert python_min_cosine < 0.99999  # the quantization is visible, so agreeing with it means something
    assert report["files"][name]["min_cosine"] == pytest.approx(python_min_cosine, abs=1e-9)
