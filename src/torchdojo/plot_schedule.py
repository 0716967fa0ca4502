"""Plot the learning rates a recipe will use, without training: `dojo plot-schedule RECIPE`.

    from torchdojo import load_recipe
    from torchdojo.plot_schedule import planned_lrs, plot_schedule
    plan = planned_lrs(load_recipe("mnist1d-stages"))
    plan["groups"]["default"][:5]            # the LR of group `default` at the first five steps
    plot_schedule(load_recipe("mnist1d-stages"), "lr.png")

The simulation follows the trainer step by step over every phase: the optimizer in use (the one the
phase, or the last phase before it, names) and its parameter groups; each group's base LR
(`initial_lr`: the optimizer's lr times the group's `lr_mult`), or 0 while the group is frozen in the
phase; times the phase's `lr_scaling` factor in the epoch of the step (batch size over the batch size
the optimizer's LR was set for); times the phase schedule's multiplier; floored by a plateau segment's
`min_lr`. It builds the model and data as `dojo train` would (to know the groups and the steps per
epoch) but trains nothing and writes nothing besides the plot.

A `plateau` segment (reduce on plateau) lowers the LR after validation results that cannot be known
in advance: it is drawn at its undecayed value, i.e. as an upper bound of the LR in that segment.
Methods that stop early (early_stopping) are not simulated either: the plan covers every phase in full.

Steps are counted as in `metrics.jsonl`: `steps[k]` is the number of optimizer steps done after the
step that used `groups[label][k]`, so the values equal the `lr/group<i>` the trainer logs at that step
(phase `p` covers the steps `p["start"] + 1` to `p["end"]`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .cli_errors import handle_errors
from .errors import ConfigError, DojoError

if TYPE_CHECKING:
    from .recipe import Recipe


def optimizer_label(spec: dict | None) -> str:
    """`adamw`, or `lookahead(sgd)` for a wrapper around an inner optimizer."""
    if not spec:
        return "?"
    inner = spec.get("inner")
    return f"{spec['name']}({optimizer_label(inner)})" if isinstance(inner, dict) else str(spec["name"])


def planned_lrs(recipe: "Recipe") -> dict[str, Any]:
    """The LR of every parameter group at every optimizer step of the whole recipe (see the module
    docstring). Returns

    - `steps`: 1, 2, ..., total steps (as `step` in metrics.jsonl);
    - `epochs`: the epochs done after each step (as `epoch` in metrics.jsonl, unrounded);
    - `groups`: {label: [lr per step]}, labelled by the groups' `name`; a group that the optimizer of a
      phase does not have is None there. Groups of different optimizers with the same name share a label;
    - `phases`: [{name, start, end, optimizer, optimizer_phase, new_optimizer, groups}] where the phase
      covers steps start+1..end and `groups` lists its optimizer's group labels in optimizer order (so
      `groups[j]` is `lr/group<j>` in metrics.jsonl);
    - `plateau`: names of the phases whose schedule has a plateau segment (drawn undecayed);
    - `plateau_spans`: [(start, end)] global step ranges of those plateau segments."""
    from .registry import SCHEDULES
    from .schedules import Schedule
    from .trainer import Trainer

    trainer = Trainer(recipe, None, quiet=True)       # no run directory: nothing is written
    model = trainer.state.model
    total = trainer.total_steps
    steps = list(range(1, total + 1))
    epochs: list[float] = []
    groups: dict[str, list[float | None]] = {}
    phases: list[dict[str, Any]] = []
    plateau: list[str] = []
    plateau_spans: list[tuple[int, int]] = []
    optimizers: dict[int, Any] = {}
    labels_of: dict[int, list[str]] = {}
    start, epochs_done, previous_opt = 0, 0.0, -1

    for i, phase in enumerate(recipe.phases):
        name = recipe.phase_name(i)
        n, clock = trainer.phase_plan[i]
        opt_phase = recipe.active_optimizer_phase(i)
        if opt_phase not in optimizers:
            optimizer = optimizers[opt_phase] = trainer.build_optimizer(opt_phase)
            labels: list[str] = []
            for j, g in enumerate(optimizer.param_groups):
                label = str(g.get("name") or f"group{j}")
                labels.append(label if label not in labels else f"{label}#{j}")
            labels_of[opt_phase] = labels
        optimizer, labels = optimizers[opt_phase], labels_of[opt_phase]

        # The trainer's rule (Trainer._enter_phase): a group whose parameters are all frozen runs at lr 0.
        frozen_names = trainer.frozen_by_phase[name]
        frozen_ids = {id(p) for pn, p in model.named_parameters() if pn in frozen_names}
        group_base = [0.0 if g["params"] and all(id(p) in frozen_ids for p in g["params"]) else g["initial_lr"]
                      for g in optimizer.param_groups]
        path = f"phases.{i}"
        try:
            segments = [SCHEDULES.build(spec, f"{path}.schedule.{j}") for j, spec in enumerate(phase.schedule)]
            schedule = Schedule(segments, n, clock)
        except ValueError as exc:
            raise ConfigError(f"{path}.schedule", str(exc)) from None
        has_floor = any(seg.plateau is not None and seg.plateau.min_lr > 0 for seg in segments)
        spans = [(start + s, start + min(s + length, n)) for seg, s, length
                 in zip(segments, schedule.starts, schedule.lengths) if seg.plateau is not None and s < n]
        if any(seg.plateau is not None for seg in segments):
            plateau.append(name)
            plateau_spans += spans

        series = [groups.setdefault(label, [None] * total) for label in labels]
        epoch, epoch_start, epoch_end, base_lrs = -1, 0, 0, []
        for t in range(n):
            while t >= epoch_end:                      # a new epoch: its batch size and lr_scaling factor
                epoch, epoch_start = epoch + 1, epoch_end
                epoch_end = clock.steps_at(epoch + 1)
                factor = trainer.lr_scale(i, epoch)
                base_lrs = [base * factor for base in group_base]
            mult = schedule(t)
            if has_floor:
                floor = schedule.min_lr(t)
                lrs = [max(base * mult, floor) if base > 0 else 0.0 for base in base_lrs]
            else:
                lrs = [base * mult for base in base_lrs]
            for values, lr in zip(series, lrs):
                values[start + t] = lr
            # Clock.epoch_at(t + 1), without its walk from epoch 0
            epochs.append(epochs_done + epoch + (t + 1 - epoch_start) / (epoch_end - epoch_start))
        epochs_done += clock.epoch_at(n)
        phases.append({"name": name, "start": start, "end": start + n,
                       "optimizer": optimizer_label(recipe.phases[opt_phase].optimizer),
                       "optimizer_phase": recipe.phase_name(opt_phase), "new_optimizer": opt_phase != previous_opt,
                       "groups": list(labels)})
        previous_opt = opt_phase
        start += n
    return {"recipe": recipe.name, "steps": steps, "epochs": epochs, "groups": groups, "phases": phases,
            "plateau": plateau, "plateau_spans": plateau_spans}


def merged_groups(groups: dict[str, list]) -> dict[str, list]:
    """Groups with identical LR curves under one legend label: the first group's name, then what sets the
    others apart, e.g. `default (+no_decay)` for `default` and `default/no_decay`."""
    order: list[tuple[list[str], list]] = []
    for label, values in groups.items():
        for names, seen in order:
            if seen == values:
                names.append(label)
                break
        else:
            order.append(([label], values))
    merged: dict[str, list] = {}
    for names, values in order:
        parts = set(names[0].split("/"))
        extra = ["/".join(x for x in n.split("/") if x not in parts) or n for n in names[1:]]
        merged[names[0] + (f" (+{', +'.join(extra)})" if extra else "")] = values
    return merged


def _matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DojoError("plot-schedule: the plot needs matplotlib (pip install matplotlib)") from None
    return plt


def _interp(x, xp, fp):
    """np.interp with linear extrapolation past both ends (for the epoch axis's tick conversion)."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    y = np.interp(x, xp, fp)
    if len(xp) > 1:
        lo, hi = x < xp[0], x > xp[-1]
        y[lo] = fp[0] + (x[lo] - xp[0]) * (fp[1] - fp[0]) / max(xp[1] - xp[0], 1e-12)
        y[hi] = fp[-1] + (x[hi] - xp[-1]) * (fp[-1] - fp[-2]) / max(xp[-1] - xp[-2], 1e-12)
    return y


def _phase_text(p: dict) -> str:
    if p["new_optimizer"]:
        return f"{p['name']}: {p['optimizer']}"
    return f"{p['name']}: {p['optimizer']} (continued)"


def _draw(ax, steps, values, edges, **style) -> None:
    """An LR holds for a whole step k: drawn as a stair over [k - 0.5, k + 0.5] (jumps land on the phase
    boundaries), or as a plain line when the steps are too many to tell apart."""
    if len(steps) > 400:
        ax.plot(steps, values, **style)
    else:
        ax.stairs(values, edges, baseline=None, **style)


def plot_schedule(recipe: "Recipe", out_path: str | Path, plan: dict | None = None) -> dict[str, Any]:
    """Write a PNG of the planned LRs to `out_path` and return the plan (`planned_lrs(recipe)`, or the
    one given).

    Top: the whole run against the optimizer step (epochs on the upper axis), one line per group
    (groups with identical curves share a line), dashed lines at phase boundaries labelled with the
    phase and its optimizer, plateau segments shaded. Bottom (with two phases or more): one panel per
    phase on its own step range, so that short phases stay readable."""
    import numpy as np

    plt = _matplotlib()
    from matplotlib import patheffects

    plan = plan if plan is not None else planned_lrs(recipe)
    steps = np.asarray(plan["steps"], dtype=float)
    curves = {label: np.asarray([math.nan if v is None else v for v in vs], dtype=float)
              for label, vs in merged_groups(plan["groups"]).items()}
    values = [v for vs in plan["groups"].values() for v in vs if v is not None]
    log_y = bool(values) and all(v > 0 for v in values)
    phases = plan["phases"]
    edges = np.arange(len(steps) + 1) + 0.5
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)

    per_phase = len(phases) > 1
    fig = plt.figure(figsize=(12, 8 if per_phase else 5.5), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2 if per_phase else 1, len(phases) if per_phase else 1,
                            height_ratios=[3, 2] if per_phase else None)
    ax = fig.add_subplot(grid[0, :])
    colors = {label: f"C{k % 10}" for k, label in enumerate(curves)}
    try:
        for label, vs in curves.items():
            _draw(ax, steps, vs, edges, linewidth=1.8, color=colors[label], label=label)
        for k, span in enumerate(plan.get("plateau_spans", [])):
            ax.axvspan(span[0] + 0.5, span[1] + 0.5, color="tab:gray", alpha=0.15, linewidth=0,
                       label="plateau: drawn undecayed" if k == 0 else None)
        if log_y:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        lo, hi = ax.get_ylim()
        for p in phases:
            x = p["start"] + 0.5                       # between the phase's first step and the one before
            if p["start"] > 0:
                ax.axvline(x, color="0.3", linestyle="--", linewidth=1)
            # The label goes up the boundary, in the upper or lower half, whichever the curves leave free.
            near = slice(p["start"], min(p["end"], p["start"] + max(1, len(steps) // 25)))
            ys = [v for vs in curves.values() for v in vs[near] if not math.isnan(v)]
            frac = max(((math.log(y / lo) / math.log(hi / lo)) if log_y else (y - lo) / (hi - lo)) for y in ys) \
                if ys and hi > lo else 0.0
            y_text, va = (0.02, "bottom") if frac > 0.5 else (0.98, "top")
            ax.text(x, y_text, " " + _phase_text(p) + " ", transform=ax.get_xaxis_transform(), rotation=90,
                    va=va, ha="left", fontsize=9, color="0.1", zorder=1.5,
                    path_effects=[patheffects.withStroke(linewidth=3, foreground="white")])
        ax.set_xlim(0.5, max(steps[-1], 1) + 0.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate" + (" (log scale)" if log_y else ""))
        title = f"planned learning rates: {plan.get('recipe', recipe.name)} ({len(steps)} steps)"
        if plan["plateau"]:
            title += ("\nplateau segments (shaded; phases " + ", ".join(plan["plateau"]) + ") are drawn at their "
                      "undecayed value: they depend on validation metrics")
        ax.set_title(title, fontsize=11)
        epochs = np.asarray([0.0] + list(plan["epochs"]), dtype=float)
        at = np.concatenate([[0.0], steps])
        if len(epochs) > 1 and epochs[-1] > 0:
            top = ax.secondary_xaxis("top", functions=(lambda s: _interp(s, at, epochs),
                                                        lambda e: _interp(e, epochs, at)))
            top.set_xlabel("epoch", fontsize=9)
            top.tick_params(labelsize=8)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=9,
                  title="parameter group", title_fontsize=9, alignment="left")

        if per_phase:
            for j, p in enumerate(phases):
                sub = fig.add_subplot(grid[1, j], sharey=ax)
                part = slice(p["start"], p["end"])
                for label, vs in curves.items():
                    _draw(sub, steps[part], vs[part], edges[p["start"]:p["end"] + 1], linewidth=1.6,
                          color=colors[label])
                for span in plan.get("plateau_spans", []):
                    if p["start"] <= span[0] < p["end"]:
                        sub.axvspan(span[0] + 0.5, span[1] + 0.5, color="tab:gray", alpha=0.15, linewidth=0)
                sub.set_xlim(p["start"] + 0.5, p["end"] + 0.5)
                e0 = plan["epochs"][p["start"] - 1] if p["start"] > 0 else 0.0
                e1 = plan["epochs"][p["end"] - 1]
                sub.set_title(f"{_phase_text(p)}\n{p['end'] - p['start']} steps, epochs {e0:.4g}-{e1:.4g}",
                              fontsize=8)
                sub.tick_params(labelsize=7)
                sub.xaxis.set_major_locator(plt.MaxNLocator(3, integer=True))
                sub.grid(True, which="major", alpha=0.3)
                if j:
                    sub.tick_params(labelleft=False)
                else:
                    sub.set_ylabel("learning rate", fontsize=9)
            fig.supxlabel("optimizer step, phase by phase", fontsize=9)
        fig.savefig(out)
    finally:
        plt.close(fig)
    return plan


def _fmt(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:.3g}"


@click.command("plot-schedule", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--out", "out_path", default="lr.png", show_default=True, type=click.Path(dir_okay=False),
              help="The PNG to write.")
@handle_errors
def plot_schedule_command(recipe, overrides, out_path):
    """Plot the learning rate of every parameter group over all phases of RECIPE, without training.

    Simulates what `dojo train` would set at each optimizer step: the active optimizer's groups (lr
    times lr_mult, 0 while frozen), lr_scaling with the batch size, the phase schedules and a
    plateau's min_lr. Phase boundaries are dashed lines labelled with the phase and its optimizer.
    Reduce-on-plateau segments depend on validation metrics and are drawn undecayed (an upper bound).
    Nothing is written but the PNG.

    \b
    Examples:
      dojo plot-schedule mnist1d-stages
      dojo plot-schedule my.yaml phases.0.epochs=50 --out plots/lr.png"""
    from .recipe import load_recipe

    r = load_recipe(recipe, list(overrides))
    plan = plot_schedule(r, out_path)
    click.echo(f"wrote {out_path}")
    for p in plan["phases"]:
        # The first group of the phase's optimizer, skipping groups frozen (lr 0) throughout the phase.
        live = [g for g in p["groups"] if any(plan["groups"][g][p["start"]:p["end"]])]
        first = (live or p["groups"] or [None])[0]
        values = plan["groups"][first][p["start"]:p["end"]] if first else []
        lrs = f"lr {_fmt(values[0])} -> {_fmt(values[-1])} ({first})" if values else "no groups"
        note = " [plateau: drawn undecayed]" if p["name"] in plan["plateau"] else ""
        click.echo(f"{p['name']}: steps {p['start'] + 1}-{p['end']} ({p['end'] - p['start']}), "
                   f"{p['optimizer']}, {lrs}{note}")
