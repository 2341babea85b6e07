"""Triplet miners returning pytorch-metric-learning-compatible ``(a, p, n)`` index tuples.

A miner is called as ``miner(embeddings, labels)`` and works under ``torch.no_grad``; pass its
tuple to a loss as ``indices_tuple``. Without a miner the losses use every valid triplet of
the batch (the exact O(B^2) batch-all), which is the training default (``--miner batch-all``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .distances import BaseDistance, EuclideanDistance
from .errors import UserError
from .losses.base import label_masks


class TripletMarginMiner(nn.Module):
    """Triplets selected by ``m = d(a, n) - d(a, p)``, as pytorch-metric-learning defines them.

    ``all``: ``m <= margin`` (every triplet with a non-zero hinge, and the boundary);
    ``hard``: ``m <= 0``; ``semihard``: ``0 < m <= margin``; ``easy``: ``m > margin``.
    Builds a ``(B, B, B)`` boolean mask: meant for ordinary batch sizes.
    """

    TYPES = ("all", "hard", "semihard", "easy")

    def __init__(self, margin: float = 0.2, type_of_triplets: str = "all", distance: BaseDistance | None = None):
        super().__init__()
        if type_of_triplets not in self.TYPES:
            raise UserError(f"unknown type_of_triplets {type_of_triplets!r}: choose one of {', '.join(self.TYPES)}")
        self.margin = margin
        self.type_of_triplets = type_of_triplets
        self.distance = distance if distance is not None else EuclideanDistance()

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dist = self.distance(embeddings)
        pos_mask, neg_mask = label_masks(labels)
        margins = dist[:, None, :] - dist[:, :, None]  # [a, p, n] = d(a, n) - d(a, p)
        if self.type_of_triplets == "easy":
            keep = margins > self.margin
        else:
            keep = margins <= self.margin
            if self.type_of_triplets == "hard":
                keep &= margins <= 0
            elif self.type_of_triplets == "semihard":
                keep &= margins > 0
        keep &= pos_mask[:, :, None] & neg_mask[:, None, :]
        return keep.nonzero(as_tuple=True)


class BatchHardMiner(nn.Module):
    """Per anchor, its farthest positive and its nearest negative (Hermans et al., 2017).

    Anchors without a positive or a negative in the batch are left out.
    """

    def __init__(self, distance: BaseDistance | None = None):
        super().__init__()
        self.distance = distance if distance is not None else EuclideanDistance()

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dist = self.distance(embeddings)
        pos_mask, neg_mask = label_masks(labels)
        hardest_p = dist.masked_fill(~pos_mask, -torch.inf).argmax(1)
        hardest_n = dist.masked_fill(~neg_mask, torch.inf).argmin(1)
        anchors = (pos_mask.any(1) & neg_mask.any(1)).nonzero(as_tuple=True)[0]
        return anchors, hardest_p[anchors], hardest_n[anchors]


@dataclass(frozen=True)
class MinerSpec:
    """``build(margin, distance)``: the miner on the loss's margin and distance (None: no miner)."""

    build: Callable[[float, BaseDistance], nn.Module | None]
    summary: str


MINERS: dict[str, MinerSpec] = {
    "batch-all": MinerSpec(lambda margin, distance: None, "every valid triplet, exactly, in O(B^2) (no miner)"),
    **{
        kind: MinerSpec(lambda margin, distance, kind=kind: TripletMarginMiner(margin, kind, distance), f"TripletMarginMiner, type_of_triplets={kind!r}")
        for kind in TripletMarginMiner.TYPES
    },
    "batch-hard": MinerSpec(lambda margin, distance: BatchHardMiner(distance), "per anchor its farthest positive and nearest negative"),
}


def create_miner(name: str, margin: float, distance: BaseDistance) -> nn.Module | None:
    """The miner called ``name`` on the loss's own distance; ``None`` for ``batch-all`` (no miner)."""
    if name not in MINERS:
        raise UserError(f"unknown miner {name!r}: choose one of {', '.join(MINERS)}")
    return MINERS[name].build(margin, distance)
