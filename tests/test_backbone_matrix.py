"""benchmarks/backbones.py end to end, through the real script in a subprocess: two real backbones
and an unknown one, fine-tuned, exported to ONNX and TFLite at fp32 and int8, checked and timed.

Kept small for CI (32x32 inputs, 1 epoch, 160 photos, no aarch64 count; timm's test_efficientnet,
a few blocks that export in half the time of lcnet_100): its figures say that the stages ran and
agree, not how good a backbone is.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "backbones.py"
REAL = ("timm:test_efficientnet", "convnet")
UNKNOWN = "timm:no_such_model"
FILES = {(fmt, precision) for fmt in ("onnx", "tflite") for precision in ("fp32", "int8")}


def run_script(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def table(markdown: str, first_columns: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header starts with ``first_columns``, by column name."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_columns} |"))
    columns = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]  # a cell's own pipes are written as \|
        assert len(cells) == len(columns), line
        rows.append(dict(zip(columns, cells)))
    return rows


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """The script's run (the unknown backbone between the real ones), its JSON and its markdown."""
    root = tmp_path_factory.mktemp("backbones")
    proc = run_script(
        "--backbones", ",".join([REAL[0], UNKNOWN, REAL[1]]), "--input-size", 32, "--epochs", 1, "--no-arm64",
        "--formats", "onnx,tflite", "--precisions", "fp32,int8", "--classes", 8, "--per-class", 20, "--calib-samples", 16,
        "--runs", 10, "--photos", root / "photos", "--work", root / "work", "--markdown", root / "matrix.md",
        "--json", root / "matrix.json", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((root / "matrix.json").read_text())
    return proc, {b["backbone"]: b for b in result["backbones"]}, (root / "matrix.md").read_text()


def test_real_backbones_are_exported_checked_and_timed(matrix):
    _, backbones, _ = matrix
    for name in REAL:
        b = backbones[name]
        assert b["error"] == "" and b["params"] > 10_000 and b["train_s"] > 0
        assert -1 <= b["pair_cosine"] <= 1 and 0 <= b["torch_precision_at_1"] <= 1
        files = {(f["format"], f["precision"]): f for f in b["files"]}
        assert set(files) == FILES
        for (fmt, precision), f in files.items():
            assert f["size_bytes"] > 0 and f["bench_error"] == "", (name, f)
            assert 0 < f["p50_ms"] < 1000 and 20 < f["peak_rss_mb"] < 4000, (name, f)
            assert f["instructions_per_inference"] is None and f["arm64_error"] == "not measured: --no-arm64"
            assert math.isfinite(f["mean_cosine"]) and f["min_cosine"] <= f["mean_cosine"] <= 1 + 1e-9
            assert f["reference_precision_at_1"] == b["torch_precision_at_1"]
            if precision == "fp32":
                assert f["status"] == "verified", (name, f)
                assert f["min_cosine"] > 1 - 1e-6 and f["precision_at_1"] == f["reference_precision_at_1"]
            else:  # a 1-epoch model on 32 test images: an int8 file may miss the P@1 tolerance, and says so
                assert f["status"] in ("verified", "degraded") and (f["status"] == "verified") == (f["problem"] == ""), (name, f)
                assert f["mean_cosine"] > 0.9 and f["int8_recipe"] and 0.5 <= f["int8_mac_fraction"] <= 1
                assert f["size_bytes"] < files[(fmt, "fp32")]["size_bytes"]
                if f["int8_mac_fraction"] == 1:  # no layer kept float: int8 weights, a quarter of fp32's, plus the graph
                    assert f["size_bytes"] < 0.6 * files[(fmt, "fp32")]["size_bytes"]


def test_an_unknown_backbone_is_one_failed_row_and_the_others_still_run(matrix):
    proc, backbones, markdown = matrix
    assert list(backbones) == [REAL[0], UNKNOWN, REAL[1]]
    failed = backbones[UNKNOWN]
    assert failed["error"].startswith("fine-tune failed: timm has no model 'no_such_model'")
    assert failed["files"] == [] and failed["params"] is None
    (per_backbone,) = [r for r in table(markdown, "backbone | params (M)") if r["backbone"] == UNKNOWN]
    (in_matrix,) = [r for r in table(markdown, "backbone | format") if r["backbone"] == UNKNOWN]
    assert per_backbone["result"] == in_matrix["status"] == failed["error"]
    assert per_backbone["params (M)"] == in_matrix["format"] == in_matrix["size KB"] == "—"
    assert markdown in proc.stdout  # the printed tables are the file's


def test_markdown_rows_carry_the_measured_figures(matrix):
    _, backbones, markdown = matrix
    rows = [r for r in table(markdown, "backbone | format") if r["backbone"] == REAL[0]]
    assert {(r["format"], r["precision"]) for r in rows} == FILES
    for row in rows:
        f = next(f for f in backbones[REAL[0]]["files"] if (f["format"], f["precision"]) == (row["format"], row["precision"]))
        assert row["size KB"] == f"{f['size_bytes'] / 1024:,.0f}" and row["p50 ms"] == f"{f['p50_ms']:.2f}"
        assert row["mean cos"] == f"{f['mean_cosine']:.6f}" and row["peak RSS MB"] == f"{f['peak_rss_mb']:.0f}"
        assert row["rel err"] == f"{f['relative_error']:.4f}"
        assert row["int8 recipe (MACs in int8)"] == (f"{f['int8_recipe']} ({f['int8_mac_fraction']:.0%})" if row["precision"] == "int8" else "—")
        assert row["status"] == (f["status"] if f["status"] == "verified" else f"{f['status']}: {f['problem']}".replace("|", "\\|"))


def test_an_existing_markdown_is_kept_without_force(tmp_path):
    existing = tmp_path / "matrix.md"
    existing.write_text("kept\n")
    proc = run_script("--backbones", "convnet", "--no-arm64", "--markdown", existing, timeout=60)
    assert proc.returncode == 2 and "already exists: pass --force to overwrite it" in proc.stderr
    assert existing.read_text() == "kept\n"
