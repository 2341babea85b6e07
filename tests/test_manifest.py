"""The bundle manifest schema, its validator and reader (``device_bench.manifest``), and the format table."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_bench.formats import file_name
from device_bench.manifest import (
    MANIFEST,
    SCHEMA,
    SCHEMA_VERSION,
    Bundle,
    BundleError,
    field_names,
    read_bundle,
    sha256_file,
    validate_manifest,
)
from device_bench.preprocessing import Preprocessing

FIDELITY = {
    "num_samples": 359,
    "mean_cosine": 0.9999,
    "min_cosine": 0.998,
    "max_abs_diff": 0.03,
    "top1_neighbour_agreement": 0.94,
    "precision_at_1": 0.98,
    "reference_precision_at_1": 0.98,
}


def file_entry(fmt: str = "onnx", precision: str = "fp32") -> dict:
    io = {"name": "images", "dtype": "float32", "shape": ["batch", 1, 8, 8], "scale": None, "zero_point": None}
    return {
        "path": file_name(fmt, precision),
        "format": fmt,
        "precision": precision,
        "size_bytes": 1000,
        "sha256": "0" * 64,
        "status": "verified",
        "input": io,
        "output": {**io, "name": "embeddings", "shape": ["batch", 8]},
        "fidelity": dict(FIDELITY),
    }


def valid_manifest() -> dict:
    """A manifest as the exporter writes it, for a d=8 Shadow model on 8x8 grey images."""
    return {
        "schema_version": SCHEMA_VERSION,
        "toolkit_version": "0.1.0",
        "created_utc": "2026-01-01T00:00:00Z",
        "input": {"name": "images", "shape": [-1, 1, 8, 8], "layout": "NCHW", "dtype": "float32"},
        "preprocessing": {
            "raw_range": [0.0, 16.0],
            "resize": [8, 8],
            "grey_conversion": "ITU-R 601-2 luma: 0.299 R + 0.587 G + 0.114 B",
            "channels": 1,
            "scale": 0.0625,
            "mean": [0.3],
            "std": [0.37],
        },
        "embedding": {"output_name": "embeddings", "dim": 8, "l2_normalized": True, "distance": "cosine", "distance_weights": None},
        "thresholds": {"far_1e-2": 0.46, "far_1e-3": 0.29, "accept": "distance < threshold", "measured_on": "validation split, 179 images"},
        "training": {"loss": "shadow", "dataset": "digits", "backbone": "convnet", "metrics": {}},
        "eval": {"path": "eval.npz", "sha256": "0" * 64, "num_samples": 359},
        "golden": {"path": "golden.npz", "sha256": "0" * 64, "num_samples": 8},
        "files": [file_entry("onnx", "fp32"), file_entry("onnx", "int8")],
    }


def test_valid_manifest_passes_and_is_returned():
    manifest = valid_manifest()
    assert validate_manifest(manifest) is manifest


def _set(manifest: dict, dotted: str, value) -> dict:
    """Set ``a.b.c`` (``files.0.x`` indexes the list) to ``value``; ``...`` deletes it."""
    *parents, last = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    target = manifest
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return manifest


@pytest.mark.parametrize(
    "dotted, value, fragments",
    [
        ("embedding.dim", "8", ["embedding.dim must be int, got str"]),
        ("embedding.l2_normalized", 1, ["embedding.l2_normalized must be bool, got int"]),
        ("schema_version", True, ["schema_version must be int, got bool"]),
        ("preprocessing.scale", "0.0625", ["preprocessing.scale must be int or float, got str"]),
        ("embedding.distance_weights", "none", ["embedding.distance_weights must be list or NoneType"]),
        ("preprocessing", [8, 8], ["preprocessing must be an object"]),
        ("files", {"path": "model_fp32.onnx"}, ["files must be list, got dict"]),
        ("files.0.size_bytes", 10.5, ["files[0].size_bytes must be int, got float"]),
        ("files.1.fidelity.min_cosine", None, ["files[1].fidelity.min_cosine must be int or float, got NoneType"]),
        ("files.1.input.zero_point", 1.5, ["files[1].input.zero_point must be int or NoneType, got float"]),
        ("files.0", "model_fp32.onnx", ["files[0] must be an object"]),
    ],
)
def test_wrong_types_are_named_with_their_dotted_field(dotted, value, fragments):
    with pytest.raises(BundleError) as info:
        validate_manifest(_set(valid_manifest(), dotted, value))
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "dotted, named",
    [
        ("embedding.dim", "embedding.dim"),
        ("golden", "golden"),
        ("thresholds.far_1e-3", "thresholds.far_1e-3"),
        ("preprocessing.raw_range", "preprocessing.raw_range"),
        ("files.1.fidelity.reference_precision_at_1", "files[1].fidelity.reference_precision_at_1"),
        ("files.0.output.scale", "files[0].output.scale"),
    ],
)
def test_a_missing_field_is_named(dotted, named):
    with pytest.raises(BundleError, match=re.escape(f"manifest is missing {named}: export the bundle again")):
        validate_manifest(_set(valid_manifest(), dotted, ...))


def test_another_schema_version_is_refused_with_both_numbers():
    with pytest.raises(BundleError, match=f"schema version {SCHEMA_VERSION + 1} is not {SCHEMA_VERSION}"):
        validate_manifest(_set(valid_manifest(), "schema_version", SCHEMA_VERSION + 1))


def test_an_empty_files_list_is_refused():
    with pytest.raises(BundleError, match="lists no model files"):
        validate_manifest(_set(valid_manifest(), "files", []))


@pytest.mark.parametrize(
    "key, value",
    [("precision", "int4"), ("format", "coreml"), ("status", "exported"), ("status", "failed")],
)
def test_unknown_precision_format_or_status_is_refused(key, value):
    with pytest.raises(BundleError, match=f"files\\[1\\] has an unknown format, precision or status: .*{value}"):
        validate_manifest(_set(valid_manifest(), f"files.1.{key}", value))


def test_field_names_lists_nested_and_per_file_fields():
    names = field_names()
    assert {"schema_version", "embedding", "embedding.dim", "thresholds.far_1e-3", "eval.sha256", "files"} <= names
    assert {"preprocessing.raw_range", "preprocessing.resize", "preprocessing.grey_conversion"} <= names
    assert {"files[].path", "files[].fidelity.min_cosine", "files[].input.scale", "files[].output.zero_point"} <= names
    assert not any(n.startswith("files[].files[]") for n in names)


def test_a_manifest_written_by_toolkit_0_1_0_still_validates():
    """0.1.0 also wrote preprocessing.resize_method, preprocessing.color and training.embedding_dim, which nothing read."""
    old = valid_manifest()
    old["preprocessing"] |= {"resize_method": "bilinear", "color": "grey"}
    old["training"]["embedding_dim"] = 8
    assert validate_manifest(old) is old
    assert Bundle(Path("."), old).preprocessing == Bundle(Path("."), valid_manifest()).preprocessing


def test_the_exporters_preprocessing_block_is_the_one_the_schema_asks_for():
    block = Preprocessing((8, 8), 1, 1 / 16, (0.3,), (0.37,)).to_dict()
    assert set(block) == set(SCHEMA["preprocessing"])  # the optional fields too: new bundles write them
    assert Preprocessing.from_dict(block) == Preprocessing((8, 8), 1, 1 / 16, (0.3,), (0.37,))


def test_bundle_file_finds_an_entry_or_lists_what_there_is(tmp_path):
    bundle = Bundle(tmp_path, valid_manifest())
    assert bundle.file("onnx", "int8")["path"] == "model_int8.onnx"
    with pytest.raises(BundleError) as info:
        bundle.file("tflite", "int8")
    message = str(info.value)
    assert "no tflite int8 model" in message and "it has: onnx fp32, onnx int8" in message


def write_bundle(folder) -> dict:
    """A small valid bundle on disk (the model files are stand-in bytes): its manifest."""
    folder.mkdir()
    manifest = valid_manifest()
    for entry in manifest["files"]:
        (folder / entry["path"]).write_bytes(entry["path"].encode() * 10)
        entry["sha256"], entry["size_bytes"] = sha256_file(folder / entry["path"]), (folder / entry["path"]).stat().st_size
    np.savez(folder / "eval.npz", images=np.zeros((3, 8, 8, 1), np.uint8), labels=np.arange(3))
    np.savez(folder / "golden.npz", images=np.zeros((2, 8, 8, 1), np.uint8), inputs=np.ones((2, 1, 8, 8), np.float32))
    for key in ("eval", "golden"):
        manifest[key]["sha256"] = sha256_file(folder / manifest[key]["path"])
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_read_bundle_validates_and_reads_the_arrays_on_demand(tmp_path):
    manifest = write_bundle(tmp_path / "b")
    bundle = read_bundle(tmp_path / "b")
    assert bundle.manifest == manifest and bundle.path == tmp_path / "b"
    assert [e["path"] for e in bundle.files] == ["model_fp32.onnx", "model_int8.onnx"]
    assert bundle.eval_set()["labels"].tolist() == [0, 1, 2]
    assert bundle.golden()["inputs"].shape == (2, 1, 8, 8)


def test_read_bundle_refuses_a_folder_without_manifest(tmp_path):
    with pytest.raises(BundleError, match="is not a bundle \\(no manifest.json\\)"):
        read_bundle(tmp_path)


def test_read_bundle_refuses_a_manifest_that_is_not_json(tmp_path):
    write_bundle(tmp_path / "b")
    (tmp_path / "b" / MANIFEST).write_text('{"schema_version": 1,')
    with pytest.raises(BundleError, match="is not valid JSON"):
        read_bundle(tmp_path / "b")


def test_read_bundle_names_a_missing_file(tmp_path):
    write_bundle(tmp_path / "b")
    (tmp_path / "b" / "golden.npz").unlink()
    with pytest.raises(BundleError, match="golden.npz is missing from .*copy the whole bundle folder"):
        read_bundle(tmp_path / "b")


def test_read_bundle_checks_every_files_sha256(tmp_path):
    write_bundle(tmp_path / "b")
    path = tmp_path / "b" / "model_int8.onnx"
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    with pytest.raises(BundleError, match="model_int8.onnx in .* does not match its sha256"):
        read_bundle(tmp_path / "b")


def test_read_bundle_validates_the_manifest_it_reads(tmp_path):
    manifest = write_bundle(tmp_path / "b")
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(_set(copy.deepcopy(manifest), "embedding.dim", ...)))
    with pytest.raises(BundleError, match="missing embedding.dim"):
        read_bundle(tmp_path / "b")


def test_device_bench_imports_neither_torch_nor_the_training_side():
    code = (
        "import sys, device_bench.manifest, device_bench.runtimes, device_bench.formats, device_bench.metrics\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'edge_siamese', 'export', 'onnx', 'onnxruntime'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
