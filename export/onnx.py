"""torch -> ONNX (fp32, dynamic batch), fp16 conversion and ONNX Runtime static int8 quantization.

``EXPORTS`` maps each precision of ``FORMATS["onnx"]`` to its writer; the model metadata goes
into ``metadata_props``.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import torch

from .job import ExportJob

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


def export_int8(job: ExportJob, path: Path) -> None:
    """ONNX Runtime static quantization: QDQ, int8 per-channel weights, uint8 activations (U8S8).

    ONNX Runtime's x86 int8 convolutions take uint8 activations (VNNI multiplies u8 by s8):
    with int8 ones (S8S8) a MobileNetV3 kept 11 of its 53 Convs in float and gained 29 layout
    Transposes, and ran slower in every paired measurement (docs/benchmarks.md), at the same
    fidelity. ARM64's kernels take either."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(job.calibration.astype(np.float32), max(1, len(job.calibration) // 32)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    quantize_static(
        str(job.fp32_path("onnx")),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=cpu_needs_reduce_range(),
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    _finish(path, job.metadata)


EXPORTS = {"fp32": export_fp32, "fp16": export_fp16, "int8": export_int8}
