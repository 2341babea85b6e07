"""``device_bench.preprocessing``: the one preprocessing, shared by training, export and the device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from device_bench.manifest import BundleError, read_bundle
from device_bench.preprocessing import LUMA, ImageError, Preprocessing, crop_box, read_image, resize_image
from edge_siamese.checkpoints import load_run, read_config
from edge_siamese.run import prepare_data


def test_fit_standardises_the_training_split_and_round_trips():
    images = np.random.default_rng(0).integers(0, 17, (50, 8, 8, 1)).astype(np.uint8)
    pre = Preprocessing.fit(images, 1 / 16)
    x = pre(images)
    assert x.shape == (50, 1, 8, 8) and x.dtype == np.float32 and x.flags.c_contiguous
    assert float(x.mean()) == pytest.approx(0, abs=1e-5) and float(x.std()) == pytest.approx(1, abs=1e-2)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    assert pre.to_dict()["raw_range"] == [0.0, 16.0]


def test_rgb_for_a_grey_model_is_pillows_luma_and_bad_shapes_say_what_to_do():
    pre = Preprocessing((2, 3), 1, 1 / 255, (0.5,), (0.25,))
    rgb = np.random.default_rng(1).integers(0, 256, (4, 2, 3, 3)).astype(np.uint8)
    grey = np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in rgb])  # 8-bit: Pillow's integer luma, exactly
    np.testing.assert_allclose(pre(rgb)[:, 0], (grey / 255 - 0.5) / 0.25, atol=1e-6)
    floats = rgb / 255.0  # floats: the luma weights themselves
    np.testing.assert_allclose(Preprocessing((2, 3), 1, 1.0, (0.0,), (1.0,))(floats)[:, 0], floats @ np.asarray(LUMA), atol=1e-6)
    grey_for_rgb = Preprocessing((2, 3), 3, 1.0, (0, 0, 0), (1, 1, 1))(np.zeros((1, 2, 3, 1)) + 0.5)
    assert grey_for_rgb.shape == (1, 3, 2, 3) and np.all(grey_for_rgb == 0.5)
    with pytest.raises(BundleError, match=r"must be \(H, W\), \(H, W, 1\) or \(H, W, 3\)"):
        pre(np.zeros((1, 2, 3, 2)))


@pytest.mark.parametrize("mode, box", [("crop", (10.0, 0.0, 50.0, 20.0)), ("stretch", (0.0, 0.0, 60.0, 20.0))])
def test_other_sizes_are_resized_by_the_mode_with_pillows_bilinear(mode, box):
    """A 20x60 image for a 16x32 model: ``crop`` keeps the centre 20x40, ``stretch`` all of it."""
    assert crop_box(20, 60, (16, 32), mode) == box
    image = np.random.default_rng(2).integers(0, 256, (20, 60, 3)).astype(np.uint8)
    expected = np.asarray(Image.fromarray(image).resize((32, 16), Image.Resampling.BILINEAR, box=box))
    np.testing.assert_array_equal(resize_image(image, (16, 32), mode), expected)
    pre = Preprocessing((16, 32), 3, 1 / 255, (0, 0, 0), (1, 1, 1), mode)
    np.testing.assert_allclose(pre([image, expected]), np.stack([expected, expected]).transpose(0, 3, 1, 2) / 255, atol=1e-7)
    assert crop_box(60, 20, (16, 32), "crop") == (0.0, 25.0, 20.0, 35.0)  # taller than wide: the middle rows


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_read_image_converts_every_mode_to_the_models_channels(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (7, 5, 3)).astype(np.uint8)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    alpha = rng.integers(0, 256, (7, 5)).astype(np.uint8)
    rgba = save(Image.fromarray(np.dstack([rgb, alpha])), tmp_path / "rgba.png")
    on_white = (rgb.astype(np.uint32) * alpha[..., None] + 255 * (255 - alpha[..., None].astype(np.uint32)) + 127) // 255
    np.testing.assert_array_equal(read_image(rgba, 3), on_white)
    np.testing.assert_array_equal(read_image(save(Image.fromarray(rgb), tmp_path / "rgb.png"), 1)[..., 0], grey)
    np.testing.assert_array_equal(read_image(save(Image.fromarray(grey), tmp_path / "grey.png"), 3), np.dstack([grey] * 3))
    assert read_image(tmp_path / "grey.png", None).shape == (7, 5, 1) and read_image(tmp_path / "rgb.png", None).shape == (7, 5, 3)
    palette = Image.fromarray(rgb).convert("P")
    np.testing.assert_array_equal(read_image(save(palette, tmp_path / "p.png"), 3), np.asarray(palette.convert("RGB")))
    deep = (rng.integers(0, 65536, (7, 5))).astype(np.uint16)
    np.testing.assert_array_equal(read_image(save(Image.fromarray(deep), tmp_path / "16.png"), 1)[..., 0], (deep >> 8).astype(np.uint8))


def test_read_image_turns_a_photo_upright_by_its_exif_orientation(tmp_path):
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[0, 0] = 255  # a white top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(Image.fromarray(pixels), tmp_path / "rotated.png", exif=exif)
    upright = read_image(path, 3)
    assert upright.shape == (6, 4, 3) and upright[0, -1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("content, fragment", [(b"", "is not an image"), (b"GIF89a-broken", "is not an image")])
def test_read_image_names_the_file_it_cannot_read(tmp_path, content, fragment):
    (tmp_path / "bad.gif").write_bytes(content)
    with pytest.raises(ImageError, match=f"bad.gif {fragment}"):
        read_image(tmp_path / "bad.gif", 3)


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr("device_bench.preprocessing.MAX_IMAGE_PIXELS", 100)
    save(Image.new("L", (11, 10)), tmp_path / "big.png")
    with pytest.raises(ImageError, match="decompression bomb"):
        read_image(tmp_path / "big.png", 1)


def test_training_inputs_the_golden_inputs_and_the_device_agree(shadow_run, tmp_path_factory):
    """The model input training computed for an image is the one a device computes from the bundle."""
    out = tmp_path_factory.mktemp("preprocessing") / "bundle"
    run_cli("export", shadow_run, "--format", "onnx", "--quiet", "--out", out)
    bundle = read_bundle(out)
    run = load_run(shadow_run)
    data = prepare_data(run.config, run.preprocessing)
    golden = bundle.golden()
    n = len(golden["images"])
    training = data.inputs("test", slice(0, n)).numpy()
    np.testing.assert_array_equal(data.images("test", slice(0, n)), golden["images"])
    np.testing.assert_array_equal(training, golden["inputs"])
    np.testing.assert_array_equal(bundle.preprocessing(golden["images"]), training)
    config = json.loads((shadow_run / "config.json").read_text())
    assert config["preprocessing"] == bundle.manifest["preprocessing"]  # one set of keys, written by one to_dict


def test_a_config_json_of_toolkit_0_1_0_still_reads(shadow_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = json.loads((shadow_run / "config.json").read_text())
    new = config["preprocessing"]
    config["preprocessing"] = {"input_size": new["resize"], "channels": new["channels"], "scale": new["scale"], "mean": new["mean"], "std": new["std"], "layout": "NCHW"}
    (run / "config.json").write_text(json.dumps(config))
    assert read_config(run)[1] == read_config(shadow_run)[1]
