"""Miners: the same index tuples as pytorch-metric-learning, element by element."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from edge_siamese.distances import CosineDistance, EuclideanDistance, ShadowDistance, SquaredEuclideanDistance
from edge_siamese.errors import UserError
from edge_siamese.losses import KochLoss, ShadowLoss, TripletMarginLoss
from edge_siamese.miners import MINERS, BatchHardMiner, TripletMarginMiner, create_miner

TYPES = ("all", "hard", "semihard", "easy")


def _batch(seed: int, size: int = 30, num_classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, 5, generator=gen, dtype=torch.float64), torch.randint(num_classes, (size,), generator=gen)


def _triplets(indices) -> set[tuple[int, int, int]]:
    return set(zip(*(x.tolist() for x in indices)))


def _assert_same_tuple(got, want) -> None:
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert torch.equal(g.long(), w.long())


@pytest.mark.parametrize("type_of_triplets", TYPES)
@pytest.mark.parametrize(("seed", "num_classes"), [(0, 2), (1, 4), (2, 8)])
def test_triplet_margin_miner_equals_pml(type_of_triplets, seed, num_classes):
    emb, labels = _batch(seed, num_classes=num_classes)
    margin = 0.5
    got = TripletMarginMiner(margin, type_of_triplets)(emb, labels)
    pml = pml_miners.TripletMarginMiner(
        margin=margin, type_of_triplets=type_of_triplets, distance=LpDistance(normalize_embeddings=False)
    )
    want = pml(emb, labels)
    assert len(got[0]) > 0
    _assert_same_tuple(got, want)


def test_triplet_margin_miner_types_partition_all_valid_triplets():
    emb, labels = _batch(3)
    mined = {t: _triplets(TripletMarginMiner(0.5, t)(emb, labels)) for t in TYPES}
    assert mined["hard"] | mined["semihard"] == mined["all"]
    assert not mined["hard"] & mined["semihard"]
    assert not mined["all"] & mined["easy"]
    same = labels[:, None] == labels[None, :]
    num_valid = sum(int(same[a].sum() - 1) * int((~same[a]).sum()) for a in range(len(labels)))
    assert len(mined["all"]) + len(mined["easy"]) == num_valid


@pytest.mark.parametrize(("seed", "num_classes"), [(0, 2), (1, 4), (2, 8)])
def test_batch_hard_miner_equals_pml(seed, num_classes):
    emb, labels = _batch(seed, num_classes=num_classes)
    got = BatchHardMiner()(emb, labels)
    want = pml_miners.BatchHardMiner(distance=LpDistance(normalize_embeddings=False))(emb, labels)
    _assert_same_tuple(got, want)


def test_batch_hard_miner_leaves_out_anchors_without_a_positive():
    emb, labels = _batch(4, size=6)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])  # 2 and 5 are alone in their class
    a, p, n = BatchHardMiner()(emb, labels)
    assert a.tolist() == [0, 1, 3, 4]
    assert p.tolist() == [1, 0, 4, 3]
    dist = EuclideanDistance()(emb)
    for anchor, neg in zip(a.tolist(), n.tolist()):
        others = [j for j in range(6) if labels[j] != labels[anchor]]
        assert neg == min(others, key=lambda j: dist[anchor, j].item())
    _assert_same_tuple(
        (a, p, n), pml_miners.BatchHardMiner(distance=LpDistance(normalize_embeddings=False))(emb, labels)
    )


def test_miner_with_one_class_returns_nothing():
    emb, _ = _batch(5, size=8)
    labels = torch.zeros(8, dtype=torch.long)
    for miner in (TripletMarginMiner(0.2, "all"), BatchHardMiner()):
        assert all(len(x) == 0 for x in miner(emb, labels))


@pytest.mark.parametrize("type_of_triplets", TYPES)
def test_miner_with_shadow_distance_selects_by_that_distance(type_of_triplets):
    emb, labels = _batch(6, size=16, num_classes=3)
    distance = ShadowDistance()
    margin = 0.3
    a, p, n = TripletMarginMiner(margin, type_of_triplets, distance)(emb, labels)
    got = _triplets((a, p, n))
    want = set()
    for i in range(16):
        for j in range(16):
            for k in range(16):
                if i == j or labels[i] != labels[j] or labels[i] == labels[k]:
                    continue
                # row-wise form, anchor first: the miner must use d(anchor, .) of the shadow distance
                anchor = emb[i : i + 1]
                m = (distance.pairwise(anchor, emb[k : k + 1]) - distance.pairwise(anchor, emb[j : j + 1])).item()
                keep = {
                    "all": m <= margin,
                    "hard": m <= 0,
                    "semihard": 0 < m <= margin,
                    "easy": m > margin,
                }[type_of_triplets]
                if keep:
                    want.add((i, j, k))
    assert got == want
    assert got  # each type finds something on this batch
    euclid = _triplets(TripletMarginMiner(margin, type_of_triplets)(emb, labels))
    assert got != euclid


@pytest.mark.parametrize("distance", [ShadowDistance(), CosineDistance()], ids=["shadow", "cosine"])
def test_batch_hard_with_another_distance_picks_extremes_of_that_distance(distance):
    emb, labels = _batch(7, size=12, num_classes=3)
    a, p, n = BatchHardMiner(distance)(emb, labels)
    for anchor, pos, neg in zip(a.tolist(), p.tolist(), n.tolist()):
        same = [j for j in range(12) if j != anchor and labels[j] == labels[anchor]]
        other = [j for j in range(12) if labels[j] != labels[anchor]]
        # row-wise form, anchor first: the shadow distance is not symmetric
        row = [distance.pairwise(emb[anchor : anchor + 1], emb[j : j + 1]).item() for j in range(12)]
        assert pos == max(same, key=lambda j: row[j])
        assert neg == min(other, key=lambda j: row[j])
    assert _triplets((a, p, n)) != _triplets(BatchHardMiner()(emb, labels))


def test_mined_all_triplets_give_the_same_mean_active_loss_as_batch_all():
    # "all" keeps every triplet with a non-zero hinge (plus the boundary), so the mean over the
    # active ones equals the exact batch-all.
    emb, labels = _batch(8)
    for loss in (TripletMarginLoss(0.4), ShadowLoss(0.4, normalize=True), ShadowLoss(0.4, normalize=False)):
        indices = TripletMarginMiner(0.4, "all", loss.distance)(emb, labels)
        torch.testing.assert_close(loss(emb, labels, indices_tuple=indices), loss(emb, labels))


def test_miner_does_not_track_gradients():
    emb, labels = _batch(9)
    emb.requires_grad_(True)
    for miner in (TripletMarginMiner(0.2, "all"), BatchHardMiner()):
        out = miner(emb, labels)
        assert all(not x.requires_grad and x.dtype == torch.long for x in out)


def test_create_miner():
    distance = SquaredEuclideanDistance()
    assert create_miner("batch-all", 0.2, distance) is None
    hard = create_miner("batch-hard", 0.2, distance)
    assert isinstance(hard, BatchHardMiner) and hard.distance is distance
    for name in TYPES:
        miner = create_miner(name, 0.3, distance)
        assert isinstance(miner, TripletMarginMiner)
        assert (miner.type_of_triplets, miner.margin, miner.distance) == (name, 0.3, distance)


@pytest.mark.parametrize("name", MINERS)
def test_every_registered_miner_mines_valid_triplets_by_the_distance_it_is_given(name):
    emb, labels = _batch(10)
    distance = ShadowDistance()
    miner = create_miner(name, 0.3, distance)
    assert MINERS[name].summary
    if miner is None:  # no miner: the loss takes every valid triplet of the batch
        loss = ShadowLoss(0.3, normalize=False)
        torch.testing.assert_close(loss(emb, labels), loss(emb, labels, lmu.get_all_triplets_indices(labels)))
        return
    assert miner.distance is distance
    a, p, n = miner(emb, labels)
    assert len(a) > 0
    assert (a != p).all() and (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all()
    assert _triplets((a, p, n)) != _triplets(create_miner(name, 0.3, EuclideanDistance())(emb, labels))


def test_create_miner_unknown_name_raises():
    with pytest.raises(UserError, match="unknown miner 'hardest'"):
        create_miner("hardest", 0.2, EuclideanDistance())


def test_unknown_type_of_triplets_raises():
    with pytest.raises(UserError, match="type_of_triplets"):
        TripletMarginMiner(0.2, "medium")


def test_a_miner_on_kochs_distance_sees_the_weights_as_they_are_learned():
    loss = KochLoss(embedding_dim=4)
    miner = create_miner("semihard", 0.2, loss.distance)
    with torch.no_grad():
        loss.rho.copy_(torch.tensor([3.0, -2.0, 0.5, 1.0]))
    assert torch.equal(miner.distance.weights, torch.nn.functional.softplus(loss.rho))
    embeddings = torch.randn(6, 4)
    assert torch.allclose(miner.distance(embeddings), loss.distance(embeddings))
