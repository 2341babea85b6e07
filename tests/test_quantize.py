"""export.quantize, the int8 search, and the writers' int8 pieces it drives, on the digits run of
the README through the real quantizers (ONNX Runtime's, ai-edge-quantizer) and runtimes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from conftest import run_cli
from device_bench.formats import PRECISIONS, Precision
from device_bench.manifest import read_bundle
from edge_siamese.checkpoints import load_run
from export import onnx as onnx_export
from export import tflite as tflite_export
from edge_siamese.config import TrainConfig
from edge_siamese.train import train
from export.exporter import GATE_SAMPLES, export_run
from export.job import ExportJob
from export.quantize import MIN_INT8_MAC_FRACTION, Recipe

WRITERS = {"onnx": onnx_export, "tflite": tflite_export}
STRICT = Precision(1, 0.0, 1e-9, None, None)  # no int8 file reaches a relative error of 1e-9


@pytest.fixture(scope="module")
def strict(shadow_run, tmp_path_factory):
    """ONNX and TFLite int8 under a gate no file passes: the whole search, its rows and bundle."""
    out = tmp_path_factory.mktemp("strict") / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRECISIONS, "int8", STRICT)
        rows, bundle = export_run(shadow_run, out, ["onnx", "tflite"], ["fp32", "int8"], allow_degraded=True, progress=False)
    return {r.format: r for r in rows if r.precision == "int8"}, bundle


@pytest.fixture(scope="module")
def job(shadow_run, tmp_path_factory):
    """A writer's job on the trained digits model, with its fp32 ONNX and TFLite files written."""
    run = load_run(shadow_run)
    pre = run.preprocessing
    rng = np.random.default_rng(0)
    calibration = rng.uniform(-1, 1, size=(32, pre.channels, *pre.resize)).astype(np.float32)
    job = ExportJob(run.model, torch.from_numpy(calibration[:4]), calibration, {}, tmp_path_factory.mktemp("job"))
    onnx_export.export_fp32(job, job.fp32_path("onnx"))
    tflite_export.export_fp32(job, job.fp32_path("tflite"))
    return job


@pytest.mark.parametrize("fmt", WRITERS)
def test_an_exhausted_search_tries_every_recipe_then_mixed_precision_and_keeps_the_closest(strict, fmt):
    rows, bundle = strict
    record, writer = rows[fmt].int8, WRITERS[fmt]
    attempts = record["attempts"]
    kinds = [a["kind"] for a in attempts]
    assert [a["recipe"] for a in attempts if a["kind"] == "recipe"] == list(writer.INT8_RECIPES)
    assert kinds == sorted(kinds, key=["recipe", "sensitivity", "mixed"].index)  # recipes, then the ranking, then mixed precision
    sensitivity = [a for a in attempts if a["kind"] == "sensitivity"]
    mixed = [a for a in attempts if a["kind"] == "mixed"]
    assert len(sensitivity) >= 5 and mixed
    assert [a["recipe"].rsplit(" +", 1)[1] for a in mixed] == [f"{2**i} float" for i in range(len(mixed))]  # 1, 2, 4, ... layers
    assert all(a["int8_mac_fraction"] >= MIN_INT8_MAC_FRACTION for a in mixed)
    assert [a["int8_mac_fraction"] for a in mixed] == sorted((a["int8_mac_fraction"] for a in mixed), reverse=True)
    candidates = [a for a in attempts if a["kind"] != "sensitivity"]
    assert not record["passed_gate"] and not any(a["passed"] for a in candidates)
    closest = min(candidates, key=lambda a: (max(0.0, a["precision_at_1_drop"]), a["relative_error"]))
    assert record["recipe"] == closest["recipe"] and record["int8_mac_fraction"] == closest["int8_mac_fraction"]
    entry = read_bundle(bundle).file(fmt, "int8")
    assert entry["status"] == "degraded" and entry["int8"] == record
    assert record["calibration_samples"] == 256 * record["calibration_multiple"]
    assert record["gate_images"] == 144 + 1038  # digits' validation images, topped up with every training image outside the 256 calibrated on


def test_a_large_validation_split_alone_feeds_the_search(tmp_path):
    """7,000 images, 3,150 of them validation (val_fraction 0.45), so the search
    measures GATE_SAMPLES of those and no training image."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(10), 700)
    images = (rng.integers(0, 60, size=(7000, 8, 8)) + 19 * labels[:, None, None]).astype(np.uint8)
    np.savez(tmp_path / "data.npz", images=images, labels=labels)
    train(TrainConfig(dataset=str(tmp_path / "data.npz"), epochs=1, val_fraction=0.45, workers=0), tmp_path / "run", progress=False)
    rows, _ = export_run(tmp_path / "run", tmp_path / "bundle", ["onnx"], ["fp32", "int8"], allow_degraded=True, progress=False)
    assert rows[1].int8["gate_images"] == GATE_SAMPLES and rows[1].int8["attempts"]


@pytest.mark.parametrize("fmt", WRITERS)
def test_the_search_stops_at_the_first_attempt_that_passes(shadow_run, strict, fmt, tmp_path, monkeypatch):
    """With the gate at the relative error of the last mixed-precision attempt, the search ends at
    the first attempt (in its order) that is at least that close: the same files, measured alike."""
    attempts = strict[0][fmt].int8["attempts"]
    candidates = [a for a in attempts if a["kind"] != "sensitivity"]
    bar = candidates[-1]["relative_error"]
    expected = next(a for a in candidates if a["relative_error"] <= bar)
    monkeypatch.setitem(PRECISIONS, "int8", replace(STRICT, max_precision_at_1_drop=1.0, max_relative_error=bar))
    rows, _ = export_run(shadow_run, tmp_path / "bundle", [fmt], ["fp32", "int8"], allow_degraded=True, progress=False)
    record = rows[1].int8
    assert record["passed_gate"] and record["recipe"] == expected["recipe"]
    assert record["attempts"][-1]["recipe"] == expected["recipe"] and record["attempts"][-1]["passed"]
    assert [a["relative_error"] for a in record["attempts"]] == [a["relative_error"] for a in attempts[: len(record["attempts"])]]


def _float_onnx_nodes(path) -> set[str]:
    """The Conv/Gemm nodes of an ONNX file whose weight is a float initializer, not a DequantizeLinear's output."""
    graph = onnx.load(str(path)).graph
    initializers = {t.name for t in graph.initializer}
    return {n.name for n in graph.node if n.op_type in onnx_export.MAC_OPS and n.input[1] in initializers}


def test_onnx_float_layers_stay_float_and_the_rest_is_int8(job):
    layers = onnx_export.int8_layers(job)
    macs = [name for name, m in layers.items() if m]
    keep = (macs[0], macs[-1])
    onnx_export.quantize_int8(job, job.folder / "all.onnx", Recipe())
    onnx_export.quantize_int8(job, job.folder / "mixed.onnx", Recipe(float_layers=keep))
    assert _float_onnx_nodes(job.folder / "all.onnx") == set()
    assert _float_onnx_nodes(job.folder / "mixed.onnx") == set(keep)


def _tflite_op_types(path) -> list[tuple[str, str]]:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    graph = model.subgraphs[0]
    out = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        out.append((ops[max(code.builtinCode, code.deprecatedBuiltinCode)], types[graph.tensors[op.outputs[0]].type]))
    return out


def test_tflite_float_layers_stay_float_and_the_rest_is_int8(job):
    layers = tflite_export.int8_layers(job)
    keep = tuple(name for name in layers if name.endswith((":CONV_2D", ":FULLY_CONNECTED")))[-2:]
    tflite_export.quantize_int8(job, job.folder / "all.tflite", Recipe())
    tflite_export.quantize_int8(job, job.folder / "mixed.tflite", Recipe(float_layers=keep))
    fp32, everything, mixed = (_tflite_op_types(job.folder / name) for name in ("model_fp32.tflite", "all.tflite", "mixed.tflite"))
    float_ops = {int(name.split(":")[0]) for name in keep}
    assert all(kind == "FLOAT32" for _, kind in fp32)
    assert [op for op, kind in everything if op in ("CONV_2D", "FULLY_CONNECTED")] and all(
        kind == "INT8" for op, kind in everything if op in ("CONV_2D", "FULLY_CONNECTED")
    )
    kept = [(op, kind) for op, kind in mixed if op in ("CONV_2D", "FULLY_CONNECTED")]  # QUANTIZE/DEQUANTIZE ops shift indices
    assert [kind for _, kind in kept].count("FLOAT32") == len(float_ops) and "INT8" in [kind for _, kind in kept]


@pytest.mark.parametrize("fmt", WRITERS)
def test_int8_layers_count_the_models_multiply_accumulates(job, fmt):
    """The writers' MAC counts, from the exported graph's shapes, equal torch's from its layers."""
    counted = []

    def hook(module, inputs, output):
        per_output = module.weight[0].numel() if isinstance(module, torch.nn.Conv2d) else module.in_features
        counted.append(output[0].numel() * per_output)

    handles = [m.register_forward_hook(hook) for m in job.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        job.model.eval()(job.example[:1])
    for h in handles:
        h.remove()
    assert sum(WRITERS[fmt].int8_layers(job).values()) == sum(counted) > 0
