"""``edge-siamese compare``: the main job. Train the triplet baseline and, at each low dimension,
Shadow (normalised and raw) and triplet under the same data, backbone, epochs and batches; export
each at fp32 and int8; measure on each target; report every figure against the baseline.

Work already in ``--out`` with the same configuration is reused, so an interrupted compare
resumes. Nothing here trains, exports or measures by itself: it drives ``train``, ``evaluate``,
``export`` and ``targets``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from device_bench.bench import eval_accuracy
from device_bench.files import folder_problem, write_json
from device_bench.formats import PRECISIONS
from device_bench.manifest import read_bundle
from device_bench.runtimes import open_runtime
from export.exporter import check_formats, default_formats, export_run

from .. import __version__
from ..checkpoints import METRICS, load_run, read_config
from ..config import TrainConfig
from ..models import MAX_DIM, MIN_DIM
from ..errors import UserError
from ..evaluate import embed_split, evaluate_run
from ..files import remove_result_folder
from ..progress import progress_bar
from ..run import prepare_data, read_index
from ..train import train
from .report import with_ci, write_report
from .targets import TARGETS, BenchSettings, run_target

COMPARE_TARGETS = tuple(name for name, target in TARGETS.items() if target.in_compare)
METRICS_SHOWN = ("precision_at_1", "mean_average_precision_at_r", "tar_at_far_1e-3")
PRESETS = {
    "default": {},
    "paper": {"dataset": "fashion-mnist", "split": "classes", "seeds": 5, "epochs": 30, "dims": [2, 4, 8, 16, 32]},
}


@dataclass
class CompareConfig:
    dataset: str = "digits"
    split: str = "samples"
    backbone: str = "convnet"
    baseline_dim: int = 128
    dims: list[int] = field(default_factory=lambda: [4, 8, 16])
    losses: list[str] = field(default_factory=lambda: ["shadow", "shadow-raw", "triplet"])
    seeds: int = 3
    epochs: int = 20
    formats: list[str] = field(default_factory=default_formats)
    targets: list[str] = field(default_factory=lambda: ["cpu"])
    bench_runs: int = 30
    gallery: list[int] = field(default_factory=lambda: [1000, 100000])

    def runs(self) -> list[tuple[str, int, int]]:
        """Every (loss, dim, seed) to train: the baseline first, then each low-dim loss."""
        out = []
        for seed in range(self.seeds):
            out.append(("triplet", self.baseline_dim, seed))
            out += [(loss, dim, seed) for dim in self.dims for loss in self.losses]
        return out

    def train_config(self, loss: str, dim: int, seed: int) -> TrainConfig:
        return TrainConfig(dataset=self.dataset, split=self.split, backbone=self.backbone, loss=loss, embedding_dim=dim, epochs=self.epochs, seed=seed).validate()

    def validate(self) -> "CompareConfig":
        """Raise ``UserError`` at the first bad setting, before any work (or any --force removal)."""
        self.formats = check_formats(self.formats)
        for t in self.targets:
            if t not in COMPARE_TARGETS:
                raise UserError(f"unknown target {t!r}: choose from {', '.join(COMPARE_TARGETS)}")
        if self.seeds < 1 or not self.dims or not self.losses:
            raise UserError("compare needs at least one seed, one dim and one loss")
        for option, values in (("--dims", self.dims), ("--losses", self.losses), ("--targets", self.targets)):
            repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
            if repeated:
                raise UserError(f"{option} names {', '.join(map(str, repeated))} more than once: list each once")
        if not MIN_DIM <= self.baseline_dim <= MAX_DIM:
            raise UserError(f"--baseline-dim {self.baseline_dim} is out of range: use {MIN_DIM} to {MAX_DIM}")
        for dim in self.dims:
            if not MIN_DIM <= dim <= MAX_DIM:
                raise UserError(f"--dims: {dim} is out of range: use {MIN_DIM} to {MAX_DIM}")
        for loss, dim, seed in self.runs():
            self.train_config(loss, dim, seed)
        return self


def mean_ci(values: list[float]) -> dict:
    """Mean and the half-width of its 95% t-interval (None with one value: no interval; results.json is strict JSON)."""
    v = np.asarray(values, dtype=float)
    from scipy import stats  # here: scipy.stats costs every command's start ~0.6 s

    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "ci95": half, "n": int(len(v)), "values": [float(x) for x in v]}


def paired_delta(values: list[float], baseline: list[float]) -> dict:
    """Per-seed differences against the baseline (same seed, same split): mean, CI, significance."""
    d = mean_ci([a - b for a, b in zip(values, baseline)])
    d["significant"] = bool(d["ci95"] is not None and abs(d["mean"]) > d["ci95"])
    return d


def _run_dir(out: Path, loss: str, dim: int, seed: int) -> Path:
    return out / "runs" / f"{loss}-d{dim}-s{seed}"


def _train_or_reuse(config: TrainConfig, run_dir: Path) -> None:
    if (run_dir / METRICS).exists() or (run_dir / "config.json").exists():
        saved, _ = read_config(run_dir)
        if saved != config:
            raise UserError(f"{run_dir} was trained with other settings: use another --out, or --force to start over")
        if (run_dir / METRICS).exists():
            return
        if (run_dir / "checkpoint.pt").exists():
            train(config, run_dir, resume=True, progress=False)
            return
    train(config, run_dir, force=True, progress=False)


def _file_metrics(bundle_dir: Path) -> dict:
    """Retrieval metrics of each exported file on the bundle's held-out set, run in its runtime."""
    bundle = read_bundle(bundle_dir)
    out = {}
    for entry in bundle.files:
        m = eval_accuracy(bundle, open_runtime(bundle.path / entry["path"], entry["format"]))
        out[entry["path"]] = {
            "format": entry["format"],
            "precision": entry["precision"],
            "status": entry["status"],
            "size_bytes": entry["size_bytes"],
            "mean_cosine": entry["fidelity"]["mean_cosine"],
            **{k: m[k] for k in METRICS_SHOWN},
        }
    return out


def _epochs_to_95(history: list[dict]) -> int:
    final = history[-1]["val_precision_at_1"]
    return next(h["epoch"] for h in history if h["val_precision_at_1"] >= 0.95 * final)


def _bench(target: str, bundle: Path, run_dir: Path, config: CompareConfig) -> dict:
    settings = BenchSettings(batches=[1], warmup=3, runs=config.bench_runs, gallery=config.gallery, run_dir=run_dir, instructions=target == "arm64-emulated", progress=False)
    return run_target(target, bundle, settings)


def run_compare(config: CompareConfig, out: Path, force: bool = False, progress: bool = True) -> dict:
    """Run (or resume) the whole comparison into ``out``; return ``results.json``'s content.
    ``force`` starts over in an ``out`` that holds an earlier compare (checked after the settings)."""
    out = Path(out)
    config.validate()
    if force:
        remove_result_folder(out, "compare_config.json")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder: choose another --out")
    if problem := folder_problem(out):
        raise UserError(problem)
    specs = config.runs()
    saved_path = out / "compare_config.json"
    if saved_path.exists():
        try:
            same = json.loads(saved_path.read_text()) == asdict(config)
        except ValueError:
            same = False
        if not same:
            raise UserError(f"{out} holds a compare with other settings: use another --out, or --force to start over")
    prepare_data(config.train_config(*specs[0]))  # the dataset loads and splits: checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved_path, asdict(config))

    started = time.perf_counter()
    runs = {}
    bar = progress_bar(len(specs), "compare", enabled=progress, unit="run")
    for loss, dim, seed in specs:
        bar.set_postfix_str(f"{loss} d={dim} seed {seed}")
        run_dir = _run_dir(out, loss, dim, seed)
        _train_or_reuse(config.train_config(loss, dim, seed), run_dir)
        evaluation_path = run_dir / "evaluation.json"
        if not evaluation_path.exists():
            write_json(evaluation_path, evaluate_run(run_dir, "test", "cpu"))
        bundle = run_dir / "bundle"
        if not (bundle / "manifest.json").exists():
            export_run(run_dir, bundle, config.formats, ["fp32", "int8"], force=True, allow_degraded=True, progress=False)
        files_path = run_dir / "file_metrics.json"
        if not files_path.exists():
            write_json(files_path, _file_metrics(bundle))
        metrics = json.loads((run_dir / METRICS).read_text())
        runs[f"{loss}-d{dim}-s{seed}"] = {
            "loss": loss,
            "dim": dim,
            "seed": seed,
            "test": json.loads(evaluation_path.read_text()),
            "files": json.loads(files_path.read_text()),
            "train_time_s": metrics["train_time_s"],
            "peak_train_rss_mb": metrics["peak_rss_mb"],
            "epochs_to_95": _epochs_to_95(metrics["history"]),
            "history": metrics["history"],
        }
        bar.update()
    bar.close()

    bench = {}
    models = [("triplet", config.baseline_dim)] + [(loss, dim) for dim in config.dims for loss in config.losses]
    bar = progress_bar(len(config.targets) * len(models) + 1, "benchmark and report", enabled=progress, unit="step")
    for target in config.targets:
        bench[target] = {}
        for loss, dim in models:
            bar.set_postfix_str(f"{loss} d={dim} on {target}")
            run_dir = _run_dir(out, loss, dim, 0)
            path = out / "bench" / f"{loss}-d{dim}-{target}.json"
            if not path.exists():
                try:
                    result = _bench(target, run_dir / "bundle", run_dir, config)
                except UserError as exc:
                    result = {"not_measured": str(exc)}
                path.parent.mkdir(exist_ok=True)
                write_json(path, result)
            bench[target][f"{loss}-d{dim}"] = json.loads(path.read_text())
            bar.update()

    results = {
        "toolkit_version": __version__,
        "config": asdict(config),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "elapsed_s": time.perf_counter() - started,
        "runs": runs,
        "summary": summarize(config, runs, bench),
        "bench": bench,
    }
    write_json(out / "results.json", results)
    bar.set_postfix_str("report")
    write_report(results, out, _embeddings_2d(config, out))
    bar.update()
    bar.close()
    return results


def _embeddings_2d(config: CompareConfig, out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Seed 0's test embeddings at the smallest dim, Shadow vs triplet: as they are at d=2, else PCA."""
    dim = min(config.dims)
    views = {}
    for loss in [l for l in ("shadow", "triplet") if l in config.losses]:
        run = load_run(_run_dir(out, loss, dim, 0))
        data = prepare_data(run.config, run.preprocessing, read_index(run.path))
        emb = embed_split(run.model, data, "test")
        if dim > 2:
            centred = emb - emb.mean(0)
            emb = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
        views[f"{loss} d={dim}" + (" (PCA)" if dim > 2 else "")] = (emb, data.labels("test"))
    return views


def summarize(config: CompareConfig, runs: dict, bench: dict) -> dict:
    """Per model (loss, dim) and per exported file: mean ± CI over seeds and Δ vs the baseline."""
    seeds = range(config.seeds)
    models = [("triplet", config.baseline_dim)] + [(loss, dim) for dim in config.dims for loss in config.losses]

    def per_seed(loss, dim, getter):
        return [getter(runs[f"{loss}-d{dim}-s{s}"]) for s in seeds]

    rows = []
    for loss, dim in models:
        first = runs[f"{loss}-d{dim}-s0"]
        variants = [("pytorch", "fp32", None)] + [(f["format"], f["precision"], path) for path, f in first["files"].items()]
        for fmt, precision, path in variants:
            row = {"loss": loss, "dim": dim, "format": fmt, "precision": precision, "baseline": loss == "triplet" and dim == config.baseline_dim}

            def metric(run, name, path=path):
                return run["test"][name] if path is None else run["files"][path][name]

            for name in METRICS_SHOWN:
                values = per_seed(loss, dim, lambda r, n=name: metric(r, n))
                row[name] = mean_ci(values)
                base = per_seed("triplet", config.baseline_dim, lambda r, n=name: metric(r, n))
                row[f"delta_{name}"] = paired_delta(values, base)
            if path is not None:
                statuses = per_seed(loss, dim, lambda r: r["files"][path]["status"])
                row["status"] = "verified" if all(s == "verified" for s in statuses) else "degraded"
                row["degraded_seeds"] = statuses.count("degraded")
                row["size_bytes"] = first["files"][path]["size_bytes"]
            else:
                row["status"] = "reference"
            # the int8 gallery stores int8 codes; every other row's gallery is float32
            row["gallery_bytes_per_identity"] = dim * PRECISIONS["int8" if precision == "int8" else "fp32"].bytes_per_value
            row["train_time_s"] = mean_ci(per_seed(loss, dim, lambda r: r["train_time_s"]))
            row["peak_train_rss_mb"] = mean_ci(per_seed(loss, dim, lambda r: r["peak_train_rss_mb"]))
            row["epochs_to_95"] = mean_ci(per_seed(loss, dim, lambda r: r["epochs_to_95"]))
            row["bench"] = {}
            for target, by_model in bench.items():
                result = by_model[f"{loss}-d{dim}"]
                # the PyTorch row is the cuda target's fp32 model; every other row is a bundle file
                same = (lambda r: r.get("format") == "pytorch" and r.get("precision") == "fp32") if path is None else (lambda r: r.get("file") == path)
                match = [r for r in result.get("rows", []) if same(r) and r.get("status") == "verified"]
                if match:
                    r = match[0]
                    lat = r["latency"][0]
                    row["bench"][target] = {
                        "p50_ms": lat["p50_ms"],
                        "p99_ms": lat["p99_ms"],
                        "peak_rss_mb": r.get("memory", {}).get("peak_rss_mb"),
                        "guest_instructions_per_inference": r.get("guest_instructions_per_inference"),
                        "emulated": result.get("target", {}).get("emulated", False),
                    }
                elif "not_measured" in result:
                    row["bench"][target] = {"not_measured": result["not_measured"]}
            rows.append(row)
    return {"rows": rows, "verdict": verdict(config, rows)}


def verdict(config: CompareConfig, rows: list[dict]) -> list[str]:
    """Plain sentences on what the data shows, Shadow's losses as plainly as its wins."""
    torch_rows = {(r["loss"], r["dim"]): r for r in rows if r["format"] == "pytorch"}
    n = config.seeds
    lines = [f"Each figure is the mean of {n} seed(s) with its 95% confidence interval; a difference is called significant when its paired CI excludes zero." + (" One seed gives no interval: nothing can be called significant." if n == 1 else "")]
    for dim in config.dims:
        if ("triplet", dim) not in torch_rows:
            continue
        trip = torch_rows[("triplet", dim)]
        for loss in [l for l in config.losses if l != "triplet"]:
            row = torch_rows[(loss, dim)]
            for name in ("precision_at_1", "mean_average_precision_at_r"):
                d = paired_delta(row[name]["values"], trip[name]["values"])
                word = "better than" if d["mean"] > 0 else "worse than"
                if not d["significant"]:
                    word = "not significantly different from"
                lines.append(
                    f"d={dim}: {loss} {name} {row[name]['mean']:.4f} vs triplet {trip[name]['mean']:.4f} "
                    f"(Δ {with_ci(d, '+')}): {word} triplet at the same dim."
                )
        for loss in config.losses:
            row = torch_rows[(loss, dim)]
            d = row["delta_precision_at_1"]
            state = "significantly below" if d["significant"] and d["mean"] < 0 else "significantly above" if d["significant"] else "within noise of"
            lines.append(
                f"d={dim}: {loss} is {state} the d={config.baseline_dim} triplet baseline on precision_at_1 "
                f"(Δ {with_ci(d, '+')}); its int8 gallery takes {dim} B per identity against "
                f"{4 * config.baseline_dim} B for the baseline at fp32."
            )
    return lines
