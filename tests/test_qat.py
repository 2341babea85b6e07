"""export.qat, the quantization-aware fine-tune of ``export --int8 --qat EPOCHS``, on the digits run
of the README, through the real exporter, ONNX Runtime and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from device_bench.formats import PRECISIONS, Precision
from device_bench.manifest import read_bundle
from edge_siamese.app.cli import _echo_qat
from edge_siamese.checkpoints import load_run
from edge_siamese.models import embed
from edge_siamese.run import prepare_data, read_index
from export import qat
from export.exporter import export_run

UNREACHABLE = Precision(1, 0.01, 1e-9, None, None)  # no post-training int8 file reaches a relative error of 1e-9


@pytest.fixture(scope="module")
def tuned(shadow_run):
    run = load_run(shadow_run)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    data = prepare_data(run.config, run.preprocessing, read_index(shadow_run))
    return run, before, qat.fine_tune(run, data, 1, progress=False), data


def test_the_fine_tune_trains_a_copy_and_leaves_a_plain_float_model(tuned):
    run, before, model, data = tuned
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())  # the run's model is untouched
    state = model.state_dict()
    assert state.keys() == before.keys()  # no parametrization left: it loads and exports as any trained model
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    changed = [k for k in state if state[k].is_floating_point() and not torch.equal(state[k], before[k])]
    assert any(k.endswith("weight") for k in changed)
    bn_stats = [k for k in state if k.endswith(("running_mean", "running_var"))]
    assert bn_stats and all(torch.equal(state[k], before[k]) for k in bn_stats)  # BatchNorm statistics stay
    x = data.inputs("test", slice(0, 64))
    assert torch.isfinite(embed(model, x)).all() and not torch.allclose(embed(model, x), embed(run.model, x))


def test_weights_are_fake_quantized_to_int8_per_output_channel():
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).view(6, 1, 1, 1)
    q = qat._WeightOnInt8Grid()(w)
    scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    assert torch.allclose(q, torch.round(w / scale) * scale, atol=1e-6)
    assert all(len(torch.unique(q[c])) <= 255 for c in range(6))


def test_activations_are_fake_quantized_over_their_moving_range():
    layer = torch.nn.Linear(2, 2).train()
    grid = qat._ActivationOnUint8Grid()
    x = torch.linspace(-1, 3, 1000)
    y = grid(layer, x)
    step = 4 / 255
    assert torch.allclose(grid.low, torch.tensor(-1.0)) and torch.allclose(grid.high, torch.tensor(3.0))
    assert len(torch.unique(y)) <= 256 and (y - x).abs().max() <= step / 2 + 1e-6
    grid(layer, 10 * x)  # a wider batch moves the range by RANGE_MOMENTUM of the difference
    assert torch.allclose(grid.high, torch.tensor(3.0 + qat.RANGE_MOMENTUM * 27.0))
    layer.eval()
    grid(layer, 100 * x)  # evaluation leaves it
    assert torch.allclose(grid.high, torch.tensor(3.0 + qat.RANGE_MOMENTUM * 27.0))


@pytest.fixture(scope="module")
def unreachable(shadow_run, tmp_path_factory):
    """``--int8 --qat 1`` under a gate no post-training file passes: the bundle is made again from the fine-tune."""
    out = tmp_path_factory.mktemp("qat") / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRECISIONS, "int8", UNREACHABLE)
        rows, bundle = export_run(shadow_run, out, ["onnx"], ["fp32", "int8"], allow_degraded=True, progress=False, qat_epochs=1)
    return rows, bundle


def test_a_missed_gate_makes_the_bundle_from_the_fine_tuned_model(shadow_run, unreachable, capsys):
    rows, path = unreachable
    bundle = read_bundle(path)
    record = bundle.manifest["qat"]
    assert record["epochs"] == 1 and record["lr"] == pytest.approx(load_run(shadow_run).config.lr * qat.LR_FACTOR)
    assert record["why"] == "post-training int8 missed the gate for onnx" and record["fine_tune_s"] > 0
    assert all(r.qat == record for r in rows)
    # the golden embeddings, every file's reference, are the fine-tuned model's, not the run's
    golden = bundle.golden()
    trained = embed(load_run(shadow_run).model, torch.from_numpy(golden["inputs"])).numpy()
    assert not np.allclose(golden["embeddings"], trained, atol=1e-4)
    fp32 = bundle.file("onnx", "fp32")
    assert fp32["status"] == "verified", rows[0].problem
    assert fp32["fidelity"]["precision_at_1"] == pytest.approx(record["precision_at_1"])
    assert 0 < record["trained_precision_at_1"] <= 1 and record["trained_val_precision_at_1"] == json.loads((shadow_run / "metrics.json").read_text())["final"]["val_precision_at_1"]
    _echo_qat(record)
    said = capsys.readouterr().out
    assert said.startswith("post-training int8 missed the gate for onnx: quantization-aware fine-tune, 1 epoch(s)") and f"{record['precision_at_1']:.4f} fine-tuned" in said
    int8 = bundle.file("onnx", "int8")
    assert int8["status"] == "degraded" and "relative error" in rows[1].problem  # the unreachable gate, still measured against the fine-tuned model


def test_a_file_is_also_held_to_the_trained_models_precision_at_1(shadow_run, tmp_path, monkeypatch):
    """A fine-tune that costs precision_at_1 cannot hide it behind its own reference."""
    monkeypatch.setitem(PRECISIONS, "int8", UNREACHABLE)
    monkeypatch.setattr(qat, "LR_FACTOR", 30.0)  # a fine-tune that ruins the model
    rows, _ = export_run(shadow_run, tmp_path / "bundle", ["onnx"], ["fp32", "int8"], allow_degraded=True, progress=False, qat_epochs=1)
    record = rows[0].qat
    assert record["precision_at_1"] < record["trained_precision_at_1"] - 0.01
    assert rows[0].status == "degraded" and "below the trained model's" in rows[0].problem  # the fp32 file matches its reference, not the trained model


def test_qat_is_not_run_when_the_search_passes(shadow_run, tmp_path):
    proc = run_cli("export", shadow_run, "--format", "onnx", "--int8", "--qat", "1", "--quiet", "--allow-degraded", "--out", tmp_path / "bundle")
    manifest = read_bundle(tmp_path / "bundle").manifest
    assert manifest["files"][1]["int8"]["passed_gate"] and "qat" not in manifest
    assert "quantization-aware" not in proc.stdout


@pytest.mark.parametrize("args", [["--qat", "1"], ["--int8", "--qat", "-1"]])
def test_bad_qat_options_are_one_line(shadow_run, tmp_path, args):
    proc = run_cli("export", shadow_run, "--format", "onnx", *args, "--out", tmp_path / "bundle", check=False)
    assert_one_line_error(proc, "--qat", "with --int8")
    assert not (tmp_path / "bundle").exists()
