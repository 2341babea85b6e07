"""The one table of export formats: it drives the exporter, the checks, the bundle and the report rows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    precisions: tuple[str, ...]
    runtimes: tuple[str, ...]  # the runtimes that can run it, preferred first


FORMATS: dict[str, Format] = {
    "onnx": Format("onnx", ".onnx", ("fp32", "fp16", "int8"), ("onnxruntime",)),
    "tflite": Format("tflite", ".tflite", ("fp32", "fp16", "int8"), ("litert", "tflite-runtime")),
}
PRECISIONS = ("fp32", "fp16", "int8")


def file_name(fmt: str, precision: str) -> str:
    """The bundle's name for a model file, e.g. ``model_int8.onnx``."""
    return f"model_{precision}{FORMATS[fmt].suffix}"
