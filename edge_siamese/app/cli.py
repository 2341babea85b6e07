"""The ``edge-siamese`` command: click commands, and the one place that turns errors into one line."""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import click

from device_bench.errors import describe_os_error
from device_bench.manifest import BundleError
from device_bench.preprocessing import RESIZE_MODES
from device_bench.runtimes import ORT_MEMORY
from export.job import CALIB_SAMPLES

from ..augment import AUGMENTS
from ..config import TRAIN_PRECISIONS, TrainConfig
from ..data import SPLITS
from ..distributed import EXIT_PEER_LOST, PeerLost
from ..errors import UserError
from ..evaluate import SPLIT_NAMES
from ..losses import LOSSES
from ..miners import MINERS
from ..models import BACKBONES, HEADS
from .compare import PRESETS, CompareConfig
from .targets import BenchSettings

EXIT_USER_ERROR = 2
EXIT_ENVIRONMENT = 1  # a full disk, a read-only file system: not the user's command
# Every default below is read from these: the dataclasses are the one home of each.
TRAIN, COMPARE, BENCH = TrainConfig(), CompareConfig(), BenchSettings()


def listed(values) -> str:
    return ",".join(map(str, values))


@click.group()
@click.version_option(package_name="edge-siamese")
def cli() -> None:
    """Train low-dimensional Siamese embeddings (Shadow Loss and baselines) for edge devices."""


@cli.command()
@click.option("--dataset", default=TRAIN.dataset, show_default=True, help="digits, fashion-mnist, an image folder (one sub-folder per class), a CSV/TSV list (path,label) or an .npz file.")
@click.option("--input-size", default=None, help="Model input H[xW], e.g. 112 or 112x96  [default: the images' size, when they all share one]")
@click.option("--resize-mode", type=click.Choice(list(RESIZE_MODES)), default=TRAIN.resize_mode, show_default=True, help="crop: shorter side to the input size, centre cropped; stretch: plain resize.")
@click.option("--augment", type=click.Choice(list(AUGMENTS)), default=TRAIN.augment, show_default=True, help="Training batches only: light = random crop + flip; standard = + colour jitter.")
@click.option("--workers", type=int, default=TRAIN.workers, help="Loader processes  [default: 0 for in-memory data without --augment, else cores - 1, at most 8]")
@click.option("--cache-mb", type=float, default=TRAIN.cache_mb, show_default=True, help="Decode an image folder once into memory when it fits this many MB (0: stream from disk).")
@click.option("--skip-bad", is_flag=True, default=TRAIN.skip_bad, help="Leave unreadable image files out (counted) instead of stopping.")
@click.option("--loss", "loss_name", type=click.Choice(list(LOSSES)), default=TRAIN.loss, show_default=True)
@click.option("--dim", "embedding_dim", type=int, default=TRAIN.embedding_dim, show_default=True, help="Embedding dimension (2 to 1024).")
@click.option("--backbone", default=TRAIN.backbone, show_default=True, help=f"{', '.join(BACKBONES)}, or timm:NAME for any timm model, e.g. timm:mobilenetv3_small_100.")
@click.option("--pretrained", default=TRAIN.pretrained, help="A timm backbone's weights: a local .safetensors (or .pth) file; never downloaded. Its mean, std and input size become the defaults.")
@click.option("--freeze-backbone-epochs", type=int, default=TRAIN.freeze_backbone_epochs, show_default=True, help="Train only the embedding layer for the first N epochs.")
@click.option("--backbone-lr-mult", type=float, default=TRAIN.backbone_lr_mult, show_default=True, help="The backbone's learning rate is --lr times this.")
@click.option("--head", type=click.Choice(list(HEADS)), default=TRAIN.head, help="Output head  [default: the loss's own]")
@click.option("--epochs", type=int, default=TRAIN.epochs, show_default=True)
@click.option("--batch-size", type=int, default=TRAIN.batch_size, show_default=True, help="P x K: P classes of K samples.")
@click.option("--samples-per-class", type=int, default=TRAIN.samples_per_class, show_default=True, help="K of the P x K batches.")
@click.option("--lr", type=float, default=TRAIN.lr, show_default=True)
@click.option("--margin", type=float, default=TRAIN.margin, help="Margin  [default: the loss's own]")
@click.option("--miner", type=click.Choice(list(MINERS)), default=TRAIN.miner, show_default=True, help="batch-all: every valid triplet, exactly, in O(B^2).")
@click.option("--split", type=click.Choice(SPLITS), default=TRAIN.split, show_default=True, help="Hold out samples (closed set) or whole classes (open set).")
@click.option("--seed", type=int, default=TRAIN.seed, show_default=True)
@click.option("--device", default=TRAIN.device, show_default=True, help="auto, cpu or cuda.")
@click.option("--nproc", type=int, default=TRAIN.world_size, show_default=True, help="Training processes on this machine (torch's elastic launcher; one GPU each on CUDA, Gloo on the CPU); several machines: torchrun.")
@click.option("--precision", type=click.Choice(list(TRAIN_PRECISIONS)), default=TRAIN.precision, show_default=True, help="bf16: the forward pass under torch.autocast in bfloat16, the loss and weights in float32.")
@click.option("--sync-bn", is_flag=True, default=TRAIN.sync_bn, help="With several processes, BatchNorm statistics over the whole batch, not each process's part.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run folder  [default: runs/LOSS-dDIM]")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out (its config.json decides).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(loss_name, embedding_dim, input_size, nproc, out, force, resume, quiet, **options) -> None:
    """Train an embedding model and write weights, config, metrics and curves to --out."""
    from ..checkpoints import CONFIG, read_config
    from ..distributed import world_from_env
    from ..evaluate import resolve_device
    from ..files import check_replaceable
    from ..train import train as run_training

    if "WORLD_SIZE" in os.environ:  # a process of several: Ctrl-C ends it quietly (no KeyboardInterrupt, whose click prints a blank line); the launcher says it once
        signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    if "WORLD_SIZE" in os.environ and world_from_env().size != nproc and nproc > 1:
        raise UserError(f"--nproc {nproc} disagrees with the launcher's WORLD_SIZE {os.environ['WORLD_SIZE']}: drop --nproc under torchrun")
    if resume:
        if out is None:
            raise UserError("--resume needs --out RUN, the folder of the run to continue")
        ctx = click.get_current_context()
        given = [p.opts[0] for p in ctx.command.params if p.name in ("loss_name", "embedding_dim", "input_size", *options)
                 and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise UserError(f"--resume continues with the settings in {out}/config.json: drop {', '.join(given)}")
    config = TrainConfig(loss=loss_name, embedding_dim=embedding_dim, input_size=input_size and parse_size(input_size), **options)
    out = out or Path("runs") / f"{loss_name}-d{embedding_dim}"
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # this process launches the workers, each of which runs this command
        if not resume:  # what each worker would stop on, said once, before any starts
            replace(config, world_size=nproc).validate()
            resolve_device(config.device)
            check_replaceable(out, CONFIG, force, ", or --resume to continue it")
        elif (trained_by := read_config(out)[0].world_size) != nproc:
            raise UserError(f"{out} was trained by {trained_by} process(es): resume it with --nproc {trained_by}, not {nproc}")
        launch_workers(nproc, click.get_current_context().find_root().obj["argv"])
        return
    metrics = run_training(config, out, resume=resume, force=force, progress=not quiet)
    if not metrics:  # a rank other than 0: rank 0 reports
        return
    final = metrics["final"]
    skipped = f"; {metrics['skipped_images']} unreadable image(s) left out (listed in {out}/index.json)" if metrics["skipped_images"] else ""
    click.echo(
        f"{out}: val precision_at_1 {final['val_precision_at_1']:.4f}, "
        f"MAP@R {final['val_mean_average_precision_at_r']:.4f}, {metrics['train_time_s']:.1f} s training{skipped}"
    )


def launch_workers(nproc: int, argv: list[str]) -> None:
    """Run this command in ``nproc`` processes on this machine through torch's elastic launcher
    (torchrun's ``--standalone``); one line when a process fails (its own line is above)."""
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # each sets its own level; their lines say again what ours says
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
        shutdown_timeout=5,  # seconds a process has to end after SIGTERM before SIGKILL (a stopped one never does)
    )  # fmt: skip
    try:
        elastic_launch(config, sys.executable)("-m", "edge_siamese.app.cli", *argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode == EXIT_USER_ERROR:  # that process's one line said what to fix
            sys.exit(EXIT_USER_ERROR)
        why = " (it lost the others: one stopped, or hung past the timeout)" if failure.exitcode == EXIT_PEER_LOST else ""
        raise UserError(f"training stopped: process {rank} of {nproc} exited with status {failure.exitcode}{why}") from None
    except SignalException as exc:
        raise click.exceptions.Abort() from exc


def parse_size(text: str) -> list[int]:
    """``112`` -> [112, 112]; ``112x96`` -> [112, 96] (H x W)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"--input-size {text!r} is not H or HxW: write e.g. 112 or 112x96")
    sizes = [int(p) for p in parts]
    return sizes * 2 if len(sizes) == 1 else sizes


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(SPLIT_NAMES), default="test", show_default=True)
@click.option("--pairs", type=click.Path(path_type=Path), default=None, help="A verification pairs list (path1,path2,same; LFW style) to evaluate instead of a split.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Output  [default: RUN/evaluation.json, or RUN/evaluation-pairs-NAME.json]")
@click.option("--device", default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def evaluate(run_dir, split, pairs, json_path, device, force) -> None:
    """Retrieval and verification metrics of a trained run on one of its splits, or on a pairs list."""
    from ..checkpoints import read_config
    from ..evaluate import default_output, evaluate_pairs, evaluate_run
    from device_bench.files import write_json

    from ..files import check_new_file

    path = json_path or (Path(run_dir) / f"evaluation-pairs-{pairs.stem}.json" if pairs else default_output(run_dir, split))
    read_config(run_dir)  # not a run folder: that error first, it says more than one about the output
    if pairs is not None and not pairs.is_file():
        raise UserError(f"--pairs {pairs} is not a file: give a CSV/TSV list of path1,path2,same")
    check_new_file(path, force)
    result = evaluate_pairs(run_dir, pairs, device) if pairs else evaluate_run(run_dir, split, device)
    width = max(len(k) for k in result)
    for key, value in result.items():
        click.echo(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    write_json(path, result)
    click.echo(f"wrote {path}")


@cli.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "formats", default=None, help="Comma-separated: onnx, tflite  [default: onnx, and tflite when its extra is installed]")
@click.option("--int8", is_flag=True, help="Add int8 files (static quantization, calibrated).")
@click.option("--fp16", is_flag=True, help="Add fp16 files.")
@click.option("--calib-samples", type=int, default=CALIB_SAMPLES, show_default=True, help="Training images to calibrate int8 on.")
@click.option("--calib-data", default=None, help="Where the run's dataset is now, if it moved.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Bundle folder  [default: RUN/bundle]")
@click.option("--zip", "make_zip", is_flag=True, help="Also write BUNDLE.zip.")
@click.option("--qat", "qat_epochs", type=int, default=0, help="When no post-training int8 file passes its gate: fine-tune the model this many epochs under fake quantization and export that.")
@click.option("--allow-degraded", is_flag=True, help="Write the bundle even if a file fails its fidelity check (marked degraded).")
@click.option("--force", is_flag=True, help="Overwrite an existing bundle.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export_cmd(run_dir, formats, int8, fp16, calib_samples, calib_data, out, make_zip, qat_epochs, allow_degraded, force, quiet) -> None:
    """Export a trained run to ONNX / TFLite (fp32, fp16, int8), check each file, write a bundle."""
    from export.exporter import export_run, parse_formats

    precisions = ["fp32"] + (["fp16"] if fp16 else []) + (["int8"] if int8 else [])
    format_list = parse_formats(formats)
    if formats is None and "tflite" not in format_list:
        click.echo("note: TFLite skipped (pip install 'edge-siamese[tflite]' to add it)", err=True)
    out = out or Path(run_dir) / "bundle"
    rows, written = export_run(
        run_dir, out, format_list, precisions, calib_samples, calib_data, force, make_zip, allow_degraded, progress=not quiet, qat_epochs=qat_epochs
    )
    for r in rows:
        if r.int8:
            _echo_int8_search(r.format, r.int8)
    if rows and rows[0].qat:
        _echo_qat(rows[0].qat)
    click.echo(f"{'format':<7} {'precision':<9} {'status':<9} {'size KB':>8} {'mean cos':>9} {'min cos':>9} {'rel err':>8} {'top-1 agree':>11} {'P@1':>6} {'P@1 torch':>9}")
    for r in rows:
        f = r.fidelity
        size = f"{r.entry['size_bytes'] / 1024:8.1f}" if r.entry else f"{'-':>8}"
        figures = (
            f"{f['mean_cosine']:9.5f} {f['min_cosine']:9.5f} {f['relative_error']:8.4f} {f['top1_neighbour_agreement']:11.3f} {f['precision_at_1']:6.4f} {f['reference_precision_at_1']:9.4f}"
            if f else ""
        )
        click.echo(f"{r.format:<7} {r.precision:<9} {r.status:<9} {size} {figures}")
    bad = [r for r in rows if r.status != "verified"]
    if written is None:
        details = "; ".join(f"{r.format} {r.precision}: {r.problem}" for r in bad)
        tried = "".join(
            f"The {r.format} int8 file passed on the search's images but not on the test images. " if r.int8["passed_gate"]
            else f"The int8 search tried {len(r.int8['attempts'])} {r.format} files (above). "
            for r in bad if r.int8
        )
        raise UserError(f"no bundle written: {details}. {tried}Pass --allow-degraded to keep the files that ran (marked degraded)")
    click.echo(f"wrote {written}" + (f" ({len(bad)} file(s) marked {', '.join(sorted({r.status for r in bad}))})" if bad else ""))


def _echo_qat(q: dict) -> None:
    """Why the bundle is the quantization-aware fine-tune's, and what the fine-tune did to precision_at_1."""
    click.echo(
        f"{q['why']}: quantization-aware fine-tune, {q['epochs']} epoch(s) at lr {q['lr']:g} ({q['fine_tune_s']:.1f} s); "
        f"precision_at_1 on the test images {q['trained_precision_at_1']:.4f} trained, {q['precision_at_1']:.4f} fine-tuned; the files below are the fine-tuned model's"
    )


def _echo_int8_search(fmt: str, search: dict) -> None:
    """The int8 search's attempts for one format, on the validation images; those that quantized
    one layer alone to rank the layers are counted, not listed."""
    click.echo(f"{fmt} int8 search on {search['gate_images']} validation and spare training images ({search['search_s']:.1f} s):")
    click.echo(f"  {'recipe':<36} {'rel err':>8} {'P@1 drop':>8} {'top-1 agree':>11} {'int8 MACs':>9} {'s':>6}  result")
    ranked = [a for a in search["attempts"] if a["kind"] == "sensitivity"]
    for a in search["attempts"]:
        if a["kind"] != "sensitivity":
            result = "passed" if a["passed"] else a["problem"]
            click.echo(f"  {a['recipe']:<36} {a['relative_error']:8.4f} {a['precision_at_1_drop']:8.4f} {a['top1_neighbour_agreement']:11.3f} {a['int8_mac_fraction']:9.0%} {a['seconds']:6.1f}  {result}")
    if ranked:
        click.echo(f"  ({len(ranked)} layers ranked by quantizing each alone, {sum(a['seconds'] for a in ranked):.1f} s)")
    chosen = f"{search['recipe']}" + (f", float layers: {', '.join(search['float_layers'])}" if search["float_layers"] else "")
    click.echo(f"  chose {chosen}" + ("" if search["passed_gate"] else " (the closest: none passed the gate)"))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", default="cpu", show_default=True, help="cpu, cuda, arm64-emulated or ssh://user@host[:port]")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=BENCH.run_dir, help="cuda: the training run  [default: the bundle's parent]")
@click.option("--format", "formats", default=BENCH.formats, help="Comma-separated formats  [default: all in the bundle]")
@click.option("--precision", default=BENCH.precision, help="Comma-separated precisions  [default: all in the bundle]")
@click.option("--batch", default=listed(BENCH.batches), show_default=True, help="Batch sizes, e.g. 1,8.")
@click.option("--warmup", type=int, default=BENCH.warmup, show_default=True)
@click.option("--runs", type=int, default=BENCH.runs, show_default=True)
@click.option("--gallery", default=listed(BENCH.gallery), show_default=True, help="Gallery sizes for 1:N search.")
@click.option("--threads", type=int, default=BENCH.threads)
@click.option("--ort-memory", type=click.Choice(list(ORT_MEMORY)), default=BENCH.ort_memory, show_default=True, help="ONNX Runtime session memory: lean = no arena and no memory pattern (less RSS, some latency).")
@click.option("--cpu-model", default=BENCH.cpu_model, show_default=True, help="arm64-emulated: cortex-a72 (Pi 4) or cortex-a76 (Pi 5).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the JSON document here.")
@click.option("--instructions", is_flag=True, default=BENCH.instructions, help="arm64-emulated: also count guest instructions per inference (deterministic ARM cost).")
@click.option("--remote-python", default=BENCH.remote_python, show_default=True, help="ssh: the device's Python (e.g. a venv's bin/python).")
@click.option("--force", is_flag=True, help="Overwrite an existing --json.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def bench(bundle, target, run_dir, formats, precision, batch, warmup, runs, gallery, threads, ort_memory, cpu_model, instructions, remote_python, json_path, force, quiet) -> None:
    """Benchmark a bundle on a target: this CPU, a CUDA GPU, emulated aarch64, or a device over ssh."""
    from device_bench.document import table

    from device_bench.files import write_json

    from ..files import check_new_file
    from .targets import run_target

    check_new_file(json_path, force)
    if runs < 1:
        raise UserError(f"--runs {runs}: use at least 1")
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: use at least 1, or leave it out for the runtime's default")
    if warmup < 0:
        raise UserError(f"--warmup {warmup}: use 0 or more")
    settings = BenchSettings(ints(batch, "batch"), warmup, runs, ints(gallery, "gallery"), threads, ort_memory, formats, precision, run_dir, cpu_model, instructions, remote_python, not quiet)
    result = run_target(target, bundle, settings)
    if result["target"].get("emulated"):
        click.echo("emulated: times below are qemu's, not device latency")
    click.echo(table(result))
    for row in result["rows"]:
        if "guest_instructions_per_inference" in row:
            click.echo(f"{row['file']:<20} {cpu_model}: {row['guest_instructions_per_inference']:,.0f} guest instructions per inference (batch 1)")
    if json_path is not None:
        write_json(json_path, result)
        click.echo(f"wrote {json_path}")
    failed = [r for r in result["rows"] if r["status"] == "failed"]
    if failed:  # like python -m device_bench: the document is written, the exit status says a row failed
        click.echo(f"error: {len(failed)} of {len(result['rows'])} rows failed; first: {failed[0]['file']}: {failed[0]['error']}", err=True)
        raise SystemExit(1)


@cli.command()
@click.option("--preset", type=click.Choice(list(PRESETS)), default="default", show_default=True, help="paper: Fashion-MNIST, open set, 5 seeds, 30 epochs, dims 2-32 (for a GPU).")
@click.option("--dataset", default=None, help=f"[default: {COMPARE.dataset}]")
@click.option("--split", type=click.Choice(SPLITS), default=None, help=f"[default: {COMPARE.split}]")
@click.option("--backbone", default=None, help=f"{', '.join(BACKBONES)} or timm:NAME  [default: {COMPARE.backbone}]")
@click.option("--baseline-dim", type=int, default=None, help=f"Dim of the triplet baseline  [default: {COMPARE.baseline_dim}]")
@click.option("--dims", default=None, help=f"Low dims, comma-separated  [default: {listed(COMPARE.dims)}]")
@click.option("--losses", default=None, help=f"Comma-separated  [default: {listed(COMPARE.losses)}]")
@click.option("--seeds", type=int, default=None, help=f"[default: {COMPARE.seeds}]")
@click.option("--epochs", type=int, default=None, help=f"[default: {COMPARE.epochs}]")
@click.option("--trials", type=int, default=None, help=f"Tuning runs per loss and dim, on validation images  [default: {COMPARE.trials}]")
@click.option("--formats", default=None, help="[default: onnx, plus tflite when its extra is installed]")
@click.option("--targets", default=listed(COMPARE.targets), show_default=True, help="Comma-separated: cpu, cuda, arm64-emulated")
@click.option("--out", type=click.Path(path_type=Path), default=Path("report"), show_default=True)
@click.option("--force", is_flag=True, help="Start over in an --out that holds another compare.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def compare(preset, dataset, split, backbone, baseline_dim, dims, losses, seeds, epochs, trials, formats, targets, out, force, quiet) -> None:
    """The main job: Shadow vs triplet at low dims, every figure against the triplet baseline."""
    from export.exporter import parse_formats

    from .compare import run_compare

    settings = dict(PRESETS[preset])
    given = {
        "dataset": dataset, "split": split, "backbone": backbone, "baseline_dim": baseline_dim, "seeds": seeds, "epochs": epochs, "trials": trials,
        "dims": ints(dims, "dims") if dims else None,
        "losses": [l.strip() for l in losses.split(",") if l.strip()] if losses else None,
    }
    settings.update({k: v for k, v in given.items() if v is not None})
    settings["formats"] = parse_formats(formats)
    settings["targets"] = [t.strip() for t in targets.split(",") if t.strip()]
    results = run_compare(CompareConfig(**settings), out, force=force, progress=not quiet)
    for line in results["summary"]["verdict"]:
        click.echo(line)
    click.echo(f"wrote {out / 'REPORT.md'}, {out / 'report.html'} and {out / 'results.json'} ({results['elapsed_s'] / 60:.1f} min)")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0 picks a free port.")
@click.option("--clients", type=click.Path(path_type=Path), default=None, help="A folder whose node_modules holds the page's npm packages  [default: the page's own folder]")
def demo(bundle, port, clients) -> None:
    """Serve BUNDLE and the web page on 127.0.0.1: the golden self-check and a two-image verdict in a browser."""
    from .demo import demo_server

    server = demo_server(bundle, port, clients)
    host, port = server.server_address[:2]
    try:
        click.echo(f"serving {bundle} at http://{host}:{port}/web/  (Ctrl-C stops)")
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def ints(text: str, name: str) -> list[int]:
    """A comma-separated list of positive integers, or a UserError naming the option."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"--{name} {text!r}: give comma-separated positive integers, e.g. 1,8")
    return values


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one line on stderr and exit status 2, never a traceback."""
    try:
        _main(argv)
    except SystemExit as exc:
        if "WORLD_SIZE" not in os.environ:
            raise
        # One of several training processes: its files are closed, its group left or lost. Skip the
        # interpreter's teardown, where Gloo threads still waiting on a lost peer abort the process
        # with "terminate called without an active exception" on stderr.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1)


def _main(argv: list[str] | None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False, obj={"argv": sys.argv[1:] if argv is None else list(argv)})
    except (UserError, BundleError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except PeerLost:  # a training process whose peer stopped: the peer, or the launcher, says why
        sys.exit(EXIT_PEER_LOST)
    except click.exceptions.Abort:
        if "WORLD_SIZE" not in os.environ:  # a training process under a launcher leaves the line to it
            click.echo("error: interrupted; continue a training run with 'edge-siamese train --resume --out RUN'", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see 'edge-siamese --help')", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # the disk or the file system, not the code: its path and cause in one line
        click.echo(f"error: {describe_os_error(exc)}", err=True)
        sys.exit(EXIT_ENVIRONMENT)


if __name__ == "__main__":
    main()
