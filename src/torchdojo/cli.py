"""The `dojo` command."""
from __future__ import annotations

import csv
import json
import sys
import warnings
from pathlib import Path

import click

from .calibrate import calibrate_command
from .cli_errors import handle_errors
from .compare import compare_command
from .errors import DojoError
from .lr_find import lr_find_command
from .pair_search import pair_search_command
from .plot_schedule import plot_schedule_command
from .report import report_command
from .runs import runs_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="torchdojo")
def main():
    """torchdojo: neural-network training methods, composable through YAML recipes.

    \b
    Start with:   dojo train quickstart
    List recipes: dojo recipes        List data: dojo datasets
    """
    # Warnings (a skipped damaged checkpoint, ...) are one line for a user, not a source listing.
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--run-dir", type=click.Path(file_okay=False), help="Where to write the run "
              "(default: runs/<recipe-name>-<timestamp>/).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@handle_errors
def train(recipe, overrides, run_dir, quiet):
    """Train RECIPE (a YAML file or a built-in name), with optional key.path=value OVERRIDES.

    \b
    Examples:
      dojo train quickstart
      dojo train quickstart phases.main.epochs=5 phases.main.optimizer.lr=1e-3
      dojo train my.yaml seed=3 --run-dir runs/try3
    The run directory gets recipe.yaml, metrics.jsonl, summary.json and checkpoints/."""
    from .recipe import load_recipe
    from .trainer import Trainer, default_run_dir

    r = load_recipe(recipe, list(overrides))
    run_dir = Path(run_dir) if run_dir else default_run_dir(r)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise DojoError(f"run directory {run_dir} is not empty; use `dojo resume {run_dir}` or another --run-dir")
    from .ensemble_runs import is_sequential, train_ensemble
    if is_sequential(r):        # members that differ in more than their seed: one run each
        if not quiet:
            click.echo(f"run directory: {run_dir} (ensemble of {r.ensemble.members}, members one after another)")
        train_ensemble(r, run_dir, quiet=quiet)
        return
    trainer = Trainer(r, run_dir, quiet=quiet)
    if not quiet:
        click.echo(f"run directory: {run_dir}")
    trainer.fit()


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@handle_errors
def resume(run_dir, quiet):
    """Continue an interrupted run from its last checkpoint."""
    from .trainer import Trainer

    if _run_status(Path(run_dir)) == "finished":
        raise DojoError(f"{run_dir} has already finished; nothing to resume (see `dojo eval {run_dir}`)")
    sequential = _sequential_ensemble(Path(run_dir))
    if sequential is not None:
        from .ensemble_runs import train_ensemble
        train_ensemble(sequential, Path(run_dir), quiet=quiet)      # skips finished members, resumes the rest
        return
    trainer = Trainer.from_run_dir(run_dir, quiet=quiet)
    if trainer.checkpoint_step is None:
        raise DojoError(f"{run_dir} has no checkpoint to resume from (none that validates; see the warnings above)")
    if not quiet:
        click.echo(f"resuming {run_dir} at step {trainer.state.step} of {trainer.total_steps}")
    trainer.fit()


def _run_status(run_dir: Path) -> str | None:
    """`status` from summary.json (finished, interrupted), or None if it is missing or unreadable."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary.get("status") if isinstance(summary, dict) else None


TTA_OPTION = click.option("--tta", "tta_views", type=click.IntRange(min=1), default=None,
                          help="Also report test-time augmentation with this many augmented views per input "
                               "(the recipe's eval.tta augmentations, else the last phase's), as `tta`.")


def _sequential_ensemble(run_dir: Path):
    """The recipe of an ensemble run whose members trained one after another (else None)."""
    from .ensemble_runs import is_sequential
    from .recipe import load_recipe, read_recipe_source
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "members").is_dir():
        return None
    recipe = load_recipe(read_recipe_source(str(run_dir / "recipe.yaml"))[0])
    return recipe if is_sequential(recipe) else None


def _load_for_inference(run_dir: str, tta_views: int | None = None):
    from .calibrate import CALIBRATION_JSON, TemperatureScaled
    from .trainer import Trainer

    sequential = _sequential_ensemble(Path(run_dir))
    if sequential is not None:
        from .ensemble_runs import ensemble_models
        return ensemble_models(Path(run_dir), sequential, tta_views)
    trainer = Trainer.from_run_dir(run_dir, quiet=True)
    models = trainer.trained_models(tta_views=tta_views)
    scaled = [m for m in models.values() if isinstance(m, TemperatureScaled)]
    if scaled:      # on stderr: predict's CSV may go to stdout
        click.echo(f"note: calibrated probabilities (temperature T = {scaled[0].temperature:.4g} from "
                   f"{Path(run_dir) / CALIBRATION_JSON}, written by `dojo calibrate`)", err=True)
    return trainer, models


@main.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="test", show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar; print only the metrics table.")
@TTA_OPTION
@handle_errors
def eval_(run_dir, split, quiet, tta_views):
    """Print the metrics of a run's final model (or latest checkpoint) on a split.

    After `dojo calibrate RUN_DIR`, NLL, ECE and Brier are those of the temperature-scaled probabilities."""
    from .log import TaskProgress, print_metrics_table

    trainer, models = _load_for_inference(run_dir, tta_views)
    metrics = {}
    splits = ["train", "val", "test"] if split == "all" else [split]
    with TaskProgress("eval", len(splits) * len(models), quiet) as progress:
        for split_name in splits:
            for name, model in models.items():
                metrics.update(trainer.evaluate(split_name, model, name))
                progress.advance(f"{split_name} {name or 'model'}")
    print_metrics_table(metrics, f"{trainer.recipe.name}: {run_dir}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV (feature columns by name, as in training; extra columns ignored) or NPZ (array x).")
@click.option("--output", "output_path", default="-", show_default=True,
              help="CSV to write: prediction and, for classes, one probability column each.")
@TTA_OPTION
@handle_errors
def predict(run_dir, input_path, output_path, tta_views):
    """Predict with a trained run on new inputs.

    After `dojo calibrate RUN_DIR`, the probabilities are temperature-scaled (the predictions are the same)."""
    import numpy as np
    import torch

    trainer, models = _load_for_inference(run_dir, tta_views)
    info = trainer.state.data.info
    x = _read_inputs(input_path, info)
    tensor = info.prepare(x, source=input_path).to(trainer.device)
    columns: dict[str, list] = {}
    with torch.no_grad():
        for name, model in models.items():     # the final model, then e.g. "ensemble/prediction"
            for col, values in trainer.state.task.predict(model, tensor, info).items():
                columns[f"{name}/{col}" if name else col] = values
    out = sys.stdout if output_path == "-" else open(output_path, "w", newline="")
    try:
        writer = csv.writer(out)
        writer.writerow(list(columns))
        for row in zip(*columns.values()):
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    finally:
        if out is not sys.stdout:
            out.close()
    if output_path != "-":
        click.echo(f"wrote {len(next(iter(columns.values())))} predictions to {output_path}", err=True)
    del np


def _read_inputs(path: str, info):
    from .data.files import DataError, numeric_matrix, read_csv, read_npz_arrays

    if path.endswith(".npz"):
        arrays = read_npz_arrays(path)      # pickles, truncated and non-NPZ files are a DataError
        if "x" not in arrays:
            raise DataError(f"{path}: no array 'x' (found: {', '.join(arrays) or 'none'})")
        return arrays["x"]
    table = read_csv(path)
    names = info.feature_names
    if names and all(n in table.columns for n in names):
        return numeric_matrix(table, names)
    if names:
        missing = [n for n in names if n not in table.columns]
        raise DataError(f"{path}: missing feature column(s) used in training: {', '.join(missing[:5])}")
    return numeric_matrix(table, list(table.columns))


@main.command("param-groups")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@handle_errors
def param_groups_cmd(recipe, overrides):
    """Dry run: print the optimizer parameter groups RECIPE builds, without training.

    One table per phase that starts an optimizer: each group's name, number of tensors and parameters,
    lr, weight decay, whether LARS/LAMB apply their trust ratio, and the phases in which it is frozen
    (lr 0, no gradient)."""
    from rich.console import Console
    from rich.table import Table

    from .log import fmt
    from .recipe import load_recipe
    from .trainer import Trainer

    r = load_recipe(recipe, list(overrides))
    trainer = Trainer(r, None, quiet=True)
    frozen = trainer.frozen_by_phase
    console = Console()
    for i, phase in enumerate(r.phases):
        if phase.optimizer is None:
            continue
        optimizer = trainer.build_optimizer(i)
        table = Table(title=f"phase {r.phase_name(i)}: {phase.optimizer['name']}")
        table.add_column("group", overflow="fold")
        for col in ("tensors", "params", "lr", "wd", "trust"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("frozen in", overflow="fold")
        names = {id(p): n for n, p in trainer.state.model.named_parameters()}
        uses_trust = "trust_ratio" in optimizer.defaults      # only LARS and LAMB read it
        for g in optimizer.param_groups:
            frozen_in = [ph for ph, ns in frozen.items() if g["params"] and all(names[id(p)] in ns for p in g["params"])]
            table.add_row(g.get("name", "-"), str(len(g["params"])), f"{sum(p.numel() for p in g['params']):,}",
                          fmt(g["lr"]), fmt(g.get("weight_decay", "-")),
                          str(g.get("trust_ratio", True)) if uses_trust else "-",
                          ", ".join(frozen_in) or "-")
        console.print(table)


@main.command()
def recipes():
    """List the built-in recipes."""
    from rich.console import Console
    from rich.table import Table

    from .recipe import builtin_recipes, parse_yaml

    table = Table(title="built-in recipes (dojo train NAME)")
    table.add_column("name")
    table.add_column("description")
    for name, path in sorted(builtin_recipes().items()):
        table.add_row(name, (parse_yaml(path.read_text(), name) or {}).get("description", ""))
    Console().print(table)


@main.command()
def datasets():
    """List the built-in datasets with shapes and class counts."""
    from rich.console import Console
    from rich.table import Table

    from .data import DATASETS
    from .data.bundle import make_bundle

    table = Table(title="built-in datasets (data: {name: NAME})")
    for col in ("name", "task", "input shape", "classes", "train/val/test", "description"):
        table.add_column(col)
    for name, factory in DATASETS.items():
        if name in ("csv", "npz"):
            continue
        b = make_bundle(factory(), 0.1, 0.2, 0)
        info = b.info
        table.add_row(name, info.task_type, "x".join(map(str, info.input_shape)),
                      str(info.num_outputs) if info.task_type == "classification" else "-",
                      "/".join(str(info.sizes[s]) for s in ("train", "val", "test")),
                      (factory.__doc__ or "").split("\n")[0])
    table.add_row("csv", "either", "-", "-", "-", "user CSV: {name: csv, path: FILE, target: COLUMN}")
    table.add_row("npz", "either", "-", "-", "-", "user NPZ: {name: npz, path: FILE} with arrays x, y")
    Console().print(table)


main.add_command(lr_find_command)
main.add_command(plot_schedule_command)
main.add_command(calibrate_command)
main.add_command(report_command)
main.add_command(compare_command)
main.add_command(runs_command)
main.add_command(pair_search_command)


if __name__ == "__main__":
    main()
