"""Call forms shared by the losses, the exact O(B^2) batch-all, and index-tuple conversions.

Every loss is called as pytorch-metric-learning's are, ``loss(embeddings, labels,
indices_tuple=None)``, with a miner's output accepted positionally (``loss(emb, labels,
miner(emb, labels))``). ``indices_tuple`` is a miner's ``(a, p, n)`` or ``(a1, p, a2, n)``; each
family converts the other kind the way pytorch-metric-learning does. The explicit forms are
named methods:

- triplet losses: ``loss.from_triplets(anchor, positive, negative)``;
- pair losses: ``loss.from_pairs(x1, x2, same)`` (``same`` = 1 for a same-class pair).
"""

from __future__ import annotations

import torch
from torch import nn

from ..distances import BaseDistance
from ..errors import UserError

IndicesTuple = tuple[torch.Tensor, ...]


def label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos_mask, neg_mask)``, both ``(B, B)`` bool: same label but not self, and other label."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def all_pairs(labels: torch.Tensor) -> IndicesTuple:
    """Every ordered pair of the batch as ``(a1, p, a2, n)``."""
    pos_mask, neg_mask = label_masks(labels)
    a1, p = pos_mask.nonzero(as_tuple=True)
    a2, n = neg_mask.nonzero(as_tuple=True)
    return a1, p, a2, n


def to_triplets(indices_tuple: IndicesTuple) -> IndicesTuple:
    """``(a, p, n)``; pairs ``(a1, p, a2, n)`` become every (positive, negative) that shares an anchor."""
    if len(indices_tuple) == 3:
        return indices_tuple
    a1, p, a2, n = indices_tuple
    i, j = (a1[:, None] == a2[None, :]).nonzero(as_tuple=True)
    return a1[i], p[i], n[j]


def to_pairs(indices_tuple: IndicesTuple) -> IndicesTuple:
    """``(a1, p, a2, n)``; a triplet ``(a, p, n)`` gives the pairs (a, p) and (a, n)."""
    if len(indices_tuple) == 4:
        return indices_tuple
    a, p, n = indices_tuple
    return a, p, a, n


def _check_labels(embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    if embeddings.dim() != 2 or labels.dim() != 1 or len(labels) != len(embeddings):
        raise UserError(
            f"expected embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )


class TripletLossBase(nn.Module):
    """A loss over (anchor, positive, negative) distances ``d_ap = d(a, p)``, ``d_an = d(a, n)``.

    Subclasses give the per-triplet term, its reduction and the in-batch form over all valid
    triplets of the batch (used when no ``indices_tuple`` is given).
    """

    def __init__(self, distance: BaseDistance):
        super().__init__()
        self.distance = distance

    def per_triplet(self, d_ap: torch.Tensor, d_an: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reduce(self, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_all(self, dist: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_embeddings(self, embeddings: torch.Tensor) -> None:
        """Hook for losses that need embeddings in a given range."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple: IndicesTuple | None = None) -> torch.Tensor:
        """pytorch-metric-learning's call: every valid triplet of the batch, or the miner's."""
        _check_labels(embeddings, labels)
        self.check_embeddings(embeddings)
        dist = self.distance(embeddings)
        if indices_tuple is None:
            return self.batch_all(dist, labels)
        a, p, n = to_triplets(indices_tuple)
        return self.reduce(self.per_triplet(dist[a, p], dist[a, n]))

    def from_triplets(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """The loss of explicit triplets: row k of each ``(N, D)`` input is one triplet."""
        for x in (anchor, positive, negative):
            self.check_embeddings(x)
        return self.reduce(self.per_triplet(self.distance.pairwise(anchor, positive), self.distance.pairwise(anchor, negative)))


class MarginTripletLoss(TripletLossBase):
    """``mean(max(d_ap - d_an + margin, 0))`` for any distance; Triplet and Shadow differ only in ``d``.

    ``reduction="mean_active"`` (default, FaceNet's batch-all and pytorch-metric-learning's
    ``AvgNonZeroReducer``) averages over the triplets whose term is > 0; ``"mean"`` over all.
    """

    def __init__(self, distance: BaseDistance, margin: float, reduction: str = "mean_active"):
        super().__init__(distance)
        if reduction not in ("mean_active", "mean"):
            raise UserError(f"unknown reduction {reduction!r}: use 'mean_active' or 'mean'")
        self.margin = margin
        self.reduction = reduction

    def per_triplet(self, d_ap, d_an):
        return torch.relu(d_ap + self.margin - d_an)

    def reduce(self, losses):
        if self.reduction == "mean":
            return losses.sum() / max(losses.numel(), 1)
        return losses.sum() / (losses > 0).sum().clamp_min(1)

    def batch_all(self, dist, labels):
        return batch_all_margin_loss(dist, labels, self.margin, self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


def batch_all_margin_loss(dist: torch.Tensor, labels: torch.Tensor, margin: float, reduction: str) -> torch.Tensor:
    """Exact batch-all ``max(d[a,p] - d[a,n] + margin, 0)`` over every valid triplet, in O(B^2) memory.

    Per anchor the negatives' distances are sorted once. For a positive p with threshold
    ``t = d[a,p] + margin`` the active negatives (``d[a,n] < t``) are a prefix of that order, of
    length ``k`` (``searchsorted``), so that positive's hinge sum is ``k * t - prefix_sum[k]``.
    Neither the ``B^3`` loss tensor nor the list of triplets is built; autograd through the sort
    and the prefix sums gives the exact gradient. ``dist`` is ``(B, B)`` with row = anchor.
    """
    pos_mask, neg_mask = label_masks(labels)
    keys = dist.detach().masked_fill(~neg_mask, torch.inf)
    sorted_keys, order = keys.sort(dim=1)
    sorted_neg = dist.masked_fill(~neg_mask, 0).gather(1, order)
    prefix = torch.nn.functional.pad(sorted_neg.cumsum(dim=1), (1, 0))
    threshold = dist + margin
    k = torch.searchsorted(sorted_keys, threshold.detach().contiguous(), side="left")
    k = k.masked_fill(~pos_mask, 0)
    hinge_sum = k * threshold - prefix.gather(1, k)
    total = hinge_sum.masked_fill(~pos_mask, 0).sum()
    if reduction == "mean_active":
        count = k.sum()
    else:
        count = (pos_mask.sum(1) * neg_mask.sum(1)).sum()
    return total / count.clamp_min(1)


class PairLossBase(nn.Module):
    """A loss over pairs with distance ``d`` and target ``y`` (1 = same class, 0 = different).

    ``mean`` over the pairs: all ordered pairs of the batch when no ``indices_tuple`` is given.
    """

    distance: BaseDistance  # set by each subclass

    def per_pair(self, dist: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple: IndicesTuple | None = None) -> torch.Tensor:
        """pytorch-metric-learning's call: every ordered pair of the batch, or the miner's."""
        _check_labels(embeddings, labels)
        a1, p, a2, n = to_pairs(indices_tuple) if indices_tuple is not None else all_pairs(labels)
        if len(a1) + len(a2) == 0:
            return embeddings.sum() * 0
        matrix = self.distance(embeddings)
        dist = torch.cat([matrix[a1, p], matrix[a2, n]])
        target = torch.cat([dist.new_ones(len(a1)), dist.new_zeros(len(a2))])
        return self.per_pair(dist, target).mean()

    def from_pairs(self, x1: torch.Tensor, x2: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        """The loss of explicit pairs: rows k of ``x1`` and ``x2`` (``(N, D)``), ``same[k]`` = 1 for a same-class pair."""
        dist = self.distance.pairwise(x1, x2)
        return self.per_pair(dist, same.to(dist.dtype)).mean()
