"""`dojo calibrate`: temperature scaling for a finished classification run (Guo et al. 2017,
arXiv 1706.04599, section 4.2).

    dojo calibrate runs/digits-20250101-120000            # fit T on the val split
    dojo eval runs/digits-20250101-120000                 # now reports calibrated NLL, ECE, Brier

The command loads the run's final model, collects its logits on the validation split, fits one
temperature T by minimising the NLL (`calibration.fit_temperature`) and writes two files into the run
directory:

- `calibration.json`: `TemperatureScaling.to_dict()` ({"method", "temperature"}) plus the split it was
  fitted on, its size, the number of ECE bins, and accuracy, NLL, ECE and Brier before and after on that
  split (`before`, `after`) and on the other evaluated splits (`other_splits`);
- `reliability.png`: the reliability diagrams of that split before and after, side by side.

From then on `Trainer.trained_models()` (and so `dojo eval` and `dojo predict`) wraps every
classification model of the run, ensembles included, in `TemperatureScaled`: outputs divided by T,
hence calibrated probabilities and the same argmax. `trained_models(calibrated=False)` gives the raw
models; `dojo calibrate` fits on those, so running it again replaces the old calibration.

    from torchdojo.calibrate import calibrate
    result = calibrate("runs/my-run")          # the content of calibration.json plus the file paths
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from .calibration import TemperatureScaling, calibration_metrics, reliability_diagram
from .cli_errors import handle_errors
from .errors import DojoError
from .runfiles import read_json_object

CALIBRATION_JSON = "calibration.json"
RELIABILITY_PNG = "reliability.png"
METRICS = ("accuracy", "nll", "ece", "brier")
SPLITS = ("train", "val", "test")


class TemperatureScaled(nn.Module):
    """`model` with its outputs divided by a temperature T > 0: softmax(model(x) / T) are the
    temperature-scaled probabilities; the argmax (and so accuracy, F1 and the confusion matrix) is that
    of `model`. Works on an Ensemble too: its log-probabilities divided by T are renormalised by the
    softmax."""

    def __init__(self, model: nn.Module, temperature: float | TemperatureScaling):
        super().__init__()
        self.model = model
        self.temperature = TemperatureScaling(temperature).temperature    # validated: finite, > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.6g}"


def calibration_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CALIBRATION_JSON


def load_calibration(run_dir: str | Path) -> TemperatureScaling | None:
    """The temperature stored in `run_dir/calibration.json`, or None when there is no such file.
    An unreadable or invalid file is a DojoError that says how to fix it."""
    path = calibration_path(run_dir)
    if not path.is_file():
        return None
    fix = f"run `dojo calibrate {run_dir}` again or delete the file"
    data = read_json_object(path, fix)
    try:
        return TemperatureScaling.from_dict(data)
    except ValueError as exc:
        raise DojoError(f"{path}: {exc}; {fix}") from None


def _collect(trainer, model: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and labels of `model` on a split, batched as `dojo eval` batches them."""
    from .tasks.base import collect_outputs

    model.eval()
    logits, y = collect_outputs(model, trainer.eval_loader(split))
    return logits.float(), y


def calibrate(run_dir: str | Path, split: str = "val", n_bins: int = 15,
              echo=None) -> dict[str, Any]:
    """Fit a temperature on `split` for the final model of the finished classification run in
    `run_dir`; write calibration.json and reliability.png there. Returns the content of
    calibration.json plus `json_path` and `png_path`. `echo` (a function taking one line, e.g.
    click.echo) receives the progress messages."""
    from .checkpoint import WEIGHTS
    from .trainer import Trainer

    say = echo or (lambda line: None)
    run_dir = Path(run_dir)
    if split not in SPLITS:
        raise DojoError(f"calibrate: unknown split '{split}'; choose train, val or test")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise DojoError(f"calibrate: --bins must be a positive integer, got {n_bins}")
    trainer = Trainer.from_run_dir(run_dir, quiet=True)
    task_type = trainer.state.task.task_type
    if task_type != "classification":
        raise DojoError(f"calibrate: temperature scaling is for classification, but {run_dir} is a "
                        f"{task_type} run (task '{trainer.recipe.task['name']}')")
    if not (run_dir / "checkpoints" / "final" / WEIGHTS).is_file():
        raise DojoError(f"calibrate: {run_dir} has no final model (checkpoints/final/{WEIGHTS}); "
                        f"finish the run first (dojo resume {run_dir})")
    sizes = {s: len(trainer.state.data.split(s)) for s in SPLITS}
    if sizes[split] == 0:
        raise DojoError(f"calibrate: the {split} split of {run_dir} is empty; nothing to fit the temperature on")

    model = trainer.trained_models(calibrated=False)[""]       # the raw model: a refit replaces the old T
    say(f"calibrate: fitting the temperature of {trainer.recipe.name} on the {split} split "
        f"({sizes[split]} samples)")
    logits, y = _collect(trainer, model, split)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaling = TemperatureScaling.fit(logits, y)
    for w in caught:
        say(f"warning: {w.message}")
    t = scaling.temperature

    # Before and after on the fitted split, then on val and test (the split fitted on comes first).
    shown = [split] + [s for s in ("val", "test") if s != split and sizes[s] > 0]
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for s in shown:
        z, labels = (logits, y) if s == split else _collect(trainer, model, s)
        z = z.double()
        metrics[s] = {"before": calibration_metrics(z, labels, n_bins),
                      "after": calibration_metrics(scaling(z), labels, n_bins)}

    png_path = run_dir / RELIABILITY_PNG
    z = logits.double().cpu()
    reliability_diagram(torch.softmax(z, 1), y.cpu(), png_path, n_bins,
                        title=f"{trainer.recipe.name}, {split} split", probs_after=torch.softmax(scaling(z), 1),
                        names=("before", f"after temperature scaling (T = {t:.3g})"))
    result = {**scaling.to_dict(), "split": split, "n_samples": sizes[split], "n_bins": n_bins,
              "before": metrics[split]["before"], "after": metrics[split]["after"],
              "other_splits": {s: metrics[s] for s in shown[1:]}}
    json_path = calibration_path(run_dir)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, json_path)                 # never a half-written calibration.json
    return {**result, "json_path": str(json_path), "png_path": str(png_path), "metrics": metrics}


def print_calibration_table(result: dict[str, Any], title: str) -> None:
    """Rows: accuracy, NLL, ECE, Brier; columns: before and after on each split."""
    from rich.console import Console
    from rich.table import Table

    from .log import fmt

    table = Table(title=title)
    table.add_column("metric")
    metrics = result["metrics"]
    for s in metrics:
        fitted = " (fit)" if s == result["split"] else ""
        table.add_column(f"{s}{fitted} before", justify="right")
        table.add_column(f"{s}{fitted} after", justify="right")
    for name in ("ece", "nll", "brier", "accuracy"):
        table.add_row(name, *[fmt(metrics[s][when][name]) for s in metrics for when in ("before", "after")])
    Console().print(table)


@click.command("calibrate", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", type=click.Choice(SPLITS), default="val", show_default=True,
              help="Split to fit the temperature on: held-out data (val); test only to experiment.")
@click.option("--bins", "n_bins", type=click.IntRange(min=1), default=15, show_default=True,
              help="Confidence bins of the ECE and the reliability diagram.")
@handle_errors
def calibrate_command(run_dir, split, n_bins):
    """Fit temperature scaling (Guo et al. 2017) for a finished classification run.

    Divides the final model's logits by one temperature T, fitted by minimising the NLL on --split.
    Accuracy is unchanged; NLL, ECE and Brier usually improve. Writes RUN_DIR/calibration.json and
    RUN_DIR/reliability.png (before and after, side by side) and prints the metrics before and after on
    val and test. From then on `dojo eval` and `dojo predict` use the calibrated probabilities; delete
    calibration.json to go back. Running it again refits on the raw model and replaces the file.

    \b
    Example:
      dojo calibrate runs/digits-20250101-120000
      dojo eval runs/digits-20250101-120000"""
    if split == "train":
        click.echo("note: the training split is not held out; the model is overconfident there by "
                   "construction, so the fitted T will be too small", err=True)
    elif split == "test":
        click.echo("note: fitting on the test split makes its calibrated metrics optimistic", err=True)
    result = calibrate(run_dir, split, n_bins, echo=click.echo)
    t = result["temperature"]
    kind = "overconfident: T > 1 softens" if t > 1 else "underconfident: T < 1 sharpens" if t < 1 else "no change"
    click.echo(f"temperature T = {t:.4g} ({kind})")
    print_calibration_table(result, f"{run_dir}: before and after temperature scaling ({n_bins} bins)")
    click.echo(f"wrote {result['json_path']} and {result['png_path']}")
    click.echo(f"`dojo eval {run_dir}` and `dojo predict {run_dir}` now use the calibrated probabilities")
