"""Retrieval and verification metrics in pure numpy, shared by training-time evaluation and the device.

``retrieval_metrics(embeddings, labels)`` uses every sample as a query against all the others
(leave-one-out), the protocol of pytorch-metric-learning's ``AccuracyCalculator`` with
``reference = query``; its definitions of ``precision_at_1``, ``r_precision`` and
``mean_average_precision_at_r`` are followed exactly. Distances are "smaller is more similar";
``shadow`` is anchor-relative (row = query). As in pml, a query alone in its class is left out
of the three rank metrics.

Memory is bounded whatever N and the number of classes: everything that compares each sample with
all N (the rank metrics, ``silhouette``, ``embedding_agreement``'s nearest neighbours) runs over
chunks of query rows, ``max(1, min(512, 2**24 // N))`` rows each, so that one chunk's
``(rows, N)`` float64 distance matrix holds at most ``2**24`` elements (128 MB) once N <= 2**24.
A chunk's other arrays (the distance's temporaries, argpartition's int64 indices, the ranked
neighbours) are that size or smaller, at most about five of them are alive at once (the tests hold
it under six), and only ``(N,)`` values per query outlive the chunk: the peak is about 5 x 128 MB
plus the embeddings, whatever the class sizes.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

_EPS = 1e-12
# One chunk's (rows, N) distance matrix: at most this many elements (the module docstring's bound),
# and at most this many rows, as larger chunks only run slower (cache misses; measured at N = 100,000).
_CHUNK_ELEMENTS = 2**24
_CHUNK_MAX_ROWS = 512


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def _weighted(q: np.ndarray, r: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if weights is None:
        raise ValueError("weighted_l1 needs the weights saved with the model")
    return q * weights, r * weights


def _l1_matrix(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    out = np.zeros((len(q), len(r)))
    for j in range(q.shape[1]):  # one (Q, R) slice per dimension: no (Q, R, D) tensor
        out += np.abs(q[:, j, None] - r[None, :, j])
    return out


def _squared_matrix(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.maximum((q * q).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2 * q @ r.T, 0)


def _shadow_norm(q: np.ndarray) -> np.ndarray:
    return np.maximum(np.linalg.norm(q, axis=1), _EPS)


class Distance(NamedTuple):
    matrix: Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]  # (Q, D), (R, D), weights -> (Q, R)
    rowwise: Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]  # (N, D), (N, D), weights -> (N,)


# Each distance by the name the manifest gives it (``edge_siamese.distances.DISTANCES`` computes the
# same in torch). float64 arrays in, "smaller is more similar"; ``w`` is only read by ``weighted_l1``. ``shadow`` is
# anchor-relative: row = query.
DISTANCES: dict[str, Distance] = {
    "euclidean": Distance(lambda q, r, w: np.sqrt(_squared_matrix(q, r)), lambda a, b, w: np.sqrt(((a - b) ** 2).sum(1))),
    "squared_euclidean": Distance(lambda q, r, w: _squared_matrix(q, r), lambda a, b, w: ((a - b) ** 2).sum(1)),
    "cosine": Distance(lambda q, r, w: 1 - _unit(q) @ _unit(r).T, lambda a, b, w: 1 - (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), _EPS)),
    "l1": Distance(lambda q, r, w: _l1_matrix(q, r), lambda a, b, w: np.abs(a - b).sum(1)),
    "weighted_l1": Distance(lambda q, r, w: _l1_matrix(*_weighted(q, r, w)), lambda a, b, w: np.abs(np.subtract(*_weighted(a, b, w))).sum(1)),
    "shadow": Distance(
        lambda q, r, w: np.abs(_shadow_norm(q)[:, None] - (q @ r.T) / _shadow_norm(q)[:, None]),
        lambda a, b, w: np.abs(_shadow_norm(a) - (a * b).sum(1) / _shadow_norm(a)),
    ),
}


def check_finite(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` if every one is finite; else a ValueError naming the first row with NaN or inf.
    Every gate checks this first: NaN compares false with everything, so it would pass them."""
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{what} hold NaN or inf (first at row {row})")
    return values


def _distance(name: str) -> Distance:
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r}: choose one of {', '.join(DISTANCES)}")
    return DISTANCES[name]


def pairwise_distances(
    queries: np.ndarray, refs: np.ndarray, distance: str = "euclidean", weights: np.ndarray | None = None
) -> np.ndarray:
    """``(Q, R)`` matrix of ``distance(query, ref)``; ``weights`` (D,) only for ``weighted_l1``."""
    return _distance(distance).matrix(np.asarray(queries, dtype=np.float64), np.asarray(refs, dtype=np.float64), weights)


def _each_chunk(emb, distance, weights, leave_one_out: bool, visit: Callable[[slice, np.ndarray], None]) -> None:
    """``visit(rows, d)`` for each chunk of query rows: ``rows`` a slice of ``emb``, ``d`` its
    ``(rows, N)`` distances to every row of ``emb`` (to itself ``inf`` when ``leave_one_out``).

    A callback, not a generator: a loop over a generator holds the last chunk's matrix (and what
    was derived from it) while the next one is built. The module docstring gives the chunk's size.
    """
    n = len(emb)
    step = max(1, min(_CHUNK_MAX_ROWS, _CHUNK_ELEMENTS // n))
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        d = pairwise_distances(emb[rows], emb, distance, weights)
        if leave_one_out:
            d[np.arange(len(d)), np.arange(rows.start, rows.stop)] = np.inf
        visit(rows, d)
        del d  # freed now, not when the next chunk's matrix replaces it


def _knn_predictions(neighbours: np.ndarray, num_classes: int) -> np.ndarray:
    """The majority class of each row of ``neighbours`` (class indices, nearest first); ties go
    to the tied class met first among the neighbours. Votes are counted over (row, class) keys,
    not in a ``(rows, num_classes)`` table, which with many classes would be the largest array."""
    rows, k = neighbours.shape
    key = (np.arange(rows)[:, None] * num_classes + neighbours).ravel()  # (row, class) as one number
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    votes = counts[inverse].reshape(rows, k)  # votes for each neighbour's class in its row
    first_tied = (votes == votes.max(1, keepdims=True)).argmax(1)
    return neighbours[np.arange(rows), first_tied]


def _rank_metrics(emb, labels, distance, weights, knn_k):
    """``precision_at_1``, ``r_precision``, ``mean_average_precision_at_r`` and ``knn_accuracy``.

    Each chunk of queries ranks its ``depth`` nearest other samples (``depth`` = the largest class
    size - 1, at least ``knn_k``) and keeps one value per query of each metric.
    """
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n = len(emb)
    r = counts[inverse] - 1  # same-class references of each query
    depth = int(min(max(r.max(), knn_k, 1), n - 1))
    k = min(knn_k, depth)
    ranks = np.arange(1, depth + 1)
    first_hit, r_precision, map_at_r, knn_hit = np.empty(n, bool), np.empty(n), np.empty(n), np.empty(n, bool)

    def rank_chunk(rows, d):
        part = np.argpartition(d, depth - 1, axis=1)[:, :depth]
        order = np.take_along_axis(d, part, axis=1).argsort(axis=1, kind="stable")
        neighbours = inverse[np.take_along_axis(part, order, axis=1)]  # classes, nearest first
        own = inverse[rows]
        hits = neighbours == own[:, None]
        hits_within_r = hits & (ranks[None, :] <= r[rows, None])
        r_safe = np.maximum(r[rows], 1)
        first_hit[rows] = hits[:, 0]
        r_precision[rows] = hits_within_r.sum(1) / r_safe
        map_at_r[rows] = (np.cumsum(hits, axis=1) / ranks[None, :] * hits_within_r).sum(1) / r_safe
        knn_hit[rows] = _knn_predictions(neighbours[:, :k], len(classes)) == own

    _each_chunk(emb, distance, weights, True, rank_chunk)
    has_r = r > 0
    return {
        "precision_at_1": float(first_hit[has_r].mean()),
        "r_precision": float(r_precision[has_r].mean()),
        "mean_average_precision_at_r": float(map_at_r[has_r].mean()),
        "knn_accuracy": float(knn_hit.mean()),
    }


def _one_shot(emb, labels, distance, weights, ways, episodes, rng):
    """Koch's N-way one-shot task: one query, one support image of each of N classes."""
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    query_classes = [c for c, idx in by_class.items() if len(idx) >= 2]
    if len(by_class) < ways or not query_classes:
        return None
    correct = 0
    for _ in range(episodes):
        target = query_classes[rng.integers(len(query_classes))]
        others = [c for c in by_class if c != target]
        chosen = [others[i] for i in rng.choice(len(others), ways - 1, replace=False)]
        query, support = rng.choice(by_class[target], 2, replace=False)
        supports = [support] + [rng.choice(by_class[c]) for c in chosen]
        d = pairwise_distances(emb[[query]], emb[supports], distance, weights)[0]
        correct += int(np.argmin(d) == 0)
    return correct / episodes


def _sample_pairs(n, max_pairs, rng):
    """All pairs i < j when there are at most ``max_pairs``, else that many random pairs i != j."""
    if n * (n - 1) // 2 <= max_pairs:
        return np.triu_indices(n, k=1)
    i = rng.integers(n, size=max_pairs)
    j = (i + rng.integers(1, n, size=max_pairs)) % n
    return i, j


def rowwise_distances(a: np.ndarray, b: np.ndarray, distance: str = "euclidean", weights: np.ndarray | None = None) -> np.ndarray:
    """``distance(a[k], b[k])`` for each row k of two (N, D) arrays, without an N x N matrix."""
    return _distance(distance).rowwise(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), weights)


def _average_ranks(values):
    order = values.argsort(kind="stable")
    sorted_vals = values[order]
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0  # 1-based average rank of each run of ties
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(avg, counts)
    return ranks


def verification_metrics(pos: np.ndarray, neg: np.ndarray) -> dict:
    """ROC AUC, EER and TAR at fixed FAR from same-class (``pos``) and other-class (``neg``) distances.

    A pair is accepted when ``distance < threshold``. The threshold at FAR x is the
    ``floor(x * n_neg) + 1``-th smallest negative distance, so that the FAR it gives is <= x.
    """
    pos, neg = np.sort(np.asarray(pos, float)), np.sort(np.asarray(neg, float))
    ranks = _average_ranks(np.concatenate([pos, neg]))
    # AUC = P(d_neg > d_pos) + P(equal) / 2 (Mann-Whitney on the negated distance).
    auc = (ranks[len(pos):].sum() - len(neg) * (len(neg) + 1) / 2) / (len(pos) * len(neg))
    out = {"roc_auc": float(auc)}

    thresholds = np.unique(np.concatenate([pos, neg, [np.inf]]))
    far = np.searchsorted(neg, thresholds, side="left") / len(neg)
    frr = 1 - np.searchsorted(pos, thresholds, side="left") / len(pos)
    best = np.argmin(np.abs(far - frr))
    out["eer"] = float((far[best] + frr[best]) / 2)
    out["eer_threshold"] = float(thresholds[best])
    for name, rate in (("1e-2", 1e-2), ("1e-3", 1e-3)):
        k = int(np.floor(rate * len(neg) + 1e-9))
        threshold = neg[k] if k < len(neg) else np.inf
        out[f"tar_at_far_{name}"] = float(np.searchsorted(pos, threshold, side="left") / len(pos))
        out[f"threshold_at_far_{name}"] = float(threshold)
    return out


def silhouette(emb: np.ndarray, labels: np.ndarray, distance: str, weights=None) -> float:
    """Mean silhouette ``(b - a) / max(a, b)``; a sample alone in its class scores 0 (scikit-learn's rule)."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    scores = np.empty(len(emb))

    def score_chunk(rows, d):
        sums = np.zeros((len(d), len(classes)))
        np.add.at(sums.T, inverse, d.T)
        own = inverse[rows]
        at = np.arange(len(d))
        a = sums[at, own] / np.maximum(counts[own] - 1, 1)
        means = sums / counts[None, :]
        means[at, own] = np.inf
        b = means.min(1)
        s = (b - a) / np.maximum(np.maximum(a, b), _EPS)
        scores[rows] = np.where(counts[own] > 1, s, 0.0)

    _each_chunk(emb, distance, weights, False, score_chunk)
    return float(scores.mean())


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    distance: str = "euclidean",
    weights: np.ndarray | None = None,
    knn_k: int = 5,
    episodes: int = 1000,
    max_pairs: int = 500_000,
    silhouette_samples: int = 2000,
    seed: int = 0,
) -> dict:
    """Every metric of a labelled set of embeddings, as a flat dict of floats.

    ``precision_at_1``, ``r_precision``, ``mean_average_precision_at_r``, ``knn_accuracy``
    (majority of ``knn_k`` neighbours), ``one_shot_5way`` / ``one_shot_20way`` (``episodes``
    seeded episodes, when the set has that many classes), ``roc_auc``, ``eer``,
    ``eer_threshold``, ``tar_at_far_1e-2``, ``tar_at_far_1e-3`` and their thresholds (over all
    pairs, or ``max_pairs`` random ones), ``silhouette`` (on at most ``silhouette_samples``) and
    ``intra_inter_distance_ratio`` (mean same-class over mean other-class pair distance).
    """
    emb = check_finite(np.asarray(embeddings, dtype=np.float64), "embeddings")
    labels = np.asarray(labels)
    if emb.ndim != 2 or labels.shape != (len(emb),):
        raise ValueError(f"expected embeddings (N, D) and labels (N,), got {emb.shape} and {labels.shape}")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2 or counts.max() < 2:
        raise ValueError("metrics need at least 2 classes and a class with at least 2 samples")
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)

    out: dict = {"num_samples": len(emb), "num_classes": len(classes)}
    out.update(_rank_metrics(emb, labels, distance, weights, knn_k))
    for ways in (5, 20):
        acc = _one_shot(emb, labels, distance, weights, ways, episodes, rng)
        if acc is not None:
            out[f"one_shot_{ways}way"] = acc

    i, j = _sample_pairs(len(emb), max_pairs, rng)
    d = rowwise_distances(emb[i], emb[j], distance, weights)
    same = labels[i] == labels[j]
    out.update(verification_metrics(d[same], d[~same]))
    out["intra_inter_distance_ratio"] = float(d[same].mean() / max(d[~same].mean(), _EPS))

    sub = np.arange(len(emb))
    if len(emb) > silhouette_samples:
        sub = np.sort(rng.choice(len(emb), silhouette_samples, replace=False))
    out["silhouette"] = silhouette(emb[sub], labels[sub], distance, weights)
    return out


def _nearest_other(emb, distance, weights) -> np.ndarray:
    """Index of each row's nearest other row of ``emb`` (the first of equals), ``(N,)``."""
    nearest = np.empty(len(emb), dtype=np.intp)

    def nearest_in_chunk(rows, d):
        nearest[rows] = d.argmin(1)

    _each_chunk(emb, distance, weights, True, nearest_in_chunk)
    return nearest


def _mean_distance_between_rows(emb, distance, weights) -> float:
    """The mean distance from each row of ``emb`` to every other row (0 for one row)."""
    total = 0.0

    def add_chunk(rows, d):
        nonlocal total
        total += d[np.isfinite(d)].sum()  # leave_one_out: a row's distance to itself is inf

    _each_chunk(emb, distance, weights, True, add_chunk)
    return total / max(len(emb) * (len(emb) - 1), 1)


def embedding_agreement(
    embeddings: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray | None = None,
    distance: str = "euclidean",
    weights: np.ndarray | None = None,
) -> dict:
    """How closely ``embeddings`` (an exported model's) follow ``reference`` (the trained model's).

    Per-row cosine (mean, min) and largest absolute difference; ``relative_error``, the mean
    Euclidean distance from each reference row to its exported row over the mean Euclidean
    distance between two different reference rows: a cosine near 1 says nothing when every image
    maps near the same point, this does (Euclidean whatever the model's distance: cosine and
    Shadow distances grow with the square of a small error, or miss its orthogonal part); the
    fraction of rows whose nearest other row is the same in both; with ``labels``,
    ``precision_at_1`` of both.
    """
    emb = check_finite(np.asarray(embeddings, dtype=np.float64), "embeddings")
    ref = check_finite(np.asarray(reference, dtype=np.float64), "reference embeddings")
    cos = (emb * ref).sum(1) / np.maximum(np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1), _EPS)
    out = {
        "num_samples": len(emb),
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "max_abs_diff": float(np.abs(emb - ref).max()),
        "relative_error": float(np.linalg.norm(emb - ref, axis=1).mean() / max(_mean_distance_between_rows(ref, "euclidean", None), _EPS)),
    }
    same = _nearest_other(emb, distance, weights) == _nearest_other(ref, distance, weights)
    out["top1_neighbour_agreement"] = float(same.mean())
    if labels is not None:
        labels = np.asarray(labels)
        out["precision_at_1"] = _rank_metrics(emb, labels, distance, weights, 1)["precision_at_1"]
        out["reference_precision_at_1"] = _rank_metrics(ref, labels, distance, weights, 1)["precision_at_1"]
    return out
