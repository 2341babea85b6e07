"""torch -> ONNX / TFLite export, quantization, fidelity checks and the bundle writer.

Imports the library (to rebuild a trained run) and ``device_bench`` (to run what it wrote);
never the application.
"""
