"""``edge-siamese export`` end to end: the bundle, its fidelity figures, what is inside each model
file, an independent re-check from ``golden.npz``, tampering, bad input and the degraded path.

Real exports are slow (about 10 s each), so two bundles are built once per session and shared:
the Shadow d=8 run in every format and precision (zipped), and a Triplet d=128 run at fp32 and int8.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from conftest import assert_one_line_error, flip_byte, run_cli
from device_bench.formats import FORMATS, PRECISIONS, Precision, file_name
from device_bench.manifest import MANIFEST, BundleError, read_bundle, sha256_file
from device_bench.runtimes import open_runtime
from export import onnx as onnx_export


@dataclass
class Exported:
    path: Path
    stdout: str


@pytest.fixture(scope="session")
def shadow_bundle(shadow_run, tmp_path_factory) -> Exported:
    out = tmp_path_factory.mktemp("shadow-export") / "bundle"
    proc = run_cli("export", shadow_run, "--int8", "--fp16", "--format", "onnx,tflite", "--quiet", "--out", out, "--zip")
    return Exported(out, proc.stdout)


@pytest.fixture(scope="session")
def triplet_bundle(tmp_path_factory) -> Exported:
    folder = tmp_path_factory.mktemp("triplet-export")
    run_cli("train", "--loss", "triplet", "--dim", "128", "--epochs", "5", "--quiet", "--out", folder / "run")
    proc = run_cli("export", folder / "run", "--int8", "--format", "onnx,tflite", "--quiet", "--out", folder / "bundle")
    return Exported(folder / "bundle", proc.stdout)


# Each shared bundle, with what was asked of it: (loss, dim, distance, precisions).
BUNDLES = {
    "shadow_bundle": ("shadow", 8, "cosine", ("fp32", "fp16", "int8")),
    "triplet_bundle": ("triplet", 128, "euclidean", ("fp32", "int8")),
}
FILES = [(name, fmt, precision) for name, spec in BUNDLES.items() for fmt in FORMATS for precision in spec[3]]


@pytest.fixture(params=list(BUNDLES))
def exported(request) -> tuple[str, Exported]:
    return request.param, request.getfixturevalue(request.param)


def model_file(request, name: str, fmt: str, precision: str) -> tuple[dict, Path, dict]:
    """The manifest, the model file's path and its manifest entry, in the shared bundle ``name``."""
    bundle = read_bundle(request.getfixturevalue(name).path)
    entry = bundle.file(fmt, precision)
    return bundle.manifest, bundle.path / entry["path"], entry


def preprocess(raw: np.ndarray, pre: dict) -> np.ndarray:
    """The manifest's preprocessing, as a device would write it: (raw * scale - mean) / std, NHWC -> NCHW."""
    x = raw.astype(np.float32) * np.float32(pre["scale"])
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return x.transpose(0, 3, 1, 2)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- the bundle -------------------------------------------------------------------------------


def test_every_format_and_precision_is_verified_and_described(exported):
    name, bundle_out = exported
    loss, dim, distance, precisions = BUNDLES[name]
    bundle = read_bundle(bundle_out.path)
    rows = {(e["format"], e["precision"]): e["status"] for e in bundle.files}
    assert rows == {(f, p): "verified" for f in FORMATS for p in precisions}
    assert [e["path"] for e in bundle.files] == [file_name(f, p) for f in FORMATS for p in precisions]
    table = bundle_out.stdout.strip().splitlines()
    assert table[-1] == f"wrote {bundle_out.path}"
    assert sum(" verified " in line for line in table) == len(rows)
    m = bundle.manifest
    assert (m["training"]["loss"], m["embedding"]["dim"], m["embedding"]["distance"]) == (loss, dim, distance)
    assert m["embedding"]["l2_normalized"] is True and m["embedding"]["distance_weights"] is None
    assert m["input"] == {"name": "images", "shape": [-1, 1, 8, 8], "layout": "NCHW", "dtype": "float32"}
    pre = m["preprocessing"]
    assert (pre["scale"], pre["raw_range"], pre["resize"], pre["channels"]) == (1 / 16, [0.0, 16.0], [8, 8], 1)
    assert 0 < m["thresholds"]["far_1e-3"] <= m["thresholds"]["far_1e-2"]


def test_the_folder_holds_exactly_the_listed_files_with_their_size_and_sha256(exported):
    bundle = read_bundle(exported[1].path)
    listed = [e["path"] for e in bundle.files] + ["eval.npz", "golden.npz", MANIFEST]
    assert sorted(p.name for p in bundle.path.iterdir()) == sorted(listed)
    for entry in bundle.files:
        path = bundle.path / entry["path"]
        assert (path.stat().st_size, sha256_file(path)) == (entry["size_bytes"], entry["sha256"])
    for key in ("eval", "golden"):
        assert sha256_file(bundle.path / bundle.manifest[key]["path"]) == bundle.manifest[key]["sha256"]


def test_eval_and_golden_arrays(exported):
    name, bundle_out = exported
    bundle = read_bundle(bundle_out.path)
    dim = BUNDLES[name][1]
    ev, golden = bundle.eval_set(), bundle.golden()
    assert set(ev) == {"images", "labels"} and set(golden) == {"images", "inputs", "embeddings"}
    n = bundle.manifest["eval"]["num_samples"]
    assert n == 359 == bundle.files[0]["fidelity"]["num_samples"]  # the digits test split
    assert ev["images"].shape == (n, 8, 8, 1) and ev["images"].dtype == np.uint8
    assert ev["labels"].shape == (n,) and set(ev["labels"].tolist()) == set(range(10))
    g = bundle.manifest["golden"]["num_samples"]
    assert g == 8
    assert golden["images"].shape == (g, 8, 8, 1) and golden["inputs"].shape == (g, 1, 8, 8)
    assert golden["inputs"].dtype == np.float32
    assert golden["embeddings"].shape == (g, dim) and golden["embeddings"].dtype == np.float32
    np.testing.assert_array_equal(golden["images"], ev["images"][:g])
    low, high = bundle.manifest["preprocessing"]["raw_range"]
    assert low <= ev["images"].min() and ev["images"].max() <= high


def test_zip_holds_the_bundle_folder(shadow_bundle):
    archive = shadow_bundle.path.with_name("bundle.zip")
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        assert sorted(names) == sorted(f"bundle/{p.name}" for p in shadow_bundle.path.iterdir())
        for p in shadow_bundle.path.iterdir():
            assert zf.read(f"bundle/{p.name}") == p.read_bytes()


# -- fidelity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, fmt, precision", FILES)
def test_fidelity_figures_meet_each_precisions_bar(request, name, fmt, precision):
    _, _, entry = model_file(request, name, fmt, precision)
    f = entry["fidelity"]
    if precision == "fp32":
        assert f["min_cosine"] > 1 - 1e-5 and f["max_abs_diff"] < 1e-4
        assert f["precision_at_1"] == f["reference_precision_at_1"] and f["top1_neighbour_agreement"] == 1.0
    else:
        assert f["mean_cosine"] >= (0.999 if precision == "fp16" else 0.995)
        assert abs(f["precision_at_1"] - f["reference_precision_at_1"]) <= 0.01
    assert f["reference_precision_at_1"] > 0.9


@pytest.mark.parametrize("name, fmt, precision", FILES)
def test_l2_normalized_models_output_unit_vectors(request, name, fmt, precision):
    manifest, path, _ = model_file(request, name, fmt, precision)
    assert manifest["embedding"]["l2_normalized"]
    ev = read_bundle(path.parent).eval_set()
    norms = np.linalg.norm(open_runtime(path, fmt).run(preprocess(ev["images"], manifest["preprocessing"])), axis=1)
    assert np.abs(norms - 1).max() < 1e-3, f"norms {norms.min():.4f} to {norms.max():.4f}"


# -- inside the model files -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUNDLES))
def test_onnx_int8_convs_read_int8_weights_through_dequantize_linear(request, name):
    _, path, entry = model_file(request, name, "onnx", "int8")
    graph = onnx.load(str(path)).graph
    initializers = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 3  # the convnet backbone
    for conv in convs:
        activation, weight = producer[conv.input[0]], producer[conv.input[1]]
        assert activation.op_type == "DequantizeLinear" and weight.op_type == "DequantizeLinear"
        w = initializers[weight.input[0]]
        assert w.data_type == TensorProto.INT8 and len(w.dims) == 4
        assert numpy_helper.to_array(initializers[weight.input[1]]).shape == (w.dims[0],)  # per-channel scales
    assert not [t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 4]
    fp32 = read_bundle(path.parent).file("onnx", "fp32")
    assert entry["size_bytes"] / fp32["size_bytes"] < 0.4


@pytest.mark.parametrize("name", list(BUNDLES))
def test_tflite_int8_holds_per_channel_int8_weights(request, name):
    from ai_edge_litert.interpreter import Interpreter

    def tensors(precision: str) -> list[dict]:
        interpreter = Interpreter(model_path=str(model_file(request, name, "tflite", precision)[1]))
        interpreter.allocate_tensors()
        return interpreter.get_tensor_details()

    def per_channel_int8(details: list[dict]) -> list[dict]:
        return [t for t in details if t["dtype"] == np.int8 and len(t["quantization_parameters"]["scales"]) > 1]

    assert len(per_channel_int8(tensors("int8"))) >= 3  # the three conv layers' weights
    assert not [t for t in tensors("fp32") if t["dtype"] == np.int8]
    _, path, entry = model_file(request, name, "tflite", "int8")
    fp32 = read_bundle(path.parent).file("tflite", "fp32")
    assert entry["size_bytes"] / fp32["size_bytes"] < 0.5


def test_tflite_fp16_holds_float16_weights(request):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model_file(request, "shadow_bundle", "tflite", "fp16")[1]))
    assert any(t["dtype"] == np.float16 for t in interpreter.get_tensor_details())


@pytest.mark.parametrize("name, fmt, precision", [c for c in FILES if c[1] == "tflite"])
def test_manifest_io_of_tflite_files_matches_the_interpreter(request, name, fmt, precision):
    from ai_edge_litert.interpreter import Interpreter

    _, path, entry = model_file(request, name, fmt, precision)
    interpreter = Interpreter(model_path=str(path))
    for key, detail in (("input", interpreter.get_input_details()[0]), ("output", interpreter.get_output_details()[0])):
        io = entry[key]
        dtype = np.dtype(detail["dtype"])
        assert (io["name"], io["dtype"], io["shape"]) == (detail["name"], dtype.name, detail["shape"].tolist())
        scale, zero_point = detail["quantization"]
        if dtype == np.int8:
            assert io["scale"] == pytest.approx(scale) and io["zero_point"] == zero_point
        else:
            assert io["scale"] is None and io["zero_point"] is None
    assert entry["input"]["shape"] == [1, 1, 8, 8]
    assert entry["output"]["shape"] == [1, BUNDLES[name][1]]


@pytest.mark.parametrize("name, fmt, precision", [c for c in FILES if c[1] == "onnx"])
def test_onnx_io_and_metadata_props_mirror_the_manifest(request, name, fmt, precision):
    manifest, path, entry = model_file(request, name, fmt, precision)
    model = onnx.load(str(path))
    for key, value in (("input", model.graph.input[0]), ("output", model.graph.output[0])):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT
        assert entry[key] == {"name": value.name, "dtype": "float32", "shape": dims, "scale": None, "zero_point": None}
    assert entry["input"]["name"] == manifest["input"]["name"]
    assert entry["output"]["name"] == manifest["embedding"]["output_name"]
    props = {p.key: p.value for p in model.metadata_props}
    keys = ("schema_version", "toolkit_version", "preprocessing", "embedding", "thresholds", "loss")
    assert set(props) == {f"edge_siamese.{k}" for k in keys}
    for key in ("preprocessing", "embedding", "thresholds"):
        assert json.loads(props[f"edge_siamese.{key}"]) == manifest[key]
    assert props["edge_siamese.schema_version"] == str(manifest["schema_version"])
    assert props["edge_siamese.toolkit_version"] == manifest["toolkit_version"]
    assert props["edge_siamese.loss"] == manifest["training"]["loss"]


@pytest.mark.parametrize("name, fmt, precision", [c for c in FILES if c[1] == "tflite"])
def test_tflite_metadata_mirrors_the_manifest_as_onnx_does(request, name, fmt, precision):
    """Every format that holds metadata carries the same keys: ONNX's metadata_props, TFLite's metadata buffers."""
    from export.tflite import read_metadata

    manifest, path, _ = model_file(request, name, fmt, precision)
    ours = {k: v for k, v in read_metadata(path).items() if k.startswith("edge_siamese.")}
    onnx_props = {p.key: p.value for p in onnx.load(str(path.with_suffix(".onnx"))).metadata_props}
    assert ours == onnx_props
    for key in ("preprocessing", "embedding", "thresholds"):
        assert json.loads(ours[f"edge_siamese.{key}"]) == manifest[key]
    assert open_runtime(path, fmt).run(read_bundle(path.parent).golden()["inputs"]).shape[1] == manifest["embedding"]["dim"]


# -- an independent re-check from golden.npz -----------------------------------------------------


def test_golden_inputs_are_the_manifests_preprocessing_of_the_raw_images(exported):
    bundle = read_bundle(exported[1].path)
    golden = bundle.golden()
    np.testing.assert_array_equal(preprocess(golden["images"], bundle.manifest["preprocessing"]), golden["inputs"])


@pytest.mark.parametrize("name, fmt, precision", FILES)
def test_each_file_reproduces_the_golden_embeddings(request, name, fmt, precision):
    _, path, entry = model_file(request, name, fmt, precision)
    golden = read_bundle(path.parent).golden()
    cos = cosine(open_runtime(path, fmt).run(golden["inputs"]), golden["embeddings"])
    # The golden images are the first held-out images, so no worse than the manifest's minimum.
    assert cos.min() >= entry["fidelity"]["min_cosine"] - 1e-4
    assert cos.min() >= {"fp32": 1 - 1e-5, "fp16": 0.999, "int8": 0.98}[precision]


def test_golden_embeddings_are_the_trained_models(shadow_run, shadow_bundle):
    import torch

    from edge_siamese.checkpoints import load_run
    from edge_siamese.models import embed

    golden = read_bundle(shadow_bundle.path).golden()
    reference = embed(load_run(shadow_run).model, torch.from_numpy(golden["inputs"])).numpy()
    np.testing.assert_allclose(golden["embeddings"], reference, atol=1e-5)


# -- tampering ----------------------------------------------------------------------------------


@pytest.fixture
def bundle_copy(shadow_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(shadow_bundle.path, tmp_path / "bundle"))


def test_a_flipped_byte_is_caught_by_sha256(bundle_copy):
    flip_byte(bundle_copy / "model_int8.onnx")
    with pytest.raises(BundleError, match="model_int8.onnx in .* does not match its sha256"):
        read_bundle(bundle_copy)


def test_a_truncated_file_is_caught_by_sha256(bundle_copy):
    path = bundle_copy / "model_fp32.tflite"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleError, match="model_fp32.tflite in .* does not match its sha256"):
        read_bundle(bundle_copy)


def test_a_changed_golden_file_is_caught_by_sha256(bundle_copy):
    np.savez_compressed(bundle_copy / "golden.npz", images=np.zeros((8, 8, 8, 1), np.uint8))
    with pytest.raises(BundleError, match="golden.npz in .* does not match its sha256"):
        read_bundle(bundle_copy)


@pytest.mark.parametrize(
    "path, named",
    [
        (("embedding", "dim"), "embedding.dim"),
        (("files", 2, "fidelity", "min_cosine"), "files[2].fidelity.min_cosine"),
        (("golden",), "golden"),
    ],
)
def test_a_deleted_manifest_field_is_named(bundle_copy, path, named):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    target = manifest
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as info:
        read_bundle(bundle_copy)
    assert f"manifest is missing {named}" in str(info.value)


# -- bad input ----------------------------------------------------------------------------------


def run_cli_after(setup: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI's ``main`` in a fresh interpreter, after ``setup`` (Python source) has run."""
    code = f"import sys\n{setup}\nfrom edge_siamese.app.cli import main\nmain(sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=600)


# What an environment without the tflite extra looks like to find_spec and to import: None in
# sys.modules (a meta-path finder cannot make find_spec answer None while the packages are installed).
WITHOUT_TFLITE = "for name in ('litert_torch', 'ai_edge_quantizer', 'ai_edge_litert'):\n    sys.modules[name] = None"
STRICT_INT8 = Precision(1, 0.0, 1e-9, None, None)  # no int8 file reaches a relative error of 1e-9: the search runs out


@pytest.fixture
def out_parent(tmp_path) -> Path:
    parent = tmp_path / "out"
    parent.mkdir()
    return parent


def assert_nothing_written(parent: Path, *expected: str) -> None:
    """No bundle, no zip and no temporary folder left beside it."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(expected)


def copy_run(shadow_run: Path, to: Path) -> Path:
    return Path(shutil.copytree(shadow_run, to, ignore=shutil.ignore_patterns("bundle*", "evaluation*")))


def test_a_run_without_weights_is_refused(shadow_run, tmp_path, out_parent):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(shadow_run / "config.json", run)
    proc = run_cli("export", run, "--out", out_parent / "bundle", "--zip", check=False)
    assert_one_line_error(proc, "no model.safetensors", "--resume")
    assert_nothing_written(out_parent)


def test_a_corrupt_run_is_refused(shadow_run, tmp_path, out_parent):
    run = copy_run(shadow_run, tmp_path / "run")
    (run / "model.safetensors").write_bytes(b"not a safetensors file" * 100)
    proc = run_cli("export", run, "--int8", "--out", out_parent / "bundle", check=False)
    assert_one_line_error(proc, "model.safetensors is corrupt", "train the run again")
    assert_nothing_written(out_parent)


def test_a_moved_dataset_asks_for_calib_data_and_then_exports(shadow_run, tmp_path, out_parent):
    run = copy_run(shadow_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["train"]["dataset"] = str(tmp_path / "moved-away" / "digits.npz")
    (run / "config.json").write_text(json.dumps(config))
    out = out_parent / "bundle"
    proc = run_cli("export", run, "--format", "onnx", "--int8", "--quiet", "--out", out, check=False)
    assert_one_line_error(proc, "moved-away", "--calib-data")
    assert_nothing_written(out_parent)
    run_cli("export", run, "--format", "onnx", "--quiet", "--out", out, "--calib-data", "digits")
    bundle = read_bundle(out)
    assert [(e["path"], e["status"]) for e in bundle.files] == [("model_fp32.onnx", "verified")]
    assert bundle.manifest["eval"]["num_samples"] == 359
    assert_nothing_written(out_parent, "bundle")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--format", "coreml"], ["unknown format 'coreml'", "onnx, tflite"]),
        (["--format", "onnx,tflite,coreml", "--int8"], ["unknown format 'coreml'"]),
        (["--int8", "--calib-samples", "4"], ["--calib-samples 4 is too few", "at least 16"]),
        (["--int8", "--calib-samples", "999999"], ["--calib-samples 999999 is more than the 1259 training images"]),
    ],
)
def test_bad_options_give_one_line_and_write_nothing(shadow_run, out_parent, args, fragments):
    proc = run_cli("export", shadow_run, *args, "--out", out_parent / "bundle", "--zip", check=False)
    assert_one_line_error(proc, *fragments)
    assert_nothing_written(out_parent)


def test_an_empty_format_list_is_refused_and_names_the_formats(shadow_run, out_parent):
    proc = run_cli("export", shadow_run, "--format", ",", "--out", out_parent / "bundle", check=False)
    assert_one_line_error(proc, "onnx, tflite")


def test_a_repeated_format_is_exported_once_or_refused(shadow_run, out_parent):
    out = out_parent / "bundle"
    proc = run_cli("export", shadow_run, "--format", "onnx,onnx", "--quiet", "--out", out, check=False)
    if proc.returncode:
        assert_one_line_error(proc, "onnx")
    else:
        paths = [e["path"] for e in read_bundle(out).files]
        assert len(paths) == len(set(paths))


def test_an_existing_out_needs_force_which_replaces_it_whole(shadow_run, out_parent):
    out = out_parent / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("keep me unless --force")
    (out / MANIFEST).write_text("{}")  # an earlier bundle, with a stray file
    proc = run_cli("export", shadow_run, "--format", "onnx", "--out", out, check=False)
    assert_one_line_error(proc, "already exists", "--force")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "old.txt"]
    run_cli("export", shadow_run, "--format", "onnx", "--quiet", "--out", out, "--force")
    assert sorted(p.name for p in out.iterdir()) == ["eval.npz", "golden.npz", MANIFEST, "model_fp32.onnx"]
    read_bundle(out)
    assert_nothing_written(out_parent, "bundle")


def test_force_replaces_only_an_earlier_bundle(shadow_run, out_parent):
    out = out_parent / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not a bundle")
    proc = run_cli("export", shadow_run, "--format", "onnx", "--out", out, "--force", check=False)
    assert_one_line_error(proc, "holds something else", "no manifest.json")
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]


def test_the_zip_is_named_after_the_whole_out_name(shadow_run, out_parent):
    run_cli("export", shadow_run, "--format", "onnx", "--quiet", "--out", out_parent / "shadow.v2", "--zip")
    assert_nothing_written(out_parent, "shadow.v2", "shadow.v2.zip")


def test_tflite_without_its_extra_names_the_extra(shadow_run, out_parent):
    proc = run_cli_after(WITHOUT_TFLITE, "export", shadow_run, "--format", "onnx,tflite", "--out", out_parent / "bundle")
    assert_one_line_error(proc, "edge-siamese[tflite]", "--format onnx")
    assert_nothing_written(out_parent)


def test_without_the_tflite_extra_the_default_is_onnx_with_a_note(shadow_run, out_parent):
    out = out_parent / "bundle"
    proc = run_cli_after(WITHOUT_TFLITE, "export", shadow_run, "--quiet", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "note: TFLite skipped (pip install 'edge-siamese[tflite]' to add it)"
    assert {e["format"] for e in read_bundle(out).files} == {"onnx"}


# -- the degraded path ----------------------------------------------------------------------------


def test_a_degraded_file_writes_no_bundle_unless_allowed(shadow_run, out_parent, monkeypatch):
    from export import exporter

    monkeypatch.setitem(PRECISIONS, "int8", STRICT_INT8)
    out = out_parent / "bundle"
    rows, written = exporter.export_run(shadow_run, out, ["onnx"], ["fp32", "int8"], progress=False)
    assert written is None
    assert_nothing_written(out_parent)
    assert [(r.format, r.precision, r.status) for r in rows] == [("onnx", "fp32", "verified"), ("onnx", "int8", "degraded")]
    int8 = rows[1]
    assert int8.fidelity["relative_error"] > STRICT_INT8.max_relative_error
    assert f"relative error {int8.fidelity['relative_error']:.4f} > {STRICT_INT8.max_relative_error}" in int8.problem
    assert rows[0].problem == ""
    search = int8.int8  # every recipe, then mixed precision, and the closest kept
    assert [a["recipe"] for a in search["attempts"] if a["kind"] == "recipe"] == list(onnx_export.INT8_RECIPES)
    assert {a["kind"] for a in search["attempts"]} == {"recipe", "sensitivity", "mixed"} and not search["passed_gate"]
    assert not any(a["passed"] for a in search["attempts"] if a["kind"] != "sensitivity")

    rows, written = exporter.export_run(shadow_run, out, ["onnx"], ["fp32", "int8"], allow_degraded=True, progress=False)
    assert written == out and [r.status for r in rows] == ["verified", "degraded"]
    bundle = read_bundle(out)
    assert bundle.file("onnx", "fp32")["status"] == "verified"
    assert bundle.file("onnx", "int8")["status"] == "degraded"
    assert bundle.file("onnx", "int8")["fidelity"] == rows[1].fidelity
    assert bundle.file("onnx", "int8")["int8"] == rows[1].int8
    assert_nothing_written(out_parent, "bundle")


def test_the_cli_names_the_figures_and_the_way_out_and_keeps_the_old_bundle(shadow_run, out_parent):
    out = out_parent / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("the previous bundle")
    (out / MANIFEST).write_text("{}")
    setup = f"from device_bench.formats import PRECISIONS, Precision\nPRECISIONS['int8'] = {STRICT_INT8!r}"
    proc = run_cli_after(setup, "export", shadow_run, "--format", "onnx", "--int8", "--quiet", "--out", out, "--force", "--zip")
    assert_one_line_error(
        proc, "no bundle written: onnx int8: relative error 0.0", f"> {STRICT_INT8.max_relative_error}", "The int8 search tried", "onnx files (above)", "--allow-degraded"
    )
    printed = proc.stdout.splitlines()
    assert printed[0].startswith("onnx int8 search on ") and "chose" in proc.stdout and "(the closest: none passed the gate)" in proc.stdout
    table = printed.index(next(line for line in printed if line.startswith("format ")))
    rows = [line.split() for line in printed[table + 1 :]]
    assert [row[:3] for row in rows] == [["onnx", "fp32", "verified"], ["onnx", "int8", "degraded"]]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "old.txt"]
    assert_nothing_written(out_parent, "bundle")
