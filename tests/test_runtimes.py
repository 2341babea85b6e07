"""The runtime adapters of ``device_bench.runtimes``: which one opens a file, and what ``run`` returns."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_bench.manifest import BundleError
from device_bench.runtimes import LiteRT, OnnxRuntime, open_runtime

WEIGHTS = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    """``embeddings = images @ WEIGHTS`` with a dynamic batch axis, built without torch."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["images", "w"], ["embeddings"])],
        "matmul",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(WEIGHTS, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tflite_models(tmp_path_factory):
    """A tiny conv net as float TFLite and as full-integer TFLite (int8 input and output), and the net.

    The net has no biases, so f(c x) = c f(x) for c > 0: calibrated on one input ``s``, every
    tensor of ``c s`` (0 < c <= 1) lies within the calibrated ranges, and the int8 model's error
    is quantization noise only.
    """
    import ai_edge_quantizer as aq
    import litert_torch
    import torch
    from ai_edge_litert.interpreter import Interpreter

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3, bias=False)
    ).eval()
    s = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    folder = tmp_path_factory.mktemp("tflite")
    float_path, int8_path = folder / "model_fp32.tflite", folder / "model_int8.tflite"
    litert_torch.convert(net, (torch.from_numpy(s),)).export(str(float_path))
    signatures = Interpreter(model_path=str(float_path)).get_signature_list()
    key = next(iter(signatures))
    quantizer = aq.Quantizer(str(float_path), aq.recipe.static_wi8_ai8())
    calibration = quantizer.calibrate({key: [{signatures[key]["inputs"][0]: s}]})
    quantizer.quantize(calibration).export_model(str(int8_path), overwrite=True)

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    return float_path, int8_path, s, reference


def test_onnx_files_open_with_onnxruntime(onnx_model):
    runtime = open_runtime(onnx_model, "onnx")
    assert isinstance(runtime, OnnxRuntime) and runtime.name == "onnxruntime"
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    out = runtime.run(x)
    assert out.dtype == np.float32 and out.shape == (5, 3)
    np.testing.assert_allclose(out, x @ WEIGHTS, rtol=1e-5, atol=1e-6)


def test_onnxruntime_describes_float_io_without_quantization(onnx_model):
    io = open_runtime(onnx_model, "onnx").io_details()
    assert io["input"] == {"name": "images", "dtype": "float32", "shape": ["batch", 4], "scale": None, "zero_point": None}
    assert io["output"] == {"name": "embeddings", "dtype": "float32", "shape": ["batch", 3], "scale": None, "zero_point": None}


def test_onnxruntime_accepts_float64_and_non_contiguous_input(onnx_model):
    x = np.random.default_rng(2).standard_normal((4, 6))[:, ::-1][:, :4]  # float64, a strided view
    np.testing.assert_allclose(open_runtime(onnx_model, "onnx").run(x), x @ WEIGHTS, rtol=1e-4, atol=1e-5)


def test_tflite_files_open_with_litert(tflite_models):
    float_path, _, s, reference = tflite_models
    runtime = open_runtime(float_path, "tflite")
    assert isinstance(runtime, LiteRT) and runtime.name == "litert"
    x = np.concatenate([s, -s, 2 * s])
    out = runtime.run(x)
    assert out.dtype == np.float32 and out.shape == (3, 3)
    np.testing.assert_allclose(out, reference(x), rtol=1e-5, atol=1e-6)


def test_int8_io_model_is_quantized_in_and_dequantized_out(tflite_models):
    _, int8_path, s, reference = tflite_models
    runtime = open_runtime(int8_path, "tflite")
    io = runtime.io_details()
    assert io["input"]["dtype"] == "int8" and io["output"]["dtype"] == "int8"
    assert isinstance(io["input"]["scale"], float) and isinstance(io["output"]["zero_point"], int)
    x = np.linspace(0.25, 1.0, 7, dtype=np.float32)[:, None, None, None] * s
    out = runtime.run(x)
    assert out.dtype == np.float32 and out.shape == (7, 3)
    expected = reference(x)
    # A few output steps: the input's rounding propagates through two layers.
    np.testing.assert_allclose(out, expected, rtol=0, atol=4 * io["output"]["scale"])
    assert len(np.unique(out, axis=0)) == 7


@pytest.mark.parametrize(
    "fmt, runtime, fragment",
    [
        ("onnx", "litert", "runtime litert cannot run onnx files: use onnxruntime"),
        ("tflite", "onnxruntime", "runtime onnxruntime cannot run tflite files: use litert or tflite-runtime"),
        ("onnx", "tensorrt", "runtime tensorrt cannot run onnx files"),
    ],
)
def test_a_runtime_that_cannot_run_the_format_is_refused(onnx_model, fmt, runtime, fragment):
    with pytest.raises(BundleError, match=fragment):
        open_runtime(onnx_model, fmt, runtime)


def test_an_unknown_format_is_refused_with_a_bundle_error(onnx_model):
    with pytest.raises(BundleError, match="coreml"):
        open_runtime(onnx_model, "coreml")


def test_a_missing_runtime_module_falls_through_to_an_install_hint(onnx_model):
    code = (
        "import sys\n"
        "sys.modules['onnxruntime'] = None  # as if it were not installed\n"
        "from device_bench.runtimes import open_runtime\n"
        "from device_bench.manifest import BundleError\n"
        "try:\n"
        f"    open_runtime({str(onnx_model)!r}, 'onnx')\n"
        "except BundleError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "no runtime for onnx files is installed: pip install onnxruntime"
