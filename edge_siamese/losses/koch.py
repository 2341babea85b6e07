"""Koch et al.'s Siamese verification head and its cross-entropy (ICML DL workshop, 2015)."""

from __future__ import annotations

import torch
from torch import nn

from ..distances import WeightedL1Distance
from .base import PairLossBase


class KochLoss(PairLossBase):
    """Learned weighted-L1 head + binary cross-entropy.

    ``p(same | h1, h2) = sigmoid(b - sum_j w_j |h1_j - h2_j|)`` and
    ``L = mean( -y log p - (1 - y) log(1 - p) )``, ``y = 1`` for a same-class pair.

    Koch writes ``sigmoid(sum_j alpha_j |h1_j - h2_j|)``; here ``alpha_j = -w_j`` with
    ``w_j = softplus(rho_j) >= 0`` plus a bias ``b``, so that the learned weighted L1 is a true
    distance that retrieval and a device can use (``self.distance``). The head's parameters
    ``rho`` (D,) and ``bias`` live in this module and are saved with the model.

    Shapes: ``(embeddings (B, D), labels (B,))`` over every ordered pair of the batch (or a
    miner's), or ``from_pairs(h1 (N, D), h2 (N, D), y (N,))``.
    """

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.rho = nn.Parameter(torch.zeros(embedding_dim))
        self.bias = nn.Parameter(torch.zeros(()))
        self.distance = WeightedL1Distance(self._current_weights)  # reads rho at every call

    def _current_weights(self) -> torch.Tensor:
        return nn.functional.softplus(self.rho)

    @property
    def weights(self) -> torch.Tensor:
        return self._current_weights()

    def per_pair(self, dist, same):
        return nn.functional.binary_cross_entropy_with_logits(self.bias - dist, same, reduction="none")

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}"
