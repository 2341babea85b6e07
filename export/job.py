"""What every format's writers get: the model, an example input, the calibration set and the metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from device_bench.formats import file_name

CALIB_SAMPLES = 256  # training images int8 is calibrated on, unless --calib-samples says otherwise


@dataclass
class ExportJob:
    model: torch.nn.Module
    example: torch.Tensor  # preprocessed held-out images: the traced input
    calibration: np.ndarray  # preprocessed training images, for int8
    metadata: dict[str, str]  # written into every file that holds metadata
    folder: Path  # where the files are written; fp16 and int8 start from the fp32 file there

    def fp32_path(self, fmt: str) -> Path:
        return self.folder / file_name(fmt, "fp32")
