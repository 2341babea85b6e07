"""End-to-end paths through the real ``edge-siamese`` command, and its handling of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, run_cli


def test_train_then_evaluate_shadow_d8_reaches_precision_at_1_above_0_9(shadow_run):
    proc = run_cli("evaluate", shadow_run)
    result = json.loads((shadow_run / "evaluation.json").read_text())
    assert result["split"] == "test" and result["loss"] == "shadow" and result["distance"] == "cosine"
    assert result["precision_at_1"] > 0.9
    assert result["num_samples"] == 359  # 20% of each digit class
    assert "precision_at_1" in proc.stdout and "tar_at_far_1e-3" in proc.stdout


def test_triplet_baseline_d128_trains_and_evaluates(tmp_path):
    out = tmp_path / "triplet-d128"
    run_cli("train", "--loss", "triplet", "--dim", "128", "--epochs", "4", "--quiet", "--out", out)
    run_cli("evaluate", out, "--json", tmp_path / "eval.json")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["embedding_dim"] == 128 and result["distance"] == "euclidean"
    assert result["precision_at_1"] > 0.9


def test_evaluate_refuses_to_overwrite_without_force(shadow_run, tmp_path):
    path = tmp_path / "e.json"
    run_cli("evaluate", shadow_run, "--split", "val", "--json", path)
    first = path.read_text()
    assert_one_line_error(run_cli("evaluate", shadow_run, "--json", path, check=False), "--force")
    assert path.read_text() == first
    run_cli("evaluate", shadow_run, "--split", "val", "--json", path, "--force")
    assert json.loads(path.read_text())["split"] == "val"


def test_force_replaces_only_an_earlier_result(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not a run")
    for command in (["train", "--epochs", "1"], ["compare", "--seeds", "1", "--epochs", "1"]):
        proc = run_cli(*command, "--out", out, "--force", check=False)
        assert_one_line_error(proc, "holds something else", "choose another --out")
        assert [p.name for p in out.iterdir()] == ["holiday.jpg"]


def test_compare_checks_its_settings_before_force_removes_anything(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "compare_config.json").write_text("{}")
    assert_one_line_error(run_cli("compare", "--targets", "tpu", "--out", out, "--force", check=False), "unknown target 'tpu'")
    assert (out / "compare_config.json").read_text() == "{}"


def test_evaluate_and_bench_check_the_json_folder_first(shadow_run, tmp_path):
    missing = tmp_path / "no" / "such" / "result.json"
    assert_one_line_error(run_cli("evaluate", shadow_run, "--json", missing, check=False), "is not a folder")
    assert_one_line_error(run_cli("bench", shadow_run / "bundle", "--json", missing, check=False), "is not a folder")


def test_train_refuses_an_existing_out_without_force(shadow_run):
    before = (shadow_run / "model.safetensors").read_bytes()
    assert_one_line_error(run_cli("train", "--out", shadow_run, check=False), "--force")
    assert (shadow_run / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--dataset", "mnist-on-the-moon"], "unknown dataset"),
        (["--loss", "arcface"], "--loss"),
        (["--backbone", "resnet9000"], "--backbone"),
        (["--dim", "0"], "--dim 0"),
        (["--loss", "lossless", "--head", "l2"], "--head sigmoid"),
        (["--margin", "0.5", "--loss", "koch"], "no margin"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_train_bad_options_give_one_line_and_write_nothing(tmp_path, args, fragment):
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", *args, "--out", out, check=False), fragment)
    assert not out.exists()


def _write_class(root, name, images):
    folder = root / name
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")


def _grey(n, size=12, seed=0):
    return list(np.random.default_rng(seed).integers(0, 255, (n, size, size), dtype=np.uint8))


@pytest.mark.parametrize("case", ["one_class", "single_image", "not_an_image", "mixed_sizes"])
def test_train_bad_image_folders(tmp_path, case):
    root = tmp_path / "data"
    _write_class(root, "a", _grey(4))
    if case == "single_image":
        _write_class(root, "b", _grey(1))
        fragment = "'b'"
    elif case == "not_an_image":
        _write_class(root, "b", _grey(3))
        (root / "b" / "notes.txt").write_text("not a picture")
        fragment = "notes.txt"
    elif case == "mixed_sizes":
        _write_class(root, "b", _grey(3, size=16))
        fragment = "several sizes"
    else:
        fragment = "1 class"
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--dataset", root, "--out", out, "--quiet", check=False), fragment)  # quiet: no indexing bar before the line
    assert not out.exists()


def test_evaluate_missing_and_corrupt_runs(shadow_run, tmp_path):
    assert_one_line_error(run_cli("evaluate", tmp_path / "nowhere", check=False), "not a training run")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((shadow_run / "config.json").read_text())
    assert_one_line_error(run_cli("evaluate", broken, check=False), "--resume")
    (broken / "model.safetensors").write_bytes((shadow_run / "model.safetensors").read_bytes()[:500])
    assert_one_line_error(run_cli("evaluate", broken, check=False), "corrupt")
    (broken / "config.json").write_text("{not json")
    assert_one_line_error(run_cli("evaluate", broken, check=False), "corrupt")
    assert not (broken / "evaluation.json").exists()


def test_version_and_help():
    assert "edge-siamese" in run_cli("--version").stdout
    help_text = run_cli("train", "--help").stdout
    for option in ("--dataset", "--loss", "--dim", "--miner", "--resume", "--quiet", "--device"):
        assert option in help_text


def test_resume_refuses_new_settings(shadow_run):
    proc = run_cli("train", "--resume", "--out", shadow_run, "--dim", "4", "--lr", "0.1", check=False)
    assert_one_line_error(proc, "drop --dim, --lr")
    assert_one_line_error(run_cli("train", "--resume", check=False), "--resume needs --out")


def test_a_split_too_small_to_measure_is_one_line(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 255, (100, 8, 8), dtype=np.uint8), labels=np.repeat(np.arange(10), 10))
    proc = run_cli("train", "--dataset", data, "--epochs", "1", "--out", tmp_path / "run", check=False)
    assert_one_line_error(proc, "too few to measure retrieval")


def test_evaluate_names_a_bad_device_in_one_line(shadow_run, tmp_path):
    assert_one_line_error(run_cli("evaluate", shadow_run, "--device", "gpu", "--json", tmp_path / "e.json", check=False), "unknown device 'gpu'")


def test_option_defaults_are_the_dataclasses():
    """Each default has one home, the dataclass the command builds: TrainConfig, BenchSettings."""
    from dataclasses import fields

    from edge_siamese.app.cli import cli
    from edge_siamese.app.targets import BenchSettings
    from edge_siamese.config import TrainConfig

    train = {p.name: p.default for p in cli.commands["train"].params}
    renamed = {"loss": "loss_name"}
    shared = [f for f in fields(TrainConfig) if renamed.get(f.name, f.name) in train]
    assert len(shared) >= 14
    for f in shared:
        assert train[renamed.get(f.name, f.name)] == f.default, f.name
    bench = {p.name: p.default for p in cli.commands["bench"].params}
    settings = BenchSettings()
    assert (bench["batch"], bench["gallery"]) == (",".join(map(str, settings.batches)), ",".join(map(str, settings.gallery)))
    for name in ("warmup", "runs", "threads", "cpu_model", "remote_python", "instructions", "run_dir", "formats", "precision"):
        assert bench[name] == getattr(settings, name), name
