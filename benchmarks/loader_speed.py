"""Throughput of the streamed training loader: images/s of P x K batches decoded from JPEG files, by loader workers.

On the 10,000-image folder of ``data_memory.py`` (112x112 RGB JPEGs, 100 a class, made once under
``~/.cache/edge-siamese/bench-photos``; ``--quick``: the 2,000-image one), with the working tree's
``edge_siamese``: ``prepare_data`` of ``TrainConfig(dataset=FOLDER, split="samples",
input_size=[112, 112], batch_size=64, samples_per_class=4)``, once, then for each augmentation
(``standard``, ``none``) and each number of loader workers (0, 1, 2), a fresh
``data.train_loader(sampler, augment)`` over a ``PKSampler`` of the training split (16 classes x 4):

- ``images/s``: the images of ``--batches`` batches over the wall time from the end of the
  ``--warmup``-th batch (worker start-up and the first batches are left out) to the arrival of
  the last; only the loader runs (no model), so this is the most it can feed a training loop.
- Median of ``--repeats`` repeats, interleaved (every setting once, then again), so that a busy
  spell of the machine's other jobs falls on all settings alike; repeat r draws the batches of
  epoch r, the same batches for every setting.
- ``ratio``: images/s over that of workers=0 (at torch's default threads) with the same augmentation.

Worker processes run torch with one thread each (the DataLoader's default); workers=0 decodes and
augments in the main process, at torch's default threads (as ``train`` does) and, where that is
more than one, at one thread too (``torch.set_num_threads(1)`` around the pass): on a machine
whose cores other jobs keep busy, torchvision's per-image ops split over several threads wait
for a descheduled one. The files are in the page cache (indexing them has just read them all):
this measures decoding, augmenting and normalising, not the disk.

    python benchmarks/loader_speed.py             # 10,000 images, 30 batches of 64, 3 repeats
    python benchmarks/loader_speed.py --quick     # 2,000 images, 10 batches
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch
from data_memory import machine, photo_folder

from device_bench.files import write_json
from edge_siamese.config import TrainConfig
from edge_siamese.data import PKSampler
from edge_siamese.progress import progress_bar
from edge_siamese.run import PreparedData, prepare_data

WORKERS = (0, 1, 2)
AUGMENTS = ("standard", "none")
NUM_IMAGES, QUICK_NUM_IMAGES = 10_000, 2_000
BATCHES, QUICK_BATCHES = 30, 10
BATCH_SIZE, SAMPLES_PER_CLASS = 64, 4


def settings(default_threads: int) -> list[tuple[str, int, int]]:
    """(augment, workers, main-process torch threads): each worker count at torch's default
    threads, and workers=0 at one thread too, where the default is more."""
    threads = sorted({default_threads, 1}, reverse=True)
    return [(a, 0, t) for a in AUGMENTS for t in threads] + [(a, w, default_threads) for a in AUGMENTS for w in WORKERS if w]


def images_per_s(data: PreparedData, augment: str, workers: int, threads: int, batches: int, warmup: int, epoch: int) -> float:
    """One pass of a fresh training loader, the main process at ``threads`` torch threads:
    images/s of ``batches`` batches after ``warmup``."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _pass(data, augment, workers, batches, warmup, epoch)
    finally:
        torch.set_num_threads(default_threads)


def _pass(data: PreparedData, augment: str, workers: int, batches: int, warmup: int, epoch: int) -> float:
    sampler = PKSampler(data.labels("train"), BATCH_SIZE // SAMPLES_PER_CLASS, SAMPLES_PER_CLASS, warmup + batches, seed=0)
    loader = replace(data, workers=workers).train_loader(sampler, augment)
    loader.batch_sampler.set_epoch(epoch)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        inputs, _ = next(it)
        images += len(inputs)
    elapsed = time.perf_counter() - start
    del it  # stops the workers, outside the timed span
    return images / elapsed


def format_table(results: dict[tuple[str, int, int], list[float]], default_threads: int) -> str:
    """One markdown table, a row per setting, by augmentation; the ratio is to workers=0 at the default threads."""
    header = ["augment", "workers", "main-process torch threads", "images/s (median)", "min – max", "ratio to workers=0"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for augment, workers, threads in sorted(results, key=lambda k: (AUGMENTS.index(k[0]), k[1], -k[2])):
        rates = results[(augment, workers, threads)]
        median = statistics.median(rates)
        base = statistics.median(results[(augment, 0, default_threads)])
        lines.append(f"| {augment} | {workers} | {threads} | {median:,.0f} | {min(rates):,.0f} – {max(rates):,.0f} | {median / base:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_NUM_IMAGES:,} images and {QUICK_BATCHES} batches")
    p.add_argument("--batches", type=int, help=f"timed batches of {BATCH_SIZE} per pass (default {BATCHES}; {QUICK_BATCHES} with --quick)")
    p.add_argument("--warmup", type=int, default=3, help="batches before the clock starts")
    p.add_argument("--repeats", type=int, default=3, help="passes per setting (median)")
    p.add_argument("--json", type=Path, help="also write every pass here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    num_images = QUICK_NUM_IMAGES if args.quick else NUM_IMAGES
    batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)
    machine_line = machine()

    folder = photo_folder(num_images, not args.quiet)
    config = TrainConfig(dataset=str(folder), split="samples", input_size=[112, 112], batch_size=BATCH_SIZE, samples_per_class=SAMPLES_PER_CLASS, workers=max(WORKERS))
    data = prepare_data(config.validate(), None, None, progress=not args.quiet)

    default_threads = torch.get_num_threads()
    results: dict[tuple[str, int, int], list[float]] = {key: [] for key in settings(default_threads)}
    bar = progress_bar(args.repeats * len(results), "loader speed", enabled=not args.quiet, unit="pass")
    for repeat in range(args.repeats):
        for (augment, workers, threads), rates in results.items():
            bar.set_postfix_str(f"augment={augment} workers={workers} threads={threads}")
            rates.append(images_per_s(data, augment, workers, threads, batches, args.warmup, repeat))
            bar.update()
    bar.close()

    print(
        f"Machine: {machine_line}; torch threads: {default_threads} by default, 1 in each loader worker. "
        f"{len(data.rows('train')):,} training images of {num_images:,} 112x112 RGB JPEGs (page cache warm), input 112x112; "
        f"{batches} batches of {BATCH_SIZE} ({BATCH_SIZE // SAMPLES_PER_CLASS} classes x {SAMPLES_PER_CLASS}) timed after {args.warmup}, "
        f"median of {args.repeats} interleaved repeats. With {os.cpu_count()} cores, workers={max(WORKERS)} shares them with the main process and the other jobs.\n"
    )
    print(format_table(results, default_threads))
    if args.json:
        rows = [{"augment": a, "workers": w, "main_threads": t, "images_per_s": r} for (a, w, t), r in results.items()]
        write_json(args.json, {"machine": machine_line, "num_images": num_images, "batches": batches, "warmup": args.warmup, "results": rows})


if __name__ == "__main__":
    main()
