"""What every format's writers get: the model, an example input, the calibration images, the
metadata, and the validation images the int8 search checks its attempts on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pathlib import Path

import numpy as np
import torch

from device_bench.formats import file_name
from device_bench.metrics import embedding_agreement

CALIB_SAMPLES = 256  # training images int8 is calibrated on, unless --calib-samples says otherwise


@dataclass
class Gate:
    """Validation images, their labels and the trained model's embeddings of them, under the
    model's distance: what the int8 search measures each attempt on."""

    inputs: np.ndarray  # preprocessed
    labels: np.ndarray
    reference: np.ndarray
    distance: str
    weights: np.ndarray | None


@dataclass
class ExportJob:
    model: torch.nn.Module
    example: torch.Tensor  # preprocessed held-out images: the traced input
    calibration: np.ndarray  # preprocessed training images, for int8
    metadata: dict[str, str]  # written into every file that holds metadata
    folder: Path  # where the files are written; fp16 and int8 start from the fp32 file there
    validation: Gate | None = None  # the int8 search's gate
    # n -> the first n preprocessed training images of the calibration order (``calibration`` is the first ones)
    calibration_images: Callable[[int], np.ndarray] | None = None
    cache: dict = field(default_factory=dict, repr=False)  # what the search's attempts compute once (calibration sets, ranges)

    def fp32_path(self, fmt: str) -> Path:
        return self.folder / file_name(fmt, "fp32")

    def calibration_set(self, multiple: int = 1) -> np.ndarray:
        """``multiple`` times the calibration images (as many as there are, when fewer)."""
        if multiple == 1 or self.calibration_images is None:
            return self.calibration
        key = ("calibration images", multiple)
        if key not in self.cache:
            self.cache[key] = self.calibration_images(multiple * len(self.calibration))
        return self.cache[key]

    @property
    def gate_images(self) -> int:
        return 0 if self.validation is None else len(self.validation.inputs)

    def gate(self, runtime, images: int | None = None) -> dict:
        """An opened runtime's fidelity on the validation images, or their first ``images``
        (``embedding_agreement``'s figures)."""
        v = self.validation
        if v is None:
            raise ValueError("this export job has no validation images for the int8 search")
        rows = slice(0, images)
        return embedding_agreement(runtime.run(v.inputs[rows]), v.reference[rows], v.labels[rows], v.distance, v.weights)
