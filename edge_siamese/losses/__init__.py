"""Losses, one per file, and ``LOSSES``, the registry by whose names the CLI and config.json call them.

Every loss takes ``loss(embeddings, labels, indices_tuple=None)`` (pytorch-metric-learning's
call, a miner's tuple positionally) and names its explicit form (``from_triplets`` or
``from_pairs``). Its ``distance`` attribute is the distance it trains, which retrieval and the
device then use.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

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
    """A registered loss: its class, fixed arguments, and the model head it is meant for.

    The default margin is the class's own (its ``margin`` parameter's default); a class without
    a ``margin`` parameter has none.
    """

    cls: type[nn.Module]
    head: str
    kwargs: dict = field(default_factory=dict)

    @property
    def margin(self) -> float | None:
        if "margin" in self.kwargs:
            return self.kwargs["margin"]
        return _default_margin(self.cls)

    def build(self, embedding_dim: int, margin: float | None = None) -> nn.Module:
        args = dict(self.kwargs)
        if "embedding_dim" in inspect.signature(self.cls).parameters:
            args["embedding_dim"] = embedding_dim
        if margin is not None:
            args["margin"] = margin
        return self.cls(**args)


def _default_margin(cls: type[nn.Module]) -> float | None:
    parameter = inspect.signature(cls).parameters.get("margin")
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


LOSSES: dict[str, LossSpec] = {
    "triplet": LossSpec(TripletMarginLoss, head="l2"),
    "shadow": LossSpec(ShadowLoss, head="l2", kwargs={"normalize": True}),
    # Shadow's algebraic twin: on the unit sphere 1 - cos(a, x) = ||a - x||^2 / 2, so normalised
    # Shadow at margin m is half the squared-Euclidean triplet at margin 2m. A gain of Shadow over
    # "triplet" that this loss shares comes from the change of distance, not from the shadow.
    "triplet-squared": LossSpec(TripletMarginLoss, head="l2", kwargs={"squared": True, "margin": 2 * _default_margin(ShadowLoss)}),
    "shadow-raw": LossSpec(ShadowLoss, head="none", kwargs={"normalize": False}),
    "lossless": LossSpec(LosslessTripletLoss, head="sigmoid"),
    "contrastive": LossSpec(ContrastiveLoss, head="none"),
    "koch": LossSpec(KochLoss, head="sigmoid"),
}


def create_loss(name: str, embedding_dim: int, margin: float | None = None) -> nn.Module:
    """Build a registered loss; ``margin=None`` takes the loss's default."""
    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    spec = LOSSES[name]
    if margin is not None and spec.margin is None:
        raise UserError(f"the {name} loss has no margin: drop --margin")
    return spec.build(embedding_dim, margin)


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
