"""torch -> ONNX / TFLite export, quantization, fidelity checks and the bundle writer (issue 4)."""
