"""The lossless triplet loss (Arsenault, 2018), for sigmoid-headed embeddings."""

from __future__ import annotations

import torch

from ..distances import SquaredEuclideanDistance
from ..errors import UserError
from .base import TripletLossBase, label_masks


class LosslessTripletLoss(TripletLossBase):
    """Triplet loss with no hinge: both terms keep a gradient until the triplet is perfect.

    With squared distances ``d+ = ||a - p||^2``, ``d- = ||a - n||^2`` of embeddings in
    ``[0, 1]^N`` (a sigmoid head), ``N = embedding_dim`` and ``beta = N`` by default::

        L = mean( -ln(1 - d+ / beta + eps) - ln(1 - (N - d-) / beta + eps) )

    Both distances lie in ``[0, N]``, so each log term is finite. Embeddings outside
    ``[0, 1]`` raise an error (use the ``sigmoid`` head). The in-batch form averages over every
    valid triplet of the batch; the terms separate, so that mean costs O(B^2).

    Shapes: ``(embeddings (B, D), labels (B,))``, or ``from_triplets(anchor, positive, negative)``
    each ``(N, D)``.
    """

    def __init__(self, embedding_dim: int, beta: float | None = None, eps: float = 1e-8):
        super().__init__(SquaredEuclideanDistance())
        self.embedding_dim = embedding_dim
        self.beta = float(embedding_dim if beta is None else beta)
        self.eps = eps

    def check_embeddings(self, embeddings: torch.Tensor) -> None:
        if embeddings.shape[-1] != self.embedding_dim:
            raise UserError(f"lossless loss built for embedding_dim={self.embedding_dim}, got {embeddings.shape[-1]}")
        if embeddings.detach().min() < 0 or embeddings.detach().max() > 1:
            raise UserError("the lossless triplet loss needs embeddings in [0, 1]: use the 'sigmoid' head")

    def positive_term(self, d_ap: torch.Tensor) -> torch.Tensor:
        return -torch.log(1 - d_ap / self.beta + self.eps)

    def negative_term(self, d_an: torch.Tensor) -> torch.Tensor:
        return -torch.log(1 - (self.embedding_dim - d_an) / self.beta + self.eps)

    def per_triplet(self, d_ap, d_an):
        return self.positive_term(d_ap) + self.negative_term(d_an)

    def reduce(self, losses):
        return losses.mean() if losses.numel() else losses.sum()

    def batch_all(self, dist, labels):
        pos_mask, neg_mask = label_masks(labels)
        n_pos, n_neg = pos_mask.sum(1), neg_mask.sum(1)
        # Each (a, p) appears with every negative of a, and each (a, n) with every positive of a.
        pos_sum = (self.positive_term(dist) * pos_mask).sum(1) * n_neg
        neg_sum = (self.negative_term(dist) * neg_mask).sum(1) * n_pos
        return (pos_sum + neg_sum).sum() / (n_pos * n_neg).sum().clamp_min(1)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, beta={self.beta}, eps={self.eps}"
