"""``edge-siamese export``: a trained run -> model files in each format and precision, each checked
against the PyTorch model on held-out images, in one self-describing bundle.

Driven by ``device_bench.formats.FORMATS``; each (format, precision) is one row with a status,
so that a failure in one row does not lose the others.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from device_bench.formats import FORMATS, PRECISIONS, file_name
from device_bench.manifest import MANIFEST, SCHEMA_VERSION
from device_bench.metrics import embedding_agreement
from device_bench.runtimes import open_runtime
from edge_siamese import __version__
from edge_siamese.checkpoints import METRICS, load_run
from edge_siamese.errors import UserError
from edge_siamese.files import check_replaceable
from edge_siamese.models import embed
from edge_siamese.progress import progress_bar
from edge_siamese.train import prepare_data, retrieval_distance, validation_metrics

from . import bundle
from . import onnx as onnx_export
from . import tflite as tflite_export

MIN_CALIB_SAMPLES = 16
FIDELITY_SAMPLES = 500  # held-out test images for the checks (and eval.npz)
GOLDEN_SAMPLES = 8
# (mean cosine at least, precision_at_1 drop at most, max |diff| at most) per precision.
TOLERANCES = {"fp32": (1 - 1e-6, 0.0, 1e-4), "fp16": (0.999, 0.01, None), "int8": (0.995, 0.01, None)}


@dataclass
class Row:
    format: str
    precision: str
    status: str = "failed"  # verified | degraded | failed
    fidelity: dict = field(default_factory=dict)
    entry: dict = field(default_factory=dict)
    problem: str = ""


def check_fidelity(precision: str, fid: dict) -> str:
    """'' when the exported file is faithful enough for its precision, else what is off."""
    min_mean_cos, max_p1_drop, max_diff = TOLERANCES[precision]
    problems = []
    if fid["mean_cosine"] < min_mean_cos:
        problems.append(f"mean cosine {fid['mean_cosine']:.5f} < {min_mean_cos}")
    drop = fid["reference_precision_at_1"] - fid["precision_at_1"]
    if drop > max_p1_drop + 1e-12:
        problems.append(f"precision_at_1 {fid['precision_at_1']:.4f} is {drop:.4f} below PyTorch's")
    if max_diff is not None and fid["max_abs_diff"] > max_diff:
        problems.append(f"max |diff| {fid['max_abs_diff']:.2e} > {max_diff}")
    return "; ".join(problems)


@contextmanager
def _converter_output_silenced():
    """The converters print pages of progress and warnings to fds 1 and 2; send them to /dev/null."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _export_file(fmt: str, precision: str, run, example: torch.Tensor, calibration: np.ndarray, folder: Path, metadata: dict) -> None:
    path, fp32 = folder / file_name(fmt, precision), folder / file_name(fmt, "fp32")
    module = onnx_export if fmt == "onnx" else tflite_export
    extra = (metadata,) if fmt == "onnx" else ()
    if precision == "fp32":
        module.export_fp32(run.model, example, path, *extra)
    elif precision == "fp16":
        module.export_fp16(fp32, path, *extra)
    else:
        module.export_int8(fp32, path, calibration, *extra)


def parse_formats(formats: str | None) -> list[str]:
    """The formats asked for; by default ONNX, plus TFLite when its extra is installed."""
    if formats is None:
        try:
            tflite_export.require_extra()
            return ["onnx", "tflite"]
        except UserError:
            return ["onnx"]
    names = list(dict.fromkeys(f.strip() for f in formats.split(",") if f.strip()))
    if not names:
        raise UserError(f"--format names no format: choose from {', '.join(FORMATS)}")
    for name in names:
        if name not in FORMATS:
            raise UserError(f"unknown format {name!r}: choose from {', '.join(FORMATS)}")
    if "tflite" in names:
        tflite_export.require_extra()
    return names


def export_run(
    run_dir: Path,
    out: Path,
    formats: list[str],
    precisions: list[str],
    calib_samples: int = 256,
    calib_data: str | None = None,
    force: bool = False,
    make_zip: bool = False,
    allow_degraded: bool = False,
    progress: bool = True,
) -> tuple[list[Row], Path | None]:
    """Export, check and bundle; return the rows and the bundle path (None when nothing was written)."""
    for p in precisions:
        if p not in PRECISIONS:
            raise UserError(f"unknown precision {p!r}: choose from {', '.join(PRECISIONS)}")
    if calib_samples < MIN_CALIB_SAMPLES:
        raise UserError(f"--calib-samples {calib_samples} is too few: use at least {MIN_CALIB_SAMPLES}")
    check_replaceable(out, MANIFEST, force, ", or --out to write elsewhere")
    run = load_run(run_dir)
    config = replace(run.config, dataset=calib_data) if calib_data else run.config
    try:
        data = prepare_data(config, run.preprocessing)
    except UserError as exc:
        raise UserError(f"{exc} (the run's data is needed for calibration and checks: point --calib-data at it)") from None
    train_idx = data.splits["train"]
    if len(train_idx) < calib_samples:
        raise UserError(f"--calib-samples {calib_samples} is more than the {len(train_idx)} training images: lower it")
    rng = np.random.default_rng(0)  # only the chosen images are preprocessed, not whole splits
    calibration = data.preprocessing(data.dataset.images[train_idx[np.sort(rng.choice(len(train_idx), calib_samples, replace=False))]]).numpy()
    test_idx = data.splits["test"][: FIDELITY_SAMPLES]
    test_x, test_y = data.preprocessing(data.dataset.images[test_idx]), data.dataset.labels[test_idx]

    distance, weights = retrieval_distance(run.loss)
    reference = embed(run.model, test_x).numpy()
    metrics_path = run.path / METRICS  # training's final validation metrics, thresholds included
    final = json.loads(metrics_path.read_text())["final"] if metrics_path.exists() else {
        f"val_{k}": v for k, v in validation_metrics(run.model, run.loss, data.inputs("val"), data.labels("val")).items()
    }

    manifest = _manifest(run, distance, weights, final)
    metadata = {
        "edge_siamese.schema_version": str(SCHEMA_VERSION),
        "edge_siamese.toolkit_version": __version__,
        **{f"edge_siamese.{k}": json.dumps(manifest[k]) for k in ("preprocessing", "embedding", "thresholds")},
        "edge_siamese.loss": run.config.loss,
    }

    tmp = bundle.staging_dir(out)
    try:
        rows = []
        bar = progress_bar(len(formats) * len(precisions), "export", enabled=progress, unit="file")
        for fmt in formats:
            for precision in precisions:
                row = Row(fmt, precision)
                rows.append(row)
                bar.set_postfix_str(f"{fmt} {precision}")
                try:
                    with _converter_output_silenced():
                        _export_file(fmt, precision, run, test_x, calibration, tmp, metadata)
                        runtime = open_runtime(tmp / file_name(fmt, precision), fmt)
                        outputs = runtime.run(test_x.numpy())
                    row.fidelity = embedding_agreement(outputs, reference, test_y, distance, weights)
                    row.problem = check_fidelity(precision, row.fidelity)
                    row.status = "degraded" if row.problem else "verified"
                    row.entry = {
                        **bundle.file_entry(tmp, file_name(fmt, precision)),
                        "format": fmt,
                        "precision": precision,
                        "status": row.status,
                        **runtime.io_details(),
                        "fidelity": row.fidelity,
                    }
                except Exception as exc:  # one row's failure is reported in its row, not lost
                    if isinstance(exc, UserError):
                        raise
                    row.problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                bar.update()
        bar.close()

        bad = [r for r in rows if r.status != "verified"]
        if bad and not allow_degraded:
            shutil.rmtree(tmp)
            return rows, None
        manifest["files"] = [r.entry for r in rows if r.entry]
        if not manifest["files"]:
            shutil.rmtree(tmp)
            return rows, None
        raw = data.dataset.images[test_idx]
        manifest["eval"] = bundle.write_arrays(tmp, "eval.npz", images=raw, labels=test_y)
        manifest["golden"] = bundle.write_arrays(
            tmp,
            "golden.npz",
            images=raw[:GOLDEN_SAMPLES],
            inputs=test_x[:GOLDEN_SAMPLES].numpy(),
            embeddings=reference[:GOLDEN_SAMPLES],
        )
        return rows, bundle.commit(tmp, out, manifest, make_zip)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _manifest(run, distance: str, weights, metrics: dict) -> dict:
    pre = run.preprocessing
    return {
        "schema_version": SCHEMA_VERSION,
        "toolkit_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": {"name": onnx_export.INPUT_NAME, "shape": [-1, pre.channels, *pre.input_size], "layout": "NCHW", "dtype": "float32"},
        "preprocessing": {
            "raw_range": [0.0, 1 / pre.scale],  # pixel values as the training data held them
            "resize": list(pre.input_size),
            "resize_method": "bilinear",
            "grey_conversion": "ITU-R 601-2 luma: 0.299 R + 0.587 G + 0.114 B",
            "channels": pre.channels,
            "color": "grey" if pre.channels == 1 else "rgb",
            "scale": pre.scale,
            "mean": pre.mean,
            "std": pre.std,
        },
        "embedding": {
            "output_name": onnx_export.OUTPUT_NAME,
            "dim": run.config.embedding_dim,
            "l2_normalized": run.config.resolved_head == "l2",
            "distance": distance,
            "distance_weights": None if weights is None else [float(w) for w in weights],
        },
        "thresholds": {
            "far_1e-2": metrics["val_threshold_at_far_1e-2"],
            "far_1e-3": metrics["val_threshold_at_far_1e-3"],
            "accept": "distance < threshold",
            "measured_on": f"validation split, {metrics['val_num_samples']} images",
        },
        "training": {
            "loss": run.config.loss,
            "embedding_dim": run.config.embedding_dim,
            "dataset": run.config.dataset,
            "backbone": run.config.backbone,
            "metrics": metrics,
        },
    }
