"""The `dojo` command."""
from __future__ import annotations

import csv
import shutil
import signal
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import click

from .calibrate import calibrate_command
from .cli_errors import handle_errors
from .compare import compare_command
from .errors import DojoError, StoppedBySignal
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


NPROC_OPTION = click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
                            help="Train data-parallel in this many local processes (through torchrun; "
                                 "needs --run-dir).")
MAX_RESTARTS_OPTION = click.option("--max-restarts", type=click.IntRange(min=0), default=0, show_default=True,
                                   help="With --nproc: how often torchrun restarts failed processes (they "
                                        "continue from the latest checkpoint).")


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--run-dir", type=click.Path(file_okay=False), help="Where to write the run "
              "(default: runs/<recipe-name>-<timestamp>/).")
@click.option("--overwrite", is_flag=True, help="Delete everything in --run-dir first (a finished run "
              "too) and train from scratch, e.g. after a run was killed before its first checkpoint.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@NPROC_OPTION
@MAX_RESTARTS_OPTION
@handle_errors
def train(recipe, overrides, run_dir, overwrite, quiet, nproc, max_restarts):
    """Train RECIPE (a YAML file or a built-in name), with optional key.path=value OVERRIDES.

    \b
    Examples:
      dojo train quickstart
      dojo train quickstart phases.main.epochs=5 phases.main.optimizer.lr=1e-3
      dojo train my.yaml seed=3 --run-dir runs/try3
    The run directory gets recipe.yaml, metrics.jsonl, summary.json and checkpoints/. Only one
    `dojo train` or `dojo resume` at a time may write it.

    With --nproc N, N local processes train data-parallel through torchrun (the recipe's batch_size
    is the global batch, split over them); `torchrun ... -m torchdojo train` works the same."""
    from .distributed import Dist
    from .recipe import load_recipe
    from .trainer import Trainer, default_run_dir

    r = load_recipe(recipe, list(overrides))
    dist = Dist.from_env()
    if (nproc > 1 or dist.enabled) and not run_dir:
        # Every process must find the same directory: a timestamped default could differ between them.
        raise DojoError("training with several processes needs --run-dir")
    run_dir = Path(run_dir) if run_dir else default_run_dir(r)
    launcher = nproc > 1 and not dist.enabled
    with _stop_on_signals("interrupted before training started; nothing was lost"), \
            _writer_lock(run_dir, dist, launcher):
        restarted = dist.enabled and dist.restart_count > 0
        if overwrite and not restarted:     # a torchrun restart continues what the first attempt wrote
            if dist.is_main:        # the other ranks could see rank 0's clearing half done
                _check_overwritable(run_dir)
            if dist.is_main and not launcher:       # the one process that holds the lock
                _clear_run_dir(run_dir)
        elif not restarted and _has_run_files(run_dir):
            raise DojoError(f"run directory {run_dir} is not empty; use `dojo resume {run_dir}`, another "
                            f"--run-dir, or --overwrite to delete it and start again")
        from .ensemble_runs import is_sequential, train_ensemble
        if (nproc > 1 or dist.enabled) and is_sequential(r):
            raise DojoError("an ensemble whose members train one after another cannot use several processes")
        if launcher:
            _check_divides(r, nproc)        # one clean error here rather than one per process
            args = ["train", recipe, *overrides, "--run-dir", str(run_dir)] + (["--quiet"] if quiet else []) \
                + (["--overwrite"] if overwrite else [])
            _launch(nproc, args, max_restarts, run_dir)
        if dist.enabled:
            _train_distributed(r, run_dir, quiet, dist, restarted)
            return
        if is_sequential(r):        # members that differ in more than their seed: one run each
            if not quiet:
                click.echo(f"run directory: {run_dir} (ensemble of {r.ensemble.members}, members one after another)")
            train_ensemble(r, run_dir, quiet=quiet)
            return
        trainer = Trainer(r, run_dir, quiet=quiet)
        if not quiet:
            click.echo(f"run directory: {run_dir}")
        trainer.fit()


@contextmanager
def _writer_lock(run_dir: Path, dist, launcher: bool):
    """Hold the run directory's writer lock (see run_lock) for the rest of the command. Under torchrun
    only rank 0 writes, so only rank 0 locks; the `--nproc` launcher only checks that no one else holds
    it, as its own rank 0 must be able to take it."""
    from .run_lock import acquire_run_dir, check_run_dir_free
    if launcher:
        check_run_dir_free(run_dir)
        yield
    elif dist.is_main:
        from .run_lock import LOCK_NAME, RunDirBusy
        created = not run_dir.exists()
        had_lock_file = (run_dir / LOCK_NAME).exists()
        lock = None
        try:
            lock = acquire_run_dir(run_dir)
            yield
        except BaseException as exc:
            # A recipe, data or checkpoint error, or a signal (even one inside acquire_run_dir): leave
            # the folder as it was (none, empty, the run as it stood), with no lock file this command
            # added. Never the lock file of the process that holds it (RunDirBusy).
            if not had_lock_file and not isinstance(exc, RunDirBusy):
                _remove_lock_file(run_dir, remove_folder=created)
            raise
        finally:
            if lock is not None:
                lock.release()
    else:
        yield


def _remove_lock_file(run_dir: Path, remove_folder: bool) -> None:
    """Delete the lock file this command created (and the folder, when this command created it and it
    is empty again). Unlinked while the lock is still held: a process that opened the file before gets
    "busy"; one that comes after creates a new lock file, and the rmdir then fails and leaves the folder
    to it."""
    from .run_lock import LOCK_NAME
    try:
        (run_dir / LOCK_NAME).unlink()
        if remove_folder and not any(run_dir.iterdir()):
            run_dir.rmdir()
    except OSError:
        pass


@contextmanager
def _stop_on_signals(message: str):
    """SIGINT/SIGTERM while the run is set up (data, model) end the command with 130/143 and `message`
    instead of click's "Aborted!" or a silent death; Trainer.fit installs its own handlers while it
    trains (and puts these back)."""
    def stop(signum, frame):
        raise StoppedBySignal(128 + signum, message)
    try:
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:      # not in the main thread (an embedding program): leave signals alone
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _has_run_files(run_dir: Path) -> bool:
    from .run_lock import LOCK_NAME
    return run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir())


def _check_overwritable(run_dir: Path) -> None:
    """--overwrite deletes only what looks like a run: a mistyped --run-dir (a home or project folder)
    must not be emptied."""
    from .runs import is_run_dir
    if _has_run_files(run_dir) and not is_run_dir(run_dir):
        raise DojoError(f"{run_dir} does not look like a run directory (no recipe.yaml, metrics.jsonl, "
                        f"summary.json or checkpoints/); --overwrite deletes only runs, so remove it yourself")


def _clear_run_dir(run_dir: Path) -> None:
    """Everything in `run_dir` but its lock file (which must stay: see run_lock)."""
    from .run_lock import LOCK_NAME
    for p in run_dir.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _check_divides(r, nproc: int) -> None:
    from .errors import ConfigError
    for i in range(len(r.phases)):
        if r.batch_size(i) % nproc:
            raise ConfigError(f"phases.{i}.batch_size", f"the global batch size {r.batch_size(i)} does not divide "
                                                        f"over {nproc} processes (--nproc)")


def _launch(nproc: int, args: list[str], max_restarts: int, run_dir) -> None:
    """Run this command again in `nproc` processes through torchrun; exit with its exit code.

    SIGINT/SIGTERM go on to torchrun (which passes them to the processes: they checkpoint and stop)
    instead of killing it, as `subprocess.call` would on Ctrl-C."""
    import signal
    import subprocess

    from .distributed import torchrun_command
    proc = subprocess.Popen(torchrun_command(nproc, args, max_restarts))
    received = []

    def forward(signum, frame):
        received.append(signum)
        proc.send_signal(signum)
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received and code != 0:      # torchrun itself exits 1 on a signal: report it as `dojo train` does
        click.echo(f"\ninterrupted; resume with: dojo resume {run_dir} --nproc {nproc}", err=True)
        sys.exit(130 if received[0] == signal.SIGINT else 143)
    sys.exit(code if code >= 0 else 128 - code)


def _train_distributed(r, run_dir: Path, quiet: bool, dist, restarted: bool) -> None:
    """One process of a torchrun job. Every rank checked the directory above, before any rank writes;
    the barrier keeps rank 0 from creating it while another rank still looks. After a torchrun restart
    (--max-restarts) the run continues from its latest checkpoint when there is one."""
    from .trainer import Trainer
    from .checkpoint import latest_valid_checkpoint

    dist.init()
    resume = restarted and latest_valid_checkpoint(run_dir / "checkpoints")[0] is not None
    if restarted and not resume and dist.is_main:
        # The failed attempt wrote lines and TensorBoard events but no checkpoint: it starts over.
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
    dist.barrier()
    trainer = Trainer.from_run_dir(run_dir, quiet=quiet) if resume else Trainer(r, run_dir, quiet=quiet)
    dist.barrier()      # every rank has built (and read) what it needs before rank 0 writes
    if not quiet and dist.is_main:
        click.echo(f"run directory: {run_dir} ({dist.world} processes)")
    trainer.fit()
    # Only after success: a rank that failed must not wait in a barrier for ranks stuck in a step;
    # it exits, and torchrun stops the others.
    dist.destroy()


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@NPROC_OPTION
@MAX_RESTARTS_OPTION
@handle_errors
def resume(run_dir, quiet, nproc, max_restarts):
    """Continue an interrupted run from its last checkpoint (--nproc N: in N processes, through torchrun).

    Only one `dojo train` or `dojo resume` at a time may write a run directory."""
    from .distributed import Dist
    from .trainer import Trainer

    if not (Path(run_dir) / "recipe.yaml").is_file():    # before the lock, which would write its file here
        raise DojoError(f"{run_dir} is not a run directory (no recipe.yaml)")
    dist = Dist.from_env()
    launcher = nproc > 1 and not dist.enabled
    with _stop_on_signals(f"interrupted before training started; nothing was lost, resume with: "
                          f"dojo resume {run_dir}"), _writer_lock(Path(run_dir), dist, launcher):
        if _run_status(Path(run_dir)) == "finished":
            raise DojoError(f"{run_dir} has already finished; nothing to resume (see `dojo eval {run_dir}`)")
        if launcher:
            _launch(nproc, ["resume", run_dir] + (["--quiet"] if quiet else []), max_restarts, run_dir)
        if dist.enabled:
            dist.init()
        sequential = _sequential_ensemble(Path(run_dir))
        if sequential is not None and dist.enabled:
            raise DojoError("an ensemble whose members train one after another cannot use several processes")
        if sequential is not None:
            from .ensemble_runs import train_ensemble
            train_ensemble(sequential, Path(run_dir), quiet=quiet)      # skips finished members, resumes the rest
            return
        trainer = Trainer.from_run_dir(run_dir, quiet=quiet)
        if trainer.checkpoint_step is None:
            raise DojoError(_no_checkpoint_message(Path(run_dir), warned=bool(trainer.skipped_checkpoints)))
        if not quiet and dist.is_main:
            click.echo(f"resuming {run_dir} at step {trainer.state.step} of {trainer.total_steps}")
        dist.barrier()      # every rank has read the checkpoint before rank 0 writes again
        trainer.fit()
        dist.destroy()      # only after success (see _train_distributed)


def _no_checkpoint_message(run_dir: Path, warned: bool) -> str:
    """`warned`: Trainer.from_run_dir skipped checkpoints, each with a warning printed above."""
    why = "none that validates; see the warnings above" if warned else "the run stopped before its first checkpoint"
    return (f"{run_dir} has no checkpoint to resume from ({why}); start it again with "
            f"`dojo train {run_dir / 'recipe.yaml'} --run-dir {run_dir} --overwrite`")


def _run_status(run_dir: Path) -> str | None:
    """`status` from summary.json (finished, interrupted), or None if it is missing or unreadable."""
    from .runfiles import read_json_object
    try:
        summary = read_json_object(run_dir / "summary.json")
    except DojoError:       # tolerant on purpose: a resumed run rewrites its summary at the end
        return None
    return summary.get("status")


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
