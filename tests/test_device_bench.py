"""``python -m device_bench`` end to end on a real bundle: torch-free, its JSON document against the
schema and against the export's own figures, bad input, and the rows that fail without losing the rest.

One bundle (the Shadow d=8 run at fp32 and int8, ONNX and TFLite) is exported once per session and
shared with ``test_embedder.py`` and ``test_targets.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, flip_byte, run_cli
from device_bench.bench import GOLDEN_SLACK
from device_bench.document import BENCH_SCHEMA_VERSION, LATENCY, RESULT, ROW_FAILED, ROW_VERIFIED, validate_result
from device_bench.manifest import schema_paths
from device_bench.manifest import MANIFEST, BundleError, read_bundle, sha256_file

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DOC = ROOT / "docs" / "bench-schema.md"
BLOCKED = ("torch", "edge_siamese", "export")
# The parent process: a meta-path finder refuses (and logs) the blocked packages, then device_bench runs
# as ``python -m device_bench`` would. argv: the module to run, then its arguments.
GUARDED_RUN = """
import importlib.abc, os, runpy, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            with open(os.environ["IMPORT_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ImportError(name + " must not be imported")
        return None

sys.meta_path.insert(0, Refuse())
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
""".format(blocked=BLOCKED)


@pytest.fixture(scope="session")
def bench_bundle(shadow_run, tmp_path_factory) -> Path:
    """The Shadow d=8 run exported at fp32 + int8 to ONNX and TFLite (no fp16).

    Kept at a fixed place in the session's temp folder so that the modules which import this
    fixture share one export instead of each making its own.
    """
    out = tmp_path_factory.getbasetemp() / "device-bench" / "bundle"
    if not (out / MANIFEST).exists():  # export writes the bundle whole (temp folder + rename)
        run_cli("export", shadow_run, "--int8", "--format", "onnx,tflite", "--quiet", "--out", out)
    return out


def device_bench(*args, cwd: Path = ROOT, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "device_bench", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def altered_copy(bundle: Path, dest: Path, name: str, data: bytes) -> Path:
    """A copy of ``bundle`` with file ``name`` replaced by ``data`` and its manifest entry updated, so it still validates."""
    shutil.copytree(bundle, dest)
    (dest / name).write_bytes(data)
    manifest = json.loads((dest / MANIFEST).read_text())
    for entry in [*manifest["files"], manifest["eval"], manifest["golden"]]:
        if entry["path"] == name:
            entry["sha256"] = sha256_file(dest / name)
            if "size_bytes" in entry:
                entry["size_bytes"] = len(data)
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    read_bundle(dest)
    return dest


# --- the torch-free run: python -m device_bench BUNDLE --runs 5 --warmup 1 --gallery 1000 --batch 1,4 ---


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> dict:
    """A device-like place: device_bench copied alone, and an environment in which importing torch,
    edge_siamese or export fails and is logged, in this process's children and theirs.

    ``python -m`` puts the working folder first on ``sys.path``, so the working folder is the one
    holding the copy (not the repository, whose ``edge_siamese`` would shadow the blockers), and
    the blocker packages come next, through PYTHONPATH, ahead of site-packages and the editable install.
    """
    root = tmp_path_factory.mktemp("guarded")
    device, blockers = root / "device", root / "blockers"
    shutil.copytree(ROOT / "device_bench", device / "device_bench", ignore=shutil.ignore_patterns("__pycache__"))
    for name in BLOCKED:
        (blockers / name).mkdir(parents=True)
        (blockers / name / "__init__.py").write_text(
            f'import os\nwith open(os.environ["IMPORT_LOG"], "a") as log:\n    log.write("{name}\\n")\n'
            f'raise ImportError("{name} must not be imported")\n'
        )
    log = root / "imports.log"
    env = {**os.environ, "PYTHONPATH": str(blockers), "IMPORT_LOG": str(log)}
    return {"device": device, "env": env, "log": log}


def test_the_import_blockers_are_effective(guarded):
    """Control runs: launched as device_bench launches its children (-m, same folder, same env), each blocked name fails."""
    for name in BLOCKED:
        proc = subprocess.run([sys.executable, "-m", name], cwd=guarded["device"], env=guarded["env"], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and f"{name} must not be imported" in proc.stderr, proc.stderr
    # The parent's meta-path finder refuses them too, without the blocker packages.
    plain = {k: v for k, v in guarded["env"].items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", GUARDED_RUN, "torch"], cwd=guarded["device"], env=plain, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "torch must not be imported" in proc.stderr, proc.stderr
    assert guarded["log"].read_text().split() == [*BLOCKED, "torch"]
    guarded["log"].unlink()
    # ... while device_bench (the copy) and numpy import fine.
    proc = subprocess.run(
        [sys.executable, "-c", "import device_bench.bench; print(device_bench.bench.__file__)"],
        cwd=guarded["device"], env=guarded["env"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(guarded["device"])
    assert not guarded["log"].exists()


@pytest.fixture(scope="module")
def torch_free_run(guarded, bench_bundle, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("torch-free") / "bench.json"
    args = [bench_bundle, "--runs", "5", "--warmup", "1", "--gallery", "1000", "--batch", "1,4", "--json", out]
    proc = subprocess.run(
        [sys.executable, "-c", GUARDED_RUN, "device_bench", *map(str, args)],
        cwd=guarded["device"], env=guarded["env"], capture_output=True, text=True, timeout=300,
    )
    result = json.loads(out.read_text()) if out.exists() else None
    return {"proc": proc, "result": result, "log": guarded["log"], "manifest": read_bundle(bench_bundle).manifest, "bundle": bench_bundle}


def test_device_bench_never_imports_torch_edge_siamese_or_export(torch_free_run):
    proc = torch_free_run["proc"]
    assert proc.returncode == 0, proc.stderr
    assert not torch_free_run["log"].exists(), f"imported: {torch_free_run['log'].read_text()}"
    assert "Traceback" not in proc.stderr


def test_result_validates_and_every_file_is_a_verified_row(torch_free_run):
    result, manifest = validate_result(torch_free_run["result"]), torch_free_run["manifest"]
    assert result["schema_version"] == BENCH_SCHEMA_VERSION
    assert result["target"] == {"name": "local", "emulated": False}
    assert result["bundle"]["manifest_sha256"] == sha256_file(torch_free_run["bundle"] / MANIFEST)
    assert (result["bundle"]["loss"], result["bundle"]["embedding_dim"], result["bundle"]["distance"]) == ("shadow", 8, "cosine")
    assert result["settings"] == {"runtime": None, "threads": None, "ort_memory": "default", "batch": [1, 4], "warmup": 1, "runs": 5, "min_seconds": None, "gallery": [1000]}
    assert [r["file"] for r in result["rows"]] == [e["path"] for e in manifest["files"]]
    assert {(e["format"], e["precision"]) for e in manifest["files"]} == {(f, p) for f in ("onnx", "tflite") for p in ("fp32", "int8")}
    for row, entry in zip(result["rows"], manifest["files"]):
        assert row["status"] == "verified", row.get("error")
        assert (row["format"], row["precision"], row["size_bytes"]) == (entry["format"], entry["precision"], entry["size_bytes"])
        assert row["runtime"] == {"onnx": "onnxruntime", "tflite": "litert"}[row["format"]]
        assert row["init_ms"] > 0 and row["first_inference_ms"] > 0
    # The table: a line per file and batch size, a line per gallery.
    table = torch_free_run["proc"].stdout.splitlines()
    assert table[0].split()[:2] == ["Format", "Precision"]
    assert sum("✅" in line for line in table) == 4 * 2 and sum("1:N search" in line for line in table) == 4


def test_latency_percentiles_are_ordered_and_throughput_follows_from_them(torch_free_run):
    for row in torch_free_run["result"]["rows"]:
        assert [lat["batch"] for lat in row["latency"]] == [1, 4]
        for lat in row["latency"]:
            assert lat["runs"] == 5
            assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
            assert lat["std_ms"] >= 0
            # items/s is batch / mean; with 5 runs the mean lies between 3/5 of p50 and p99 whatever the outliers.
            assert lat["items_per_s"] == pytest.approx(lat["batch"] * 1000 / lat["mean_ms"], rel=1e-9)
            assert 0.6 * lat["p50_ms"] <= lat["mean_ms"] * (1 + 1e-9) and lat["mean_ms"] <= lat["p99_ms"] * (1 + 1e-9)


def test_accuracy_is_the_exports_own_precision_at_1(torch_free_run):
    """eval.npz holds the raw test images the export's fidelity check ran on (the first 500 of the test split),
    so the same file in the same runtime must give the same precision_at_1."""
    fidelity = {e["path"]: e["fidelity"] for e in torch_free_run["manifest"]["files"]}
    for row in torch_free_run["result"]["rows"]:
        acc = row["accuracy"]
        assert acc["num_samples"] == torch_free_run["manifest"]["eval"]["num_samples"] == fidelity[row["file"]]["num_samples"]
        assert abs(acc["precision_at_1"] - fidelity[row["file"]]["precision_at_1"]) <= 1e-9
        assert 0.9 < acc["precision_at_1"] <= 1 and 0 < acc["mean_average_precision_at_r"] <= 1 and 0 <= acc["tar_at_far_1e-3"] <= 1


def test_golden_check_passes_at_the_exports_min_cosine_less_the_slack(torch_free_run):
    fidelity = {e["path"]: e["fidelity"] for e in torch_free_run["manifest"]["files"]}
    for row in torch_free_run["result"]["rows"]:
        golden = row["golden"]
        assert golden["required_min_cosine"] == pytest.approx(fidelity[row["file"]]["min_cosine"] - GOLDEN_SLACK, abs=1e-12)
        assert golden["min_cosine"] >= golden["required_min_cosine"]
        assert golden["preprocessing_max_abs_diff"] <= 1e-6
        if row["precision"] == "fp32":
            assert golden["min_cosine"] > 1 - 1e-6


def test_memory_figures_are_consistent(torch_free_run):
    for row in torch_free_run["result"]["rows"]:
        mem = row["memory"]
        assert 0 < mem["baseline_rss_mb"] < mem["peak_rss_mb"]
        assert mem["rss_mb"] <= mem["peak_rss_mb"] <= mem["peak_rss_with_eval_and_gallery_mb"]
        assert mem["rss_increase_mb"] == pytest.approx(mem["rss_mb"] - mem["baseline_rss_mb"])
        assert mem["peak_rss_mb"] < 500  # a tiny model: far below a Pi's RAM


def test_gallery_bytes_are_size_times_dim_times_the_element_size(torch_free_run):
    for row in torch_free_run["result"]["rows"]:
        (gallery,) = row["gallery"]
        precision = "int8" if row["precision"] == "int8" else "fp32"
        assert (gallery["size"], gallery["precision"]) == (1000, precision)
        assert gallery["bytes"] == 1000 * 8 * (1 if precision == "int8" else 4)
        assert gallery["runs"] == 5 and 0 < gallery["p50_ms"] <= gallery["p90_ms"] <= gallery["p99_ms"]


def test_validate_result_rejects_a_row_without_its_fields(torch_free_run):
    broken = json.loads(json.dumps(torch_free_run["result"]))
    del broken["rows"][0]["latency"][1]["p99_ms"]
    with pytest.raises(BundleError, match=r"rows\[0\]\.latency\[1\]\.p99_ms"):
        validate_result(broken)
    broken = json.loads(json.dumps(torch_free_run["result"]))
    broken["schema_version"] = 1  # statuses were "ok" then
    with pytest.raises(BundleError, match="schema version 1"):
        validate_result(broken)


# --- bad input: one line on stderr, exit 2, no traceback, no JSON ---


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--precision", "fp16"], "has no onnx/tflite file at fp16"),
        (["--precision", "fp64"], "unknown precision 'fp64'"),
        (["--format", "pb"], "unknown format 'pb'"),
        (["--runs", "0"], "--runs 0"),
        (["--batch", "0"], "give comma-separated positive integers"),
        (["--batch", "1,x"], "not a comma-separated list of integers"),
        (["--gallery", "-5"], "give comma-separated positive integers"),
        (["--runtime", "tensorrt"], "invalid choice: 'tensorrt'"),
        (["--format", "onnx", "--runtime", "litert"], "runtime litert runs none of the chosen files"),
        (["--runs", "3", "--min-seconds", "0.1"], "--runs or --min-seconds"),
        (["--threads", "0"], "--threads >= 1"),
        (["--min-seconds", "0"], "--min-seconds"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(bench_bundle, tmp_path, args, fragment):
    out = tmp_path / "bench.json"
    proc = device_bench(bench_bundle, "--gallery", "10", *args, "--json", out)  # a later --gallery wins
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_one_line_error(proc, fragment)
    assert not out.exists()


def test_a_folder_that_is_not_a_bundle_is_refused(tmp_path):
    proc = device_bench(tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, "is not a bundle (no manifest.json)")


def test_a_tampered_bundle_is_refused(bench_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bench_bundle, copy)
    flip_byte(copy / "model_fp32.onnx")
    proc = device_bench(copy, "--gallery", "10", "--json", tmp_path / "bench.json")
    assert proc.returncode == 2
    assert_one_line_error(proc, "model_fp32.onnx", "does not match its sha256")
    assert not (tmp_path / "bench.json").exists()


def test_a_runtime_that_is_not_installed_fails_its_rows_with_an_install_hint(bench_bundle, tmp_path):
    """``--runtime tflite-runtime`` keeps the TFLite files only; without the package each row fails, the JSON is still written, exit 1."""
    if importlib.util.find_spec("tflite_runtime") is not None:
        pytest.skip("tflite_runtime is installed here")
    out = tmp_path / "bench.json"
    proc = device_bench(bench_bundle, "--runtime", "tflite-runtime", "--runs", "2", "--gallery", "10", "--json", out)
    assert proc.returncode == 1, proc.stderr
    result = validate_result(json.loads(out.read_text()))
    assert [r["file"] for r in result["rows"]] == ["model_fp32.tflite", "model_int8.tflite"]
    assert result["settings"]["runtime"] == "tflite-runtime"
    for row in result["rows"]:
        assert row["status"] == "failed"
        assert "pip install tflite-runtime" in row["error"] and "ai-edge-litert" in row["error"]
    assert proc.stdout.count("❌") == 2


# --- rows that fail: reported in their row, the others still measured ---


def test_a_file_the_runtime_cannot_load_fails_its_row_only(bench_bundle, tmp_path):
    copy = altered_copy(bench_bundle, tmp_path / "bundle", "model_int8.onnx", b"not an onnx model" * 64)
    out = tmp_path / "bench.json"
    proc = device_bench(copy, "--format", "onnx", "--runs", "3", "--gallery", "10", "--json", out)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    result = validate_result(json.loads(out.read_text()))
    ok, failed = result["rows"]
    assert (ok["file"], ok["status"]) == ("model_fp32.onnx", "verified")
    assert (failed["file"], failed["status"], failed["size_bytes"]) == ("model_int8.onnx", "failed", 17 * 64)
    assert "INVALID_PROTOBUF" in failed["error"] or "Protobuf" in failed["error"]
    assert "latency" not in failed
    assert "❌" in proc.stdout and "✅" in proc.stdout


def test_a_golden_check_failure_is_reported_and_not_timed(bench_bundle, tmp_path):
    with np.load(bench_bundle / "golden.npz", allow_pickle=False) as f:
        golden = {k: f[k] for k in f.files}
    golden["embeddings"][0] = -golden["embeddings"][0]  # cosine -1 on one golden image
    staging = tmp_path / "golden.npz"
    np.savez_compressed(staging, **golden)
    copy = altered_copy(bench_bundle, tmp_path / "bundle", "golden.npz", staging.read_bytes())
    out = tmp_path / "bench.json"
    proc = device_bench(copy, "--format", "onnx", "--runs", "3", "--gallery", "10", "--json", out)
    assert proc.returncode == 1, proc.stderr
    result = validate_result(json.loads(out.read_text()))
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["status"] == "failed" and "golden check failed" in row["error"]
        assert row["golden"]["min_cosine"] < -0.99 < row["golden"]["required_min_cosine"]
        assert not {"latency", "accuracy", "gallery"} & set(row)


def test_min_seconds_times_each_batch_size_for_that_long(bench_bundle, tmp_path):
    out = tmp_path / "bench.json"
    proc = device_bench(bench_bundle, "--format", "onnx", "--precision", "fp32", "--min-seconds", "0.2", "--gallery", "100", "--quiet", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    result = validate_result(json.loads(out.read_text()))
    assert (result["settings"]["runs"], result["settings"]["min_seconds"]) == (None, 0.2)
    (row,) = result["rows"]
    (lat,) = row["latency"]
    assert lat["runs"] >= 1  # how many depends on this machine's speed: no timed assertion
    assert row["gallery"][0]["runs"] == 20  # gallery search keeps a fixed count


def test_a_tiny_min_seconds_still_times_one_run(bench_bundle, tmp_path):
    out = tmp_path / "bench.json"
    proc = device_bench(bench_bundle, "--format", "onnx", "--precision", "fp32", "--min-seconds", "1e-9", "--gallery", "10", "--json", out)
    assert proc.returncode == 0, proc.stdout
    assert json.loads(out.read_text())["rows"][0]["latency"][0]["runs"] >= 1


# --- docs/bench-schema.md names every field of the schema ---


def bench_schema_paths() -> set[str]:
    """Every dotted field path of the JSON document, e.g. ``rows[].latency[].p50_ms``."""
    gallery = {"size": (int,), "precision": (str,), "bytes": (int,), **LATENCY}
    return (
        schema_paths(RESULT)
        | schema_paths(ROW_VERIFIED, "rows[].")
        | schema_paths(ROW_FAILED, "rows[].")
        | schema_paths({"batch": (int,), **LATENCY}, "rows[].latency[].")
        | schema_paths(gallery, "rows[].gallery[].")
    )


def test_the_schema_doc_names_every_field_and_no_other():
    tokens = set(re.findall(r"`([^`\n]+)`", SCHEMA_DOC.read_text()))
    paths = bench_schema_paths()
    assert sorted(paths - tokens) == []
    starts = tuple(f"{key}." for key in RESULT)
    named = {t for t in tokens if t.startswith(starts)}
    assert sorted(named - paths) == ["environment.throttled"]  # only on a Pi (vcgencmd)
