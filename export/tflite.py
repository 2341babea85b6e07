"""torch -> TFLite without TensorFlow: litert-torch converts, ai-edge-quantizer quantizes.

Needs the ``tflite`` extra (``pip install edge-siamese[tflite]``). Models are converted with a
batch of 1 and keep the NCHW layout of the PyTorch model. ``EXPORTS`` maps each precision of
``FORMATS["tflite"]`` to its writer; the model metadata goes into the flatbuffer's ``metadata``
(one named buffer per key, UTF-8), where ``read_metadata`` finds it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np

from device_bench.files import plain_file_mode
from edge_siamese.errors import UserError

from .job import ExportJob
from .quantize import Recipe, search_int8

REQUIRED = ("litert_torch", "ai_edge_quantizer", "ai_edge_litert")


def require_extra() -> None:
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"TFLite export needs {', '.join(missing)}: pip install 'edge-siamese[tflite]' (about 2 GB), or use --format onnx"
        )


def write_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Put ``metadata`` into the model's ``metadata`` entries (replacing earlier ones of the same names)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    model.metadata = [m for m in model.metadata or [] if (m.name.decode() if isinstance(m.name, bytes) else m.name) not in metadata]
    for key, value in metadata.items():
        buffer = schema.BufferT()
        buffer.data = list(value.encode())
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = key, len(model.buffers) - 1
        model.metadata.append(entry)
    flatbuffer_utils.write_model(model, str(path))
    plain_file_mode(path)  # the quantizer writes its files executable


def read_metadata(path: Path) -> dict[str, str]:
    """Every metadata entry of a ``.tflite`` file as text (those that decode as UTF-8)."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    out = {}
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        try:
            out[name] = bytes(model.buffers[entry.buffer].data).decode()
        except (UnicodeDecodeError, TypeError):
            continue
    return out


def export_fp32(job: ExportJob, path: Path) -> None:
    import litert_torch

    litert_torch.convert(job.model.eval().cpu(), (job.example[:1].cpu(),)).export(str(path))
    write_metadata(path, job.metadata)


def _quantize(job: ExportJob, path: Path, recipe, calibration: np.ndarray | None) -> None:
    """Quantize the fp32 file by ``recipe``; the calibration result of an image set is computed once
    per job (it holds every tensor's range, whatever the recipe)."""
    import ai_edge_quantizer as aq

    fp32_path = job.fp32_path("tflite")
    quantizer = aq.Quantizer(str(fp32_path), recipe)
    result = None
    if calibration is not None:
        key = ("tflite calibration", len(calibration))
        if key not in job.cache:
            signature, names = _signature(fp32_path)
            samples = [{names[0]: x[None].astype(np.float32)} for x in calibration]
            job.cache[key] = quantizer.calibrate({signature: samples}, num_threads=1)
        result = job.cache[key]
    quantizer.quantize(result, enable_progress_report=False).export_model(str(path), overwrite=True)
    write_metadata(path, job.metadata)


def _signature(path: Path) -> tuple[str, list[str]]:
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(path)).get_signature_list()
    key = next(iter(signatures))
    return key, signatures[key]["inputs"]


def export_fp16(job: ExportJob, path: Path) -> None:
    """float16 weights (ai-edge-quantizer's FLOAT_CASTING weight-only recipe), float32 arithmetic and I/O."""
    from ai_edge_quantizer import algorithm_manager, qtyping, recipe_manager

    manager = recipe_manager.RecipeManager()
    manager.add_weight_only_config(
        regex=".*",
        operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        num_bits=16,
        algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING,
    )
    _quantize(job, path, manager.get_quantization_recipe(), None)


# The ops that run in int8 (per-channel weights, int8 activations), unless the search keeps some
# float. The embedding layer (FULLY_CONNECTED) is one of them: float, it held four fifths of a
# digits convnet's file. RESHAPE stays float: the L2 head reshapes the norm, and an int8 norm
# scales the output.
INT8_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "PAD", "TRANSPOSE", "MEAN", "ADD", "MAX_POOL_2D", "AVERAGE_POOL_2D")
# The int8 search's recipes this writer makes (export.quantize.RECIPES): ai-edge-quantizer calibrates by min/max only.
INT8_RECIPES = ("minmax", "minmax-per-tensor", "minmax-4x-calibration")
# op -> its multiply-accumulates per output value, from its weight's shape
MACS_PER_OUTPUT = {
    "CONV_2D": lambda weight_shape: int(np.prod(weight_shape[1:])),  # (out, kh, kw, in)
    "DEPTHWISE_CONV_2D": lambda weight_shape: int(np.prod(weight_shape[1:3])),  # (1, kh, kw, out)
    "FULLY_CONNECTED": lambda weight_shape: int(weight_shape[1]),  # (out, in)
}


def _int8_ops(job: ExportJob) -> dict[str, tuple[str, int]]:
    """The fp32 file's ops of INT8_OPS by layer name (``INDEX:OP``), each with its output tensor's
    name (the op's scope in ai-edge-quantizer) and its multiply-accumulates per image."""
    if "tflite ops" in job.cache:
        return job.cache["tflite ops"]
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(job.fp32_path("tflite")))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    graph, ops = model.subgraphs[0], {}
    for index, op in enumerate(graph.operators):
        code = model.operatorCodes[op.opcodeIndex]
        kind = names.get(max(code.builtinCode, code.deprecatedBuiltinCode))
        if kind not in INT8_OPS:
            continue
        out = graph.tensors[op.outputs[0]]
        macs = int(np.prod(out.shape[1:])) * MACS_PER_OUTPUT[kind](list(graph.tensors[op.inputs[1]].shape)) if kind in MACS_PER_OUTPUT else 0
        ops[f"{index}:{kind}"] = (out.name.decode() if isinstance(out.name, bytes) else out.name, macs)
    job.cache["tflite ops"] = ops
    return ops


def quantize_int8(job: ExportJob, path: Path, recipe: Recipe) -> None:
    """Static int8 (weights and activations) as ``recipe`` says; its float layers are left out by
    their output tensor's name, the op's scope in ai-edge-quantizer (the last matching scope wins)."""
    from ai_edge_quantizer import algorithm_manager, qtyping, recipe_manager

    granularity = qtyping.QuantGranularity.CHANNELWISE if recipe.per_channel else qtyping.QuantGranularity.TENSORWISE
    manager = recipe_manager.RecipeManager()
    for op in INT8_OPS:
        manager.add_static_config(regex=".*", operation_name=op, activation_num_bits=8, weight_num_bits=8, weight_granularity=granularity)
    ops = _int8_ops(job)
    for layer in recipe.float_layers:
        manager.add_quantization_config(
            regex=f"^{re.escape(ops[layer][0])};$",
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE,
        )
    _quantize(job, path, manager.get_quantization_recipe(), job.calibration_set(recipe.calibration_multiple))


def int8_layers(job: ExportJob) -> dict[str, int]:
    """The layers the int8 recipes quantize, with their multiply-accumulates per image (0 for
    pads, pools and adds)."""
    return {layer: macs for layer, (_, macs) in _int8_ops(job).items()}


def export_int8(job: ExportJob, path: Path) -> dict | None:
    """The int8 search's file (``export.quantize``): its record for the manifest."""
    return search_int8(job, sys.modules[__name__], "tflite", path)


EXPORTS = {"fp32": export_fp32, "fp16": export_fp16, "int8": export_int8}
