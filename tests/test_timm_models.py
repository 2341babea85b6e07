"""timm backbones (``edge_siamese/timm_models.py``): built from timm's registry, local pretrained
weights loaded (safetensors, or torch files of tensors only), grey data fed RGB weights, the
pretrained preprocessing as defaults, a frozen backbone, and the whole path through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

timm = pytest.importorskip("timm")

from conftest import colour_photos, run_cli  # noqa: E402
from device_bench.embedder import Embedder  # noqa: E402
from edge_siamese.checkpoints import load_run  # noqa: E402
from edge_siamese.config import TrainConfig  # noqa: E402
from edge_siamese.errors import UserError  # noqa: E402
from edge_siamese.models import create_model  # noqa: E402
from edge_siamese.run import prepare_data  # noqa: E402
from edge_siamese.timm_models import load_pretrained  # noqa: E402
from edge_siamese.train import train  # noqa: E402

NAME = "mobilenetv3_small_050"  # the smallest MobileNetV3 (0.6 M parameters without its classifier)
BACKBONE = f"timm:{NAME}"
SIZE = (32, 32)


@pytest.fixture(scope="module")
def source():
    """The timm model whose weights are 'pretrained': seeded, so unlike a fresh build's, with
    BatchNorm statistics of its own, in eval mode."""
    torch.manual_seed(1)
    model = timm.create_model(NAME, pretrained=False)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2)
    return model.eval()


@pytest.fixture(scope="module")
def weights(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained") / f"{NAME}.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))  # classifier included, as timm ships it
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """4 classes of 20 colour photos of mixed sizes (2 of each validation images)."""
    return colour_photos(tmp_path_factory.mktemp("timm-photos") / "photos", 4, 20, 10, np.random.default_rng(0))


def pooled(model, x):
    """What the source computes without its classifier: the features our model embeds."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def test_pretrained_weights_load_and_change_the_embeddings(source, weights):
    torch.manual_seed(0)
    model = create_model(BACKBONE, 3, SIZE, embedding_dim=16).eval()
    x = torch.randn(4, 3, *SIZE)
    before = model(x).detach()
    load_pretrained(model.features, BACKBONE, str(weights))
    with torch.no_grad():
        assert torch.allclose(model.features(x), pooled(source, x), atol=1e-5)
        after = model(x)
    assert (after - before).abs().max() > 0.1
    assert torch.allclose(after.norm(dim=1), torch.ones(4), atol=1e-5)


def test_grey_data_feeds_rgb_weights_through_the_summed_first_convolution(source, weights):
    model = create_model(BACKBONE, 1, SIZE, embedding_dim=16).eval()
    load_pretrained(model.features, BACKBONE, str(weights))
    grey = torch.rand(3, 1, *SIZE)
    with torch.no_grad():  # a grey image through the summed weights = the same image as RGB through the originals
        assert torch.allclose(model.features(grey), pooled(source, grey.expand(-1, 3, -1, -1)), atol=1e-4)
    assert torch.allclose(model.features.conv_stem.weight, source.conv_stem.weight.sum(dim=1, keepdim=True))


def test_a_torch_file_of_tensors_loads_even_wrapped_as_a_training_checkpoint(source, tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = create_model(BACKBONE, 3, SIZE, embedding_dim=8).eval()
    load_pretrained(model.features, BACKBONE, str(path))
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert torch.allclose(model.features(x), pooled(source, x), atol=1e-5)


def test_unusable_weight_files_say_what_to_pass(tmp_path, weights):
    model = create_model(BACKBONE, 3, SIZE, embedding_dim=8)
    other = tmp_path / "lcnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("lcnet_050").state_dict().items()}, str(other))
    pickled = tmp_path / "whole-model.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)  # the module object itself: only unpickling reads it
    cases = {
        str(other): f"does not hold {NAME} weights",
        str(pickled): "pickled Python objects",
        str(tmp_path / "missing.safetensors"): "no such file",
        f"hf-hub:timm/{NAME}.lamb_in1k": "never downloads",
        str(tmp_path): "no such file",
    }
    (tmp_path / "weights.txt").write_text("not weights")
    cases[str(tmp_path / "weights.txt")] = "not a weights file"
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 40)
    cases[str(tmp_path / "broken.safetensors")] = "not a readable safetensors file"
    for value, fragment in cases.items():
        with pytest.raises(UserError, match=fragment):
            load_pretrained(model.features, BACKBONE, value)
    assert "\n" not in str(pytest.raises(UserError, load_pretrained, model.features, BACKBONE, str(other)).value)


def test_timm_names_are_checked_with_a_suggestion():
    with pytest.raises(UserError, match="did you mean timm:mobilenetv3_small_050"):
        TrainConfig(backbone="timm:mobilenetv3_smal_050").validate()
    with pytest.raises(UserError, match="--pretrained loads timm weights"):
        TrainConfig(backbone="convnet", pretrained="w.safetensors").validate()
    with pytest.raises(UserError, match="--freeze-backbone-epochs 3"):
        TrainConfig(backbone=BACKBONE, epochs=2, freeze_backbone_epochs=3).validate()
    with pytest.raises(UserError, match="--backbone-lr-mult"):
        TrainConfig(backbone=BACKBONE, backbone_lr_mult=float("nan")).validate()
    assert TrainConfig(backbone=f"{BACKBONE}.lamb_in1k").validate()  # a pretrained tag is a name too


def test_the_pretrained_mean_std_and_input_size_are_the_defaults(weights):
    cfg = timm.create_model(NAME).pretrained_cfg
    grey = prepare_data(TrainConfig(dataset="digits", backbone=BACKBONE, pretrained=str(weights))).preprocessing
    assert grey.resize == tuple(cfg["input_size"][1:]) == (224, 224)
    assert grey.channels == 1 and grey.mean == pytest.approx((np.mean(cfg["mean"]),)) and grey.std == pytest.approx((np.mean(cfg["std"]),))
    own = prepare_data(TrainConfig(dataset="digits", backbone=BACKBONE, input_size=[16, 16])).preprocessing
    assert own.resize == (16, 16) and own.mean[0] > 0.1  # no weights: the images' size asked for, their own statistics


@pytest.mark.parametrize("freeze, lr_mult", [(1, 1.0), (0, 0.0)])
def test_a_frozen_backbone_keeps_its_pretrained_weights(source, weights, photos, tmp_path, freeze, lr_mult):
    """Frozen for the only epoch: weights and BatchNorm statistics as loaded. A learning-rate
    multiplier of 0 keeps the weights too, while BatchNorm's statistics follow the data."""
    config = TrainConfig(
        dataset=str(photos), backbone=BACKBONE, pretrained=str(weights), input_size=[16, 16], epochs=1, workers=0,
        freeze_backbone_epochs=freeze, backbone_lr_mult=lr_mult, batch_size=16, samples_per_class=4, embedding_dim=8,
    )
    train(config, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    expected, trained = source.state_dict(), run.model.features.state_dict()
    weights_kept = [torch.equal(trained[k], expected[k]) for k, _ in run.model.features.named_parameters()]
    statistics_kept = [torch.equal(trained[k], expected[k]) for k, _ in run.model.features.named_buffers() if "running" in k]
    assert all(weights_kept) and len(weights_kept) > 50
    assert all(statistics_kept) if freeze else not any(statistics_kept)
    fresh = create_model(BACKBONE, 3, (16, 16), 8)
    assert not torch.equal(run.model.embed.weight, fresh.embed.weight)  # the embedding layer trained


def test_train_a_pretrained_timm_backbone_on_photos_then_export_int8_and_bench(weights, photos, tmp_path):
    """The issue's path through the real CLI, small: a photo folder, --pretrained, --input-size."""
    from PIL import Image

    run = tmp_path / "run"
    run_cli("train", "--backbone", BACKBONE, "--pretrained", weights, "--dataset", photos, "--input-size", "32",
            "--epochs", "8", "--batch-size", "16", "--samples-per-class", "4", "--backbone-lr-mult", "0.5", "--lr", "3e-3", "--quiet", "--out", run)
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["pretrained"] == str(weights) and config["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    # 16 test images: whether int8 stays within its gate there is a coin toss near the bar, so the
    # file is kept either way; the search and its verdict are test_quantize's.
    exported = run_cli("export", run, "--int8", "--format", "onnx", "--calib-samples", "48", "--allow-degraded", "--quiet").stdout
    rows = [line.split() for line in exported.splitlines() if line.startswith("onnx ")]
    statuses = {row[1]: row[2] for row in rows if row[2] in ("verified", "degraded", "failed")}
    assert statuses["fp32"] == "verified" and statuses["int8"] in ("verified", "degraded"), exported
    bench = tmp_path / "bench.json"
    run_cli("bench", run / "bundle", "--runs", "3", "--gallery", "10", "--ort-memory", "lean", "--quiet", "--json", bench)
    document = json.loads(bench.read_text())
    assert document["settings"]["ort_memory"] == "lean"
    assert [r["status"] for r in document["rows"]] == ["verified", "verified"]
    images = [np.asarray(Image.open(p)) for p in sorted((photos / "p0").glob("*.jpg"))[:3]]
    device = Embedder(run / "bundle", file="model_fp32.onnx").embed(images)
    torch_side = load_run(run).model(torch.from_numpy(load_run(run).preprocessing(images))).detach().numpy()
    assert np.allclose(device, torch_side, atol=1e-4)
