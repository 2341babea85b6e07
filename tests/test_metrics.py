"""device_bench.metrics: pml's AccuracyCalculator, scikit-learn and brute force agree with the numpy code."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.metrics import roc_auc_score, silhouette_score

from device_bench import metrics
from device_bench.metrics import (
    DISTANCES,
    embedding_agreement,
    pairwise_distances,
    retrieval_metrics,
    silhouette,
    verification_metrics,
)
from edge_siamese.distances import DISTANCES as TORCH_DISTANCES

REPO = Path(__file__).resolve().parents[1]
RANK_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def clustered(seed: int, n: int, num_classes: int, dim: int = 6, spread: float = 1.5):
    """Continuous embeddings around class centres: no distance ties, non-trivial metrics."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(num_classes, size=n)
    centres = rng.normal(size=(num_classes, dim)) * spread
    return centres[labels] + rng.normal(size=(n, dim)), labels


def weights_for(distance: str, dim: int):
    return np.linspace(0.2, 2.0, dim) if distance == "weighted_l1" else None


def pml_accuracy(emb: np.ndarray, labels: np.ndarray) -> dict:
    calc = AccuracyCalculator(include=RANK_METRICS, knn_func=CustomKNN(LpDistance(normalize_embeddings=False)))
    return calc.get_accuracy(emb, labels)


def brute_force_rank_metrics(emb, labels, distance="euclidean", weights=None, knn_k=5) -> dict:
    """Leave-one-out ranking from the full matrix, one query at a time."""
    d = pairwise_distances(emb, emb, distance, weights)
    p1, rp, mapr, knn = [], [], [], []
    for i in range(len(emb)):
        row = d[i].copy()
        row[i] = np.inf
        order = np.argsort(row, kind="stable")[: len(emb) - 1]
        hits = labels[order] == labels[i]
        r = int((labels == labels[i]).sum()) - 1
        p1.append(hits[0])
        votes = Counter(labels[order[:knn_k]].tolist())
        best = max(votes.values())
        knn.append(next(lab for lab in labels[order[:knn_k]] if votes[lab] == best) == labels[i])
        if r > 0:
            rp.append(hits[:r].mean())
            mapr.append((np.cumsum(hits[:r]) / np.arange(1, r + 1) * hits[:r]).sum() / r)
    return {
        "precision_at_1": np.mean(p1),
        "r_precision": np.mean(rp),
        "mean_average_precision_at_r": np.mean(mapr),
        "knn_accuracy": np.mean(knn),
    }


def full_matrix_rank_metrics(emb, labels, distance="euclidean", weights=None, knn_k=5) -> dict:
    """The full-matrix reference: the rank metrics as device_bench computed them before they were
    chunked, with (N, N) distances, (N, depth) neighbours and an (N, num_classes) vote table."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    r = counts[inverse] - 1
    depth = int(min(max(r.max(), knn_k, 1), len(emb) - 1))
    d = pairwise_distances(emb, emb, distance, weights)
    np.fill_diagonal(d, np.inf)
    part = np.argpartition(d, depth - 1, axis=1)[:, :depth]
    order = np.take_along_axis(d, part, axis=1).argsort(axis=1, kind="stable")
    neigh = labels[np.take_along_axis(part, order, axis=1)]
    hits = neigh == labels[:, None]
    ranks = np.arange(1, depth + 1)
    within_r = ranks[None, :] <= r[:, None]
    has_r = r > 0
    r_safe = np.maximum(r, 1)
    r_precision = (hits & within_r).sum(1) / r_safe
    precision_at_k = np.cumsum(hits, axis=1) / ranks[None, :]
    map_at_r = (precision_at_k * (hits & within_r)).sum(1) / r_safe

    k = min(knn_k, depth)
    votes = np.zeros((len(emb), len(classes)), dtype=np.int64)
    neigh_idx = np.searchsorted(classes, neigh[:, :k])
    np.add.at(votes, (np.arange(len(emb))[:, None], neigh_idx), 1)
    tied = votes[np.arange(len(emb))[:, None], neigh_idx] == votes.max(1)[:, None]
    predicted = neigh[np.arange(len(emb)), tied.argmax(1)]
    return {
        "precision_at_1": float(hits[has_r, 0].mean()),
        "r_precision": float(r_precision[has_r].mean()),
        "mean_average_precision_at_r": float(map_at_r[has_r].mean()),
        "knn_accuracy": float((predicted == labels).mean()),
    }


def full_matrix_nearest(emb, distance="euclidean", weights=None) -> np.ndarray:
    """The full-matrix reference for ``embedding_agreement``: each row's nearest other row."""
    d = pairwise_distances(emb, emb, distance, weights)
    np.fill_diagonal(d, np.inf)
    return d.argmin(1)


def tied_set(seed: int, n: int = 90, num_classes: int = 6):
    """Embeddings on a coarse integer grid: many equal distances, duplicate points, a zero vector."""
    rng = np.random.default_rng(seed)
    emb = rng.integers(-1, 2, size=(n, 3)).astype(np.float64)
    emb[0] = 0.0
    return emb, rng.integers(num_classes, size=n)


def with_lone_classes(emb, labels, seed: int):
    """Three more samples, each alone in its class (left out of the three rank metrics)."""
    extra = np.random.default_rng(seed).normal(size=(3, emb.shape[1])) * 2
    return np.concatenate([emb, extra]), np.concatenate([labels, [100, 101, 102]])


def with_string_labels(emb, labels):
    return emb, np.array(list("abcdefgh"))[labels]


CHUNK_CASES = {
    "clustered": lambda: clustered(30, 110, 7),
    "ties": lambda: tied_set(31),
    "lone classes": lambda: with_lone_classes(*clustered(32, 80, 5), seed=33),
    "ties and lone classes": lambda: with_lone_classes(*tied_set(34, n=60, num_classes=4), seed=35),
    "string labels": lambda: with_string_labels(*clustered(36, 70, 4)),
}


# --- chunked against the full-matrix reference -------------------------------------------------


@pytest.mark.parametrize("case", CHUNK_CASES)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("chunk_rows", [None, 7])  # None: the module's own chunk (one here); 7: many
def test_rank_metrics_equal_the_full_matrix_reference(case, distance, chunk_rows, monkeypatch):
    emb, labels = CHUNK_CASES[case]()
    weights = weights_for(distance, emb.shape[1])
    if chunk_rows:
        monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", chunk_rows * len(emb))
    for knn_k in (1, 4, 7):
        got = retrieval_metrics(emb, labels, distance, weights, knn_k=knn_k, episodes=1, max_pairs=100)
        want = full_matrix_rank_metrics(emb, labels, distance, weights, knn_k)
        for name, value in want.items():
            assert got[name] == pytest.approx(value, abs=1e-9), (name, knn_k)


@pytest.mark.parametrize("case", ["clustered", "ties", "lone classes"])
@pytest.mark.parametrize("distance", DISTANCES)
def test_embedding_agreement_in_chunks_equals_the_full_matrix_reference(case, distance, monkeypatch):
    emb, labels = CHUNK_CASES[case]()
    weights = weights_for(distance, emb.shape[1])
    ref = emb + np.random.default_rng(37).normal(size=emb.shape) * 0.3
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 5 * len(emb))
    got = embedding_agreement(emb, ref, labels, distance, weights)
    agreement = full_matrix_nearest(emb, distance, weights) == full_matrix_nearest(ref, distance, weights)
    assert got["top1_neighbour_agreement"] == pytest.approx(agreement.mean(), abs=1e-12)
    assert 0 < got["top1_neighbour_agreement"] < 1
    for key, x in (("precision_at_1", emb), ("reference_precision_at_1", ref)):
        want = full_matrix_rank_metrics(x, labels, distance, weights, knn_k=1)["precision_at_1"]
        assert got[key] == pytest.approx(want, abs=1e-9), key


def test_relative_error_is_the_mean_error_over_the_mean_distance_between_images(monkeypatch):
    """In chunks as in one matrix, Euclidean whatever the model's distance."""
    emb, labels = clustered(40, 90, 4)
    ref = emb + np.random.default_rng(41).normal(size=emb.shape) * 0.05
    spread = np.linalg.norm(ref[:, None] - ref[None], axis=2).sum() / (len(ref) * (len(ref) - 1))
    want = np.linalg.norm(emb - ref, axis=1).mean() / spread
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 7 * len(emb))
    for distance in DISTANCES:
        got = embedding_agreement(emb, ref, labels, distance, weights_for(distance, emb.shape[1]))
        assert got["relative_error"] == pytest.approx(want, rel=1e-9), distance
    assert embedding_agreement(ref, ref, labels)["relative_error"] == 0


def test_relative_error_sees_what_cosine_misses_on_embeddings_that_barely_vary():
    """Every image near one point: an error as large as the images' spread keeps the cosine at
    0.9999 and loses precision_at_1; the relative error says so."""
    rng = np.random.default_rng(42)
    labels = np.repeat(np.arange(10), 20)
    ref = np.full((200, 8), 1.0) + 0.01 * np.eye(10)[labels][:, :8] + 0.0005 * rng.normal(size=(200, 8))
    noisy = ref + 0.01 * rng.normal(size=ref.shape)
    got = embedding_agreement(noisy, ref, labels)
    assert got["mean_cosine"] > 0.9999
    assert got["relative_error"] > 0.5
    assert got["precision_at_1"] < got["reference_precision_at_1"] - 0.2
    assert embedding_agreement(ref + 1e-5 * rng.normal(size=ref.shape), ref, labels)["relative_error"] < 0.05


def test_small_chunks_are_used_and_stay_within_the_element_budget(monkeypatch):
    emb, labels = clustered(38, 300, 6)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 8 * len(emb))
    shapes = []

    def recording(queries, refs, *args):
        shapes.append((len(queries), len(refs)))
        return pairwise_distances(queries, refs, *args)

    monkeypatch.setattr(metrics, "pairwise_distances", recording)
    metrics._rank_metrics(emb, labels, "euclidean", None, 5)
    assert len(shapes) == 300 // 8 + 1  # 37 chunks of 8 rows, one of 4
    assert max(rows * refs for rows, refs in shapes) == 8 * 300


def test_silhouette_in_small_chunks_equals_sklearn(monkeypatch):
    emb, labels = clustered(39, 200, 5)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 9 * len(emb))
    assert silhouette(emb, labels, "euclidean") == pytest.approx(silhouette_score(emb, labels), abs=1e-9)


@pytest.mark.parametrize("distance", DISTANCES)
def test_peak_memory_is_a_few_chunk_matrices_not_n_by_n(distance, monkeypatch):
    # Two classes of about 1,500, the worst case (the deepest ranking): the full-matrix reference
    # holds (3000, 3000) distances and (3000, ~1500) neighbour arrays, 36 MB each; a chunk is 0.5 MB.
    emb, labels = clustered(40, 3000, 2, dim=4)
    weights = weights_for(distance, emb.shape[1])
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 2**16)
    chunk_bytes = 2**16 * 8
    for run in (
        lambda: metrics._rank_metrics(emb, labels, distance, weights, 5),
        lambda: embedding_agreement(emb, emb[::-1], labels, distance, weights),
        lambda: silhouette(emb, labels, distance, weights),
    ):
        tracemalloc.start()
        run()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 6 * chunk_bytes, peak / chunk_bytes


# --- ranking metrics ---------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "n", "num_classes"), [(0, 120, 6), (1, 200, 15), (2, 90, 3)])
def test_rank_metrics_equal_pml_accuracy_calculator(seed, n, num_classes):
    emb, labels = clustered(seed, n, num_classes, spread=1.0)
    assert np.bincount(labels).min() >= 2  # no lone query: see the test below
    got = retrieval_metrics(emb, labels)
    want = pml_accuracy(emb, labels)
    for name in RANK_METRICS:
        assert got[name] == pytest.approx(want[name], abs=1e-5), name
    assert 0.1 < got["precision_at_1"] < 0.99  # a set where the metrics can disagree


def test_lone_queries_are_left_out_of_every_rank_metric_like_pml():
    emb, labels = clustered(3, 60, 5)
    labels = np.concatenate([labels, [100, 101, 102]])  # three classes of one sample each
    emb = np.concatenate([emb, np.random.default_rng(4).normal(size=(3, emb.shape[1])) * 3])
    got = retrieval_metrics(emb, labels)
    want = pml_accuracy(emb, labels)
    for name in RANK_METRICS:
        assert got[name] == pytest.approx(want[name], abs=1e-5), name


def test_chunked_rank_metrics_equal_brute_force():
    emb, labels = clustered(5, 1200, 30, dim=4, spread=1.0)  # N > the 512-row chunk
    got = retrieval_metrics(emb, labels, knn_k=5, episodes=10)
    want = brute_force_rank_metrics(emb, labels, knn_k=5)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("distance", ["cosine", "l1", "shadow"])
def test_rank_metrics_under_other_distances_equal_brute_force(distance):
    emb, labels = clustered(6, 150, 8)
    got = retrieval_metrics(emb, labels, distance=distance, knn_k=3, episodes=10)
    want = brute_force_rank_metrics(emb, labels, distance, knn_k=3)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_knn_accuracy_by_hand_and_tie_rule():
    # 1-D points. Query 0 (class a): neighbours 1 (b), 2 (a), 3 (b), 4 (a): k=3 -> b wins 2-1.
    # With k=4 it is 2-2, and the tie goes to the label met first among the neighbours: b.
    emb = np.array([[0.0], [1.0], [-1.5], [2.0], [-2.5], [10.0], [11.0]])
    labels = np.array(["a", "b", "a", "b", "a", "c", "c"])
    for k in (3, 4):
        got = retrieval_metrics(emb, labels, knn_k=k, episodes=1)
        want = brute_force_rank_metrics(emb, labels, knn_k=k)
        assert got["knn_accuracy"] == pytest.approx(want["knn_accuracy"])
    got = retrieval_metrics(emb, labels, knn_k=1, episodes=1)
    # 1-NN: 0->1 (b) wrong, 1->0 (a) wrong, 2->0 right, 3->1 right, 4->2 right, 5 and 6 right
    assert got["knn_accuracy"] == pytest.approx(5 / 7)
    assert got["precision_at_1"] == pytest.approx(5 / 7)


def test_perfectly_separated_embeddings():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(6), 10)
    emb = np.eye(6)[labels] * 100 + rng.normal(size=(60, 6)) * 0.01
    got = retrieval_metrics(emb, labels, episodes=50)
    assert got["precision_at_1"] == 1.0
    assert got["r_precision"] == 1.0
    assert got["mean_average_precision_at_r"] == 1.0
    assert got["knn_accuracy"] == 1.0
    assert got["roc_auc"] == 1.0
    assert got["eer"] == 0.0
    assert got["tar_at_far_1e-2"] == 1.0 and got["tar_at_far_1e-3"] == 1.0
    assert got["one_shot_5way"] == 1.0
    assert got["silhouette"] > 0.99
    assert got["intra_inter_distance_ratio"] < 1e-3
    assert (got["num_samples"], got["num_classes"]) == (60, 6)


# --- one-shot ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_classes", "five", "twenty"), [(4, False, False), (5, True, False), (19, True, False), (20, True, True)]
)
def test_one_shot_keys_depend_on_the_number_of_classes(num_classes, five, twenty):
    labels = np.repeat(np.arange(num_classes), 3)
    emb = np.random.default_rng(8).normal(size=(len(labels), 4))
    got = retrieval_metrics(emb, labels, episodes=40)
    assert ("one_shot_5way" in got) is five
    assert ("one_shot_20way" in got) is twenty
    for key in ("one_shot_5way", "one_shot_20way"):
        if key in got:
            assert 0.0 <= got[key] <= 1.0
            assert got[key] * 40 == pytest.approx(round(got[key] * 40))  # a count of episodes


def test_one_shot_on_random_embeddings_is_near_chance():
    labels = np.repeat(np.arange(25), 4)
    emb = np.random.default_rng(9).normal(size=(100, 16))
    got = retrieval_metrics(emb, labels, episodes=2000)
    assert got["one_shot_5way"] == pytest.approx(1 / 5, abs=0.05)
    assert got["one_shot_20way"] == pytest.approx(1 / 20, abs=0.03)


# --- verification ------------------------------------------------------------------------------


def test_verification_by_hand():
    pos = np.array([1.0, 2.0, 3.0, 4.0])
    neg = np.array([3.5, 5.0, 6.0, 7.0])
    got = verification_metrics(pos, neg)
    # Accept d < t. At t = 4: FAR = 1/4 (3.5), FRR = 1 - 3/4: the first threshold where they meet.
    assert got["eer"] == 0.25
    assert got["eer_threshold"] == 4.0
    # 15 of the 16 (pos, neg) pairs are ordered right.
    assert got["roc_auc"] == pytest.approx(15 / 16)


def test_tar_at_far_by_hand():
    neg = np.arange(1.0, 101.0)  # 1 .. 100
    pos = np.array([0.5, 1.0, 1.5, 1.9, 2.0, 3.0, 50.0, 0.1])
    got = verification_metrics(pos, neg)
    # FAR 1e-2: one negative in 100 may pass; threshold = 2nd smallest negative = 2, and d < 2 passes.
    assert got["threshold_at_far_1e-2"] == 2.0
    assert got["tar_at_far_1e-2"] == pytest.approx(5 / 8)  # 0.5, 1.0, 1.5, 1.9, 0.1
    # FAR 1e-3 allows no negative: threshold = the smallest negative, 1.
    assert got["threshold_at_far_1e-3"] == 1.0
    assert got["tar_at_far_1e-3"] == pytest.approx(2 / 8)  # 0.5, 0.1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_far_at_the_threshold_is_at_most_the_target(seed):
    rng = np.random.default_rng(seed)
    pos = rng.normal(1.0, 0.5, size=300)
    neg = np.round(rng.normal(2.5, 0.7, size=2345), 2)  # rounded: ties among negatives
    got = verification_metrics(pos, neg)
    for name, rate in (("1e-2", 1e-2), ("1e-3", 1e-3)):
        threshold = got[f"threshold_at_far_{name}"]
        assert (neg < threshold).mean() <= rate
        assert got[f"tar_at_far_{name}"] == pytest.approx((pos < threshold).mean())
        # the threshold is a negative's distance, the next one up would pass more than allowed
        assert threshold in neg
        assert (neg <= threshold).mean() > rate


def test_tar_at_far_with_few_negatives_uses_the_smallest_negative():
    got = verification_metrics(np.array([0.1, 5.0]), np.array([1.0, 2.0]))
    # floor(1e-2 * 2) = 0: the threshold is the smallest negative.
    assert got["threshold_at_far_1e-2"] == 1.0 and got["tar_at_far_1e-2"] == 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_roc_auc_equals_sklearn_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    pos, neg = rng.normal(1.0, 1.0, 400), rng.normal(2.0, 1.0, 700)
    for p, n in ((pos, neg), (np.round(pos), np.round(neg))):
        want = roc_auc_score(np.r_[np.ones(len(p)), np.zeros(len(n))], -np.r_[p, n])
        assert verification_metrics(p, n)["roc_auc"] == pytest.approx(want, abs=1e-12)


def test_perfect_separation_verification():
    got = verification_metrics(np.array([0.1, 0.2, 0.3]), np.array([0.9, 1.0]))
    assert got["roc_auc"] == 1.0 and got["eer"] == 0.0
    assert 0.3 < got["eer_threshold"] <= 0.9


@pytest.mark.parametrize("distance", DISTANCES)
def test_roc_auc_and_distance_ratio_over_all_pairs_equal_sklearn(distance):
    emb, labels = clustered(10, 70, 5)
    weights = weights_for(distance, emb.shape[1])
    got = retrieval_metrics(emb, labels, distance=distance, weights=weights, episodes=10)
    d = pairwise_distances(emb, emb, distance, weights)
    i, j = np.triu_indices(len(emb), k=1)  # row = anchor i for the anchor-relative shadow
    same = labels[i] == labels[j]
    assert got["roc_auc"] == pytest.approx(roc_auc_score(same, -d[i, j]), abs=1e-9)
    assert got["intra_inter_distance_ratio"] == pytest.approx(d[i, j][same].mean() / d[i, j][~same].mean())
    for key in ("eer", "tar_at_far_1e-2", "tar_at_far_1e-3"):
        assert got[key] == pytest.approx(verification_metrics(d[i, j][same], d[i, j][~same])[key], abs=1e-9)


# --- silhouette --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("distance", "metric"), [("euclidean", "euclidean"), ("cosine", "cosine"), ("l1", "manhattan")]
)
@pytest.mark.parametrize("n", [150, 700])  # 700 > the 512-row chunk
def test_silhouette_equals_sklearn(distance, metric, n):
    emb, labels = clustered(11, n, 7)
    want = silhouette_score(emb, labels, metric=metric)
    assert silhouette(emb, labels, distance) == pytest.approx(want, abs=1e-9)
    assert retrieval_metrics(emb, labels, distance=distance, episodes=5)["silhouette"] == pytest.approx(want, abs=1e-9)


def test_silhouette_singleton_class_scores_zero_like_sklearn():
    emb, labels = clustered(12, 40, 3)
    labels[0] = 99
    assert silhouette(emb, labels, "euclidean") == pytest.approx(silhouette_score(emb, labels), abs=1e-9)


def test_silhouette_subsample_is_seeded():
    emb, labels = clustered(13, 300, 4)
    a = retrieval_metrics(emb, labels, silhouette_samples=100, episodes=5, seed=1)["silhouette"]
    b = retrieval_metrics(emb, labels, silhouette_samples=100, episodes=5, seed=1)["silhouette"]
    full = silhouette(emb, labels, "euclidean")
    assert a == b
    assert a != full and a == pytest.approx(full, abs=0.15)


# --- distances ---------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", DISTANCES)
def test_numpy_distances_equal_the_training_distances(distance):
    rng = np.random.default_rng(14)
    q, r = rng.normal(size=(9, 5)), rng.normal(size=(6, 5))
    weights = weights_for(distance, 5)
    got = pairwise_distances(q, r, distance, weights)
    cls = TORCH_DISTANCES[distance]
    torch_distance = cls(torch.from_numpy(weights)) if distance == "weighted_l1" else cls()
    want = torch_distance(torch.from_numpy(q), torch.from_numpy(r)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("distance", DISTANCES)
def test_every_distance_name_is_accepted(distance):
    emb, labels = clustered(16, 60, 4)
    got = retrieval_metrics(emb, labels, distance=distance, weights=weights_for(distance, emb.shape[1]), episodes=5)
    assert all(np.isfinite(v) for v in got.values())
    assert got["precision_at_1"] > 0.5  # clustered: every distance finds the clusters


def test_unknown_distance_raises():
    emb, labels = clustered(17, 20, 2)
    with pytest.raises(ValueError, match="unknown distance 'hamming'"):
        retrieval_metrics(emb, labels, distance="hamming")
    with pytest.raises(ValueError, match="unknown distance"):
        pairwise_distances(emb, emb, "hamming")


def test_weighted_l1_needs_weights():
    emb, labels = clustered(18, 20, 2)
    with pytest.raises(ValueError, match="weights"):
        retrieval_metrics(emb, labels, distance="weighted_l1")


def test_weighted_l1_with_unit_weights_equals_l1():
    emb, labels = clustered(19, 80, 5)
    l1 = retrieval_metrics(emb, labels, distance="l1", episodes=50)
    weighted = retrieval_metrics(emb, labels, distance="weighted_l1", weights=np.ones(emb.shape[1]), episodes=50)
    assert weighted.keys() == l1.keys()
    for key, value in l1.items():
        assert weighted[key] == pytest.approx(value, abs=1e-12), key


# --- inputs, determinism, torch-free -----------------------------------------------------------


@pytest.mark.parametrize(
    ("emb", "labels"),
    [
        (np.zeros((4, 2)), np.zeros(4)),  # one class
        (np.zeros((4, 2)), np.arange(4)),  # no class with two samples
        (np.zeros((4, 2)), np.array([0, 0, 1])),  # labels do not match
        (np.zeros(4), np.array([0, 0, 1, 1])),  # not (N, D)
    ],
)
def test_bad_inputs_raise_value_error(emb, labels):
    with pytest.raises(ValueError):
        retrieval_metrics(emb, labels)


def test_seeded_determinism():
    emb, labels = clustered(20, 300, 25)
    kwargs = dict(episodes=200, max_pairs=5000, silhouette_samples=150)
    first = retrieval_metrics(emb, labels, seed=3, **kwargs)
    assert retrieval_metrics(emb, labels, seed=3, **kwargs) == first
    other = retrieval_metrics(emb, labels, seed=4, **kwargs)
    assert other["precision_at_1"] == first["precision_at_1"]  # not sampled
    assert other["one_shot_20way"] != first["one_shot_20way"] or other["roc_auc"] != first["roc_auc"]


def test_sampled_pairs_approximate_all_pairs():
    emb, labels = clustered(21, 400, 6)
    full = retrieval_metrics(emb, labels, episodes=5)
    sampled = retrieval_metrics(emb, labels, episodes=5, max_pairs=20_000)
    assert sampled["roc_auc"] != full["roc_auc"]
    assert sampled["roc_auc"] == pytest.approx(full["roc_auc"], abs=0.02)


def test_importing_device_bench_metrics_does_not_import_torch():
    code = "import sys, device_bench.metrics; print('torch' in sys.modules, 'edge_siamese' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
