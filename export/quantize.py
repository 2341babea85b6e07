"""``--int8`` that keeps its accuracy: each format's int8 file is the first of a search to pass int8's gate.

Cheapest first, as accuracy-aware tuning goes (Intel Neural Compressor's, ai-edge-quantizer's
recipes):

1. ``RECIPES``, post-training settings in their order: MinMax calibration (the default),
   Percentile, Entropy, symmetric activations, per-tensor weights, four times the calibration
   images. A format's writer makes those it can (its ``INT8_RECIPES``).
2. Mixed precision: the recipe that came closest, with its most sensitive layers kept in float,
   1, 2, 4, ... of them, while at least ``MIN_INT8_MAC_FRACTION`` of the layers'
   multiply-accumulates stay int8. A layer's sensitivity is the relative error of the model with
   that layer alone quantized.

The gate is int8's tolerances (``device_bench.formats.PRECISIONS``) on the job's ``validation``
images (the exporter's ``_gate``: validation images, topped up with training images calibration
did not use): the search never sees the test images that the exporter's final check, and the
manifest's fidelity figures, come from. Each writer module that makes int8 files has ``INT8_RECIPES``,
``quantize_int8(job, path, recipe)`` and ``int8_layers(job)``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType

from device_bench.formats import PRECISIONS
from device_bench.runtimes import open_runtime

from .job import ExportJob

MIN_INT8_MAC_FRACTION = 0.5  # below this, an int8 file saves too little to be worth a float layer more
SENSITIVITY_IMAGES = 64  # validation images a layer's sensitivity is measured on: enough to rank, few enough for 100+ layers


@dataclass(frozen=True)
class Recipe:
    """One post-training int8 setting."""

    calibration: str = "minmax"  # minmax | percentile | entropy
    calibration_multiple: int = 1  # times --calib-samples training images (at most all of them)
    per_channel: bool = True  # weights quantized per output channel, else per tensor
    symmetric_activations: bool = False
    float_layers: tuple[str, ...] = ()  # layers kept in float (mixed precision)


# name -> recipe, tried in this order.
RECIPES: dict[str, Recipe] = {
    "minmax": Recipe(),
    "percentile": Recipe(calibration="percentile"),
    "entropy": Recipe(calibration="entropy"),
    "minmax-symmetric": Recipe(symmetric_activations=True),
    "minmax-per-tensor": Recipe(per_channel=False),
    "minmax-4x-calibration": Recipe(calibration_multiple=4),
}


@dataclass
class Attempt:
    """One file the search made and checked on the validation images."""

    name: str  # a RECIPES name, then "+N float" for mixed precision
    kind: str  # recipe | sensitivity (one layer in float, to rank them) | mixed
    recipe: Recipe
    fidelity: dict
    problem: str  # '' when it passed the gate
    int8_mac_fraction: float
    seconds: float
    file: Path = field(repr=False)

    def summary(self) -> dict:
        """What the manifest and the printed table keep of it."""
        fid = self.fidelity
        return {
            "recipe": self.name,
            "kind": self.kind,
            "relative_error": fid["relative_error"],
            "precision_at_1_drop": fid["reference_precision_at_1"] - fid["precision_at_1"],
            "top1_neighbour_agreement": fid["top1_neighbour_agreement"],
            "mean_cosine": fid["mean_cosine"],
            "int8_mac_fraction": self.int8_mac_fraction,
            "seconds": self.seconds,
            "passed": not self.problem,
            "problem": self.problem,
        }


def _shortfall(attempt: Attempt) -> tuple[float, float]:
    """How far an attempt is from the gate: the P@1 lost beyond its tolerance, then the relative error."""
    fid, tolerance = attempt.fidelity, PRECISIONS["int8"]
    drop = fid["reference_precision_at_1"] - fid["precision_at_1"]
    return max(0.0, drop - tolerance.max_precision_at_1_drop), fid["relative_error"]


def search_int8(job: ExportJob, writer: ModuleType, fmt: str, path: Path) -> dict:
    """Write the format's int8 file at ``path``: the first attempt to pass the gate, else the closest.
    Returns the manifest's ``int8`` record (what was chosen, and every attempt); None when the job
    has no validation images to search on (a writer called on its own): then the default recipe."""
    started = time.perf_counter()
    scratch = job.folder / f".int8-search-{fmt}"  # in the staging folder, which a killed export leaves to the next one to remove
    scratch.mkdir(exist_ok=True)
    try:
        if job.validation is None:
            writer.quantize_int8(job, scratch / path.name, RECIPES["minmax"])
            shutil.move(scratch / path.name, path)
            return None
        layers = writer.int8_layers(job)
        total_macs = sum(layers.values())

        def attempt(name: str, kind: str, recipe: Recipe) -> Attempt:
            t = time.perf_counter()
            file = scratch / f"{len(attempts)}{path.suffix}"
            writer.quantize_int8(job, file, recipe)
            fidelity = job.gate(open_runtime(file, fmt), SENSITIVITY_IMAGES if kind == "sensitivity" else None)
            int8_macs = sum(m for layer, m in layers.items() if layer not in recipe.float_layers)
            done = Attempt(name, kind, recipe, fidelity, PRECISIONS["int8"].problems(fidelity), int8_macs / max(total_macs, 1), time.perf_counter() - t, file)
            attempts.append(done)
            return done

        attempts: list[Attempt] = []
        for name in writer.INT8_RECIPES:
            if not attempt(name, "recipe", RECIPES[name]).problem:
                break
        else:
            _mixed_precision(attempt, min(attempts, key=_shortfall), layers, total_macs)

        candidates = [a for a in attempts if a.kind != "sensitivity"]
        chosen = next((a for a in candidates if not a.problem), None) or min(candidates, key=_shortfall)
        shutil.move(chosen.file, path)
        recipe = chosen.recipe
        return {
            "recipe": chosen.name,
            **{k: v for k, v in asdict(recipe).items() if k != "float_layers"},
            "calibration_samples": len(job.calibration_set(recipe.calibration_multiple)),
            "float_layers": list(recipe.float_layers),
            "int8_mac_fraction": chosen.int8_mac_fraction,
            "passed_gate": not chosen.problem,
            "gate_images": job.gate_images,
            "search_s": time.perf_counter() - started,
            "attempts": [a.summary() for a in attempts],
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _mixed_precision(attempt, base: Attempt, layers: dict[str, int], total_macs: int) -> None:
    """Keep the most sensitive layers of ``base``'s recipe in float, doubling their number, until an
    attempt passes or too few multiply-accumulates would stay int8. A layer's sensitivity is the
    relative error of the model with that layer alone in int8, on the first ``SENSITIVITY_IMAGES``
    validation images: errors that only show together
    (an int8 pooling before an int8 embedding layer) rank both layers high."""
    error = {}
    for layer in layers:
        alone = attempt(f"{base.name} only {layer} int8", "sensitivity", replace(base.recipe, float_layers=tuple(k for k in layers if k != layer)))
        error[layer] = alone.fidelity["relative_error"]
    ranked = sorted(layers, key=lambda layer: -error[layer])
    count = 1
    while count < len(ranked):
        kept = tuple(ranked[:count])
        if 1 - sum(layers[k] for k in kept) / max(total_macs, 1) < MIN_INT8_MAC_FRACTION:
            return
        if not attempt(f"{base.name} +{count} float", "mixed", replace(base.recipe, float_layers=kept)).problem:
            return
        count *= 2
