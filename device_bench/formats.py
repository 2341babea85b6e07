"""The tables every layer reads: export formats, precisions (with their fidelity tolerances) and
the status words of a row. The exporter, the bundle, device_bench, the targets, compare's report
and the docs all name things as these tables do."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    suffix: str
    precisions: tuple[str, ...]
    runtimes: tuple[str, ...]  # the runtimes that can run it, preferred first
    metadata: str  # where the model metadata goes in the file


FORMATS: dict[str, Format] = {
    "onnx": Format(".onnx", ("fp32", "fp16", "int8"), ("onnxruntime",), "ModelProto.metadata_props"),
    "tflite": Format(".tflite", ("fp32", "fp16", "int8"), ("litert", "tflite-runtime"), "Model.metadata (one buffer per key)"),
}


@dataclass(frozen=True)
class Precision:
    """How values are stored and how close a file of this precision must stay to the trained model
    (the figures of ``device_bench.metrics.embedding_agreement``; None: not checked)."""

    bytes_per_value: int
    max_precision_at_1_drop: float  # points of precision_at_1 lost, at most
    max_relative_error: float | None  # mean |e - e_torch| over the mean distance between two images, at most
    min_mean_cosine: float | None  # mean cosine to the PyTorch fp32 embeddings, at least
    max_abs_diff: float | None  # largest |difference| of an embedding component, at most

    def problems(self, fidelity: dict) -> str:
        """'' when ``fidelity`` meets every tolerance, else what is off ("; "-separated).
        Written as ``not within`` so that NaN fails."""
        problems = []
        drop = fidelity["reference_precision_at_1"] - fidelity["precision_at_1"]
        if not drop <= self.max_precision_at_1_drop + 1e-12:
            problems.append(f"precision_at_1 {fidelity['precision_at_1']:.4f} is {drop:.4f} below PyTorch's")
        if self.max_relative_error is not None and not fidelity["relative_error"] <= self.max_relative_error:
            problems.append(f"relative error {fidelity['relative_error']:.4f} > {self.max_relative_error}")
        if self.min_mean_cosine is not None and not fidelity["mean_cosine"] >= self.min_mean_cosine:
            problems.append(f"mean cosine {fidelity['mean_cosine']:.5f} < {self.min_mean_cosine}")
        if self.max_abs_diff is not None and not fidelity["max_abs_diff"] <= self.max_abs_diff:
            problems.append(f"max |diff| {fidelity['max_abs_diff']:.2e} > {self.max_abs_diff}")
        return "; ".join(problems)


# int8 is judged by what retrieval needs, not by cosine: on a model whose embeddings barely vary
# between images, int8 kept a mean cosine of 0.99998 and lost 10 points of precision_at_1; its
# relative error was 0.20, against 0.01-0.06 for int8 files that kept precision_at_1.
PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(4, 0.0, 1e-4, 1 - 1e-6, 1e-4),
    "fp16": Precision(2, 0.01, 0.01, 0.999, None),
    "bf16": Precision(2, 0.01, 0.02, 0.995, None),  # the cuda target's autocast-free bf16 model; no file format holds it
    "int8": Precision(1, 0.01, 0.05, None, None),
}

# One vocabulary for every row: an exported file, a benchmark row, a compare table row.
STATUSES: dict[str, str] = {
    "reference": "the trained PyTorch model every other row is checked against",
    "verified": "ran in its runtime and matched the trained model within its precision's tolerances",
    "degraded": "ran, but missed a tolerance; kept only with --allow-degraded",
    "failed": "could not be exported, or failed its golden check; the row says why",
    "not_measured": "not run here (no such runtime or device); the row says why",
}


def file_name(fmt: str, precision: str) -> str:
    """The bundle's name for a model file, e.g. ``model_int8.onnx``."""
    return f"model_{precision}{FORMATS[fmt].suffix}"


# The precisions a model file can have (bf16 is the cuda target's alone).
FILE_PRECISIONS: tuple[str, ...] = tuple(dict.fromkeys(p for f in FORMATS.values() for p in f.precisions))
