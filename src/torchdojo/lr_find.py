"""LR finder: the learning-rate range test of Smith 2015, "Cyclical Learning Rates for Training
Neural Networks" (arXiv 1506.01186), section 3.3.

Train for a few steps while the learning rate grows exponentially from `start_lr` to `end_lr`, one
batch per step, and watch the loss. While the LR is too small the loss barely moves; in a useful range
it falls fast; past that it becomes ragged and then blows up. The sweep stops once the smoothed loss
exceeds `diverge_factor` times its best value (or is no longer finite).

    from torchdojo import load_recipe
    from torchdojo.lr_find import lr_find
    result = lr_find(load_recipe("quickstart"), "lr_find")
    result["suggested"]          # {"steepest": ..., "min_over_10": ...}

The sweep uses the first phase as it trains: its model, data, batch size (that of its first epoch, if
the batch size is scheduled), losses, frozen modules and optimizer over its parameter groups. Every group's LR is set to `initial_lr / max initial_lr * lr`, so
the swept `lr` is the LR of the fastest group and discriminative (`lr_mult`, layer-decay) ratios are
kept; frozen groups stay at 0. The schedule and the recipe's methods (EMA, gradient clipping, ...) are
not applied: the sweep measures the plain objective under the optimizer alone.

Nothing but `lr_find.json` and `lr_find.png` is written: no run directory, no checkpoint, no weights.

Two suggestions are reported (both are heuristics: look at the plot):
- `steepest`: the LR where the smoothed loss falls fastest per decade of LR (the most negative
  d loss / d log10 lr), ignoring the first ~10% of the sweep and everything after the minimum.
- `min_over_10`: the LR at the minimum of the smoothed loss, divided by 10.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .cli_errors import handle_errors
from .errors import DojoError

if TYPE_CHECKING:
    from .recipe import Recipe

JSON_NAME = "lr_find.json"
PNG_NAME = "lr_find.png"


def _check_args(start_lr: float, end_lr: float, steps: int, smoothing: float, diverge_factor: float) -> None:
    if not (isinstance(start_lr, (int, float)) and math.isfinite(start_lr) and start_lr > 0):
        raise DojoError(f"lr-find: start_lr must be a positive number, got {start_lr}")
    if not (isinstance(end_lr, (int, float)) and math.isfinite(end_lr)):
        raise DojoError(f"lr-find: end_lr must be a finite number, got {end_lr}")
    if start_lr >= end_lr:
        raise DojoError(f"lr-find: start_lr ({start_lr:g}) must be smaller than end_lr ({end_lr:g})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 10:
        raise DojoError(f"lr-find: steps must be an integer of at least 10, got {steps}")
    if not 0 <= smoothing < 1:
        raise DojoError(f"lr-find: smoothing must be in [0, 1), got {smoothing}")
    if not diverge_factor > 1:
        raise DojoError(f"lr-find: diverge_factor must be greater than 1, got {diverge_factor}")


def sweep_lrs(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """The planned LRs: lr_k = start_lr * (end_lr / start_lr) ** (k / (steps - 1)), k = 0..steps-1."""
    return [start_lr * (end_lr / start_lr) ** (k / (steps - 1)) for k in range(steps)]


def suggest(lrs: list[float], smoothed: list[float]) -> dict[str, float]:
    """`steepest` and `min_over_10` from a sweep (see the module docstring)."""
    import numpy as np

    y = np.asarray(smoothed, dtype=float)
    i_min = int(np.argmin(y))
    min_over_10 = lrs[i_min] / 10
    if len(y) < 2 or i_min == 0:
        return {"steepest": float(lrs[0]), "min_over_10": float(min_over_10)}
    grad = np.gradient(y, np.log10(np.asarray(lrs, dtype=float)))
    lo = len(y) // 10                       # the first ~10% is mostly bias-correction noise
    if lo >= i_min:
        lo = 0
    i_steep = lo + int(np.argmin(grad[lo:i_min + 1]))
    return {"steepest": float(lrs[i_steep]), "min_over_10": float(min_over_10)}


def lr_key(spec: dict, prefix: str) -> str:
    """The override key of an optimizer spec's lr (`inner.lr` for wrappers such as lookahead)."""
    if "lr" not in spec and isinstance(spec.get("inner"), dict):
        return lr_key(spec["inner"], f"{prefix}.inner")
    return f"{prefix}.lr"


def _progress(quiet: bool):
    """A rich progress bar on stderr, or None when quiet or not a terminal (as log.Reporter)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        return None
    return Progress(TextColumn("[bold]lr-find"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("lr {task.fields[lr]}"), TextColumn("loss {task.fields[loss]}"),
                    TimeRemainingColumn(), console=console, transient=True)


def lr_find(recipe: "Recipe | str | dict", out_dir: str | Path, *, start_lr: float = 1e-7, end_lr: float = 10.0,
            steps: int = 100, smoothing: float = 0.98, diverge_factor: float = 4.0,
            quiet: bool = False) -> dict[str, Any]:
    """Run the LR range test on the first phase of `recipe` (a Recipe, file, built-in name or mapping).

    Writes `out_dir/lr_find.json` and `out_dir/lr_find.png` and returns the JSON's content plus
    `json_path` and `png_path`. The model is built fresh from the recipe and thrown away afterwards."""
    import torch

    from .recipe import Recipe, load_recipe
    from .trainer import Trainer, frozen_modules

    _check_args(start_lr, end_lr, steps, smoothing, diverge_factor)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    trainer = Trainer(recipe, None, quiet=True)      # no run directory: nothing is written
    s = trainer.state
    model, phase = s.model, recipe.phases[0]

    # Phase 0 as the trainer sets it up: frozen modules get no gradient and stay in eval mode.
    frozen = frozen_modules(model, phase.freeze, "phases.0.freeze")
    for m in frozen:
        m.requires_grad_(False)
    optimizer = trainer.build_optimizer(0)
    frozen_names = trainer.frozen_by_phase[recipe.phase_name(0)]
    frozen_ids = {id(p) for n, p in model.named_parameters() if n in frozen_names}
    bases = [0.0 if g["params"] and all(id(p) in frozen_ids for p in g["params"]) else float(g["initial_lr"])
             for g in optimizer.param_groups]
    top = max(bases)
    if not top > 0:
        raise DojoError("lr-find: every parameter group of the first phase is frozen or has lr 0")
    ratios = [b / top for b in bases]
    loader = trainer.train_loader(0)                  # the first epoch's batch size, kept throughout
    terms = trainer.build_losses(0)
    model.train()
    for m in frozen:
        m.eval()
        if phase.train_bn:
            for sub in m.modules():
                if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
                    sub.train()

    planned = sweep_lrs(start_lr, end_lr, steps)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg, best, stopped_early, reason = 0.0, math.inf, False, ""

    def batches():
        epoch = 0
        while True:
            yield from loader.epoch(epoch)
            epoch += 1

    progress = _progress(quiet)
    if progress is not None:
        progress.start()
        bar = progress.add_task("", total=steps, lr="-", loss="-")
    try:
        for k, (lr, batch) in enumerate(zip(planned, batches())):
            for group, ratio in zip(optimizer.param_groups, ratios):
                group["lr"] = ratio * lr
            loss, _ = s.task.training_loss(model, batch, terms)
            value = float(loss.detach())
            if not math.isfinite(value):
                stopped_early, reason = True, f"the loss became {value} at lr {lr:.3g}"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            avg = smoothing * avg + (1 - smoothing) * value
            smooth = avg / (1 - smoothing ** (k + 1))            # bias correction of the EMA
            lrs.append(lr)
            losses.append(value)
            smoothed.append(smooth)
            if progress is not None:
                progress.update(bar, completed=k + 1, lr=f"{lr:.2e}", loss=f"{smooth:.4f}")
            if not math.isfinite(smooth):
                stopped_early, reason = True, f"the smoothed loss became {smooth} at lr {lr:.3g}"
                break
            best = min(best, smooth)
            # diverge_factor x best (for a positive best; works for losses that can be negative, too)
            if smooth > best + (diverge_factor - 1) * abs(best):
                stopped_early, reason = True, f"the loss diverged at lr {lr:.3g}"
                break
    finally:
        if progress is not None:
            progress.stop()
    base_lr = float(optimizer.defaults.get("lr", top))   # the optimizer's lr before lr_mult
    if len(lrs) < 2:
        raise DojoError(f"lr-find: {reason or 'the sweep stopped'} after {len(lrs)} step(s); "
                        f"lower --start-lr (now {start_lr:g})")
    suggested = suggest(lrs, smoothed)
    # The swept lr is the fastest group's; the recipe's optimizer lr is that divided by its lr_mult.
    to_recipe = base_lr / top
    result: dict[str, Any] = {
        "recipe": recipe.name,
        "lrs": lrs, "losses": losses, "smoothed": smoothed,
        "suggested": suggested,
        "optimizer_lr": {k: v * to_recipe for k, v in suggested.items()},
        "optimizer_lr_key": lr_key(phase.optimizer or {}, "phases.0.optimizer"),
        "stopped_early": stopped_early,
        "stop_reason": reason or None,
        "settings": {"start_lr": start_lr, "end_lr": end_lr, "steps": steps, "smoothing": smoothing,
                     "diverge_factor": diverge_factor, "phase": recipe.phase_name(0),
                     "optimizer": phase.optimizer.get("name") if phase.optimizer else None},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / JSON_NAME, out / PNG_NAME
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, png_path)
    return {**result, "json_path": str(json_path), "png_path": str(png_path)}


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DojoError(f"lr-find: wrote {path.with_name(JSON_NAME)}, but the plot needs matplotlib "
                        "(pip install matplotlib)") from None
    lrs, losses, smoothed = result["lrs"], result["losses"], result["smoothed"]
    sug = result["suggested"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        ax.plot(lrs, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss (per batch)")
        ax.plot(lrs, smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
        i_min = min(range(len(smoothed)), key=smoothed.__getitem__)
        ax.axvline(sug["steepest"], color="tab:red", linestyle="--",
                   label=f"steepest: {sug['steepest']:.2e}")
        ax.axvline(sug["min_over_10"], color="tab:green", linestyle=":",
                   label=f"min / 10: {sug['min_over_10']:.2e}")
        ax.plot([lrs[i_min]], [smoothed[i_min]], "o", color="tab:green", label=f"minimum at {lrs[i_min]:.2e}")
        # Keep the interesting part in view: a diverging loss would flatten the rest of the curve.
        low = min(min(losses), min(smoothed))
        high = max(smoothed[:i_min + 1])
        high = min(max(losses + smoothed), high + 0.5 * max(high - low, 1e-12))
        pad = 0.05 * max(high - low, 1e-12)
        ax.set_ylim(low - pad, high + pad)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss")
        title = f"LR range test: {result['recipe']}"
        if result["stopped_early"]:
            title += f" (stopped at {lrs[-1]:.2e})"
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


@click.command("lr-find", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--out", "out_dir", default="lr_find", show_default=True, type=click.Path(file_okay=False),
              help="Folder for lr_find.json and lr_find.png.")
@click.option("--start-lr", type=float, default=1e-7, show_default=True, help="First LR of the sweep.")
@click.option("--end-lr", type=float, default=10.0, show_default=True, help="Last LR of the sweep.")
@click.option("--steps", type=int, default=100, show_default=True,
              help="Number of LRs (one batch each) at most; the sweep stops early when the loss diverges.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar; print only the results.")
@handle_errors
def lr_find_command(recipe, overrides, out_dir, start_lr, end_lr, steps, quiet):
    """Find a learning rate for RECIPE with the LR range test (Smith 2015, arXiv 1506.01186).

    Trains the first phase for up to --steps batches while the LR grows exponentially from --start-lr
    to --end-lr, records the loss, and stops when the loss diverges. Nothing else is written: no run
    directory and no weights, only lr_find.json and lr_find.png in --out.

    \b
    Examples:
      dojo lr-find quickstart
      dojo lr-find my.yaml phases.0.batch_size=64 --out lr_find/bs64 --steps 200

    Read the plot: pick an LR on the steep downward slope, well before the minimum. Two suggestions
    are printed: `steepest` (fastest descent) and `min_over_10` (the minimum's LR / 10). Put the one
    you choose into the recipe's `optimizer.lr`, e.g. `dojo train RECIPE phases.0.optimizer.lr=3e-3`
    (schedules and lr_mult multiply it as usual)."""
    import shlex

    from .recipe import load_recipe

    _check_args(start_lr, end_lr, steps, 0.98, 4.0)
    r = load_recipe(recipe, list(overrides))
    if not quiet:
        click.echo(f"lr-find: {r.name}, phase {r.phase_name(0)}, up to {steps} steps from lr {start_lr:g} "
                   f"to {end_lr:g}")
    result = lr_find(r, out_dir, start_lr=start_lr, end_lr=end_lr, steps=steps, quiet=quiet)
    n = len(result["lrs"])
    stop = result["stop_reason"] if result["stopped_early"] else "reached --end-lr"
    click.echo(f"swept {n} steps, lr {result['lrs'][0]:.2e} to {result['lrs'][-1]:.2e} ({stop})")
    sug, opt = result["suggested"], result["optimizer_lr"]
    click.echo(f"suggested lr (steepest descent): {sug['steepest']:.2e}")
    click.echo(f"suggested lr (minimum / 10):     {sug['min_over_10']:.2e}")
    if any(not math.isclose(sug[k], opt[k], rel_tol=1e-9) for k in sug):
        click.echo(f"(these are the fastest parameter group's LR; as optimizer.lr: steepest {opt['steepest']:.2e}, "
                   f"min/10 {opt['min_over_10']:.2e})")
    click.echo(f"wrote {result['json_path']} and {result['png_path']}")
    click.echo("try: " + shlex.join(["dojo", "train", recipe, *overrides,
                                     f"{result['optimizer_lr_key']}={opt['steepest']:.3g}"]))
