"""``edge-siamese export``: a trained run -> model files in each format and precision, each checked
against the PyTorch model on held-out images, in one self-describing bundle.

Driven by the tables of ``device_bench.formats``: each format's writers (``WRITERS``), each
precision's tolerances (``PRECISIONS``). Each (format, precision) is one row with a status, so
that a failure in one row does not lose the others.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from device_bench.formats import FILE_PRECISIONS, FORMATS, PRECISIONS, file_name
from device_bench.manifest import MANIFEST, SCHEMA_VERSION
from device_bench.metrics import check_finite, embedding_agreement
from device_bench.preprocessing import INPUT_LAYOUT
from device_bench.runtimes import open_runtime
from edge_siamese import __version__
from edge_siamese.checkpoints import METRICS, load_run
from edge_siamese.errors import UserError
from edge_siamese.evaluate import validation_metrics
from edge_siamese.files import check_replaceable
from edge_siamese.models import HEADS, embed
from edge_siamese.progress import progress_bar
from edge_siamese.run import prepare_data, read_index

from . import bundle
from . import onnx as onnx_export
from . import qat
from . import tflite as tflite_export
from .job import CALIB_SAMPLES, ExportJob, Gate

# One writer module per entry of FORMATS; each has EXPORTS, a writer per precision of its format.
WRITERS = {"onnx": onnx_export, "tflite": tflite_export}
MIN_CALIB_SAMPLES = 16
EVAL_SAMPLES = 500  # held-out test images eval.npz keeps for the device's accuracy figures
# Held-out test images each file is checked on: as many as memory allows, up to CHECK_SAMPLES.
# 500 were too few: an int8 file lost 3.2 points of precision_at_1 on the first 500 open-set test
# images of Fashion-MNIST, 0.3 on the first 2,000 and 1.8 on all 35,000.
CHECK_SAMPLES = 5000
CHECK_BYTES = 256 * 2**20  # of preprocessed float32 inputs held at once
GATE_SAMPLES = 2000  # validation images the int8 search measures on
GOLDEN_SAMPLES = 8


@dataclass
class Row:
    format: str
    precision: str
    status: str = "failed"  # verified | degraded | failed
    fidelity: dict = field(default_factory=dict)
    entry: dict = field(default_factory=dict)
    problem: str = ""
    int8: dict | None = None  # the int8 search's record (export.quantize), for int8 files
    qat: dict | None = None  # the manifest's ``qat`` record, when the file comes from the quantization-aware fine-tune


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


def default_formats() -> list[str]:
    """ONNX, plus TFLite when its extra is installed."""
    try:
        tflite_export.require_extra()
        return ["onnx", "tflite"]
    except UserError:
        return ["onnx"]


def check_formats(names: list[str]) -> list[str]:
    """``names`` without repeats, each a format of FORMATS whose writer can run here; else a UserError."""
    names = list(dict.fromkeys(names))
    if not names:
        raise UserError(f"no format given: choose from {', '.join(FORMATS)}")
    for name in names:
        if name not in FORMATS:
            raise UserError(f"unknown format {name!r}: choose from {', '.join(FORMATS)}")
    if "tflite" in names:
        tflite_export.require_extra()
    return names


def parse_formats(text: str | None) -> list[str]:
    """A ``--format`` value (comma-separated; None: ``default_formats()``)."""
    return default_formats() if text is None else check_formats([f.strip() for f in text.split(",") if f.strip()])


def export_run(
    run_dir: Path,
    out: Path,
    formats: list[str],
    precisions: list[str],
    calib_samples: int = CALIB_SAMPLES,
    calib_data: str | None = None,
    force: bool = False,
    make_zip: bool = False,
    allow_degraded: bool = False,
    progress: bool = True,
    qat_epochs: int = 0,
) -> tuple[list[Row], Path | None]:
    """Export, check and bundle; return the rows and the bundle path (None when nothing was written).
    With ``qat_epochs``, when an int8 search ends without passing its gate, the bundle is made
    again from a quantization-aware fine-tune of the model (``export.qat``)."""
    for p in precisions:
        if p not in FILE_PRECISIONS:
            raise UserError(f"unknown precision {p!r}: choose from {', '.join(FILE_PRECISIONS)}")
    if calib_samples < MIN_CALIB_SAMPLES:
        raise UserError(f"--calib-samples {calib_samples} is too few: use at least {MIN_CALIB_SAMPLES}")
    if qat_epochs < 0 or (qat_epochs and "int8" not in precisions):
        raise UserError(f"--qat {qat_epochs}: give a positive number of epochs, with --int8")
    check_replaceable(out, MANIFEST, force, ", or --out to write elsewhere")
    run = load_run(run_dir)
    config = replace(run.config, dataset=calib_data) if calib_data else run.config
    try:
        data = prepare_data(config, run.preprocessing, read_index(run_dir))
    except UserError as exc:
        raise UserError(f"{exc} (the run's data is needed for calibration and checks: point --calib-data at it)") from None
    train_idx = data.splits["train"]
    if len(train_idx) < calib_samples:
        raise UserError(f"--calib-samples {calib_samples} is more than the {len(train_idx)} training images: lower it")
    rng = np.random.default_rng(0)  # only the chosen images are preprocessed, not whole splits
    calibration_order = rng.permutation(len(train_idx))  # int8 calibrates on its first images

    def calibration_images(n: int) -> np.ndarray:
        return data.inputs("train", np.sort(calibration_order[:n])).numpy()

    raw = data.images("test", slice(0, EVAL_SAMPLES))  # at the input size, as eval.npz and golden.npz keep them
    fits = CHECK_BYTES // (4 * raw[0].size)  # preprocessed images held at once
    checked = slice(0, min(CHECK_SAMPLES, max(EVAL_SAMPLES, fits)))
    test = data.inputs("test", checked), data.labels("test", checked)
    check_free_space(out, run.model, len(formats) * len(precisions), raw.nbytes)

    def bundle_of(model: torch.nn.Module, final: dict, folder: Path) -> tuple[list[Row], np.ndarray, dict]:
        """Every file of ``model`` written into ``folder`` and checked; the rows, the reference
        embeddings of the test images, and the manifest so far."""
        manifest = _manifest(run, final)
        metadata = {
            "edge_siamese.schema_version": str(SCHEMA_VERSION),
            "edge_siamese.toolkit_version": __version__,
            **{f"edge_siamese.{k}": json.dumps(manifest[k]) for k in ("preprocessing", "embedding", "thresholds")},
            "edge_siamese.loss": run.config.loss,
        }
        reference = _reference(model, test[0])
        validation = _gate(model, run.loss, data, calibration_order[calib_samples:][::-1], min(GATE_SAMPLES, fits)) if "int8" in precisions else None
        job = ExportJob(model, test[0], calibration_images(calib_samples), metadata, folder, validation, calibration_images)
        return _write_files(job, formats, precisions, reference, test[1], run.loss, progress), reference, manifest

    tmp = bundle.staging_dir(out)
    try:
        trained_final = _final_metrics(run, data)
        rows, reference, manifest = bundle_of(run.model, trained_final, tmp)
        short = [r.format for r in rows if r.precision == "int8" and not (r.int8 and r.int8["passed_gate"])]
        if qat_epochs and short:
            started = time.perf_counter()
            tuned = qat.fine_tune(run, data, qat_epochs, progress)
            fine_tune_s = time.perf_counter() - started
            shutil.rmtree(tmp)
            tmp = bundle.staging_dir(out)
            trained = _precision_at_1(reference, test[1], run.loss)
            final = {f"val_{k}": v for k, v in validation_metrics(tuned, run.loss, data, "val").items()}
            rows, reference, manifest = bundle_of(tuned, final, tmp)
            manifest["qat"] = {
                "epochs": qat_epochs,
                "lr": run.config.lr * qat.LR_FACTOR,
                "why": f"post-training int8 missed the gate for {', '.join(short)}",
                "trained_precision_at_1": trained,
                "precision_at_1": _precision_at_1(reference, test[1], run.loss),
                "trained_val_precision_at_1": trained_final["val_precision_at_1"],
                "val_precision_at_1": final["val_precision_at_1"],
                "fine_tune_s": fine_tune_s,
            }
            for r in rows:  # the bundle's files now follow the tuned model: what each keeps of the trained one's accuracy decides too
                _check_against_trained(r, trained)
                r.qat = manifest["qat"]

        bad = [r for r in rows if r.status != "verified"]
        if bad and not allow_degraded:
            return rows, None
        manifest["files"] = [r.entry for r in rows if r.entry]
        if not manifest["files"]:
            return rows, None
        manifest["eval"] = bundle.write_arrays(tmp, "eval.npz", images=raw, labels=test[1][: len(raw)])
        manifest["golden"] = bundle.write_arrays(
            tmp,
            "golden.npz",
            images=raw[:GOLDEN_SAMPLES],
            inputs=test[0][:GOLDEN_SAMPLES].numpy(),
            embeddings=reference[:GOLDEN_SAMPLES],
        )
        return rows, bundle.commit(tmp, out, manifest, make_zip)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_files(job: ExportJob, formats: list[str], precisions: list[str], reference: np.ndarray, labels: np.ndarray, loss, progress: bool) -> list[Row]:
    """One row per (format, precision): the file written into ``job.folder``, run in its runtime on
    the test images and checked against ``reference`` by its precision's tolerances."""
    distance, weights = loss.distance.name, loss.distance.weights_array()
    rows = []
    bar = progress_bar(len(formats) * len(precisions), "export", enabled=progress, unit="file")
    for fmt in formats:
        for precision in precisions:
            row = Row(fmt, precision)
            rows.append(row)
            bar.set_postfix_str(f"{fmt} {precision}")
            path = job.folder / file_name(fmt, precision)
            try:
                with _converter_output_silenced():
                    row.int8 = WRITERS[fmt].EXPORTS[precision](job, path)
                    runtime = open_runtime(path, fmt)
                    outputs = runtime.run(job.example.numpy())
                row.fidelity = embedding_agreement(outputs, reference, labels, distance, weights)
                row.problem = PRECISIONS[precision].problems(row.fidelity)
                row.status = "degraded" if row.problem else "verified"
                row.entry = {
                    **bundle.file_entry(job.folder, file_name(fmt, precision)),
                    "format": fmt,
                    "precision": precision,
                    "status": row.status,
                    **runtime.io_details(),
                    "fidelity": row.fidelity,
                    **({"int8": row.int8} if row.int8 else {}),
                }
            except Exception as exc:  # one row's failure is reported in its row, not lost
                if isinstance(exc, (UserError, OSError)):  # the user's to fix, or the disk's: not this row's
                    raise
                row.problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            bar.update()
    bar.close()
    return rows


def _precision_at_1(embeddings: np.ndarray, labels: np.ndarray, loss) -> float:
    return embedding_agreement(embeddings, embeddings, labels, loss.distance.name, loss.distance.weights_array())["precision_at_1"]


def _check_against_trained(row: Row, trained_precision_at_1: float) -> None:
    """After the quantization-aware fine-tune a file must also keep the trained model's
    precision_at_1 within int8's tolerance, whatever its precision: the fine-tune is int8's, so it
    may cost what int8 may, and the file's own reference is no longer the trained model."""
    if not row.fidelity:
        return
    drop = trained_precision_at_1 - row.fidelity["precision_at_1"]
    if not drop <= PRECISIONS["int8"].max_precision_at_1_drop + 1e-12:
        lost = f"precision_at_1 {row.fidelity['precision_at_1']:.4f} is {drop:.4f} below the trained model's (before the quantization-aware fine-tune)"
        row.problem = "; ".join(filter(None, [row.problem, lost]))
        row.status = row.entry["status"] = "degraded"


def _reference(model: torch.nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """The trained model's embeddings of ``inputs``, every exported file's reference."""
    try:
        return check_finite(embed(model, inputs).numpy(), "the trained model's embeddings of the held-out images")
    except ValueError as exc:
        raise UserError(f"{exc}: the model's weights are not finite; train it again with a lower --lr") from None


def _gate(model: torch.nn.Module, loss, data, spare_train: np.ndarray, count: int) -> Gate:
    """The int8 search's images: ``count`` of the validation split, topped up with
    training images outside the default calibration set (``spare_train``, those calibration
    reaches last first) when it holds fewer, so that a small validation split does not leave the
    search measuring a handful of images. Never the test images, whose check is the final verdict."""
    val = np.sort(np.random.default_rng(1).permutation(len(data.splits["val"]))[:count])
    parts = [("val", val), ("train", np.sort(spare_train[: count - len(val)]))]
    inputs = torch.cat([data.inputs(split, rows) for split, rows in parts if len(rows)])
    labels = np.concatenate([data.labels(split, rows) for split, rows in parts])
    return Gate(inputs.numpy(), labels, _reference(model, inputs), loss.distance.name, loss.distance.weights_array())


def _final_metrics(run, data) -> dict:
    """Training's final validation metrics (thresholds included), or computed when metrics.json is gone."""
    path = run.path / METRICS
    if not path.exists():
        return {f"val_{k}": v for k, v in validation_metrics(run.model, run.loss, data, "val").items()}
    try:
        final = json.loads(path.read_text())["final"]
        for key in ("val_threshold_at_far_1e-2", "val_threshold_at_far_1e-3", "val_num_samples"):
            if not (isinstance(final[key], (int, float)) and math.isfinite(final[key])):
                raise ValueError(f"{key} is {final[key]!r}")
        return final
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is corrupt ({exc}): delete it to have export measure the thresholds again, or train again") from None


def check_free_space(out: Path, model: torch.nn.Module, files: int, eval_bytes: int) -> None:
    """Stop before writing when the disk cannot hold the bundle: the TFLite converter ends the whole
    process (LLVM's exit) on a full disk instead of raising. A file holds at most the float32
    weights and its graph; twice the sum leaves room for the converters' own temporaries."""
    weights = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    needed = 2 * (files * (weights + 2**20) + 2 * eval_bytes) + 2**20
    folder = Path(out).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(f"no space left on device for the bundle: {folder} has {free / 2**20:.1f} MB free, the export needs about {needed / 2**20:.1f} MB; free some space or choose another --out")


def _manifest(run, metrics: dict) -> dict:
    pre = run.preprocessing
    return {
        "schema_version": SCHEMA_VERSION,
        "toolkit_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": {"name": onnx_export.INPUT_NAME, "shape": [-1, pre.channels, *pre.resize], "layout": INPUT_LAYOUT, "dtype": "float32"},
        "preprocessing": pre.to_dict(),
        "embedding": {
            "output_name": onnx_export.OUTPUT_NAME,
            "dim": run.config.embedding_dim,
            "l2_normalized": HEADS[run.config.resolved_head].l2_normalized,
            "distance": run.loss.distance.name,
            "distance_weights": None if (w := run.loss.distance.weights_array()) is None else [float(v) for v in w],
        },
        "thresholds": {
            "far_1e-2": metrics["val_threshold_at_far_1e-2"],
            "far_1e-3": metrics["val_threshold_at_far_1e-3"],
            "accept": "distance < threshold",
            "measured_on": f"validation split, {metrics['val_num_samples']} images",
        },
        "training": {
            "loss": run.config.loss,
            "dataset": run.config.dataset,
            "backbone": run.config.backbone,
            "metrics": metrics,
        },
    }
