"""A tiny compare end to end through the CLI: the report's tables, figures and JSON."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli
from device_bench.files import json_text
from edge_siamese.app.compare import mean_ci, trial_values
from edge_siamese.app.report import with_ci

ARGS = ("--seeds", "1", "--epochs", "2", "--trials", "2", "--dims", "4", "--losses", "shadow,triplet-squared,triplet", "--baseline-dim", "16", "--formats", "onnx", "--quiet")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "report"
    proc = run_cli("compare", *ARGS, "--out", out)
    return out, proc


def test_report_files_and_verdict(report):
    out, proc = report
    for name in ("REPORT.md", "report.html", "results.json", "map_at_r_vs_dim.png", "p1_vs_dim.png", "pareto_cpu.png", "fidelity.png", "curves.png", "embeddings_2d.png"):
        assert (out / name).exists(), name
    md = (out / "REPORT.md").read_text()
    assert md.index("## Verdict") < md.index("## Setup") < md.index("## Tuning") < md.index("## Details") < md.index("## Figures") < md.index("## Target: cpu")
    verdict = md[md.index("## Verdict") : md.index("## Setup")].strip().splitlines()[2:]
    assert len(verdict) == 3, verdict  # the answer in three lines
    assert verdict[0].startswith("- Best low-dimension model: ") and "MAP@R" in verdict[0] and "B per identity" in verdict[0] and "int8 onnx file" in verdict[0]
    assert verdict[1].startswith("- Shadow against triplet at the same dim, Δ MAP@R: d=4 ")
    assert verdict[2].startswith("- Shadow against its twin (triplet-squared at twice Shadow's margin), Δ MAP@R: d=4 ")
    assert "split by classes (test classes never trained on)" in md and "nothing can be called significant" in md
    assert proc.stdout.splitlines()[:3] == [line[2:] for line in verdict]
    table = md[md.index("## Target: cpu") :]
    assert table.index("MAP@R") < table.index("P@1")  # MAP@R first
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and page.count("<table>") == 2


def test_results_json_holds_every_run_row_and_trial(report):
    out, _ = report
    text = (out / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))  # strict JSON
    assert results["config"]["dims"] == [4] and results["config"]["baseline_dim"] == 16 and results["config"]["split"] == "classes"
    assert set(results["runs"]) == {"triplet-d16-s0", "shadow-d4-s0", "triplet-squared-d4-s0", "triplet-d4-s0"}
    # equal tuning: two margins for every loss but the twin, which takes twice Shadow's
    tuning = results["tuning"]
    assert {k: [t["value"] for t in v["trials"]] for k, v in tuning.items()} == {"triplet-d16": [0.1, 0.4], "shadow-d4": [0.1, 0.4], "triplet-d4": [0.1, 0.4], "triplet-squared-d4": []}
    for key, t in tuning.items():
        if t["trials"]:
            assert t["chosen"] == max(t["trials"], key=lambda x: x["val_mean_average_precision_at_r"])["value"]
            assert results["runs"][f"{key}-s0"]["margin"] == t["chosen"]
    assert tuning["triplet-squared-d4"]["twin_of"] == "shadow" and tuning["triplet-squared-d4"]["chosen"] == 2 * tuning["shadow-d4"]["chosen"]
    assert json.loads((out / "runs" / "triplet-squared-d4-s0" / "config.json").read_text())["train"]["margin"] == tuning["triplet-squared-d4"]["chosen"]
    rows = results["summary"]["rows"]
    keys = {(r["loss"], r["dim"], r["format"], r["precision"]) for r in rows}
    for loss, dim in (("triplet", 16), ("shadow", 4), ("triplet-squared", 4), ("triplet", 4)):
        assert {(loss, dim, "pytorch", "fp32"), (loss, dim, "onnx", "fp32"), (loss, dim, "onnx", "int8")} <= keys
    base = next(r for r in rows if r["baseline"] and r["format"] == "pytorch")
    shadow = next(r for r in rows if r["loss"] == "shadow" and r["format"] == "pytorch")
    run = results["runs"]["shadow-d4-s0"]
    assert shadow["mean_average_precision_at_r"] == {"mean": pytest.approx(run["test"]["mean_average_precision_at_r"]), "ci95": None, "n": 1, "values": [pytest.approx(run["test"]["mean_average_precision_at_r"])], "reason": "one run: no interval"}
    assert shadow["delta_precision_at_1"]["mean"] == pytest.approx(run["test"]["precision_at_1"] - base["precision_at_1"]["mean"])
    # one test set: every exported file on the PyTorch row's images, so the fp32 file matches its row
    fp32 = run["files"]["model_fp32.onnx"]
    assert fp32["num_samples"] == run["test"]["num_samples"] > 500
    assert fp32["mean_average_precision_at_r"] == pytest.approx(run["test"]["mean_average_precision_at_r"], abs=1e-4)
    onnx_int8 = next(r for r in rows if r["loss"] == "shadow" and r["precision"] == "int8")
    assert onnx_int8["gallery_bytes_per_identity"] == 4 and onnx_int8["bench"]["cpu"]["p50_ms"] > 0
    assert 1 <= shadow["epochs_to_95"]["mean"] <= 2


def test_a_figure_that_is_not_finite_is_null_with_a_reason():
    stat = mean_ci([0.5, float("nan"), 0.7])
    assert stat == {"mean": None, "ci95": None, "n": 3, "values": [0.5, None, 0.7], "reason": "1 of 3 runs gave no finite value"}
    assert with_ci(stat) == "n/a"
    json_text(stat)  # strict JSON accepts it
    assert mean_ci([0.5, 0.7])["ci95"] > 0 and "reason" not in mean_ci([0.5, 0.7])


def test_trial_values_run_from_half_to_twice_the_default():
    assert trial_values(0.2, 3) == [0.1, 0.2, 0.4] and trial_values(0.2, 1) == [0.2] and trial_values(1e-3, 2) == [5e-4, 2e-3]


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
