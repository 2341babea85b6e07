"""A tiny compare end to end through the CLI: the report's tables, figures and JSON."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli

ARGS = ("--seeds", "1", "--epochs", "2", "--dims", "4", "--losses", "shadow,shadow-raw,triplet", "--baseline-dim", "16", "--formats", "onnx", "--quiet")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "report"
    proc = run_cli("compare", *ARGS, "--out", out)
    return out, proc


def test_report_files_and_verdict(report):
    out, proc = report
    for name in ("REPORT.md", "report.html", "results.json", "p1_vs_dim.png", "pareto_cpu.png", "fidelity.png", "curves.png", "embeddings_2d.png"):
        assert (out / name).exists(), name
    md = (out / "REPORT.md").read_text()
    assert md.index("## Verdict") < md.index("## Setup") < md.index("## Target: cpu")
    assert "1 seed(s)" in md and "nothing can be called significant" in md
    assert "d=4: shadow precision_at_1" in proc.stdout
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "<table>" in page


def test_results_json_holds_every_run_and_row(report):
    out, _ = report
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dims"] == [4] and results["config"]["baseline_dim"] == 16
    assert set(results["runs"]) == {"triplet-d16-s0", "shadow-d4-s0", "shadow-raw-d4-s0", "triplet-d4-s0"}
    rows = results["summary"]["rows"]
    keys = {(r["loss"], r["dim"], r["format"], r["precision"]) for r in rows}
    for loss, dim in (("triplet", 16), ("shadow", 4), ("shadow-raw", 4), ("triplet", 4)):
        assert {(loss, dim, "pytorch", "fp32"), (loss, dim, "onnx", "fp32"), (loss, dim, "onnx", "int8")} <= keys
    base = next(r for r in rows if r["baseline"] and r["format"] == "pytorch")
    shadow = next(r for r in rows if r["loss"] == "shadow" and r["format"] == "pytorch")
    run = results["runs"]["shadow-d4-s0"]
    assert shadow["precision_at_1"]["mean"] == pytest.approx(run["test"]["precision_at_1"])
    assert shadow["delta_precision_at_1"]["mean"] == pytest.approx(run["test"]["precision_at_1"] - base["precision_at_1"]["mean"])
    onnx_int8 = next(r for r in rows if r["loss"] == "shadow" and r["precision"] == "int8")
    assert onnx_int8["gallery_bytes_per_identity"] == 4 and onnx_int8["bench"]["cpu"]["p50_ms"] > 0
    assert 1 <= shadow["epochs_to_95"]["mean"] <= 2


def test_a_second_run_reuses_the_work(report):
    out, _ = report
    model = out / "runs" / "shadow-d4-s0" / "model.safetensors"
    before = model.stat().st_mtime_ns
    run_cli("compare", *ARGS, "--out", out)
    assert model.stat().st_mtime_ns == before


def test_other_settings_in_the_same_out_are_refused(report):
    out, _ = report
    other = [("3" if previous == "--epochs" else a) for previous, a in zip(("",) + ARGS, ARGS)]
    proc = run_cli("compare", *other, "--out", out, check=False)
    assert_one_line_error(proc, "other settings", "--force")


def test_bad_compare_options(tmp_path):
    assert_one_line_error(run_cli("compare", "--dims", "4,x", "--out", tmp_path / "r", check=False), "--dims")
    assert_one_line_error(run_cli("compare", "--losses", "arcface", "--out", tmp_path / "r", check=False), "unknown loss")
    assert_one_line_error(run_cli("compare", "--targets", "tpu", "--out", tmp_path / "r", check=False), "unknown target")
    assert not (tmp_path / "r").exists()
