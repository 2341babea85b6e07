"""A class-balanced subset of Fashion-MNIST as an ``.npz`` that ``--dataset`` takes: the data of
docs/results.md, small enough for a tuned, several-seed ``compare`` on a 2-core CPU.

Reads the Debian package ``dataset-fashion-mnist`` (train and test sets together, 70,000 images)
through the toolkit's own loader and keeps the first ``--per-class`` images of each class in the
order of a generator seeded with ``--seed``.

    python benchmarks/fmnist_subset.py runs/fmnist-12k.npz --per-class 1200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from device_bench.files import atomic_path, new_file_problem
from edge_siamese.data import load_fashion_mnist


def subset(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    data = load_fashion_mnist()
    order = np.random.default_rng(seed).permutation(len(data.labels))
    keep = np.sort(np.concatenate([order[data.labels[order] == c][:per_class] for c in np.unique(data.labels)]))
    return data.images[keep], data.labels[keep]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the .npz to write")
    p.add_argument("--per-class", type=int, default=1200, help="images per class (Fashion-MNIST has 7,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = p.parse_args(argv)
    if not 2 <= args.per_class <= 7000:
        p.error("--per-class must lie between 2 and 7000")
    if problem := new_file_problem(args.out, args.force):
        p.error(problem)
    images, labels = subset(args.per_class, args.seed)
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels)
    print(f"wrote {args.out}: {len(labels)} images, {len(np.unique(labels))} classes")


if __name__ == "__main__":
    main()
