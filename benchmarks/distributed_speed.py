"""Training steps with 1 and 2 processes (torch.distributed, Gloo on this CPU): steps/s, the time of each
part of a step, and memory per process, side by side in one run.

Each world size is a fresh ``python -m torch.distributed.run --standalone --nproc-per-node W`` of
this script (``--child``); every process builds the run's model and loss as ``edge_siamese.train``
does (``checkpoints.build`` on ``TrainConfig(dataset, batch_size, samples_per_class=8)``: convnet,
Shadow, batch-all), wraps the model in DistributedDataParallel when W > 1, and times ``--steps``
steps after 5 warm-up steps on the same P x K batches (the global batch is ``--batch-size``; each
process embeds its ``1/W`` shard). The parts, timed on each process with ``time.perf_counter``:
``forward`` (the model on its shard), ``gather`` (``distributed.gather``: every rank's
embeddings and labels), ``loss`` (the exact batch-all on the global batch), ``backward`` (with
DDP's gradient all-reduce and the gather's backward) and ``step`` (AdamW). Reported: medians
over steps, of rank 0 (the other ranks wait on the same collectives); ``steps/s`` is one over
the median step; ``images/s`` counts the global batch; ``peak RSS MB`` is each process's
``VmHWM`` at the end (Python, torch and the data set included), the largest over ranks.

With 2 cores, 2 processes of 1 thread each against 1 process of 2 threads: the same cores, used
differently. Threads per process: ``OMP_NUM_THREADS`` = cores / W.

    python benchmarks/distributed_speed.py                      # fashion-mnist, batch 256, 50 steps
    python benchmarks/distributed_speed.py --dataset digits --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("forward", "gather", "loss", "backward", "step")
WARMUP = 5


def child(out: Path, args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from edge_siamese import distributed
    from edge_siamese.checkpoints import build
    from edge_siamese.config import TrainConfig
    from edge_siamese.data import PKSampler
    from edge_siamese.run import prepare_data

    world = distributed.world_from_env()
    distributed.start(world, torch.device("cpu"))
    config = TrainConfig(dataset=args.dataset, batch_size=args.batch_size, samples_per_class=8, workers=0, device="cpu")
    data = prepare_data(config, None, None, False)
    torch.manual_seed(0)
    model, loss_fn = build(config, data.preprocessing)
    net = torch.nn.parallel.DistributedDataParallel(model) if world.size > 1 else model
    optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=1e-3)
    labels_all = data.labels("train")
    sampler = PKSampler(labels_all, config.batch_size // 8, 8, WARMUP + args.steps, seed=0)
    times = {part: [] for part in PARTS}
    for i, batch in enumerate(sampler):
        rows = np.array(distributed.shard(batch, world))
        x, y = data.inputs("train", np.sort(rows)), torch.from_numpy(labels_all[np.sort(rows)])
        marks = [time.perf_counter()]
        embeddings = net(x)
        marks.append(time.perf_counter())
        embeddings, labels = distributed.gather(embeddings, y, world)
        marks.append(time.perf_counter())
        loss = loss_fn(embeddings, labels)
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        if i >= WARMUP:
            for part, (a, b) in zip(PARTS, zip(marks, marks[1:])):
                times[part].append(b - a)
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    (out / f"rank{world.rank}.json").write_text(json.dumps({"times": times, "peak_rss_mb": hwm, "threads": torch.get_num_threads()}))
    distributed.stop(world)


def measure(world_size: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world_size))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size), __file__,
               "--child", folder, "--dataset", args.dataset, "--batch-size", str(args.batch_size), "--steps", str(args.steps)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if done.returncode:
            raise SystemExit(f"{world_size} process(es) failed: {(done.stderr.strip().splitlines() or ['no message'])[-1]}")
        ranks = [json.loads((Path(folder) / f"rank{r}.json").read_text()) for r in range(world_size)]
    step = [sum(parts) for parts in zip(*(ranks[0]["times"][p] for p in PARTS))]
    return {
        "world_size": world_size,
        "threads_per_process": ranks[0]["threads"],
        "steps_per_s": 1 / statistics.median(step),
        "images_per_s": args.batch_size / statistics.median(step),
        **{f"{part}_ms": 1000 * statistics.median(ranks[0]["times"][part]) for part in PARTS},
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--batch-size", type=int, default=256, help="the global P x K batch (8 per class)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args)
        return
    rows = [measure(w, args) for w in (1, 2)]
    head = ["processes", "threads each", "steps/s", "images/s", *(f"{part} ms" for part in PARTS), "peak RSS MB (per process)"]
    print(f"{args.dataset}, global batch {args.batch_size}, {args.steps} steps after {WARMUP}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")
    print("| " + " | ".join(head) + " |\n|" + "---:|" * len(head))
    for r in rows:
        cells = [r["world_size"], r["threads_per_process"], f"{r['steps_per_s']:.2f}", f"{r['images_per_s']:.0f}", *(f"{r[f'{part}_ms']:.2f}" for part in PARTS), f"{r['peak_rss_mb']:.0f}"]
        print("| " + " | ".join(map(str, cells)) + " |")
    one, two = rows
    print(f"\n2 processes / 1: {two['steps_per_s'] / one['steps_per_s']:.2f}x the steps/s; the gather costs {two['gather_ms'] / two['loss_ms']:.2f}x the loss's time")


if __name__ == "__main__":
    main()
