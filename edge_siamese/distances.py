"""Distances between embeddings, one small class each (pytorch-metric-learning's idea, not its API),
and ``DISTANCES``, the table of them by the name a device reads (``embedding.distance`` in the
manifest; ``device_bench.metrics`` computes each the same way in numpy).

Every distance is "smaller is more similar" and has two forms:

- ``distance(embeddings, ref_emb=None)`` -> ``(B, R)`` matrix, row i = anchor i;
- ``distance.pairwise(x, y)`` -> ``(N,)``, row-wise.

The matrix forms are computed from the Gram matrix ``E @ R.T`` where possible, so that
no ``B x R x D`` difference tensor is built.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

EPS = 1e-12


def _l2_norm(x: torch.Tensor) -> torch.Tensor:
    """``||x||`` per row, clamped away from 0 so that gradients stay finite."""
    return x.pow(2).sum(dim=-1).clamp_min(EPS).sqrt()


class BaseDistance(nn.Module):
    """A distance with a matrix form (``forward``) and a row-wise form (``pairwise``)."""

    name: str = ""

    def forward(self, embeddings: torch.Tensor, ref_emb: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def pairwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weights_array(self) -> np.ndarray | None:
        """The weights a device needs for this distance (the manifest's ``distance_weights``), or None."""
        return None


class SquaredEuclideanDistance(BaseDistance):
    """``d(x, y) = ||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y`` (clamped at 0)."""

    name = "squared_euclidean"

    def forward(self, embeddings, ref_emb=None):
        ref = embeddings if ref_emb is None else ref_emb
        sq = embeddings.pow(2).sum(1)[:, None] + ref.pow(2).sum(1)[None, :] - 2 * embeddings @ ref.T
        return sq.clamp_min(0)

    def pairwise(self, x, y):
        return (x - y).pow(2).sum(-1)


class EuclideanDistance(SquaredEuclideanDistance):
    """``d(x, y) = ||x - y||_2``; the square root is clamped by an eps (finite gradient at 0)."""

    name = "euclidean"

    def forward(self, embeddings, ref_emb=None):
        return super().forward(embeddings, ref_emb).clamp_min(EPS).sqrt()

    def pairwise(self, x, y):
        return super().pairwise(x, y).clamp_min(EPS).sqrt()


class L1Distance(BaseDistance):
    """``d(x, y) = sum_j |x_j - y_j|`` (``torch.cdist`` with p=1, no difference tensor kept)."""

    name = "l1"

    def forward(self, embeddings, ref_emb=None):
        ref = embeddings if ref_emb is None else ref_emb
        return torch.cdist(embeddings, ref, p=1)

    def pairwise(self, x, y):
        return (x - y).abs().sum(-1)


class WeightedL1Distance(L1Distance):
    """Koch et al.'s component-weighted L1: ``d(x, y) = sum_j w_j |x_j - y_j|``, ``w_j >= 0``.

    With non-negative weights this is the L1 distance between ``w * x`` and ``w * y``.
    ``weights`` may be a callable returning them: it is read at every call, so that a learned
    weighting (Koch's head) is the current one wherever the distance was handed (a miner).
    """

    name = "weighted_l1"

    def __init__(self, weights: torch.Tensor | Callable[[], torch.Tensor]):
        super().__init__()
        self._weights = weights

    @property
    def weights(self) -> torch.Tensor:
        return self._weights() if callable(self._weights) else self._weights

    def forward(self, embeddings, ref_emb=None):
        ref = embeddings if ref_emb is None else ref_emb
        return super().forward(embeddings * self.weights, ref * self.weights)

    def pairwise(self, x, y):
        return super().pairwise(x * self.weights, y * self.weights)

    def weights_array(self) -> np.ndarray:
        return self.weights.detach().cpu().numpy()


class CosineDistance(BaseDistance):
    """``d(x, y) = 1 - x.y / (||x|| ||y||)``."""

    name = "cosine"

    def forward(self, embeddings, ref_emb=None):
        ref = embeddings if ref_emb is None else ref_emb
        return 1 - (embeddings @ ref.T) / (_l2_norm(embeddings)[:, None] * _l2_norm(ref)[None, :])

    def pairwise(self, x, y):
        return 1 - (x * y).sum(-1) / (_l2_norm(x) * _l2_norm(y))


class ShadowDistance(BaseDistance):
    """Shadow Loss's anchor-relative distance (Shadow Loss, arXiv 2311.14012).

    The shadow of ``x`` on anchor ``a`` is its scalar projection ``s_x = a.x / ||a||``;
    ``d(a, x) = | ||a|| - s_x |``, how far that shadow falls from the anchor's own length.
    Not symmetric: row i of the matrix form is anchor i. On the unit sphere it is
    ``1 - cos(a, x)``, the ``CosineDistance``.
    """

    name = "shadow"

    def forward(self, embeddings, ref_emb=None):
        ref = embeddings if ref_emb is None else ref_emb
        norm = _l2_norm(embeddings)
        shadows = (embeddings @ ref.T) / norm[:, None]
        return (norm[:, None] - shadows).abs()

    def pairwise(self, x, y):
        norm = _l2_norm(x)
        return (norm - (x * y).sum(-1) / norm).abs()


DISTANCES: dict[str, type[BaseDistance]] = {
    cls.name: cls for cls in (EuclideanDistance, SquaredEuclideanDistance, CosineDistance, L1Distance, WeightedL1Distance, ShadowDistance)
}
