"""A class-per-folder set of real RGB photos, made offline: crops of scikit-learn's two sample
photographs (``china.jpg``, ``flower.jpg``, 427x640, shipped inside scikit-learn).

Each class is one region of a photograph; each image of it a crop around that region's centre,
shifted by up to an eighth of the crop, scaled 0.85-1.15, sometimes mirrored, with its brightness
changed by up to 10 %, saved as a JPEG (quality 90) of 96 to 160 pixels a side. Natural image
statistics, so that int8 calibration and fidelity see what a camera would give them; nothing is
downloaded. ``photo_folder(root, classes, per_class)`` makes it once and reuses it.

    python benchmarks/sample_photos.py OUT [--classes 16] [--per-class 24]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CROP = 120  # side of a class's region in the photograph, in its pixels


def photo_folder(root: Path, classes: int = 16, per_class: int = 24, seed: int = 0) -> Path:
    """``root`` holding ``classes`` sub-folders of ``per_class`` JPEGs (made unless already there)."""
    from sklearn.datasets import load_sample_images

    root = Path(root)
    done = root / ".complete"
    if done.exists() and done.read_text() == f"{classes} {per_class} {seed}":
        return root
    photos = [np.asarray(img) for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for c in range(classes):
        photo = photos[c % len(photos)]
        h, w = photo.shape[:2]
        cy, cx = rng.integers(CROP, h - CROP), rng.integers(CROP, w - CROP)
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(CROP * rng.uniform(0.85, 1.15))
            y = int(np.clip(cy + rng.integers(-CROP // 8, CROP // 8 + 1) - side // 2, 0, h - side))
            x = int(np.clip(cx + rng.integers(-CROP // 8, CROP // 8 + 1) - side // 2, 0, w - side))
            crop = photo[y : y + side, x : x + side].astype(np.float32) * rng.uniform(0.9, 1.1)
            image = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out = int(rng.integers(96, 161))
            image.resize((out, out), Image.Resampling.BILINEAR).save(folder / f"{i:03d}.jpg", quality=90)
    done.write_text(f"{classes} {per_class} {seed}")
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=24)
    args = parser.parse_args()
    print(photo_folder(args.out, args.classes, args.per_class))
