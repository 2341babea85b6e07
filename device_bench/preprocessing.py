"""The one preprocessing: an image file or array -> the model's float32 NCHW input, in numpy and Pillow.

Three steps, each with one home here, each followed exactly by the JavaScript reader
(``edge_siamese/app/web/bundle.mjs``):

1. ``read_image``: decode a file (JPEG, PNG, WebP, ...), apply its EXIF orientation and convert
   it to the model's channels as 8-bit values (alpha composited onto white, 16-bit values' high
   byte, palette expanded, colour made grey by Pillow's integer ITU-R 601-2 luma).
2. ``Preprocessing.resized``: one image to the input size by ``RESIZE_MODES`` (default ``crop``:
   the shorter side scaled to the input size and the centre kept) with Pillow's bilinear filter
   (antialiased when shrinking; 8-bit images rounded after each pass).
3. ``Preprocessing.__call__``: ``(raw * scale - mean[c]) / std[c]``, NHWC -> NCHW, float32.

Training, export's golden set, ``Embedder`` and ``python -m device_bench`` all call it; its
``to_dict`` is the ``preprocessing`` block of both a run's config.json and a bundle's manifest.json.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import BundleError

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2: grey = 0.299 R + 0.587 G + 0.114 B
# Pillow's integer form of LUMA, for 8-bit images: (19595 R + 38470 G + 7471 B + 2**15) >> 16.
LUMA_16 = (19595, 38470, 7471)
GREY_CONVERSION = f"ITU-R 601-2 luma: {LUMA[0]} R + {LUMA[1]} G + {LUMA[2]} B"
INPUT_LAYOUT = "NCHW"  # what Preprocessing returns and every exported model takes
RESIZE_MODES = {
    "crop": "the shorter side scaled to the input size, the centre cropped (aspect ratio kept)",
    "stretch": "scaled to the input size (aspect ratio not kept)",
}
INTERPOLATION = "Pillow bilinear, antialiased when shrinking; 8-bit values rounded after each pass"
ALPHA_BACKGROUND = 255  # transparent pixels are composited onto white
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own limit: a larger image is refused as a decompression bomb


class ImageError(BundleError):
    """A file that is not an image this toolkit can read; the message names it and says what to do."""


def _grey(rgb: np.ndarray) -> np.ndarray:
    """8-bit RGB -> 8-bit grey, exactly as Pillow's ``convert("L")``."""
    r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
    return ((LUMA_16[0] * r + LUMA_16[1] * g + LUMA_16[2] * b + (1 << 15)) >> 16).astype(np.uint8)


def _composite(values: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """8-bit colour and alpha -> colour over ``ALPHA_BACKGROUND``, rounded."""
    a = alpha.astype(np.uint32)[..., None]
    return ((values.astype(np.uint32) * a + ALPHA_BACKGROUND * (255 - a) + 127) // 255).astype(np.uint8)


def _to_channels(image, channels: int | None) -> np.ndarray:
    """A decoded Pillow image of any mode -> uint8 (H, W, channels); ``None``: 1 for a grey
    image, 3 for a colour one."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey (PNG): the high byte, as libpng's and browsers' decoders keep it
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], channels or 1, axis=2)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("1", "F"):
        image = image.convert("L")
    elif mode not in ("L", "LA", "RGB", "RGBA"):  # CMYK, YCbCr, PA, RGBa, ...
        image = image.convert("RGBA" if "A" in mode or "transparency" in image.info else "RGB")
    x = np.asarray(image, dtype=np.uint8)
    x = x[..., None] if x.ndim == 2 else x
    if x.shape[2] in (2, 4):  # LA, RGBA
        x = _composite(x[..., :-1], x[..., -1])
    if x.shape[2] == 3 and channels == 1:
        return _grey(x)[..., None]
    return np.repeat(x, channels, axis=2) if x.shape[2] == 1 and channels == 3 else x


def read_image(source: str | Path | bytes, channels: int | None) -> np.ndarray:
    """An image file (or its bytes) -> uint8 (H, W, channels), upright by its EXIF orientation;
    ``channels=None`` keeps the file's own (1 for grey, 3 for colour).

    Raises ``ImageError`` naming the file for an empty, truncated, corrupt or oversized one.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = "the image" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError("too many pixels")
            im.load()
            return _to_channels(ImageOps.exif_transpose(im), channels)
    except Image.DecompressionBombError:
        raise ImageError(f"{name} has more pixels than are safe to decode (a decompression bomb?): shrink it or remove it") from None
    except FileNotFoundError:
        raise ImageError(f"{name} does not exist: check the path") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):  # SyntaxError: Pillow's word for a broken PNG
        raise ImageError(f"{name} is not an image this tool can read (empty, truncated or not an image): remove it or convert it to PNG") from None


def crop_box(height: int, width: int, size: tuple[int, int], mode: str) -> tuple[float, float, float, float]:
    """The source region (left, top, right, bottom) that ``mode`` scales onto ``size`` (H, W)."""
    if mode == "stretch":
        return 0.0, 0.0, float(width), float(height)
    out_h, out_w = size
    if width * out_h > height * out_w:  # wider than the input: keep the full height
        kept = height * out_w / out_h
        return (width - kept) / 2, 0.0, (width + kept) / 2, float(height)
    kept = width * out_h / out_w
    return 0.0, (height - kept) / 2, float(width), (height + kept) / 2


def resize_image(image: np.ndarray, size: tuple[int, int], mode: str = "crop") -> np.ndarray:
    """One raw image (H, W, C), uint8 or float, to ``size`` (H, W) by ``mode``, each channel with
    Pillow's bilinear filter (mode ``L`` for uint8, ``F`` for floats). Pillow is imported only
    here and in ``read_image``: a device fed images at the input size needs numpy alone."""
    x = np.asarray(image)
    if x.shape[:2] == tuple(size):
        return x
    from PIL import Image

    box = crop_box(x.shape[0], x.shape[1], size, mode)
    target = (int(size[1]), int(size[0]))
    planes = []
    for c in range(x.shape[2]):
        plane = x[..., c] if x.dtype == np.uint8 else x[..., c].astype(np.float32)
        planes.append(np.asarray(Image.fromarray(plane).resize(target, Image.Resampling.BILINEAR, box=box)))
    return np.stack(planes, axis=2).astype(x.dtype)


@dataclass(frozen=True)
class Preprocessing:
    """Raw images -> ``(raw * scale - mean[c]) / std[c]``, NCHW float32, at ``resize`` (H, W).

    An image of another size is first resized by ``resize_mode``; an RGB image for a one-channel
    model is made grey (``LUMA``), a grey one for an RGB model repeated. ``raw * scale`` is the
    [0, 1] range the model was trained on (``raw_range`` = [0, 1 / scale]).
    """

    resize: tuple[int, int]
    channels: int
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "crop"

    @classmethod
    def fit(cls, images: np.ndarray, scale: float, resize_mode: str = "crop") -> "Preprocessing":
        """Per-channel mean and std of ``images`` (N, H, W, C), training images at the input size,
        after scaling; summed in float64 a few images at a time (no float copy of them all)."""
        n, height, width, channels = images.shape
        total, squares = np.zeros(channels), np.zeros(channels)
        for start in range(0, n, 64):
            x = images[start : start + 64].astype(np.float64) * scale
            total += x.sum(axis=(0, 1, 2))
            squares += (x * x).sum(axis=(0, 1, 2))
        count = n * height * width
        mean = total / count
        std = np.maximum(np.sqrt(np.maximum(squares / count - mean * mean, 0)), 1e-6)
        return cls((int(height), int(width)), int(channels), float(scale), tuple(mean.tolist()), tuple(std.tolist()), resize_mode)

    def with_channels(self, image: np.ndarray) -> np.ndarray:
        """One raw image (H, W[, C]) in the model's channels (colour made grey, grey repeated); size and dtype kept."""
        x = np.asarray(image)
        x = x[..., None] if x.ndim == 2 else x
        if x.ndim != 3 or x.shape[2] not in (1, 3):
            raise BundleError(f"an image must be (H, W), (H, W, 1) or (H, W, 3), got shape {x.shape}")
        if x.shape[2] == 3 and self.channels == 1:
            return _grey(x)[..., None] if x.dtype == np.uint8 else (x.astype(np.float32) @ np.asarray(LUMA, np.float32))[..., None]
        return np.repeat(x, 3, axis=2) if x.shape[2] == 1 and self.channels == 3 else x

    def resized(self, image: np.ndarray) -> np.ndarray:
        """One raw image (H, W[, C]) in the model's channels and at its input size, dtype kept."""
        return resize_image(self.with_channels(image), self.resize, self.resize_mode)

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Raw images, an (N, H, W[, C]) array or a list of (H, W[, C]) arrays of any sizes -> float32 (N, C, H, W)."""
        if isinstance(images, np.ndarray) and images.ndim not in (3, 4):
            raise BundleError(f"images must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
        x = np.stack([self.resized(image) for image in images]) if len(images) else np.zeros((0, *self.resize, self.channels))
        x = x.astype(np.float32)
        x = (x * np.float32(self.scale) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def to_dict(self) -> dict:
        """The ``preprocessing`` block of config.json and manifest.json."""
        return {
            "raw_range": [0.0, 1 / self.scale],  # pixel values as the training data held them
            "resize": list(self.resize),
            "resize_mode": self.resize_mode,
            "interpolation": INTERPOLATION,
            "grey_conversion": GREY_CONVERSION,
            "channels": self.channels,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """From ``to_dict``'s keys; a config.json written by toolkit 0.1.0 said ``input_size`` for
        ``resize``, and older files have no ``resize_mode`` (their images were all one size)."""
        resize = d["resize"] if "resize" in d else d["input_size"]
        mode = d.get("resize_mode", "crop")
        if mode not in RESIZE_MODES:
            raise BundleError(f"preprocessing resize_mode {mode!r} is unknown (this toolkit knows {', '.join(RESIZE_MODES)}): export or train again")
        pre = cls((int(resize[0]), int(resize[1])), int(d["channels"]), float(d["scale"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])), mode)
        numbers = np.asarray([pre.scale, *pre.mean, *pre.std])
        if not (np.isfinite(numbers).all() and pre.scale > 0 and min(pre.std) > 0 and min(pre.resize) > 0):
            raise BundleError(f"preprocessing {d} needs a positive size, scale and std and finite means: export or train again")
        if pre.channels not in (1, 3) or len(pre.mean) != pre.channels or len(pre.std) != pre.channels:
            raise BundleError(f"preprocessing {d} needs 1 or 3 channels with one mean and std each: export or train again")
        return pre
