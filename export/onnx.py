"""torch -> ONNX (fp32, dynamic batch), fp16 conversion and ONNX Runtime static int8 quantization.

``EXPORTS`` maps each precision of ``FORMATS["onnx"]`` to its writer; the model metadata goes
into ``metadata_props``.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np
import torch

from .job import ExportJob
from .quantize import Recipe, search_int8

# ``onnx`` is imported in the writers, not here: with ml_dtypes it costs the CLI's every start ~1.5 s.

INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


def export_fp32(job: ExportJob, path: Path) -> None:
    """The model with a dynamic batch axis, checked by ``onnx.checker``, the metadata in ``metadata_props``."""
    model = job.model.eval().cpu()
    torch.onnx.export(
        model,
        (job.example[:2].cpu(),),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        external_data=False,
        verbose=False,
    )
    _finish(path, job.metadata)


def _finish(path: Path, metadata: dict[str, str], proto=None) -> None:
    """Write ``metadata`` into the ``metadata_props`` of ``proto`` (else of the model at ``path``),
    check the model and save it at ``path``."""
    import onnx

    proto = onnx.load(str(path)) if proto is None else proto
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_fp16(job: ExportJob, path: Path) -> None:
    """Weights and arithmetic in float16; the input and output stay float32 for the caller."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(job.fp32_path("onnx"))), keep_io_types=True)
    _sort_nodes(proto.graph)  # the converter appends its input casts after their consumers
    _finish(path, job.metadata, proto)


def _sort_nodes(graph) -> None:
    """Order the graph's nodes so that each comes after the producers of its inputs."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        progress = [n for n in pending if all(i in ready for i in n.input)]
        if not progress:
            raise ValueError("the fp16 graph has a cycle or a dangling input")
        for node in progress:
            ready.update(node.output)
            ordered.append(node)
        pending = [n for n in pending if all(n is not p for p in progress)]
    del graph.node[:]
    graph.node.extend(ordered)


def cpu_needs_reduce_range() -> bool:
    """7-bit weights avoid int8 overflow only on x86 CPUs without VNNI; elsewhere they cost accuracy."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


# The int8 search's recipes this writer makes (export.quantize.RECIPES), and ONNX Runtime's names for them.
INT8_RECIPES = ("minmax", "percentile", "entropy", "minmax-symmetric", "minmax-per-tensor", "minmax-4x-calibration")
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the nodes whose multiply-accumulates int8 speeds up


def quantize_int8(job: ExportJob, path: Path, recipe: Recipe) -> None:
    """ONNX Runtime static quantization: QDQ, int8 weights, uint8 activations (U8S8), as ``recipe`` says.

    ONNX Runtime's x86 int8 convolutions take uint8 activations (VNNI multiplies u8 by s8):
    with int8 ones (S8S8) a MobileNetV3 kept 11 of its 53 Convs in float and gained 29 layout
    Transposes, and ran slower in every paired measurement (docs/benchmarks.md), at the same
    fidelity. ARM64's kernels take either. The calibration ranges of a (method, image set) are
    computed once and cached beside ``path`` for the search's later attempts."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    images = job.calibration_set(recipe.calibration_multiple).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(images, max(1, len(images) // 32)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    quantize_static(
        str(job.fp32_path("onnx")),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=recipe.per_channel,
        reduce_range=cpu_needs_reduce_range(),
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(recipe.float_layers),
        calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[recipe.calibration]),
        calibration_cache_path=str(path.parent / f"calibration-{recipe.calibration}-{len(images)}.json"),
        extra_options={"ActivationSymmetric": recipe.symmetric_activations},
    )
    _finish(path, job.metadata)


def int8_layers(job: ExportJob) -> dict[str, int]:
    """The fp32 file's nodes that ``quantize_static`` quantizes, by name, with their
    multiply-accumulates per image (Conv, Gemm and MatMul; 0 for the others)."""
    import onnx
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    model = onnx.shape_inference.infer_shapes(onnx.load(str(job.fp32_path("onnx"))))
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim] for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    layers = {}
    for node in model.graph.node:
        if node.op_type not in QDQRegistry and node.op_type not in QLinearOpsRegistry:  # quantize_static's default op types
            continue
        out, weight = shapes.get(node.output[0]), shapes.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type not in MAC_OPS or out is None or weight is None:
            layers[node.name] = 0
        elif node.op_type in ("Conv", "ConvTranspose"):  # weight (out, in / groups, *kernel): in / groups * kernel products per output value
            layers[node.name] = int(np.prod(out[1:])) * int(np.prod(weight[1:]))
        else:  # (.., K) x (K, N) -> (.., N), or Gemm's transposed weight: K products per output value
            k = weight[-1] if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute) else weight[-2]
            layers[node.name] = int(np.prod(out[1:])) * int(k)
    return layers


def export_int8(job: ExportJob, path: Path) -> dict | None:
    """The int8 search's file (``export.quantize``): its record for the manifest."""
    return search_int8(job, sys.modules[__name__], "onnx", path)


EXPORTS = {"fp32": export_fp32, "fp16": export_fp16, "int8": export_int8}
