"""Contrastive loss (Hadsell, Chopra and LeCun, 2006)."""

from __future__ import annotations

import torch

from ..distances import EuclideanDistance
from .base import PairLossBase


class ContrastiveLoss(PairLossBase):
    """Hadsell et al.'s contrastive loss; label convention ``y = 1`` for a same-class pair.

    With ``d = ||x1 - x2||``::

        L = mean( y * d^2 / 2 + (1 - y) * max(margin - d, 0)^2 / 2 )

    Shapes: ``(embeddings (B, D), labels (B,))`` over every ordered pair of the batch (or a
    miner's pairs / triplets), or ``from_pairs(x1 (N, D), x2 (N, D), y (N,))``.
    """

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = margin
        self.distance = EuclideanDistance()

    def per_pair(self, dist, same):
        return 0.5 * (same * dist.pow(2) + (1 - same) * torch.relu(self.margin - dist).pow(2))

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
