"""``device_bench.preprocessing``: the one preprocessing, shared by training, export and the device."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from device_bench.manifest import BundleError, read_bundle
from device_bench.preprocessing import LUMA, Preprocessing
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


def test_rgb_for_a_grey_model_is_luma_and_wrong_shapes_say_what_to_do():
    pre = Preprocessing((2, 3), 1, 1 / 255, (0.5,), (0.25,))
    rgb = np.random.default_rng(1).integers(0, 256, (4, 2, 3, 3)).astype(np.uint8)
    grey = rgb.astype(np.float64) @ np.asarray(LUMA)
    np.testing.assert_allclose(pre(rgb)[:, 0], (grey / 255 - 0.5) / 0.25, atol=1e-5)
    with pytest.raises(BundleError, match="2x3.*resize them first"):
        pre(np.zeros((1, 3, 2, 1)))
    with pytest.raises(BundleError, match="takes 3"):
        Preprocessing((2, 3), 3, 1.0, (0, 0, 0), (1, 1, 1))(np.zeros((1, 2, 3, 1)))


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
