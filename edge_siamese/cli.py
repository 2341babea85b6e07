"""The ``edge-siamese`` command: click commands, and the one place that turns errors into one line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import UserError
from .losses import LOSSES
from .miners import MINERS
from .models import BACKBONES, HEADS

EXIT_USER_ERROR = 2


@click.group()
@click.version_option(package_name="edge-siamese")
def cli() -> None:
    """Train low-dimensional Siamese embeddings (Shadow Loss and baselines) for edge devices."""


@cli.command()
@click.option("--dataset", default="digits", show_default=True, help="digits, fashion-mnist, an image folder or an .npz file.")
@click.option("--loss", "loss_name", type=click.Choice(list(LOSSES)), default="shadow", show_default=True)
@click.option("--dim", "embedding_dim", type=int, default=8, show_default=True, help="Embedding dimension (2 to 1024).")
@click.option("--backbone", type=click.Choice(list(BACKBONES)), default="convnet", show_default=True)
@click.option("--head", type=click.Choice(HEADS), default=None, help="Output head  [default: the loss's own]")
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True, help="P x K: P classes of K samples.")
@click.option("--samples-per-class", type=int, default=8, show_default=True, help="K of the P x K batches.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--margin", type=float, default=None, help="Margin  [default: the loss's own]")
@click.option("--miner", type=click.Choice(MINERS), default="batch-all", show_default=True, help="batch-all: every valid triplet, exactly, in O(B^2).")
@click.option("--split", type=click.Choice(["samples", "classes"]), default="samples", show_default=True, help="Hold out samples (closed set) or whole classes (open set).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run folder  [default: runs/LOSS-dDIM]")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out (its config.json decides).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(loss_name, embedding_dim, out, force, resume, quiet, **options) -> None:
    """Train an embedding model and write weights, config, metrics and curves to --out."""
    from .config import TrainConfig
    from .train import train as run_training

    if resume:
        if out is None:
            raise UserError("--resume needs --out RUN, the folder of the run to continue")
        ctx = click.get_current_context()
        given = [p.opts[0] for p in ctx.command.params if p.name in ("loss_name", "embedding_dim", *options)
                 and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise UserError(f"--resume continues with the settings in {out}/config.json: drop {', '.join(given)}")
    config = TrainConfig(loss=loss_name, embedding_dim=embedding_dim, **options)
    out = out or Path("runs") / f"{loss_name}-d{embedding_dim}"
    metrics = run_training(config, out, resume=resume, force=force, progress=not quiet)
    final = metrics["final"]
    click.echo(
        f"{out}: val precision_at_1 {final['val_precision_at_1']:.4f}, "
        f"MAP@R {final['val_mean_average_precision_at_r']:.4f}, {metrics['train_time_s']:.1f} s training"
    )


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Output  [default: RUN/evaluation.json]")
@click.option("--device", default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def evaluate(run_dir, split, json_path, device, force) -> None:
    """Retrieval and verification metrics of a trained run on one of its splits."""
    from .evaluate import default_output, evaluate_run
    from .files import write_json

    path = json_path or default_output(run_dir, split)
    if path.exists() and not force:
        raise UserError(f"{path} already exists: pass --force to overwrite it, or --json to write elsewhere")
    result = evaluate_run(run_dir, split, device)
    width = max(len(k) for k in result)
    for key, value in result.items():
        click.echo(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    write_json(path, result)
    click.echo(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one line on stderr and exit status 2, never a traceback."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except click.exceptions.Abort:
        click.echo("error: interrupted; continue a training run with 'edge-siamese train --resume --out RUN'", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see 'edge-siamese --help')", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
