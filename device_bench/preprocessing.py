"""The one preprocessing: raw images -> the model's float32 NCHW input, in numpy.

Training, export's golden set, ``Embedder`` and ``python -m device_bench`` all call
``Preprocessing``; its ``to_dict`` is the ``preprocessing`` block of both a run's config.json and
a bundle's manifest.json, and the JavaScript reader (``edge_siamese/app/web/bundle.mjs``) follows
the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BundleError

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2: grey = 0.299 R + 0.587 G + 0.114 B
GREY_CONVERSION = f"ITU-R 601-2 luma: {LUMA[0]} R + {LUMA[1]} G + {LUMA[2]} B"
INPUT_LAYOUT = "NCHW"  # what Preprocessing returns and every exported model takes


@dataclass(frozen=True)
class Preprocessing:
    """``x = (raw * scale - mean[c]) / std[c]``, then NHWC -> NCHW, float32.

    ``resize`` is the model's input size (H, W): images must have it when they arrive here. An
    RGB image for a one-channel model is made grey with ``LUMA`` first. ``raw * scale`` is the
    [0, 1] range the model was trained on (``raw_range`` = [0, 1 / scale]).
    """

    resize: tuple[int, int]
    channels: int
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, images: np.ndarray, scale: float) -> "Preprocessing":
        """Per-channel mean and std of ``images`` (N, H, W, C), the training split, after scaling."""
        x = images.astype(np.float64) * scale
        mean = x.mean(axis=(0, 1, 2))
        std = np.maximum(x.std(axis=(0, 1, 2)), 1e-6)
        return cls((int(images.shape[1]), int(images.shape[2])), int(images.shape[3]), float(scale), tuple(mean.tolist()), tuple(std.tolist()))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Raw images (N, H, W[, C]) -> float32 (N, C, H, W)."""
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise BundleError(f"images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
        if x.shape[1:3] != tuple(self.resize):
            raise BundleError(f"images are {x.shape[1]}x{x.shape[2]} but the model takes {self.resize[0]}x{self.resize[1]}: resize them first")
        x = x.astype(np.float32)
        if self.channels == 1 and x.shape[3] == 3:
            x = (x @ np.asarray(LUMA, np.float32))[..., None]
        if x.shape[3] != self.channels:
            raise BundleError(f"images have {x.shape[3]} channel(s) but the model takes {self.channels}")
        x = (x * np.float32(self.scale) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def to_dict(self) -> dict:
        """The ``preprocessing`` block of config.json and manifest.json."""
        return {
            "raw_range": [0.0, 1 / self.scale],  # pixel values as the training data held them
            "resize": list(self.resize),
            "grey_conversion": GREY_CONVERSION,
            "channels": self.channels,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """From ``to_dict``'s keys; a config.json written by toolkit 0.1.0 said ``input_size`` for ``resize``."""
        resize = d["resize"] if "resize" in d else d["input_size"]
        pre = cls((int(resize[0]), int(resize[1])), int(d["channels"]), float(d["scale"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])))
        numbers = np.asarray([pre.scale, *pre.mean, *pre.std])
        if not (np.isfinite(numbers).all() and pre.scale > 0 and min(pre.std) > 0 and min(pre.resize) > 0):
            raise BundleError(f"preprocessing {d} needs a positive size, scale and std and finite means: export or train again")
        if pre.channels not in (1, 3) or len(pre.mean) != pre.channels or len(pre.std) != pre.channels:
            raise BundleError(f"preprocessing {d} needs 1 or 3 channels with one mean and std each: export or train again")
        return pre
