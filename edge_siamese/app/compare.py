"""``edge-siamese compare``: the main job, held to "A Metric Learning Reality Check" (Musgrave,
Belongie, Lim, ECCV 2020). Train the triplet baseline and, at each low dimension, Shadow
(normalised and raw), its algebraic twin (``triplet-squared``) and triplet under the same data,
backbone, epochs and batches, each loss's margin first tuned on the validation images of the
training classes with the same number of trials; test on classes never trained on; export each
at fp32 and int8 and evaluate every file on the same test images as its PyTorch model; measure
on each target; report every figure against the baseline, MAP@R first.

Work already in ``--out`` with the same configuration is reused, so an interrupted compare
resumes. Nothing here trains, exports or measures by itself: it drives ``train``, ``evaluate``,
``export`` and ``targets``.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

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
from ..evaluate import embed_split, embedding_metrics, evaluate_run
from ..losses import LOSSES
from ..files import remove_result_folder
from ..progress import progress_bar
from ..run import prepare_data, read_index
from ..train import train
from .report import with_ci, write_report
from .targets import TARGETS, BenchSettings, run_target

COMPARE_TARGETS = tuple(name for name, target in TARGETS.items() if target.in_compare)
METRICS_SHOWN = ("mean_average_precision_at_r", "precision_at_1", "tar_at_far_1e-3")
TWIN = {"triplet-squared": "shadow"}  # a twin -> the loss it mirrors: its margin is twice that loss's tuned one, not tuned itself
PRESETS = {
    "default": {},
    "paper": {"dataset": "fashion-mnist", "split": "classes", "seeds": 5, "epochs": 30, "dims": [2, 4, 8, 16, 32]},
}


@dataclass
class CompareConfig:
    dataset: str = "digits"
    split: str = "classes"  # test classes never seen in training
    backbone: str = "convnet"
    baseline_dim: int = 128
    dims: list[int] = field(default_factory=lambda: [4, 8, 16])
    losses: list[str] = field(default_factory=lambda: ["shadow", "triplet-squared", "shadow-raw", "triplet"])
    seeds: int = 3
    epochs: int = 10
    trials: int = 3  # tuning runs per (loss, dim): the default margin (or learning rate) times TRIAL_FACTORS
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

    def models(self) -> list[tuple[str, int]]:
        """Every (loss, dim): the baseline first."""
        return [("triplet", self.baseline_dim)] + [(loss, dim) for dim in self.dims for loss in self.losses]

    def train_config(self, loss: str, dim: int, seed: int, **tuned: float) -> TrainConfig:
        """The run of (loss, dim, seed), with a tuned ``margin`` or ``lr`` when given."""
        return TrainConfig(dataset=self.dataset, split=self.split, backbone=self.backbone, loss=loss, embedding_dim=dim, epochs=self.epochs, seed=seed, **tuned).validate()

    def validate(self) -> "CompareConfig":
        """Raise ``UserError`` at the first bad setting, before any work (or any --force removal)."""
        self.formats = check_formats(self.formats)
        for t in self.targets:
            if t not in COMPARE_TARGETS:
                raise UserError(f"unknown target {t!r}: choose from {', '.join(COMPARE_TARGETS)}")
        if self.seeds < 1 or not self.dims or not self.losses or self.trials < 1:
            raise UserError("compare needs at least one seed, one dim, one loss and one tuning trial")
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
    """Mean and the half-width of its 95% t-interval over ``n`` runs. results.json is strict JSON:
    what cannot be a number is null with a ``reason`` (one run gives no interval; a run whose
    figure is not finite leaves no mean)."""
    v = np.asarray(values, dtype=float)
    from scipy import stats  # here: scipy.stats costs every command's start ~0.6 s

    finite = np.isfinite(v)
    listed = [float(x) if ok else None for x, ok in zip(v, finite)]
    if not finite.all():
        return {"mean": None, "ci95": None, "n": int(len(v)), "values": listed, "reason": f"{int((~finite).sum())} of {len(v)} runs gave no finite value"}
    if len(v) == 1:
        return {"mean": float(v[0]), "ci95": None, "n": 1, "values": listed, "reason": "one run: no interval"}
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return {"mean": float(v.mean()), "ci95": half, "n": int(len(v)), "values": listed}


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


def trial_values(default: float, trials: int) -> list[float]:
    """``trials`` values around a loss's default, from half to twice it on a log scale (the default alone for one)."""
    factors = np.geomspace(0.5, 2.0, trials) if trials > 1 else np.ones(1)
    return [float(f"{default * f:.4g}") for f in factors]


def tuned_parameter(loss: str) -> str:
    """What a loss's trials vary: its margin, or the learning rate when it has none."""
    return "margin" if LOSSES[loss].margin is not None else "lr"


def tune(config: CompareConfig, out: Path, bar) -> dict[str, dict]:
    """Each (loss, dim)'s margin (or learning rate) chosen on the validation images of the training
    classes by MAP@R, from ``config.trials`` runs of seed 0 that differ in that value alone; the
    same number for every loss. A twin (``TWIN``) takes twice its loss's chosen margin."""
    tuning = {}
    for loss, dim in [m for m in config.models() if not _mirrors(config, m[0])]:
        parameter = tuned_parameter(loss)
        default = LOSSES[loss].margin if parameter == "margin" else TrainConfig.lr
        trials = []
        for value in trial_values(default, config.trials):
            bar.set_postfix_str(f"tuning {loss} d={dim} {parameter} {value:g}")
            run_dir = _trial_dir(out, loss, dim, parameter, value)
            _train_or_reuse(config.train_config(loss, dim, 0, **{parameter: value}), run_dir)
            final = json.loads((run_dir / METRICS).read_text())["final"]
            trials.append({"value": value, **{f"val_{k}": final[f"val_{k}"] for k in ("mean_average_precision_at_r", "precision_at_1")}})
            bar.update()
        best = max(trials, key=lambda t: t["val_mean_average_precision_at_r"])  # the first of equals
        tuning[f"{loss}-d{dim}"] = {"parameter": parameter, "default": default, "trials": trials, "chosen": best["value"]}
    for loss, dim in [m for m in config.models() if _mirrors(config, m[0])]:
        tuning[f"{loss}-d{dim}"] = {"parameter": "margin", "default": LOSSES[loss].margin, "trials": [], "twin_of": TWIN[loss], "chosen": 2 * tuning[f"{TWIN[loss]}-d{dim}"]["chosen"]}
    return tuning


def _mirrors(config: CompareConfig, loss: str) -> bool:
    return loss in TWIN and TWIN[loss] in config.losses


def _trial_dir(out: Path, loss: str, dim: int, parameter: str, value: float) -> Path:
    return out / "tuning" / f"{loss}-d{dim}-{parameter}{value:g}"


def _file_metrics(run_dir: Path, bundle_dir: Path) -> dict:
    """Retrieval metrics of each exported file, run in its runtime, on the run's whole test split:
    the images its PyTorch row is evaluated on, so that a row's difference is the export's cost."""
    run = load_run(run_dir)
    data = prepare_data(run.config, run.preprocessing, read_index(run_dir))
    labels = data.labels("test")
    bundle = read_bundle(bundle_dir)
    out = {}
    for entry in bundle.files:
        runtime = open_runtime(bundle.path / entry["path"], entry["format"])
        embeddings = np.concatenate([runtime.run(inputs.numpy()) for inputs, _ in data.batches("test")])
        m = embedding_metrics(embeddings, labels, run.loss.distance)
        out[entry["path"]] = {
            "format": entry["format"],
            "precision": entry["precision"],
            "status": entry["status"],
            "size_bytes": entry["size_bytes"],
            "mean_cosine": entry["fidelity"]["mean_cosine"],
            "num_samples": len(labels),
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
    tuning_runs = sum(config.trials for loss, _ in config.models() if not _mirrors(config, loss))
    bar = progress_bar(tuning_runs + len(specs), "compare", enabled=progress, unit="run")
    tuning = tune(config, out, bar)
    for loss, dim, seed in specs:
        bar.set_postfix_str(f"{loss} d={dim} seed {seed}")
        run_dir = _run_dir(out, loss, dim, seed)
        chosen = tuning[f"{loss}-d{dim}"]
        trial = _trial_dir(out, loss, dim, chosen["parameter"], chosen["chosen"])
        if seed == 0 and not run_dir.exists() and (trial / METRICS).exists():
            shutil.copytree(trial, run_dir)  # the tuning's run of the chosen value is seed 0's
        _train_or_reuse(config.train_config(loss, dim, seed, **{chosen["parameter"]: chosen["chosen"]}), run_dir)
        evaluation_path = run_dir / "evaluation.json"
        if not evaluation_path.exists():
            write_json(evaluation_path, evaluate_run(run_dir, "test", "cpu"))
        bundle = run_dir / "bundle"
        if not (bundle / "manifest.json").exists():
            export_run(run_dir, bundle, config.formats, ["fp32", "int8"], force=True, allow_degraded=True, progress=False)
        files_path = run_dir / "file_metrics.json"
        if not files_path.exists():
            write_json(files_path, _file_metrics(run_dir, bundle))
        metrics = json.loads((run_dir / METRICS).read_text())
        runs[f"{loss}-d{dim}-s{seed}"] = {
            "loss": loss,
            "dim": dim,
            "seed": seed,
            chosen["parameter"]: chosen["chosen"],
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
    models = config.models()
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
        "tuning": tuning,
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
    models = config.models()

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
    answer, details = verdict(config, rows)
    return {"rows": rows, "verdict": answer, "details": details}


def verdict(config: CompareConfig, rows: list[dict]) -> tuple[list[str], list[str]]:
    """The answer in three lines (the best low-dimension model against the baseline; Shadow
    against triplet; Shadow against its twin), then the details per dimension: plain sentences,
    Shadow's losses as plainly as its wins, MAP@R first."""
    torch_rows = {(r["loss"], r["dim"]): r for r in rows if r["format"] == "pytorch"}
    base = torch_rows[("triplet", config.baseline_dim)]
    n = config.seeds

    def delta(row: dict, other: dict, name: str) -> str:
        d = paired_delta(row[name]["values"], other[name]["values"])
        return with_ci(d, "+") + (" *" if d["significant"] else "")

    low = [torch_rows[(loss, dim)] for dim in config.dims for loss in config.losses]
    best = max(low, key=lambda r: -np.inf if r["mean_average_precision_at_r"]["mean"] is None else r["mean_average_precision_at_r"]["mean"])
    int8 = next((r for r in rows if (r["loss"], r["dim"]) == (best["loss"], best["dim"]) and r["precision"] == "int8"), None)
    deployed = ""
    if int8 is not None:
        cpu = int8["bench"].get("cpu", {})
        latency = f", p50 {cpu['p50_ms']:.3f} ms on this CPU" if "p50_ms" in cpu else ", latency not measured"
        deployed = f"; its int8 {int8['format']} file {int8['size_bytes'] / 1024:.0f} KB ({int8['status']}){latency}"
    answer = [
        f"Best low-dimension model: {best['loss']} d={best['dim']}, MAP@R {_mean(best['mean_average_precision_at_r'])} against the "
        f"d={config.baseline_dim} triplet baseline's {_mean(base['mean_average_precision_at_r'])} (Δ {delta(best, base, 'mean_average_precision_at_r')}; "
        f"precision_at_1 Δ {delta(best, base, 'precision_at_1')}); {best['dim']} B per identity in an int8 gallery against "
        f"{4 * config.baseline_dim} B for the baseline at fp32{deployed}.",
        _versus(config, torch_rows, "shadow", "triplet", "Shadow against triplet at the same dim", delta),
        _versus(config, torch_rows, "shadow", "triplet-squared", "Shadow against its twin (triplet-squared at twice Shadow's margin)", delta),
    ]
    details = [
        f"Each figure is the mean of {n} seed(s) with its 95% confidence interval on test classes never trained on; * marks a paired difference whose CI excludes zero."
        + (" One seed gives no interval: nothing can be called significant." if n == 1 else "")
    ]
    for dim in config.dims:
        for loss in config.losses:
            row = torch_rows[(loss, dim)]
            details.append(
                f"d={dim}: {loss} MAP@R {_mean(row['mean_average_precision_at_r'])}, precision_at_1 {_mean(row['precision_at_1'])}; "
                f"against the d={config.baseline_dim} baseline Δ MAP@R {delta(row, base, 'mean_average_precision_at_r')}, Δ precision_at_1 {delta(row, base, 'precision_at_1')}"
                + (f"; against triplet d={dim} Δ MAP@R {delta(row, torch_rows[('triplet', dim)], 'mean_average_precision_at_r')}" if loss != "triplet" and "triplet" in config.losses else "")
                + "."
            )
    return answer, details


def _mean(stat: dict) -> str:
    return "n/a" if stat["mean"] is None else f"{stat['mean']:.4f}"


def _versus(config: CompareConfig, torch_rows: dict, loss: str, other: str, title: str, delta) -> str:
    """One line: ``loss`` against ``other`` on MAP@R at each low dim, and whether any difference is significant."""
    if loss not in config.losses or other not in config.losses:
        return f"{title}: not measured ({loss if loss not in config.losses else other} is not among --losses)."
    parts, significant = [], []
    for dim in config.dims:
        d = paired_delta(torch_rows[(loss, dim)]["mean_average_precision_at_r"]["values"], torch_rows[(other, dim)]["mean_average_precision_at_r"]["values"])
        parts.append(f"d={dim} {delta(torch_rows[(loss, dim)], torch_rows[(other, dim)], 'mean_average_precision_at_r')}")
        if d["significant"]:
            significant.append(f"d={dim} ({'higher' if d['mean'] > 0 else 'lower'})")
    found = f"significant at {', '.join(significant)}" if significant else "no significant difference" + (" (one seed: none can be)" if config.seeds == 1 else "")
    return f"{title}, Δ MAP@R: {'; '.join(parts)}: {found}."
