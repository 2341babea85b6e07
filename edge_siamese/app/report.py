"""The compare report: ``REPORT.md``, a self-contained ``report.html`` and the plots, from ``results.json``."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from device_bench.files import atomic_path

from ..plots import pyplot

COLUMNS = (
    "loss", "dim", "format", "precision", "status", "MAP@R", "P@1", "TAR@FAR=1e-3", "ΔMAP@R vs baseline", "ΔP@1 vs baseline",
    "size KB", "peak RSS MB", "p50 ms", "p99 ms", "gallery B/id", "train s", "train peak MB", "epochs to 95%",
)


def with_ci(stat: dict, sign: str = "") -> str:
    """``mean ± ci95``, the mean alone when one run gives no interval, ``n/a`` when there is no mean."""
    if stat["mean"] is None:
        return "n/a"
    text = f"{stat['mean']:{sign}.4f}"
    return text if stat["ci95"] is None else f"{text} ± {stat['ci95']:.4f}"


def _value(stat: dict) -> float:
    """A figure for a plot: NaN where results.json has none."""
    return np.nan if stat["mean"] is None else stat["mean"]


def _delta(stat: dict, baseline: bool) -> str:
    return "baseline" if baseline else with_ci(stat, "+") + (" *" if stat.get("significant") else "")


def table_rows(results: dict, target: str) -> list[list[str]]:
    out = []
    for r in results["summary"]["rows"]:
        b = r["bench"].get(target, {})
        if "not_measured" in b:
            perf = ["not measured"] * 3
        elif b:
            perf = [f"{b['peak_rss_mb']:.1f}" if b.get("peak_rss_mb") else "-", f"{b['p50_ms']:.3f}", f"{b['p99_ms']:.3f}"]
            if b.get("emulated"):
                perf = [perf[0], "emulated", f"{b['guest_instructions_per_inference']:,.0f} insn" if b.get("guest_instructions_per_inference") else "emulated"]
        else:
            perf = ["-"] * 3
        out.append([
            r["loss"], str(r["dim"]), r["format"], r["precision"],
            r["status"] + (f" ({r['degraded_seeds']}/{results['config']['seeds']})" if r["status"] == "degraded" else ""),
            with_ci(r["mean_average_precision_at_r"]), with_ci(r["precision_at_1"]), with_ci(r["tar_at_far_1e-3"]),
            _delta(r["delta_mean_average_precision_at_r"], r["baseline"]), _delta(r["delta_precision_at_1"], r["baseline"]),
            f"{r['size_bytes'] / 1024:.1f}" if "size_bytes" in r else "-", *perf,
            str(r["gallery_bytes_per_identity"]), f"{r['train_time_s']['mean']:.1f}", f"{r['peak_train_rss_mb']['mean']:.0f}",
            f"{r['epochs_to_95']['mean']:.1f}",
        ])
    return out


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    pyplot().close(fig)


def plot_all(results: dict, out: Path, embeddings_2d: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[str, str]]:
    """Write the report's figures; return (file name, caption) pairs."""
    from matplotlib.ticker import NullFormatter

    plt = pyplot()
    config, rows = results["config"], results["summary"]["rows"]
    figures = []

    base = next(r for r in rows if r["baseline"] and r["format"] == "pytorch")
    for metric, label, name in (("mean_average_precision_at_r", "MAP@R", "map_at_r_vs_dim.png"), ("precision_at_1", "precision@1", "p1_vs_dim.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for loss in config["losses"]:
            pts = [r for r in rows if r["loss"] == loss and r["format"] == "pytorch" and not r["baseline"]]
            ax.errorbar([r["dim"] for r in pts], [_value(r[metric]) for r in pts], yerr=[r[metric]["ci95"] or 0 for r in pts], marker="o", capsize=3, label=loss)
        ax.axhline(_value(base[metric]), color="grey", ls="--", label=f"triplet d={config['baseline_dim']}")
        ax.set(xscale="log", xlabel="embedding dim", ylabel=f"test {label}", title=f"{label} vs embedding dim (test classes)")
        ax.set_xticks(config["dims"], [str(d) for d in config["dims"]])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend()
        _save(fig, out / name)
        figures.append((name, f"{label} against embedding dimension on the test classes (mean ± 95% CI over seeds)"))

    for target in results["bench"]:
        pts = [r for r in rows if "size_bytes" in r and "p50_ms" in r["bench"].get(target, {}) and not r["bench"][target].get("emulated")]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in pts:
            ax.scatter(r["size_bytes"] / 1024, r["bench"][target]["p50_ms"], marker="o" if r["precision"] == "fp32" else "s")
            ax.annotate(f"{r['loss']} d{r['dim']} {r['format']} {r['precision']}", (r["size_bytes"] / 1024, r["bench"][target]["p50_ms"]), fontsize=6)
        ax.set(xlabel="model size (KB)", ylabel="p50 latency, batch 1 (ms)", title=f"latency vs size ({target})")
        _save(fig, out / f"pareto_{target}.png")
        figures.append((f"pareto_{target}.png", f"latency against size on {target} (circle fp32, square int8)"))

    fig, ax = plt.subplots(figsize=(7, 4))
    files = [r for r in rows if r["format"] != "pytorch"]
    labels = sorted({(r["loss"], r["dim"], r["format"]) for r in files}, key=lambda k: (k[1], k[0], k[2]))
    x = np.arange(len(labels))
    for i, precision in enumerate(("fp32", "int8")):
        vals = [next((_value(r["precision_at_1"]) for r in files if (r["loss"], r["dim"], r["format"]) == k and r["precision"] == precision), np.nan) for k in labels]
        ax.bar(x + (i - 0.5) * 0.4, vals, 0.4, label=precision)
    ax.set_xticks(x, [f"{l} d{d} {f}" for l, d, f in labels], rotation=70, fontsize=6)
    lo = np.nanmin([_value(r["precision_at_1"]) for r in files] or [0])
    ax.set(ylabel="precision@1 of the exported file", ylim=(max(0, lo - 0.05), 1.0), title="fp32 vs int8")
    ax.legend()
    _save(fig, out / "fidelity.png")
    figures.append(("fidelity.png", "precision_at_1 of each exported file at fp32 and int8 (the PyTorch rows' test images)"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, run in results["runs"].items():
        if run["seed"] == 0:
            ax.plot([h["epoch"] for h in run["history"]], [h["val_precision_at_1"] for h in run["history"]], label=f"{run['loss']} d{run['dim']}")
    ax.set(xlabel="epoch", ylabel="validation precision@1", title="validation curves (seed 0)")
    ax.legend(fontsize=6)
    _save(fig, out / "curves.png")
    figures.append(("curves.png", "validation precision_at_1 per epoch, seed 0"))

    if embeddings_2d:
        fig, axes = plt.subplots(1, len(embeddings_2d), figsize=(4 * len(embeddings_2d), 4))
        for ax, (name, (xy, labels_)) in zip(np.atleast_1d(axes), embeddings_2d.items()):
            ax.scatter(xy[:, 0], xy[:, 1], c=labels_, cmap="tab10", s=6)
            ax.set(title=name, xticks=[], yticks=[])
        _save(fig, out / "embeddings_2d.png")
        figures.append(("embeddings_2d.png", "test embeddings in 2-D (the model itself at d=2, PCA otherwise), colour = class"))
    return figures


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _tuning_rows(results: dict) -> list[list[str]]:
    out = []
    for key, t in results["tuning"].items():
        tried = ", ".join(f"{x['value']:g}: {x['val_mean_average_precision_at_r']:.4f}" for x in t["trials"]) or f"twice {t['twin_of']}'s"
        out.append([key, t["parameter"], f"{t['default']:g}", tried, f"{t['chosen']:g}"])
    return out


TUNING_COLUMNS = ("model", "tuned", "default", "trials (value: validation MAP@R)", "chosen")


def _setup_lines(results: dict) -> list[str]:
    c, m = results["config"], results["machine"]
    split = "classes (test classes never trained on)" if c["split"] == "classes" else f"{c['split']} (the test images' classes were trained on)"
    return [
        f"dataset {c['dataset']}, split by {split}, backbone {c['backbone']}, {c['epochs']} epochs, {c['seeds']} seed(s)",
        f"tuning: {c['trials']} run(s) of seed 0 per loss and dim, the margin (or, without one, the learning rate) from half to twice its default, chosen by MAP@R on the validation images of the training classes",
        f"losses {', '.join(c['losses'])} at dims {', '.join(map(str, c['dims']))}; baseline triplet at d={c['baseline_dim']}",
        f"formats {', '.join(c['formats'])} at fp32 and int8; targets {', '.join(c['targets'])}",
        f"machine: {m['processor']}, {m['platform']}, Python {m['python']}; took {results['elapsed_s'] / 60:.1f} min",
        f"each accuracy figure: mean over {c['seeds']} run(s) ± 95% CI, every row (PyTorch and exported files) on the whole test split; latency and memory: seed 0's bundle; * = significant",
    ]


def write_report(results: dict, out: Path, embeddings_2d: dict) -> None:
    """The verdict first (three lines), the setup and tuning, the details per dimension, the
    figures, then the full tables."""
    figures = plot_all(results, out, embeddings_2d)
    summary = results["summary"]
    md = ["# edge-siamese compare", "", "## Verdict", ""] + [f"- {v}" for v in summary["verdict"]]
    md += ["", "## Setup", ""] + [f"- {s}" for s in _setup_lines(results)]
    md += ["", "## Tuning", "", _md_table(TUNING_COLUMNS, _tuning_rows(results))]
    md += ["", "## Details", ""] + [f"- {v}" for v in summary["details"]]
    page = [f"<h1>edge-siamese compare</h1><h2>Verdict</h2><ul>{''.join(f'<li>{html.escape(v)}</li>' for v in summary['verdict'])}</ul>"]
    page.append(f"<h2>Setup</h2><ul>{''.join(f'<li>{html.escape(s)}</li>' for s in _setup_lines(results))}</ul>")
    page.append(f"<h2>Tuning</h2>{_html_table(TUNING_COLUMNS, _tuning_rows(results))}")
    page.append(f"<h2>Details</h2><ul>{''.join(f'<li>{html.escape(v)}</li>' for v in summary['details'])}</ul>")
    md += ["", "## Figures", ""] + [f"![{cap}]({name})\n\n{cap}\n" for name, cap in figures]
    for name, cap in figures:
        data = base64.b64encode((out / name).read_bytes()).decode()
        page.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(cap)}'><figcaption>{html.escape(cap)}</figcaption></figure>")
    for target in results["bench"] or {"none": {}}:
        rows = table_rows(results, target)
        md += ["", f"## Target: {target}", "", _md_table(COLUMNS, rows)]
        page.append(f"<h2>Target: {html.escape(target)}</h2>{_html_table(COLUMNS, rows)}")
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:900px}"
    with atomic_path(out / "REPORT.md") as tmp:
        tmp.write_text("\n".join(md) + "\n")
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>edge-siamese compare</title><style>{style}</style></head><body>{''.join(page)}</body></html>\n")


def _html_table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
