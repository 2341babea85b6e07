"""A photo's model input on the page equals device_bench's: the page's reader
(edge_siamese/app/web/bundle.mjs: decodeImage, then preprocessRgba) in headless Chromium against
``Preprocessing(...)([read_image(path, channels)])`` on the same JPEG and PNG files, and
preprocessRgba in Node against Pillow, exactly, on random pixels."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device_bench.preprocessing import Preprocessing, read_image
from edge_siamese.app.demo import PAGE

from test_web import NEEDS_BROWSER, TIMEOUT_MS, browser  # noqa: F401 (browser: the fixture)

NODE = shutil.which("node")
READER = PAGE / "bundle.mjs"
SIZES = [(37, 53), (200, 120), (64, 64), (300, 301)]  # (height, width) of the files
INPUT_SIZE = (24, 32)
# One grey and one RGB model, each resizing both ways: (channels, resize_mode).
MODELS = [(1, "crop"), (1, "stretch"), (3, "crop"), (3, "stretch")]


def preprocessing(channels: int, mode: str, size: tuple[int, int] = INPUT_SIZE, scale: float = 1 / 255, mean: float = 0.5, std: float = 0.25) -> Preprocessing:
    return Preprocessing(size, channels, scale, (mean,) * channels, (std,) * channels, mode)


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth colour gradients, a disc and some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    disc = ((y - 0.4) ** 2 + (x - 0.6) ** 2 < 0.08) * 90.0
    rgb = np.stack([200 * x + disc, 180 * y + 40, 255 * (1 - x * y) - disc], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def write_files(folder: Path) -> list[Path]:
    """Every kind of file read_image handles, at each of SIZES, plus JPEGs with an EXIF orientation."""
    files = []

    def save(image: Image.Image, name: str, **options) -> None:
        files.append(folder / name)
        image.save(files[-1], **options)

    for i, (height, width) in enumerate(SIZES):
        rgb = photo(height, width, seed=i)
        grey = Image.fromarray(rgb).convert("L")
        alpha = np.clip(np.linspace(-80, 335, width)[None, :] + np.zeros((height, 1)), 0, 255).astype(np.uint8)  # 0 .. 255 across
        tag = f"{height}x{width}"
        save(Image.fromarray(rgb), f"rgb-{tag}.jpg", quality=90)
        save(grey, f"grey-{tag}.jpg", quality=90)
        save(Image.fromarray(rgb), f"rgb-{tag}.png")
        save(grey, f"grey-{tag}.png")
        save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), f"rgba-{tag}.png")
        save(Image.fromarray(np.dstack([grey, alpha]), "LA"), f"grey-alpha-{tag}.png")
        save(Image.fromarray(rgb).quantize(64), f"palette-{tag}.png", **({"transparency": 0} if i % 2 else {}))  # one colour transparent
        low_byte = np.random.default_rng(i).integers(0, 256, (height, width))  # noise below the high byte, which both keep
        save(Image.fromarray((np.asarray(grey, np.uint16) * 256 + low_byte).astype(np.uint16)), f"grey16-{tag}.png")
        for orientation in (3, 6, 8) if i < 2 else ():  # rotated 180, 90 clockwise, 90 anticlockwise
            exif = Image.Exif()
            exif[0x0112] = orientation
            save(Image.fromarray(rgb), f"exif{orientation}-{tag}.jpg", quality=90, exif=exif)
    return files


def grey_levels(a: np.ndarray, b: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """How far apart two model inputs are, per value, in the raw 8-bit levels they came from."""
    return np.abs(a.astype(np.float64) - b) * np.asarray(pre.std)[:, None, None] / pre.scale


BROWSER_INPUTS = """async ({ files, pres }) => {
  const reader = await import(new URL("bundle.mjs", location.href));
  const out = [];
  for (const file of files) {
    const bytes = Uint8Array.from(atob(file), (c) => c.charCodeAt(0));
    const { rgba, width, height } = await reader.decodeImage(new Blob([bytes]), "file");
    for (const pre of pres) {
      const x = reader.preprocessRgba(rgba, width, height, pre);
      out.push(btoa(String.fromCharCode(...new Uint8Array(x.buffer))));
    }
  }
  return out;
}"""


@NEEDS_BROWSER
def test_the_page_computes_the_model_input_python_does(browser, served, tmp_path):  # noqa: F811 (browser: the fixture)
    """Every file through Chromium's decoder and bundle.mjs, in one page load and one evaluate:
    38 files x 4 models, each within float32 rounding of Python's."""
    files = write_files(tmp_path)
    pres = [preprocessing(channels, mode) for channels, mode in MODELS]
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(served + "bundle.mjs")  # any page of the server: the reader is imported, the runtimes are not loaded
        encoded = page.evaluate(BROWSER_INPUTS, {"files": [base64.b64encode(f.read_bytes()).decode() for f in files], "pres": [p.to_dict() for p in pres]})
    finally:
        page.close()
    report, outputs = {}, iter(encoded)
    for path in files:
        for pre in pres:
            page_input = np.frombuffer(base64.b64decode(next(outputs)), np.float32).reshape(pre.channels, *INPUT_SIZE)
            python = pre([read_image(path, pre.channels)])[0]
            levels = grey_levels(page_input, python, pre)
            report[f"{path.name} {pre.channels}ch {pre.resize_mode}"] = (float(levels.max()), float((levels > 0.5).mean()))
    print("\n".join(f"{case}: max {worst:.2g} grey levels, {share:.1%} of values differ" for case, (worst, share) in report.items()))
    # Float32 rounding alone (numpy's float32 against the page's float64 then float32) is ~2e-5 grey levels here.
    worst = {case: worst for case, (worst, _) in report.items()}
    assert max(worst.values()) < 1e-4, worst


NODE_INPUTS = """
import { preprocessRgba } from %s;
import { readFileSync } from "node:fs";
const cases = JSON.parse(readFileSync(0, "utf8"));
const inputs = cases.map(({ rgba, width, height, pre }) => {
  const x = preprocessRgba(new Uint8ClampedArray(Buffer.from(rgba, "base64")), width, height, pre);
  return Buffer.from(x.buffer).toString("base64");
});
console.log(JSON.stringify(inputs));
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_preprocess_rgba_is_pillow_exactly():
    """Random RGBA pixels (some transparent) at sizes that shrink, grow, shrink one side and grow
    the other, or shrink the height by far more than the width (Pillow's other pass order): every
    value equals the 8-bit one Pillow computes from the same pixels written as a PNG."""
    rng = np.random.default_rng(0)
    shapes = [(37, 53), (200, 120), (64, 64), (300, 301), (5, 7), (24, 32), (24, 40), (12, 16), (1000, 3), (3, 900), (90, 20)]
    cases = []
    for i, (height, width) in enumerate(shapes):
        rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        if i % 2:
            rgba[..., 3] = 255
        for size in [INPUT_SIZE, (50, 40), (7, 7)]:
            for channels, mode in MODELS:
                cases.append((rgba, preprocessing(channels, mode, size, mean=0.0, std=1.0)))
    payload = [{"rgba": base64.b64encode(rgba.tobytes()).decode(), "width": rgba.shape[1], "height": rgba.shape[0], "pre": pre.to_dict()} for rgba, pre in cases]
    proc = subprocess.run([NODE, "--input-type=module", "-e", NODE_INPUTS % json.dumps(READER.as_uri())], input=json.dumps(payload), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for (rgba, pre), encoded in zip(cases, json.loads(proc.stdout)):
        levels = np.frombuffer(base64.b64decode(encoded), np.float32).reshape(pre.channels, *pre.resize) * 255
        png = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(png, "PNG")
        pillow = pre.resized(read_image(png.getvalue(), pre.channels)).transpose(2, 0, 1)
        assert np.abs(levels - pillow).max() < 1e-3, (rgba.shape, pre.channels, pre.resize_mode, pre.resize)  # the same 8-bit value, to float32 rounding
