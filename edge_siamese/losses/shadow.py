"""Shadow Loss (Khan et al., 2023, arXiv 2311.14012)."""

from __future__ import annotations

from ..distances import CosineDistance, ShadowDistance
from .base import MarginTripletLoss


class ShadowLoss(MarginTripletLoss):
    """Triplet hinge on the scalar projections ("shadows") of p and n onto the anchor.

    With ``s_x = a.x / ||a||``::

        delta_p = | ||a|| - s_p |,   delta_n = | ||a|| - s_n |
        L = mean(max(delta_p - delta_n + margin, 0))

    ``||a||`` is a real square-root norm clamped by an eps. ``normalize=True`` is the form on
    L2-normalised embeddings, where ``||a|| = 1`` and ``delta = 1 - cos``: it trains
    ``CosineDistance``, which equals the shadow distance of the normalised embeddings.
    ``normalize=False`` is the paper's raw form with the anchor-relative ``ShadowDistance``.

    Shapes: ``(embeddings (B, D), labels (B,))``, or ``from_triplets(anchor, positive, negative)``
    each ``(N, D)``.
    The in-batch form works from the batch Gram matrix (``a.p``, ``a.n``, ``||a||``): no
    ``S x D`` difference tensor is built, and the exact batch-all runs in O(B^2) memory.
    """

    def __init__(self, margin: float = 0.2, normalize: bool = True, reduction: str = "mean_active"):
        super().__init__(CosineDistance() if normalize else ShadowDistance(), margin, reduction)
        self.normalize = normalize

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize}"
