"""The training loop: its outputs, every loss and miner, resume after a kill, divergence and the CUDA gate."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import CLI, assert_one_line_error, run_cli
from edge_siamese.checkpoints import load_run
from edge_siamese.config import TrainConfig
from edge_siamese.errors import UserError
from edge_siamese.losses import LOSSES
from edge_siamese.miners import MINERS
from edge_siamese.evaluate import resolve_device
from edge_siamese.train import train


def test_run_folder_holds_everything_needed_to_rebuild(shadow_run):
    names = {p.name for p in shadow_run.iterdir()}
    assert {"config.json", "model.safetensors", "metrics.json", "training_curves.png", "checkpoint.pt"} <= names
    config = json.loads((shadow_run / "config.json").read_text())
    assert config["train"]["loss"] == "shadow" and config["train"]["embedding_dim"] == 8
    pre = config["preprocessing"]
    assert pre["resize"] == [8, 8] and pre["channels"] == 1 and pre["scale"] == pytest.approx(1 / 16)
    metrics = json.loads((shadow_run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 21))
    assert metrics["final"]["val_precision_at_1"] > 0.9
    assert metrics["peak_rss_mb"] > 50 and metrics["train_time_s"] > 0
    assert (shadow_run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = load_run(shadow_run)
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(run.model(x).norm(dim=1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_trains_and_learns_something(tmp_path, loss):
    metrics = train(TrainConfig(loss=loss, embedding_dim=8, epochs=3), tmp_path / loss, progress=False)
    assert all(map(torch.isfinite, torch.tensor([h["train_loss"] for h in metrics["history"]])))
    assert metrics["final"]["val_precision_at_1"] > 0.3  # chance is 0.1


def test_koch_head_is_saved_with_the_model(tmp_path):
    train(TrainConfig(loss="koch", embedding_dim=4, epochs=2), tmp_path / "koch", progress=False)
    tensors = load_file(str(tmp_path / "koch" / "model.safetensors"))
    assert {"loss.rho", "loss.bias"} <= set(tensors)
    assert not torch.equal(tensors["loss.rho"], torch.zeros(4))  # trained, not the initial value


@pytest.mark.parametrize("miner", [m for m in MINERS if m != "batch-all"])
def test_every_miner_trains(tmp_path, miner):
    metrics = train(TrainConfig(miner=miner, epochs=2), tmp_path / miner, progress=False)
    assert metrics["final"]["val_precision_at_1"] > 0.3


def test_mobilenet_and_class_split(tmp_path):
    config = TrainConfig(backbone="mobilenet", split="classes", epochs=2)
    metrics = train(config, tmp_path / "m", progress=False)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["train"]
    assert saved["backbone"] == "mobilenet" and saved["split"] == "classes"
    assert metrics["final"]["val_num_classes"] == 5  # the other 5 digits are held out for the test split


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    args = ["train", "--epochs", "8", "--quiet"]
    run_cli(*args, "--out", tmp_path / "whole")
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen([str(CLI), *args, "--out", str(interrupted)], stderr=subprocess.DEVNULL)
    checkpoint = interrupted / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(checkpoint, weights_only=True)
    assert 1 <= state["epoch"] < 8, "the kill should land mid-run"
    assert not (interrupted / "metrics.json").exists()
    assert_one_line_error(run_cli("evaluate", interrupted, check=False), "--resume")

    run_cli("train", "--resume", "--quiet", "--out", interrupted)
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    resumed = load_file(str(interrupted / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    history = json.loads((interrupted / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert_one_line_error(run_cli("train", "--resume", "--out", interrupted, check=False), "nothing to resume")


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = run_cli("train", "--loss", "shadow-raw", "--lr", "1e8", "--quiet", "--out", out, check=False)
    assert_one_line_error(proc, "training stopped", "Lower --lr")
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
    assert "no epoch finished" in proc.stderr and not out.exists()  # nothing to resume, nothing left


def test_a_kept_checkpoint_is_finite_in_every_parameter_and_buffer(tmp_path):
    """At --lr 1e5 the loss can stay finite while BatchNorm's running_var overflows: such an epoch
    is not "good", so the checkpoint kept is the last one whose every number is finite."""
    out = tmp_path / "run"
    proc = run_cli("train", "--lr", "1e5", "--epochs", "6", "--quiet", "--out", out, check=False)
    assert proc.returncode == 2 and "training stopped" in proc.stderr, proc.stderr
    if (out / "checkpoint.pt").exists():
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        for part in ("model", "loss"):
            for name, tensor in state[part].items():
                assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), name
    else:
        assert not out.exists()


def test_divergence_after_a_good_epoch_keeps_its_checkpoint(tmp_path):
    """Two good epochs, then the run is reopened with 4 epochs and its optimizer's learning rate
    raised to 1e8 in the checkpoint: resuming diverges in epoch 3 and keeps epoch 2's checkpoint."""
    out = tmp_path / "run"
    run_cli("train", "--epochs", "2", "--quiet", "--out", out)
    (out / "metrics.json").unlink()
    (out / "model.safetensors").unlink()
    config = json.loads((out / "config.json").read_text())
    config["train"]["epochs"] = 4
    (out / "config.json").write_text(json.dumps(config))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = 1e8
    n = len(state["scheduler"]["base_lrs"])
    state["scheduler"].update(base_lrs=[1e8] * n, _last_lr=[1e8] * n, T_max=10**6)
    torch.save(state, out / "checkpoint.pt")
    proc = run_cli("train", "--resume", "--quiet", "--out", out, check=False)
    assert_one_line_error(proc, "training stopped", "at epoch 3", "the last good checkpoint (epoch 2) is kept")
    kept = torch.load(out / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == 2 and torch.isfinite(kept["model"]["embed.weight"]).all()
    assert not (out / "model.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_cuda_gate_without_a_gpu(tmp_path):
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda")
    out = tmp_path / "cuda"
    assert_one_line_error(run_cli("train", "--device", "cuda", "--out", out, check=False), "CUDA is not available")
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_trains_on_cuda(tmp_path):
    metrics = train(TrainConfig(device="cuda", epochs=3), tmp_path / "gpu", progress=False)
    assert metrics["device"].startswith("cuda") and metrics["peak_cuda_mb"] > 0
    assert metrics["final"]["val_precision_at_1"] > 0.5


def test_bf16_runs_the_forward_pass_in_bfloat16_and_keeps_float32_weights(tmp_path):
    """--precision bf16 on the CPU: the backbone's activations are bfloat16 (seen by a hook on the
    first convolution), the loss and the saved weights float32, and the run lands near fp32's."""
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: seen.append(output.dtype) if isinstance(module, torch.nn.Conv2d) and module.training else None
    )
    try:
        runs = {p: train(TrainConfig(epochs=1, precision=p, device="cpu"), tmp_path / p, progress=False) for p in ("fp32", "bf16")}
    finally:
        hook.remove()
    assert set(seen) == {torch.float32, torch.bfloat16}
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    fp32, bf16 = (runs[p]["history"][0]["train_loss"] for p in ("fp32", "bf16"))
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["train"]["precision"] == "bf16"
