"""Distances: the matrix form, the row-wise form and a direct formula agree, and gradients stay finite."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from device_bench import metrics as device_metrics
from edge_siamese.distances import (
    DISTANCES,
    CosineDistance,
    EuclideanDistance,
    L1Distance,
    ShadowDistance,
    SquaredEuclideanDistance,
    WeightedL1Distance,
)

WEIGHTS = torch.tensor([0.5, 0.0, 2.0, 1.0, 3.0], dtype=torch.float64)


def _direct(name: str, a: np.ndarray, x: np.ndarray) -> float:
    """One distance straight from its definition, in numpy."""
    if name == "euclidean":
        return float(np.sqrt(((a - x) ** 2).sum()))
    if name == "squared_euclidean":
        return float(((a - x) ** 2).sum())
    if name == "l1":
        return float(np.abs(a - x).sum())
    if name == "weighted_l1":
        return float((WEIGHTS.numpy() * np.abs(a - x)).sum())
    if name == "cosine":
        return float(1 - a @ x / (np.linalg.norm(a) * np.linalg.norm(x)))
    if name == "shadow":
        norm = np.linalg.norm(a)
        return float(abs(norm - a @ x / norm))
    raise AssertionError(name)


def _direct_matrix(name: str, emb: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    rows = [[_direct(name, a.numpy(), x.numpy()) for x in ref] for a in emb]
    return torch.tensor(rows, dtype=torch.float64)


def _registered(name: str):
    """The distance ``DISTANCES`` calls ``name``; the weighted L1 on ``WEIGHTS``."""
    cls = DISTANCES[name]
    return cls(WEIGHTS) if cls is WeightedL1Distance else cls()


@pytest.mark.parametrize("name", DISTANCES)
def test_registered_under_its_own_name(name):
    assert _registered(name).name == name


def test_every_distance_is_one_the_device_computes():
    assert set(DISTANCES) == set(device_metrics.DISTANCES)


@pytest.mark.parametrize("name", DISTANCES)
def test_matrix_pairwise_and_direct_formula_agree(name):
    distance = _registered(name)
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    ref = torch.randn(4, 5, generator=gen, dtype=torch.float64)

    matrix = distance(emb, ref)
    assert matrix.shape == (7, 4)
    rows, cols = torch.meshgrid(torch.arange(7), torch.arange(4), indexing="ij")
    pairwise = distance.pairwise(emb[rows.flatten()], ref[cols.flatten()]).reshape(7, 4)
    direct = _direct_matrix(name, emb, ref)

    torch.testing.assert_close(matrix, direct, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pairwise, direct, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", DISTANCES)
def test_matrix_without_ref_is_against_the_batch_itself(name):
    distance = _registered(name)
    emb = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(distance(emb), distance(emb, emb))
    torch.testing.assert_close(distance(emb), _direct_matrix(name, emb, emb), rtol=1e-9, atol=1e-6)


def test_shadow_on_the_unit_sphere_is_the_cosine_distance():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(9, 6, generator=gen, dtype=torch.float64) * 3
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    unit_a, unit_x = (torch.nn.functional.normalize(v, dim=1) for v in (a, x))
    cos = torch.nn.functional.cosine_similarity(a, x, dim=1)
    torch.testing.assert_close(ShadowDistance().pairwise(unit_a, unit_x), 1 - cos, rtol=0, atol=1e-12)
    torch.testing.assert_close(ShadowDistance()(unit_a, unit_x), CosineDistance()(a, x), rtol=0, atol=1e-12)
    # Off the sphere the two differ: the shadow distance depends on the anchor's length.
    assert not torch.allclose(ShadowDistance()(a, x), CosineDistance()(a, x))


def test_shadow_raw_by_hand_and_not_symmetric():
    a = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # ||a|| = 5
    x = torch.tensor([[6.0, 8.0]], dtype=torch.float64)  # shadow on a = 50 / 5 = 10
    shadow = ShadowDistance()
    assert shadow.pairwise(a, x).item() == pytest.approx(5.0)  # | 5 - 10 |
    assert shadow.pairwise(x, a).item() == pytest.approx(5.0)  # | 10 - 50 / 10 |
    y = torch.tensor([[4.0, -3.0]], dtype=torch.float64)  # orthogonal to a: shadow 0
    assert shadow.pairwise(a, y).item() == pytest.approx(5.0)
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    # a on z: | 1 - 3 | = 2; z on a: | 5 - 3 / 5 | = 4.4
    matrix = shadow(torch.cat([a, z]))
    assert matrix[1, 0].item() == pytest.approx(2.0)
    assert matrix[0, 1].item() == pytest.approx(4.4)


def test_weighted_l1_with_unit_weights_is_l1():
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    weighted = WeightedL1Distance(torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(weighted(emb), L1Distance()(emb))
    torch.testing.assert_close(weighted.pairwise(emb, emb.flip(0)), L1Distance().pairwise(emb, emb.flip(0)))


def test_weighted_l1_ignores_zero_weighted_components():
    a = torch.tensor([[1.0, 100.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, -100.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    # 0.5 * 1 + 0 * 200 + 3 * 1
    assert WeightedL1Distance(WEIGHTS).pairwise(a, b).item() == pytest.approx(3.5)


@pytest.mark.parametrize("name", DISTANCES)
def test_finite_gradients_for_identical_embeddings(name):
    distance = _registered(name)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    emb = torch.cat([x, x]).requires_grad_(True)  # every row has an exact duplicate
    distance(emb).sum().backward()
    assert torch.isfinite(emb.grad).all()

    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    d = distance.pairwise(a, b)
    d.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert torch.allclose(d, torch.zeros_like(d), atol=1e-6)



@pytest.mark.parametrize("name", DISTANCES)
def test_weights_array_is_what_the_device_needs(name):
    # The manifest's distance_weights: only the weighted L1 has any, as the numpy weights.
    weights = _registered(name).weights_array()
    if name == "weighted_l1":
        assert isinstance(weights, np.ndarray)
        np.testing.assert_array_equal(weights, WEIGHTS.numpy())
    else:
        assert weights is None


def test_weights_array_reads_learned_weights_as_they_are_now():
    rho = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    distance = WeightedL1Distance(lambda: torch.nn.functional.softplus(rho))
    with torch.no_grad():
        rho.copy_(torch.tensor([-1.0, 0.0, 2.0]))
    weights = distance.weights_array()
    assert isinstance(weights, np.ndarray)
    np.testing.assert_allclose(weights, np.log1p(np.exp([-1.0, 0.0, 2.0])), rtol=1e-12)

def test_euclidean_at_zero_has_eps_value_and_zero_gradient():
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    d = EuclideanDistance().pairwise(x, x.detach().clone())
    d.sum().backward()
    assert 0 <= d.item() <= 1e-6
    assert torch.equal(x.grad, torch.zeros_like(x))
    m = EuclideanDistance()(x)
    assert torch.isfinite(m).all() and 0 <= m.item() <= 1e-6


def test_cosine_and_shadow_stay_finite_on_a_zero_vector():
    emb = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    for distance in (CosineDistance(), ShadowDistance()):
        emb.grad = None
        d = distance(emb)
        d.sum().backward()
        assert torch.isfinite(d).all() and torch.isfinite(emb.grad).all()


def test_squared_euclidean_is_never_negative():
    # Large, nearly equal rows: the Gram form can round below zero; it is clamped at 0.
    base = torch.full((1, 16), 1e4, dtype=torch.float32)
    emb = torch.cat([base, base + 1e-3, base])
    d = SquaredEuclideanDistance()(emb)
    assert (d >= 0).all()
    assert torch.isfinite(EuclideanDistance()(emb)).all()
