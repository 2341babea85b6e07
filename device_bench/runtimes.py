"""One adapter per runtime behind one small interface: ``open_runtime(path, fmt).run(inputs)``.

``run`` takes the preprocessed float32 NCHW batch and returns float32 embeddings; an adapter
quantizes int8 inputs and dequantizes int8 outputs itself, with the model's own scale and
zero point. Runtimes are imported only when asked for.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from .formats import FORMATS
from .manifest import BundleError

INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime",
    "litert": "pip install ai-edge-litert",
    "tflite-runtime": "pip install tflite-runtime (needs numpy<2; prefer ai-edge-litert)",
}


# ONNX Runtime's session options per memory mode. "lean": no CPU arena (freed tensors go back to
# the system allocator instead of staying reserved) and no memory pattern (no block planned ahead
# per input shape): less resident memory, at some cost in latency.
RUN_BATCH = 256  # images per session call in run()

ORT_MEMORY = {"default": {}, "lean": {"enable_cpu_mem_arena": False, "enable_mem_pattern": False}}


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None, ort_memory: str = "default"):
        ort = importlib.import_module("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        for option, value in ORT_MEMORY[ort_memory].items():
            setattr(options, option, value)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.version = ort.__version__

    def io_details(self) -> dict:
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        describe = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8"}
        return {
            "input": {"name": inp.name, "dtype": describe.get(inp.type, inp.type), "shape": list(inp.shape), "scale": None, "zero_point": None},
            "output": {"name": out.name, "dtype": describe.get(out.type, out.type), "shape": list(out.shape), "scale": None, "zero_point": None},
        }

    def run(self, inputs: np.ndarray) -> np.ndarray:
        """At most ``RUN_BATCH`` images a call, so that a large set needs a batch's memory only."""
        outputs = [self.session.run(None, {self.input_name: np.ascontiguousarray(inputs[i : i + RUN_BATCH], dtype=np.float32)})[0] for i in range(0, len(inputs), RUN_BATCH)]
        return np.concatenate(outputs).astype(np.float32)


class _TFLiteInterpreter:
    """The TFLite interpreter API shared by ai-edge-litert and tflite-runtime; batch 1 per invoke."""

    module = ""

    def __init__(self, path: Path, threads: int | None = None, ort_memory: str = "default"):  # ort_memory: ONNX Runtime's only
        module = importlib.import_module(self.module)
        self.interpreter = module.Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.version = getattr(importlib.import_module(self.module.split(".")[0]), "__version__", "unknown")

    @staticmethod
    def _describe(detail: dict) -> dict:
        scale, zero_point = detail["quantization"]
        quantized = np.dtype(detail["dtype"]) in (np.int8, np.uint8)
        return {
            "name": detail["name"],
            "dtype": np.dtype(detail["dtype"]).name,
            "shape": [int(d) for d in detail["shape"]],
            "scale": float(scale) if quantized else None,
            "zero_point": int(zero_point) if quantized else None,
        }

    def io_details(self) -> dict:
        return {"input": self._describe(self.input), "output": self._describe(self.output)}

    def run(self, inputs: np.ndarray) -> np.ndarray:
        in_dtype = np.dtype(self.input["dtype"])
        in_scale, in_zero = self.input["quantization"]
        out_scale, out_zero = self.output["quantization"]
        outputs = []
        for x in np.asarray(inputs, dtype=np.float32):
            x = x[None]
            if in_dtype in (np.int8, np.uint8):
                info = np.iinfo(in_dtype)
                x = np.clip(np.round(x / in_scale + in_zero), info.min, info.max).astype(in_dtype)
            self.interpreter.set_tensor(self.input["index"], x)
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self.output["index"])
            if np.dtype(self.output["dtype"]) in (np.int8, np.uint8):
                y = (y.astype(np.float32) - out_zero) * out_scale
            outputs.append(y.astype(np.float32))
        return np.concatenate(outputs)


class LiteRT(_TFLiteInterpreter):
    name = "litert"
    module = "ai_edge_litert.interpreter"


class TFLiteRuntime(_TFLiteInterpreter):
    name = "tflite-runtime"
    module = "tflite_runtime.interpreter"


RUNTIMES = {cls.name: cls for cls in (OnnxRuntime, LiteRT, TFLiteRuntime)}


def open_runtime(path: Path, fmt: str, runtime: str | None = None, threads: int | None = None, ort_memory: str = "default"):
    """Open ``path`` with ``runtime``, or with the first installed runtime of its format;
    ``ort_memory`` is a key of ``ORT_MEMORY`` (ONNX Runtime's session memory options)."""
    if ort_memory not in ORT_MEMORY:
        raise BundleError(f"unknown ONNX Runtime memory mode {ort_memory!r}: choose {' or '.join(ORT_MEMORY)}")
    if fmt not in FORMATS:
        raise BundleError(f"unknown model format {fmt!r}: this device_bench knows {', '.join(FORMATS)}")
    candidates = [runtime] if runtime else list(FORMATS[fmt].runtimes)
    broken = []
    for name in candidates:
        if name not in FORMATS[fmt].runtimes:
            raise BundleError(f"runtime {name} cannot run {fmt} files: use {' or '.join(FORMATS[fmt].runtimes)}")
        try:
            return RUNTIMES[name](path, threads, ort_memory)
        except ModuleNotFoundError:
            continue
        except ImportError as exc:  # installed but unusable here, e.g. tflite-runtime built for numpy 1
            broken.append(f"{name} does not import ({exc})")
    hints = "; or ".join(INSTALL_HINTS[n] for n in candidates)
    raise BundleError(f"no runtime for {fmt} files {'works' if broken else 'is installed'}: {'; '.join(broken) + '; ' if broken else ''}{hints}")
