"""Training-time augmentation with torchvision.transforms.v2, by name: ``none``, ``light``, ``standard``.

Applied to the training batches only, never in evaluation, calibration or export. Each policy
replaces the deterministic resize (``Preprocessing.resized``) with a random resized crop at the
input size; the draws of one sample come from its own seed (see ``loader.KeyedBatches``), so
that a run's augmentation does not depend on the number of loader workers and a resumed run
sees what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch


class Augment(NamedTuple):
    crop_scale: tuple[float, float] | None  # RandomResizedCrop's area range; None: no augmentation
    flip: bool  # RandomHorizontalFlip(p=0.5)
    jitter: float  # ColorJitter's brightness, contrast and saturation (hue: a quarter of it)


AUGMENTS: dict[str, Augment] = {
    "none": Augment(None, False, 0.0),
    "light": Augment((0.8, 1.0), True, 0.0),
    "standard": Augment((0.35, 1.0), True, 0.4),
}


def augmentation(name: str, size: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray] | None:
    """The policy ``name`` as a function of one raw image (H, W, C) -> (size, C), same dtype; None for ``none``."""
    spec = AUGMENTS[name]
    if spec.crop_scale is None:
        return None
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(tuple(size), scale=spec.crop_scale, antialias=True)]
    if spec.flip:
        steps.append(v2.RandomHorizontalFlip())
    if spec.jitter:
        steps.append(v2.ColorJitter(spec.jitter, spec.jitter, spec.jitter, spec.jitter / 4))
    transform = v2.Compose(steps)

    def apply(image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))
        return transform(x).permute(1, 2, 0).numpy()

    return apply
