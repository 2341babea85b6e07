"""Losses, one per file, and the registry that the CLI, the config and the report share.

Every loss takes ``loss(embeddings, labels, indices_tuple=None)`` (pytorch-metric-learning's
convention) and its explicit form (``(anchor, positive, negative)`` or ``(x1, x2, same)``).
Its ``distance`` attribute is the distance it trains, which retrieval and the device then use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import UserError
from .base import batch_all_margin_loss
from .contrastive import ContrastiveLoss
from .koch import KochLoss
from .lossless import LosslessTripletLoss
from .shadow import ShadowLoss
from .triplet import TripletMarginLoss


@dataclass(frozen=True)
class LossSpec:
    """How a registered loss is built and which model head it expects."""

    build: Callable[[int, float | None], nn.Module]  # (embedding_dim, margin) -> loss
    head: str  # the model head this loss is meant for
    margin: float | None  # default margin; None when the loss has none


LOSSES: dict[str, LossSpec] = {
    "triplet": LossSpec(lambda dim, m: TripletMarginLoss(margin=m), head="l2", margin=0.2),
    "shadow": LossSpec(lambda dim, m: ShadowLoss(margin=m, normalize=True), head="l2", margin=0.2),
    "shadow-raw": LossSpec(lambda dim, m: ShadowLoss(margin=m, normalize=False), head="none", margin=0.2),
    "lossless": LossSpec(lambda dim, m: LosslessTripletLoss(embedding_dim=dim), head="sigmoid", margin=None),
    "contrastive": LossSpec(lambda dim, m: ContrastiveLoss(margin=m), head="none", margin=1.0),
    "koch": LossSpec(lambda dim, m: KochLoss(embedding_dim=dim), head="sigmoid", margin=None),
}


def create_loss(name: str, embedding_dim: int, margin: float | None = None) -> nn.Module:
    """Build a registered loss; ``margin=None`` takes the loss's default."""
    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    spec = LOSSES[name]
    if margin is not None and spec.margin is None:
        raise UserError(f"the {name} loss has no margin: drop --margin")
    return spec.build(embedding_dim, spec.margin if margin is None else margin)


__all__ = [
    "LOSSES",
    "ContrastiveLoss",
    "KochLoss",
    "LossSpec",
    "LosslessTripletLoss",
    "ShadowLoss",
    "TripletMarginLoss",
    "batch_all_margin_loss",
    "create_loss",
]
