"""docs/app-integration.md and the JS clients stay true: every manifest field they name exists,
and the doc's Python code runs on a real bundle."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from device_bench.manifest import SCHEMA, field_names, optional_fields

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "app-integration.md"
PAGE = ROOT / "edge_siamese" / "app" / "web"
CLIENT_CODE = [PAGE / "bundle.mjs", ROOT / "clients" / "node" / "verify.mjs", PAGE / "app.mjs"]
# How the JS clients name what they read: the manifest, one of its files[] (io: its input or output), and its sections.
JS_MEMBERS = {"at", "every", "filter", "find", "flatMap", "forEach", "length", "map", "some", "json"}  # array methods; "manifest.json" in messages
JS_NAMES = {"manifest": "", "entry": "files[].", "io": "files[].input.", "pre": "preprocessing.", "embedding": "embedding.", "thresholds": "thresholds.", "training": "training."}
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
BUNDLE_PLACEHOLDER = '"path/to/bundle"'
# Fields the doc must name: what an app reads to check, choose, feed, compare, decide and self-check.
APP_FIELDS = {
    "schema_version",
    "files[].sha256",
    "files[].format",
    "files[].precision",
    "files[].status",
    "preprocessing.resize",
    "preprocessing.channels",
    "preprocessing.scale",
    "preprocessing.mean",
    "preprocessing.std",
    "input.layout",
    "files[].input.name",
    "files[].input.dtype",
    "files[].input.scale",
    "files[].input.zero_point",
    "files[].output.dtype",
    "files[].output.scale",
    "files[].output.zero_point",
    "embedding.distance",
    "embedding.distance_weights",
    "embedding.l2_normalized",
    "thresholds.far_1e-3",
    "thresholds.far_1e-2",
    "thresholds.accept",
    "files[].fidelity.min_cosine",
}


def doc_field_tokens() -> set[str]:
    """Inline-code tokens outside fenced blocks that start like a manifest path (``key.`` or ``key[]``)."""
    prose = FENCED.sub("", DOC.read_text())
    tokens = set(re.findall(r"`([^`\n]+)`", prose))
    starts = tuple(f"{key}{sep}" for key in SCHEMA for sep in (".", "[]"))
    is_file_name = re.compile(r"[\w-]+\.(npz|json|onnx|tflite)")  # eval.npz names a file, not a field
    return {t for t in tokens if t.startswith(starts) and not is_file_name.fullmatch(t)} | (tokens & set(SCHEMA))


def test_every_manifest_field_the_doc_names_is_in_the_schema():
    tokens = doc_field_tokens()
    assert len(tokens) > 30
    assert sorted(tokens - field_names()) == []


def client_field_tokens() -> set[str]:
    """Manifest paths the JS clients read: ``name.a.b`` and ``name["a"]`` for the names of
    JS_NAMES, and ``const { a, b } = name``."""
    tokens = set()
    for code in (path.read_text() for path in CLIENT_CODE):
        for name, prefix in JS_NAMES.items():
            for path in re.findall(rf"\b{name}\??\.([a-z_]\w*(?:\??\.[a-z_]\w*)*)", re.sub(r'"[^"\n]*"', '""', code)):
                parts = path.replace("?", "").split(".")
                cut = next((i for i, part in enumerate(parts) if part in JS_MEMBERS), len(parts))
                tokens.add(prefix + ".".join(parts[:cut]))
            tokens |= {prefix + key for key in re.findall(rf"\b{name}\[\"([\w.-]+)\"\]", code)}
            for names in re.findall(rf"const \{{([^}}]*)\}} = {name}\b", code):
                tokens |= {prefix + n.split(":")[0].strip() for n in names.split(",")}
    return {t.removesuffix(".") for t in tokens if t.removesuffix(".")}


def checked_fields() -> set[str]:
    """The fields the JS reader's (bundle.mjs) checkManifest requires (REQUIRED, and FILE_REQUIRED in every files[] entry)."""
    code = CLIENT_CODE[0].read_text()
    lists = {name: re.findall(r'"([\w.-]+)"', body) for name, body in re.findall(r"const (REQUIRED|FILE_REQUIRED) = \[(.*?)\];", code, re.S)}
    return set(lists["REQUIRED"]) | {f"files[].{field}" for field in lists["FILE_REQUIRED"]} | {"schema_version", "files"}


def test_every_manifest_field_the_clients_read_is_in_the_schema():
    tokens = client_field_tokens()
    assert {"files[].input.zero_point", "files[].fidelity.min_cosine", "preprocessing.mean", "thresholds.far_1e-3", "golden.path"} <= tokens
    assert sorted(tokens - field_names()) == []
    assert sorted(checked_fields() - field_names()) == []


def test_the_clients_check_every_field_they_read():
    """checkManifest turns a missing field into one clear line, so it must require what the clients
    read, except the fields older bundles lack (the clients take their default)."""
    checked = checked_fields() | optional_fields()
    unchecked = {t for t in client_field_tokens() if not any(c == t or c.startswith((f"{t}.", f"{t}[]")) for c in checked)}
    assert sorted(unchecked) == []


def test_the_doc_names_every_field_and_section_an_app_reads():
    tokens = doc_field_tokens()
    assert sorted(APP_FIELDS - tokens) == []
    for section in ("preprocessing", "embedding", "thresholds", "files", "golden"):
        assert any(t == section or t.startswith((f"{section}.", f"{section}[]")) for t in tokens), section


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory) -> Path:
    """A digits Shadow d=8 run trained for 2 epochs, exported to ONNX fp32 and int8."""
    root = tmp_path_factory.mktemp("docs")
    run_cli("train", "--dataset", "digits", "--epochs", "2", "--quiet", "--out", root / "run")
    run_cli("export", root / "run", "--int8", "--format", "onnx", "--allow-degraded", "--quiet", "--out", root / "bundle")
    return root / "bundle"


def python_blocks() -> list[str]:
    return [code for lang, code in FENCED.findall(DOC.read_text()) if lang == "python"]


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_snippet_runs_on_a_real_bundle(index, onnx_bundle, tmp_path):
    code = python_blocks()[index]
    assert BUNDLE_PLACEHOLDER in code, "each snippet opens the bundle at the placeholder path"
    code = code.replace(BUNDLE_PLACEHOLDER, repr(str(onnx_bundle)))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)}
    )
    assert proc.returncode == 0, proc.stderr
