"""FaceNet's triplet margin loss: the baseline every figure is reported against."""

from __future__ import annotations

from ..distances import EuclideanDistance, SquaredEuclideanDistance
from .base import MarginTripletLoss


class TripletMarginLoss(MarginTripletLoss):
    """FaceNet triplet loss (Schroff et al., 2015, arXiv 1503.03832).

    ``L = mean over triplets of max(d(a, p) - d(a, n) + margin, 0)`` with ``d`` the Euclidean
    distance, or its square with ``squared=True`` (FaceNet's own form).

    Shapes: ``(embeddings (B, D), labels (B,))`` with the exact batch-all over every valid triplet
    when no ``indices_tuple`` is given, or ``from_triplets(anchor, positive, negative)`` each
    ``(N, D)``; with ``reduction="mean"`` that equals ``torch.nn.functional.triplet_margin_loss``.
    """

    def __init__(self, margin: float = 0.2, squared: bool = False, reduction: str = "mean_active"):
        distance = SquaredEuclideanDistance() if squared else EuclideanDistance()
        super().__init__(distance, margin, reduction)
