"""Losses: the exact O(B^2) batch-all against a dense B^3 reference, hand formulas, and pml/torch parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.reducers import MeanReducer
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from edge_siamese.distances import DISTANCES, SquaredEuclideanDistance, WeightedL1Distance
from edge_siamese.errors import UserError
from edge_siamese.losses import (
    LOSSES,
    ContrastiveLoss,
    KochLoss,
    LosslessTripletLoss,
    ShadowLoss,
    TripletMarginLoss,
    create_loss,
)
from edge_siamese.losses.base import all_pairs, to_pairs, to_triplets
from edge_siamese.models import HEADS

REDUCTIONS = ("mean_active", "mean")
MARGIN_LOSSES = {
    "shadow": lambda margin, reduction: ShadowLoss(margin=margin, normalize=True, reduction=reduction),
    "shadow_raw": lambda margin, reduction: ShadowLoss(margin=margin, normalize=False, reduction=reduction),
    "triplet": lambda margin, reduction: TripletMarginLoss(margin=margin, squared=False, reduction=reduction),
    "triplet_squared": lambda margin, reduction: TripletMarginLoss(margin=margin, squared=True, reduction=reduction),
}


def _masks(labels: torch.Tensor) -> torch.Tensor:
    """``valid[a, p, n]``: p shares a's label (p != a) and n does not."""
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool)
    return pos[:, :, None] & ~same[:, None, :]


def dense_margin_loss(dist: torch.Tensor, labels: torch.Tensor, margin: float, reduction: str) -> torch.Tensor:
    """The B^3 definition: every valid (a, p, n), hinge ``d[a,p] - d[a,n] + margin``."""
    valid = _masks(labels)
    hinge = torch.relu(dist[:, :, None] - dist[:, None, :] + margin)
    hinge = torch.where(valid, hinge, torch.zeros_like(hinge))
    count = (hinge > 0).sum() if reduction == "mean_active" else valid.sum()
    return hinge.sum() / max(int(count), 1)


def loss_and_grad(fn, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = emb.detach().clone().requires_grad_(True)
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


def assert_batch_all_exact(loss, emb: torch.Tensor, labels: torch.Tensor) -> None:
    got, got_grad = loss_and_grad(lambda x: loss(x, labels), emb)
    want, want_grad = loss_and_grad(
        lambda x: dense_margin_loss(loss.distance(x), labels, loss.margin, loss.reduction), emb
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


# --- exact batch-all ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", MARGIN_LOSSES)
@pytest.mark.parametrize(("seed", "num_classes"), [(0, 2), (1, 3), (2, 5), (3, 9)])
def test_batch_all_equals_dense_reference_random(name, reduction, seed, num_classes):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(18, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(num_classes, (18,), generator=gen)
    loss = MARGIN_LOSSES[name](0.3 if "squared" not in name else 1.0, reduction)
    assert_batch_all_exact(loss, emb, labels)
    assert loss(emb, labels).item() > 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", MARGIN_LOSSES)
def test_batch_all_with_duplicated_embeddings(name, reduction):
    gen = torch.Generator().manual_seed(10)
    base = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    emb = torch.cat([base, base, base[:3]])  # exact ties in every row of the distance matrix
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 1, 2])
    assert_batch_all_exact(MARGIN_LOSSES[name](0.25, reduction), emb, labels)


# Margins that make thresholds d[a,p] + margin land exactly on negatives of points on a line.
BOUNDARY_MARGINS = {"shadow": 2.0, "shadow_raw": 1.0, "triplet": 1.0, "triplet_squared": 3.0}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", MARGIN_LOSSES)
def test_batch_all_with_thresholds_landing_exactly_on_negatives(name, reduction):
    # Integer positions on a line: every distance is exact (for the raw shadow, on the positive
    # half-line the shadow of x on a is x itself, so d = |a - x|; normalised, d is 0 or 2), and the
    # margin puts many thresholds exactly on a negative's distance, where the hinge is 0, not active.
    pos = torch.tensor([-3.0, -1.0, 1.0, 1.0, 2.0, 2.0, 4.0, 5.0, 7.0, 1.0, -1.0, 3.0], dtype=torch.float64)
    if name == "shadow_raw":
        pos = pos + 10
    emb = torch.stack([pos, torch.zeros_like(pos)], dim=1)
    labels = torch.tensor([0, 1, 0, 1, 2, 0, 2, 1, 0, 2, 2, 1])
    margin = BOUNDARY_MARGINS[name]
    loss = MARGIN_LOSSES[name](margin, reduction)
    dist = loss.distance(emb)
    on_boundary = _masks(labels) & (dist[:, :, None] + margin == dist[:, None, :])
    assert on_boundary.sum() >= 3, "the example must put thresholds exactly on negatives"
    assert_batch_all_exact(loss, emb, labels)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["triplet", "triplet_squared", "shadow_raw"])
def test_batch_all_with_integer_embeddings(name, reduction):
    gen = torch.Generator().manual_seed(11)
    emb = torch.randint(-2, 3, (16, 3), generator=gen).to(torch.float64)
    labels = torch.randint(3, (16,), generator=gen)
    loss = MARGIN_LOSSES[name](1.0, reduction)
    dist = loss.distance(emb)
    ties = _masks(labels) & (dist[:, :, None] + 1.0 == dist[:, None, :])
    assert ties.any()
    assert_batch_all_exact(loss, emb, labels)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", MARGIN_LOSSES)
@pytest.mark.parametrize("labels", [[4] * 7, list(range(7))], ids=["one_class", "all_distinct"])
def test_batch_all_without_a_valid_triplet_is_zero(name, reduction, labels):
    emb = torch.randn(7, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    value, grad = loss_and_grad(lambda x: MARGIN_LOSSES[name](0.2, reduction)(x, torch.tensor(labels)), emb)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batch_all_counts_active_triplets_by_hand(reduction):
    # 1-D points; anchor-relative distances are easy to list by hand.
    emb = torch.tensor([[0.0], [1.0], [1.5], [3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    loss = TripletMarginLoss(margin=1.0, reduction=reduction)
    # (a, p, n) and hinge d(a,p) - d(a,n) + 1:
    # (0,1,2): 1-1.5+1=0.5  (0,1,3): 1-3+1=-1->0  (1,0,2): 1-0.5+1=1.5  (1,0,3): 1-2+1=0
    # (2,3,0): 1.5-1.5+1=1  (2,3,1): 1.5-0.5+1=2  (3,2,0): 1.5-3+1=-0.5->0  (3,2,1): 1.5-2+1=0.5
    total = 0.5 + 1.5 + 1.0 + 2.0 + 0.5
    want = total / 5 if reduction == "mean_active" else total / 8
    assert loss(emb, labels).item() == pytest.approx(want, abs=1e-12)


def test_memory_smoke_large_batch_runs_forward_and_backward():
    gen = torch.Generator().manual_seed(6)
    emb = torch.randn(2048, 64, generator=gen).requires_grad_(True)
    labels = torch.randint(64, (2048,), generator=gen)
    value = ShadowLoss(margin=0.2)(emb, labels)
    value.backward()
    assert math.isfinite(value.item()) and value.item() > 0
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


# --- margin triplet losses against torch and pytorch-metric-learning -----------------------------


def test_triplet_explicit_mean_equals_torch_triplet_margin_loss():
    gen = torch.Generator().manual_seed(7)
    a, p, n = (torch.randn(50, 8, generator=gen) for _ in range(3))
    for margin in (0.1, 0.5, 2.0):
        got = TripletMarginLoss(margin=margin, reduction="mean").from_triplets(a, p, n)
        want = torch.nn.functional.triplet_margin_loss(a, p, n, margin=margin)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_triplet_explicit_mean_active_averages_nonzero_terms():
    a = torch.tensor([[0.0], [0.0], [0.0]], dtype=torch.float64)
    p = torch.tensor([[1.0], [1.0], [1.0]], dtype=torch.float64)
    n = torch.tensor([[0.5], [3.0], [1.25]], dtype=torch.float64)
    # hinges with margin 1: 1.5, 0 (-1), 0.75
    assert TripletMarginLoss(1.0).from_triplets(a, p, n).item() == pytest.approx(2.25 / 2)
    assert TripletMarginLoss(1.0, reduction="mean").from_triplets(a, p, n).item() == pytest.approx(2.25 / 3)


def _pml_triplet(margin: float, squared: bool, reduction: str) -> pml_losses.TripletMarginLoss:
    kwargs = {"reducer": MeanReducer()} if reduction == "mean" else {}
    distance = LpDistance(normalize_embeddings=False, power=2 if squared else 1)
    return pml_losses.TripletMarginLoss(margin=margin, distance=distance, **kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_in_batch_equals_pml(squared, reduction, seed):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(4, (32,), generator=gen)
    margin = 0.4
    got = TripletMarginLoss(margin, squared=squared, reduction=reduction)(emb, labels)
    want = _pml_triplet(margin, squared, reduction)(emb, labels)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("miner_type", ["all", "semihard", "hard"])
def test_triplet_with_pml_miner_tuple_equals_pml(squared, miner_type):
    gen = torch.Generator().manual_seed(8)
    emb = torch.randn(24, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(3, (24,), generator=gen)
    miner = pml_miners.TripletMarginMiner(
        margin=0.5, type_of_triplets=miner_type, distance=LpDistance(normalize_embeddings=False)
    )
    indices = miner(emb, labels)
    assert len(indices[0]) > 0
    for reduction in REDUCTIONS:
        got = TripletMarginLoss(0.5, squared=squared, reduction=reduction)(emb, labels, indices_tuple=indices)
        want = _pml_triplet(0.5, squared, reduction)(emb, labels, indices_tuple=indices)
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_pairs_tuple_converts_to_triplets_like_pml():
    gen = torch.Generator().manual_seed(9)
    labels = torch.randint(3, (10,), generator=gen)
    a1, p, a2, n = lmu.get_all_pairs_indices(labels)
    keep1 = torch.rand(len(a1), generator=gen) < 0.5
    keep2 = torch.rand(len(a2), generator=gen) < 0.5
    pairs = (a1[keep1], p[keep1], a2[keep2], n[keep2])
    got = to_triplets(pairs)
    want = lmu.convert_to_triplets(pairs, labels)
    assert len(got[0]) > 0
    for g, w in zip(got, want):
        assert torch.equal(g, w)

    emb = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    for reduction in REDUCTIONS:
        got_loss = TripletMarginLoss(0.3, reduction=reduction)(emb, labels, indices_tuple=pairs)
        want_loss = _pml_triplet(0.3, False, reduction)(emb, labels, indices_tuple=pairs)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-7, atol=1e-9)


def test_triplet_tuple_passes_through_and_gives_pml_pairs():
    a, p, n = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])
    assert to_triplets((a, p, n)) == (a, p, n)
    got = to_pairs((a, p, n))
    want = lmu.convert_to_pairs((a, p, n), torch.zeros(6))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_all_pairs_matches_pml():
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    for g, w in zip(all_pairs(labels), lmu.get_all_pairs_indices(labels)):
        assert torch.equal(g, w)


def test_unknown_reduction_raises():
    with pytest.raises(UserError, match="reduction"):
        ShadowLoss(reduction="sum")


def test_bad_shapes_raise_user_error():
    with pytest.raises(UserError, match="labels"):
        ShadowLoss()(torch.randn(4, 3), torch.tensor([0, 1, 0]))


# --- Shadow Loss -------------------------------------------------------------------------------


def _cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


def _nonzero_rows(x: np.ndarray) -> bool:
    return bool((np.linalg.norm(x, axis=1) > 1e-3).all())


triplet_arrays = st.integers(1, 6).flatmap(
    lambda n: st.tuples(
        *[
            arrays(np.float64, (n, 4), elements=st.floats(-10, 10, allow_nan=False, allow_infinity=False)).filter(
                _nonzero_rows
            )
            for _ in range(3)
        ]
    )
)


@settings(max_examples=60, deadline=None)
@given(triplet_arrays, st.floats(0.0, 2.0))
def test_shadow_normalized_explicit_is_cosine_hinge(triplet, margin):
    a, p, n = triplet
    want = np.maximum(_cos(a, n) - _cos(a, p) + margin, 0).mean()
    loss = ShadowLoss(margin=margin, normalize=True, reduction="mean")
    got = loss.from_triplets(*(torch.from_numpy(x) for x in triplet))
    assert got.item() == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_shadow_explicit_equals_in_batch_with_indices(normalize, reduction):
    gen = torch.Generator().manual_seed(12)
    emb = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(4, (20,), generator=gen)
    valid = _masks(labels).nonzero(as_tuple=True)
    pick = torch.randperm(len(valid[0]), generator=gen)[:40]
    a, p, n = (idx[pick] for idx in valid)
    loss = ShadowLoss(margin=0.3, normalize=normalize, reduction=reduction)

    explicit, explicit_grad = loss_and_grad(lambda x: loss.from_triplets(x[a], x[p], x[n]), emb)
    in_batch, in_batch_grad = loss_and_grad(lambda x: loss(x, labels, indices_tuple=(a, p, n)), emb)
    torch.testing.assert_close(explicit, in_batch, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(explicit_grad, in_batch_grad, rtol=1e-7, atol=1e-10)
    assert explicit.item() > 0



@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_shadow_normalized_is_the_raw_shadow_loss_of_unit_embeddings(reduction):
    # On the unit sphere ||a|| = 1 and the shadow distance is 1 - cos: normalize=True trains it.
    gen = torch.Generator().manual_seed(18)
    emb = torch.randn(20, 5, generator=gen, dtype=torch.float64) * (0.5 + 5 * torch.rand(20, 1, generator=gen))
    labels = torch.randint(4, (20,), generator=gen)
    normalized = ShadowLoss(margin=0.3, normalize=True, reduction=reduction)
    raw = ShadowLoss(margin=0.3, normalize=False, reduction=reduction)
    got, got_grad = loss_and_grad(lambda x: normalized(x, labels), emb)
    want, want_grad = loss_and_grad(lambda x: raw(x / x.norm(dim=1, keepdim=True), labels), emb)
    assert got.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-12)

def test_shadow_raw_by_hand():
    a = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # ||a|| = 5
    p = torch.tensor([[6.0, 8.0]], dtype=torch.float64)  # s_p = 50 / 5 = 10 -> delta_p = 5
    n = torch.tensor([[3.0, 0.0]], dtype=torch.float64)  # s_n = 9 / 5 = 1.8 -> delta_n = 3.2
    loss = ShadowLoss(margin=0.5, normalize=False)
    assert loss.from_triplets(a, p, n).item() == pytest.approx(5 - 3.2 + 0.5)
    # A negative whose shadow falls far from ||a||: inactive, the mean over no active term is 0.
    far = torch.tensor([[-10.0, 0.0]], dtype=torch.float64)  # s = -6 -> delta = 11
    assert loss.from_triplets(a, p, far).item() == 0.0
    assert ShadowLoss(margin=0.5, normalize=False, reduction="mean").from_triplets(
        torch.cat([a, a]), torch.cat([p, p]), torch.cat([n, far])
    ).item() == pytest.approx(2.3 / 2)


# --- lossless triplet --------------------------------------------------------------------------


def test_lossless_formula_by_hand():
    n_dim = 3
    a = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.5, 0.0, 0.0]], dtype=torch.float64)  # d+ = 0.25
    n = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)  # d- = 2
    eps = 1e-8
    want = -math.log(1 - 0.25 / 3 + eps) - math.log(1 - (3 - 2) / 3 + eps)
    assert LosslessTripletLoss(n_dim).from_triplets(a, p, n).item() == pytest.approx(want, rel=1e-12)
    # beta other than N changes only the divisor.
    want_beta = -math.log(1 - 0.25 / 6 + eps) - math.log(1 - (3 - 2) / 6 + eps)
    assert LosslessTripletLoss(n_dim, beta=6).from_triplets(a, p, n).item() == pytest.approx(want_beta, rel=1e-12)
    # The perfect triplet (p on a, n at the opposite corner) costs -2 ln(1 + eps), about 0.
    perfect = LosslessTripletLoss(n_dim).from_triplets(a, a, torch.ones(1, 3, dtype=torch.float64))
    assert perfect.item() == pytest.approx(-2 * math.log1p(eps), rel=1e-6)


@pytest.mark.parametrize(("seed", "num_classes"), [(0, 2), (1, 4), (2, 7)])
def test_lossless_in_batch_equals_dense_mean(seed, num_classes):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.rand(15, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(num_classes, (15,), generator=gen)
    loss = LosslessTripletLoss(6)

    def dense(x):
        dist = SquaredEuclideanDistance()(x)
        terms = loss.positive_term(dist)[:, :, None] + loss.negative_term(dist)[:, None, :]
        return terms[_masks(labels)].mean()

    got, got_grad = loss_and_grad(lambda x: loss(x, labels), emb)
    want, want_grad = loss_and_grad(dense, emb)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


def test_lossless_without_valid_triplets_is_zero():
    emb = torch.rand(5, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    value, grad = loss_and_grad(lambda x: LosslessTripletLoss(3)(x, torch.zeros(5, dtype=torch.long)), emb)
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("bad", [-0.01, 1.01])
def test_lossless_rejects_values_outside_unit_interval(bad):
    emb = torch.full((4, 3), 0.5)
    emb[2, 1] = bad
    loss = LosslessTripletLoss(3)
    with pytest.raises(UserError, match="sigmoid"):
        loss(emb, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(UserError, match="sigmoid"):
        loss.from_triplets(emb[:1], emb[1:2], emb[2:3])


def test_lossless_rejects_wrong_embedding_dim():
    with pytest.raises(UserError, match="embedding_dim"):
        LosslessTripletLoss(4)(torch.rand(4, 3), torch.tensor([0, 0, 1, 1]))


# --- contrastive -------------------------------------------------------------------------------


def test_contrastive_formula_by_hand_and_label_convention():
    x1 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    x2 = torch.tensor([[3.0, 4.0], [0.3, 0.4], [3.0, 4.0]], dtype=torch.float64)  # d = 5, 0.5, 5
    loss = ContrastiveLoss(margin=1.0)
    # same pair (y = 1): d^2 / 2
    assert loss.from_pairs(x1[:1], x2[:1], torch.tensor([1])).item() == pytest.approx(12.5)
    # different pair (y = 0) closer than the margin: (1 - 0.5)^2 / 2; beyond it: 0
    assert loss.from_pairs(x1[1:2], x2[1:2], torch.tensor([0])).item() == pytest.approx(0.125)
    assert loss.from_pairs(x1[2:], x2[2:], torch.tensor([0])).item() == 0.0
    both = loss.from_pairs(x1, x2, torch.tensor([1, 0, 0]))
    assert both.item() == pytest.approx((12.5 + 0.125 + 0.0) / 3)


def test_contrastive_in_batch_equals_mean_over_ordered_pairs():
    gen = torch.Generator().manual_seed(13)
    emb = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    labels = torch.randint(3, (12,), generator=gen)
    margin = 2.0
    e, y = emb.numpy(), labels.numpy()
    terms = []
    for i in range(12):
        for j in range(12):
            if i == j:
                continue
            d = np.linalg.norm(e[i] - e[j])
            terms.append(0.5 * d**2 if y[i] == y[j] else 0.5 * max(margin - d, 0) ** 2)
    got = ContrastiveLoss(margin)(emb, labels)
    assert got.item() == pytest.approx(np.mean(terms), rel=1e-10)


def test_contrastive_with_triplet_tuple_uses_its_pairs():
    emb = torch.tensor([[0.0], [1.0], [0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    # (a=0, p=1, n=2): pairs (0, 1) same, d = 1 -> 0.5; (0, 2) different, d = 0.5 -> 0.125
    got = ContrastiveLoss(1.0)(emb, labels, indices_tuple=(torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    assert got.item() == pytest.approx((0.5 + 0.125) / 2)


def test_pair_loss_with_empty_tuple_is_zero_with_a_gradient_path():
    emb = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    empty = torch.tensor([], dtype=torch.long)
    value = ContrastiveLoss()(emb, torch.tensor([0, 1, 0, 1]), indices_tuple=(empty, empty, empty))
    value.backward()
    assert value.item() == 0.0 and torch.equal(emb.grad, torch.zeros_like(emb))


# --- Koch --------------------------------------------------------------------------------------


def test_koch_bce_formula_by_hand():
    loss = KochLoss(embedding_dim=3)
    with torch.no_grad():
        loss.rho.copy_(torch.tensor([0.0, 1.0, -2.0]))
        loss.bias.fill_(0.7)
    h1 = torch.tensor([[0.2, 0.9, 0.1], [0.5, 0.5, 0.5]])
    h2 = torch.tensor([[0.6, 0.1, 0.1], [0.0, 1.0, 0.25]])
    same = torch.tensor([1.0, 0.0])
    w = np.log1p(np.exp([0.0, 1.0, -2.0]))  # softplus(rho)
    terms = []
    for x, y, t in zip(h1.numpy(), h2.numpy(), same.numpy()):
        prob = 1 / (1 + np.exp(-(0.7 - (w * np.abs(x - y)).sum())))
        terms.append(-t * np.log(prob) - (1 - t) * np.log(1 - prob))
    assert loss.from_pairs(h1, h2, same).item() == pytest.approx(np.mean(terms), rel=1e-5)
    torch.testing.assert_close(loss.weights, torch.tensor(w, dtype=torch.float32))
    assert isinstance(loss.distance, WeightedL1Distance)
    torch.testing.assert_close(loss.distance.weights, loss.weights)


def test_koch_parameters_in_state_dict_and_gradients_reach_them():
    loss = KochLoss(embedding_dim=4)
    state = loss.state_dict()
    assert set(state) == {"rho", "bias"}
    assert state["rho"].shape == (4,) and state["bias"].shape == ()

    gen = torch.Generator().manual_seed(14)
    emb = torch.sigmoid(torch.randn(10, 4, generator=gen))
    labels = torch.randint(3, (10,), generator=gen)
    loss(emb, labels).backward()
    assert loss.rho.grad is not None and loss.bias.grad is not None
    assert torch.isfinite(loss.rho.grad).all() and (loss.rho.grad != 0).all()
    assert loss.bias.grad.item() != 0

    restored = KochLoss(embedding_dim=4)
    with torch.no_grad():
        loss.rho.add_(0.5)
    restored.load_state_dict(loss.state_dict())
    torch.testing.assert_close(restored.weights, loss.weights)


def test_koch_in_batch_equals_explicit_over_all_ordered_pairs():
    gen = torch.Generator().manual_seed(15)
    emb = torch.sigmoid(torch.randn(9, 4, generator=gen, dtype=torch.float64))
    labels = torch.randint(3, (9,), generator=gen)
    loss = KochLoss(embedding_dim=4).double()
    i, j = (~torch.eye(9, dtype=torch.bool)).nonzero(as_tuple=True)
    explicit = loss.from_pairs(emb[i], emb[j], (labels[i] == labels[j]).double())
    torch.testing.assert_close(loss(emb, labels), explicit, rtol=1e-10, atol=1e-12)


# --- registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
def test_every_registered_loss_builds_with_the_margin_its_spec_reports(name):
    spec = LOSSES[name]
    loss = create_loss(name, embedding_dim=8)
    assert type(loss) is spec.cls
    assert getattr(loss, "margin", None) == spec.margin
    if spec.margin is None:
        with pytest.raises(UserError, match="no margin"):
            create_loss(name, 8, margin=0.37)
    else:
        assert spec.margin > 0
        assert create_loss(name, 8, margin=0.37).margin == 0.37


@pytest.mark.parametrize("name", LOSSES)
def test_every_registered_loss_trains_on_its_heads_output_with_a_distance_a_device_knows(name):
    spec = LOSSES[name]
    loss = spec.build(embedding_dim=8)
    assert DISTANCES[loss.distance.name] is type(loss.distance)
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(16, 8, generator=gen, requires_grad=True)
    labels = torch.randint(4, (16,), generator=gen)
    value = loss(HEADS[spec.head].module()(x), labels)
    value.backward()
    assert math.isfinite(value.item()) and value.item() > 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_triplet_squared_is_twice_normalised_shadow_at_twice_its_margin():
    """On L2-normalised embeddings 1 - cos = ||a - x||^2 / 2: the twin's loss and gradients are
    exactly twice Shadow's, for every batch (its default margin twice Shadow's)."""
    assert LOSSES["triplet-squared"].margin == 2 * LOSSES["shadow"].margin
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(24, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(4, (24,), generator=gen)
    unit = HEADS["l2"].module()
    for m in (0.1, 0.3):
        shadow, shadow_grad = loss_and_grad(lambda e: create_loss("shadow", 8, margin=m).double()(unit(e), labels), x)
        twin, twin_grad = loss_and_grad(lambda e: create_loss("triplet-squared", 8, margin=2 * m).double()(unit(e), labels), x)
        assert float(twin) == pytest.approx(2 * float(shadow), rel=1e-9) and torch.allclose(twin_grad, 2 * shadow_grad, atol=1e-12)


def test_registry_unknown_name_raises():
    with pytest.raises(UserError, match="unknown loss 'nope'"):
        create_loss("nope", 8)


# --- pytorch-metric-learning's call, exactly ------------------------------------------------------

# pml miners, each giving one kind of tuple: (a, p, n), or (a1, p, a2, n) pairs. They mine the raw
# outputs (pml's distance normalises them), so every loss gets the same tuples whatever its head;
# the margins keep a strict subset of the batch's triplets and pairs.
PML_MINERS = {
    "triplet_margin_all": lambda: pml_miners.TripletMarginMiner(margin=0.1, type_of_triplets="all"),
    "pair_margin": lambda: pml_miners.PairMarginMiner(pos_margin=1.2, neg_margin=1.4),
    "batch_easy_hard": lambda: pml_miners.BatchEasyHardMiner(),
}

# Our losses that pml has, built from our registry with this margin, and pml's twin.
PML_TWINS = {
    "triplet": lambda margin: pml_losses.TripletMarginLoss(margin=margin, distance=LpDistance()),
    # pml's hinge on similarities, s_an - s_ap + m, is (1 - cos_ap) - (1 - cos_an) + m.
    "shadow": lambda margin: pml_losses.TripletMarginLoss(margin=margin, distance=CosineSimilarity()),
    "triplet-squared": lambda margin: pml_losses.TripletMarginLoss(margin=margin, distance=LpDistance(power=2)),
}


def _pml_batch(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """32 raw outputs (float64) and labels of 4 classes, and the head the registry gives the loss."""
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(32, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(4, (32,), generator=gen)
    return x, labels, HEADS[LOSSES[name].head].module()


def _mined(miner: str, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    indices = PML_MINERS[miner]()(x, labels)
    assert all(len(i) > 0 for i in indices), "the example must mine pairs/triplets of every kind"
    return indices


def _shadow_raw_by_formula(loss, emb, labels, indices):
    a, p, n = lmu.convert_to_triplets(indices, labels)

    def delta(anchor, x):  # | ||a|| - a.x / ||a|| |
        norm = anchor.pow(2).sum(1).sqrt()
        return (norm - (anchor * x).sum(1) / norm).abs()

    hinge = torch.relu(delta(emb[a], emb[p]) - delta(emb[a], emb[n]) + loss.margin)
    return hinge.sum() / (hinge > 0).sum()


def _lossless_by_formula(loss, emb, labels, indices):
    a, p, n = lmu.convert_to_triplets(indices, labels)
    dim, eps = emb.shape[1], 1e-8  # beta = N
    d_pos = (emb[a] - emb[p]).pow(2).sum(1)
    d_neg = (emb[a] - emb[n]).pow(2).sum(1)
    return (-torch.log(1 - d_pos / dim + eps) - torch.log(1 - (dim - d_neg) / dim + eps)).mean()


def _contrastive_by_formula(loss, emb, labels, indices):
    a1, p, a2, n = lmu.convert_to_pairs(indices, labels)
    d_pos = (emb[a1] - emb[p]).pow(2).sum(1).sqrt()
    d_neg = (emb[a2] - emb[n]).pow(2).sum(1).sqrt()
    return torch.cat([0.5 * d_pos.pow(2), 0.5 * torch.relu(loss.margin - d_neg).pow(2)]).mean()


def _koch_by_formula(loss, emb, labels, indices):
    a1, p, a2, n = lmu.convert_to_pairs(indices, labels)
    weights = torch.log1p(torch.exp(loss.rho))
    logit_pos = loss.bias - (weights * (emb[a1] - emb[p]).abs()).sum(1)
    logit_neg = loss.bias - (weights * (emb[a2] - emb[n]).abs()).sum(1)
    # -y log p - (1 - y) log(1 - p), p = sigmoid(logit): y = 1 for the pairs (a1, p), 0 for (a2, n)
    log_sigmoid = torch.nn.functional.logsigmoid
    return torch.cat([-log_sigmoid(logit_pos), -log_sigmoid(-logit_neg)]).mean()


# Our losses that pml lacks: the formula on the tuples, and a margin that keeps both of the
# loss's branches active on the test batch (None: the loss has no margin).
FORMULAS = {
    "shadow-raw": (_shadow_raw_by_formula, 0.5),
    "lossless": (_lossless_by_formula, None),
    "contrastive": (_contrastive_by_formula, 4.0),
    "koch": (_koch_by_formula, None),
}


def _built(name: str, margin: float | None) -> torch.nn.Module:
    loss = LOSSES[name].build(embedding_dim=8, margin=margin).double()
    if isinstance(loss, KochLoss):  # a head away from its zero initialisation
        with torch.no_grad():
            loss.rho.copy_(torch.linspace(-1.0, 1.0, 8, dtype=torch.float64))
            loss.bias.fill_(1.5)
    return loss


@pytest.mark.parametrize("miner", PML_MINERS)
@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_takes_a_pml_miners_tuple_positionally(name, miner):
    x, labels, head = _pml_batch(name)
    emb = head(x)
    indices = _mined(miner, x, labels)
    loss = _built(name, None)
    positional = loss(emb, labels, indices)
    assert torch.equal(positional, loss(emb, labels, indices_tuple=indices))
    assert positional.item() != pytest.approx(loss(emb, labels).item(), rel=1e-6), "the tuple must be used"


def test_every_registered_loss_is_checked_against_pml_or_its_formula():
    assert set(PML_TWINS) | set(FORMULAS) == set(LOSSES)
    assert not set(PML_TWINS) & set(FORMULAS)


@pytest.mark.parametrize("miner", PML_MINERS)
@pytest.mark.parametrize("name", PML_TWINS)
def test_loss_with_a_pml_twin_equals_it_on_pml_mined_tuples(name, miner):
    x, labels, head = _pml_batch(name)
    indices = _mined(miner, x, labels)
    margin = 0.3
    loss = _built(name, margin)
    got, got_grad = loss_and_grad(lambda x: loss(head(x), labels, indices), x)
    want, want_grad = loss_and_grad(lambda x: PML_TWINS[name](margin)(head(x), labels, indices), x)
    assert got.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("miner", PML_MINERS)
@pytest.mark.parametrize("name", FORMULAS)
def test_loss_without_a_pml_twin_equals_its_formula_on_pml_mined_tuples(name, miner):
    x, labels, head = _pml_batch(name)
    indices = _mined(miner, x, labels)
    formula, margin = FORMULAS[name]
    loss = _built(name, margin)
    got, got_grad = loss_and_grad(lambda x: loss(head(x), labels, indices), x)
    want, want_grad = loss_and_grad(lambda x: formula(loss, head(x), labels, indices), x)
    assert got.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-12)
