"""`dojo report DIR`: one self-contained HTML page that shows what a run did.

    dojo report runs/quickstart-20250101-120000        # writes report.html and report/*.png there

The page (`DIR/report.html`) has every plot inline as a base64 PNG, its CSS inline, no scripts and no
links outside itself, so it can be mailed or archived alone; the same PNGs are in `DIR/report/`.
Each section appears only when the run has its data:

- the header: recipe, status (and the error of a failed run), steps, epochs, wall time, final metrics;
- loss and metric curves against the optimizer step from `metrics.jsonl` (train, val, the final model's
  val and test values), phase boundaries as labelled dashed lines, events such as `rollback` marked;
- the learning rate of every parameter group;
- diagnostics (`diag/*` keys): a heatmap of log10 gradient norms over parameters and steps, update
  ratios, dead-ReLU and saturation fractions, weight norms, throughput and peak memory;
- the confusion matrix on the test split (classification; a predicted-vs-true scatter for regression),
  predicted by the run's final model (or latest checkpoint) rebuilt with `Trainer.from_run_dir`; for an
  unsupervised task (`autoencode`, `vae`: the model's outputs reconstruct its inputs, whatever the data's
  labels are) the first test inputs next to their reconstructions instead, drawn by the data's kind;
- the reliability diagram on the test split before and after temperature scaling, when `dojo calibrate`
  wrote `calibration.json` (drawn by `calibration.reliability_diagram`);
- the test metric of every named model (e.g. a snapshot ensemble) next to the main model's;
- the resolved recipe (`recipe.yaml`).

Figures are drawn on matplotlib `Figure` objects with the Agg canvas, never through pyplot, so no
global figure state is created or left open.

    from torchdojo.report import write_report
    path = write_report("runs/my-run")          # DIR/report.html
"""
from __future__ import annotations

import base64
import html
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from .atomic import atomic_write_text
from .cli_errors import handle_errors
from .errors import DojoError
from .log import fmt
from .runfiles import read_bytes, read_summary, scan_metrics

REPORT_HTML = "report.html"
REPORT_DIR = "report"
SPLIT_STYLE = {"train": dict(color="tab:blue", linewidth=1.2, alpha=0.8),
               "val": dict(color="tab:orange", linewidth=1.6, marker="o", markersize=3.5)}
FINAL_STYLE = {"val": dict(color="tab:orange", marker="D", s=55, edgecolor="black", zorder=5),
               "test": dict(color="tab:green", marker="*", s=140, edgecolor="black", zorder=5)}
# diag/<family>/<name> keys drawn as one line per name: (family, axis label, log axis)
DIAG_LINES = (("update_ratio", "update / weight ratio", True), ("dead_relu", "dead ReLU fraction", False),
              ("saturation", "saturated fraction", False), ("weight_norm", "weight norm", True))
RECON_SAMPLES = 6             # test inputs drawn next to their reconstructions (unsupervised tasks)


# --------------------------------------------------------------------------------------------- the run

@dataclass
class Run:
    """What the report reads from a run directory."""
    dir: Path
    summary: dict[str, Any]
    lines: list[dict[str, Any]]                    # metrics.jsonl, in file order
    recipe_text: str | None
    notes: list[str] = field(default_factory=list)  # problems the reader should know about

    @property
    def name(self) -> str:
        if isinstance(self.summary.get("recipe"), str):
            return self.summary["recipe"]
        match = re.search(r"^name:\s*(\S.*)$", self.recipe_text or "", re.MULTILINE)
        return match.group(1).strip().strip("'\"") if match else self.dir.name

    @property
    def metrics(self) -> dict[str, float]:
        m = self.summary.get("metrics")
        return {k: v for k, v in m.items() if _number(v) is not None} if isinstance(m, dict) else {}

    def steps_of(self, where: Callable[[dict], bool]) -> list[dict]:
        """Lines with a numeric step that satisfy `where`, in file order."""
        return [e for e in self.lines if _number(e.get("step")) is not None and where(e)]


def _number(v) -> float | None:
    """v as a float if it is a finite number, else None (strings, None, booleans, NaN, inf: not plotted)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def read_run(run_dir: str | Path) -> Run:
    """summary.json, metrics.jsonl and recipe.yaml of a run. A directory with none of the three is not a
    run: DojoError; so is a damaged summary.json or metrics.jsonl, naming the file (and line). The
    unfinished last line of a run still writing (or killed while writing) is left out with a note."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DojoError(f"report: {run_dir} is not a directory")
    files = [run_dir / n for n in ("summary.json", "metrics.jsonl", "recipe.yaml")]
    if not any(f.is_file() for f in files):
        raise DojoError(f"report: {run_dir} is not a run directory (no summary.json, metrics.jsonl or recipe.yaml)")
    notes: list[str] = []
    summary = read_summary(files[0]) if files[0].is_file() else {}
    lines: list[dict] = []
    if files[1].is_file():
        scan = scan_metrics(read_bytes(files[1]))
        scan.check(files[1])
        lines = scan.entries
        if scan.torn:
            notes.append("metrics.jsonl: 1 unreadable line(s) skipped")
    # Only shown here (a bad byte as U+FFFD); load_model rebuilds the run through the recipe loader,
    # whose one-line error about a damaged recipe.yaml becomes a note.
    recipe_text = read_bytes(files[2]).decode("utf-8", errors="replace") if files[2].is_file() else None
    return Run(run_dir, summary, lines, recipe_text, notes)


def _is_event(e: dict) -> bool:
    return "event" in e


def _is_final(e: dict) -> bool:
    """The line `_finish` writes: the final model's val and test metrics."""
    return any(k.startswith("test/") for k in e)


def series(lines: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over lines that have it as a number."""
    xs, ys = [], []
    for e in lines:
        x, y = _number(e.get("step")), _number(e.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def keys_with_prefix(lines: list[dict], prefix: str) -> list[str]:
    """The part after `prefix` of every key that starts with it, in first-seen order."""
    seen: dict[str, None] = {}
    for e in lines:
        for k in e:
            if k.startswith(prefix) and len(k) > len(prefix):
                seen[k[len(prefix):]] = None
    return list(seen)


def phase_starts(run: Run) -> list[tuple[float, str]]:
    """(x, phase name) where each phase starts: half a step after the last line of the phase before."""
    starts: list[tuple[float, str]] = []
    prev_step, prev_phase = None, None
    for e in run.steps_of(lambda e: not _is_event(e) and isinstance(e.get("phase"), str)):
        step = float(e["step"])
        if e["phase"] != prev_phase:
            starts.append((step - 0.5 if prev_step is None else prev_step + 0.5, e["phase"]))
        prev_step, prev_phase = step, e["phase"]
    return starts


# --------------------------------------------------------------------------------------------- figures

def _figure(width: float = 9.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    fig.clear()
    return path


def _mark_phases(ax, starts: list[tuple[float, str]]) -> None:
    """Dashed lines at phase boundaries, each phase's name up its start (when there are several)."""
    if len(starts) < 2:
        return
    from matplotlib import patheffects

    left = ax.get_xlim()[0]
    for k, (x, name) in enumerate(starts):
        if k:
            ax.axvline(x, color="0.35", linestyle="--", linewidth=1)
        ax.annotate(name, (max(x, left), 1.0), xycoords=("data", "axes fraction"), xytext=(2, -4),
                    textcoords="offset points", rotation=90, va="top", ha="left", fontsize=8, color="0.15",
                    path_effects=[patheffects.withStroke(linewidth=3, foreground="white")])


def _mark_events(ax, events: list[dict]) -> None:
    for k, e in enumerate(events):
        ax.axvline(float(e["step"]), color="tab:red", linestyle=":", linewidth=1.5,
                   label="event" if k == 0 else None)
        ax.text(float(e["step"]), 0.02, f" {e['event']}", transform=ax.get_xaxis_transform(), rotation=90,
                va="bottom", ha="left", fontsize=8, color="tab:red")


def _finish_axes(ax, ylabel: str, starts, log: bool = False, legend: bool = True) -> None:
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    _mark_phases(ax, starts)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _log_scale(values, span: float = 10.0) -> bool:
    """A log axis helps when the values are all positive and max / min exceeds `span` (a decade)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > span


def _final_markers(ax, run: Run, metric: str) -> None:
    """The final model's val and test values at the last step (stars/diamonds)."""
    final = run.steps_of(_is_final)
    if not final:
        return
    e = final[-1]
    for split in ("val", "test"):
        v = _number(e.get(f"{split}/{metric}"))
        if v is not None:
            ax.scatter([float(e["step"])], [v], label=f"{split}, final model", **FINAL_STYLE[split])


def plot_loss(run: Run, path: Path, starts) -> Path | None:
    """Training loss (and its terms) and validation loss against the step; events marked."""
    train = run.steps_of(lambda e: not _is_event(e) and not _is_final(e))
    xs, ys = series(train, "train/loss")
    vx, vy = series(train, "val/loss")
    # Loss terms, logged when there are several (diagnostics logs a single term too: it is the loss).
    term_prefix = "train/loss/" if keys_with_prefix(train, "train/loss/") else "diag/loss/"
    terms = keys_with_prefix(train, term_prefix)
    terms = terms if len(terms) > 1 else []
    if not ys and not vy and not terms:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    if ys:
        ax.plot(xs, ys, label="train", **SPLIT_STYLE["train"])
    for k, term in enumerate(terms):
        tx, ty = series(train, term_prefix + term)
        ax.plot(tx, ty, linestyle="--", linewidth=1, color=f"C{(k + 4) % 10}", label=f"train: {term}")
    if vy:
        ax.plot(vx, vy, label="val", **SPLIT_STYLE["val"])
    _final_markers(ax, run, "loss")
    _mark_events(ax, run.steps_of(lambda e: _is_event(e) and isinstance(e.get("event"), str)))
    values = ys + vy
    _finish_axes(ax, "loss" + (" (log scale)" if _log_scale(values) else ""), starts, log=_log_scale(values))
    ax.set_title(f"loss: {run.name}", fontsize=11)
    return _save(fig, path)


def val_metric_names(run: Run) -> list[str]:
    """Metrics of the main model in val/test lines (`val/<metric>`, one slash), loss and exact copies of
    the loss (the classifier's nll) left out."""
    lines = run.steps_of(lambda e: not _is_event(e))
    names = [n for n in keys_with_prefix(lines, "val/") + keys_with_prefix(lines, "test/") if "/" not in n]
    names = list(dict.fromkeys(n for n in names if n != "loss"))
    loss = series(lines, "val/loss")
    return [n for n in names if not (loss[1] and series(lines, f"val/{n}") == loss)]


def plot_metric(run: Run, metric: str, path: Path, starts) -> Path | None:
    """One validation metric against the step, with the final model's val and test values."""
    lines = run.steps_of(lambda e: not _is_event(e) and not _is_final(e))
    vx, vy = series(lines, f"val/{metric}")
    final = run.steps_of(_is_final)
    if not vy and not any(_number(e.get(f"{s}/{metric}")) is not None for e in final for s in ("val", "test")):
        return None
    fig = _figure(9.0, 3.6)
    ax = fig.add_subplot()
    if vy:
        ax.plot(vx, vy, label="val", **SPLIT_STYLE["val"])
    _final_markers(ax, run, metric)
    _finish_axes(ax, metric, starts)
    ax.set_title(f"{metric}: {run.name}", fontsize=11)
    return _save(fig, path)


def plot_lr(run: Run, path: Path, starts) -> Path | None:
    """The learning rate of each parameter group (`lr/group<i>`, else `diag/lr/group<i>`)."""
    lines = run.steps_of(lambda e: not _is_event(e))
    prefix = "lr/" if keys_with_prefix(lines, "lr/") else "diag/lr/"
    groups = [g for g in keys_with_prefix(lines, prefix) if series(lines, prefix + g)[1]]
    if not groups:
        return None
    fig = _figure(9.0, 3.6)
    ax = fig.add_subplot()
    values = []
    for k, g in enumerate(groups):
        xs, ys = series(lines, prefix + g)
        values += ys
        ax.plot(xs, ys, color=f"C{k % 10}", linewidth=1.6 if k == 0 else 1.2,
                linestyle="-" if k < 10 else "--", label=g)
    _finish_axes(ax, "learning rate" + (" (log scale)" if _log_scale(values) else ""), starts,
                 log=_log_scale(values))
    ax.set_title(f"learning rate per parameter group: {run.name}", fontsize=11)
    return _save(fig, path)


def grad_norm_grid(run: Run) -> tuple[list[str], list[float], list[list[float]]]:
    """(parameter names in first-seen order, logged steps in order, norms[parameter][step column]);
    NaN where a parameter has no value at a step."""
    lines = run.steps_of(lambda e: not _is_event(e))
    params = keys_with_prefix(lines, "diag/grad_norm/")
    columns: dict[float, dict[str, float]] = {}
    for e in lines:
        row = {p: _number(e.get(f"diag/grad_norm/{p}")) for p in params}
        row = {p: v for p, v in row.items() if v is not None}
        if row:
            columns.setdefault(float(e["step"]), {}).update(row)
    steps = sorted(columns)
    return params, steps, [[columns[s].get(p, math.nan) for s in steps] for p in params]


def _phase_at(starts: list[tuple[float, str]], step: float) -> str | None:
    name = None
    for x, n in starts:
        if step >= x:
            name = n
    return name


def plot_grad_heatmap(run: Run, path: Path, starts) -> Path | None:
    """Rows: parameters; columns: logged steps; colour: log10 of the gradient norm (grey: missing or 0)."""
    import numpy as np

    params, steps, grid = grad_norm_grid(run)
    if not params or not steps:
        return None
    norms = np.asarray(grid, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(norms > 0, np.log10(norms), np.nan)
    logs[~np.isfinite(logs)] = np.nan
    fig = _figure(10.0, min(2.2 + 0.22 * len(params), 24.0))
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(logs), aspect="auto", interpolation="nearest", cmap=cmap)
    fig.colorbar(image, ax=ax, label="log10 gradient norm", pad=0.01)
    every = max(1, math.ceil(len(params) / 60))
    ax.set_yticks(range(0, len(params), every), [params[i] for i in range(0, len(params), every)],
                  fontsize=7 if len(params) > 20 else 8)
    ticks = sorted(set(np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int).tolist()))
    ax.set_xticks(ticks, [f"{steps[i]:g}" for i in ticks], fontsize=8)
    ax.set_xlabel("optimizer step (logged steps)")
    phases = [_phase_at(starts, s) for s in steps]
    if len(starts) > 1:
        for i in range(1, len(steps)):
            if phases[i] != phases[i - 1]:
                ax.axvline(i - 0.5, color="white", linestyle="--", linewidth=1.2)
                ax.text(i - 0.5, 1.0, f" {phases[i]}", transform=ax.get_xaxis_transform(), va="bottom",
                        ha="left", fontsize=8)
    ax.set_title(f"gradient norm per parameter: {run.name}", fontsize=11, pad=14)
    return _save(fig, path)


def plot_diag_lines(run: Run, family: str, path: Path, starts, ylabel: str, log: bool = False) -> Path | None:
    """One line per name of `diag/<family>/<name>`; a log y axis when asked and all values are > 0."""
    lines = run.steps_of(lambda e: not _is_event(e))
    curves = {name: series(lines, f"diag/{family}/{name}") for name in keys_with_prefix(lines, f"diag/{family}/")}
    curves = {name: xy for name, xy in curves.items() if xy[1]}
    if not curves:
        return None
    names = list(curves)
    fig = _figure()
    ax = fig.add_subplot()
    for k, name in enumerate(names):
        ax.plot(*curves[name], color=f"C{k % 10}", linestyle=("-", "--", ":", "-.")[(k // 10) % 4], linewidth=1.2,
                label=name if k < 30 else None)
    log = log and _log_scale([v for _, ys in curves.values() for v in ys], 1.0)
    _finish_axes(ax, ylabel + (" (log scale)" if log else ""), starts, log=log)
    ax.set_title(f"{ylabel}: {run.name}" + (f" (legend: first 30 of {len(names)})" if len(names) > 30 else ""),
                 fontsize=11)
    return _save(fig, path)


def plot_throughput(run: Run, path: Path, starts) -> Path | None:
    """`diag/samples_per_sec` and `diag/peak_memory_mb`, one panel each."""
    lines = run.steps_of(lambda e: not _is_event(e))
    panels = [(k, label) for k, label in (("diag/samples_per_sec", "samples / s"),
                                          ("diag/peak_memory_mb", "peak memory (MB)")) if series(lines, k)[1]]
    if not panels:
        return None
    fig = _figure(9.0, 2.6 * len(panels) + 0.6)
    for j, (key, label) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, j + 1)
        ax.plot(*series(lines, key), color=f"C{j}", linewidth=1.4)
        _finish_axes(ax, label, starts, legend=False)
    fig.suptitle(f"throughput and memory: {run.name}", fontsize=11)
    return _save(fig, path)


def plot_confusion(counts, class_names: list[str], path: Path, title: str) -> Path:
    """Counts with true classes as rows and predicted classes as columns, each cell annotated."""
    import numpy as np

    counts = np.asarray(counts)
    k = len(class_names)
    side = min(3.0 + 0.45 * k, 16.0)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="samples", pad=0.02)
    tilt = k > 6 and max(len(n) for n in class_names) > 2
    ax.set_xticks(range(k), class_names, rotation=45 if tilt else 0, ha="right" if tilt else "center", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 30:
        top = counts.max() if counts.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8 if k <= 12 else 6,
                        color="white" if top and counts[i, j] > top / 2 else "black")
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


def plot_pred_vs_true(pred, true, path: Path, title: str) -> Path:
    """Regression: predicted against true target values (original units), the diagonal for reference."""
    import numpy as np

    pred, true = np.asarray(pred, dtype=float).ravel(), np.asarray(true, dtype=float).ravel()
    fig = _figure(5.6, 5.2)
    ax = fig.add_subplot()
    ax.scatter(true, pred, s=12, alpha=0.6, color="tab:blue", edgecolor="none")
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="0.3", linewidth=1, label="prediction = truth")
    ax.set_xlabel("true value")
    ax.set_ylabel("predicted value")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


def _show_image(ax, a, lo: float, hi: float) -> None:
    """One (C, H, W) input on `ax`: RGB for 3 channels (scaled by [lo, hi]), else its first channel in grey."""
    import numpy as np

    if a.shape[0] == 3:
        ax.imshow(np.clip((np.moveaxis(a, 0, -1) - lo) / (hi - lo or 1.0), 0, 1), interpolation="nearest")
    else:
        ax.imshow(a[0], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_reconstructions(x, recon, kind: str, path: Path, title: str, feature_names: list[str] = ()) -> Path:
    """Inputs `x` and their reconstructions `recon` (arrays of the same shape, one row per sample), one
    panel per sample drawn by the data's kind: images (C, H, W) as an input row above a reconstruction row
    (sharing each sample's grey scale), sequences (C, L) and tables (F,) as input and reconstruction lines
    overlaid. Each panel's title gives the sample's mean squared error per value."""
    import numpy as np

    x, recon = np.asarray(x, dtype=float), np.asarray(recon, dtype=float)
    n = len(x)
    errors = ((recon - x) ** 2).reshape(n, -1).mean(1)
    if kind == "image" and x.ndim == 4:
        fig = _figure(max(4.0, 1.7 * n + 1.0), 4.0)
        axes = fig.subplots(2, n, squeeze=False)
        for j in range(n):
            lo, hi = float(min(x[j].min(), recon[j].min())), float(max(x[j].max(), recon[j].max()))
            _show_image(axes[0][j], x[j], lo, hi)
            _show_image(axes[1][j], recon[j], lo, hi)
            axes[0][j].set_title(f"#{j}  mse {errors[j]:.3g}", fontsize=9)
        axes[0][0].set_ylabel("input")
        axes[1][0].set_ylabel("reconstruction")
    else:                               # sequences (C, L) and tables (F,): values against position
        cols = min(n, 3)
        rows = math.ceil(n / cols)
        fig = _figure(9.0, 2.3 * rows + 0.8)
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        table = kind == "tabular" and x.ndim == 2
        for j in range(n):
            ax = axes[j]
            xs = x[j].reshape(1, -1) if table or x.ndim != 3 else x[j]          # (channels, positions)
            rs = recon[j].reshape(xs.shape)
            pos = np.arange(xs.shape[1])
            for c in range(len(xs)):
                style = dict(marker="o", markersize=3) if table else {}
                ax.plot(pos, xs[c], color=f"C{c % 10}", linewidth=1.4, label="input" if c == 0 else None, **style)
                ax.plot(pos, rs[c], color=f"C{c % 10}", linewidth=1.2, linestyle="--", alpha=0.85,
                        label="reconstruction" if c == 0 else None, **style)
            if table and 0 < len(feature_names) == xs.shape[1] <= 20:
                ax.set_xticks(pos, feature_names, rotation=90, fontsize=7)
            ax.set_title(f"#{j}  mse {errors[j]:.3g}", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=8)
        for ax in axes[n:]:
            ax.set_visible(False)
        axes[0].legend(fontsize=8, loc="best")
        fig.supxlabel("feature" if table else "position", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def named_model_metrics(metrics: dict[str, float]) -> tuple[str, str, dict[str, float]] | None:
    """(split, metric, {model label: value}) for a bar chart of the named models (`<split>/<name>/<metric>`
    keys whose metric the main model also has) next to the main model; None without named models."""
    for split in ("test", "val"):
        main = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{split}/") and k.count("/") == 1}
        names = list(dict.fromkeys(k.split("/")[1] for k in metrics
                                   if k.startswith(f"{split}/") and k.count("/") == 2 and k.split("/")[2] in main))
        if not names:
            continue
        preferred = [m for m in ("accuracy", "r2", "f1_macro", "mse") if m in main]
        metric = (preferred or [m for m in main if m != "loss"] or list(main))[0]
        values = {"main model": main[metric]}
        values.update({n: metrics[f"{split}/{n}/{metric}"] for n in names if f"{split}/{n}/{metric}" in metrics})
        return split, metric, values
    return None


def plot_models(split: str, metric: str, values: dict[str, float], path: Path, title: str) -> Path:
    fig = _figure(max(4.5, 1.4 * len(values) + 2.5), 3.8)
    ax = fig.add_subplot()
    labels = list(values)
    bars = ax.bar(labels, [values[k] for k in labels], color=[f"C{i % 10}" for i in range(len(labels))],
                  edgecolor="black", linewidth=0.6)
    ax.bar_label(bars, labels=[f"{values[k]:.4g}" for k in labels], fontsize=9, padding=2)
    ax.set_ylabel(f"{split} {metric}")
    ax.margins(y=0.15)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- model sections

def _test_predictions(trainer, model):
    """Outputs and labels of `model` on the test split, in eval mode without gradients."""
    import torch

    model.eval()
    outs, ys = [], []
    with torch.no_grad():
        for batch in trainer.eval_loader("test"):
            outs.append(model(batch["x"]).float().cpu())
            ys.append(batch["y"].cpu())
    return torch.cat(outs), torch.cat(ys)


def confusion_counts(labels, predictions, k: int):
    """counts[true][predicted] for class indices in [0, k)."""
    import torch

    return torch.bincount(labels.long() * k + predictions.long(), minlength=k * k).reshape(k, k)


@dataclass
class Plot:
    """One image of the report: `key` is its file name (without .png) and the <img> id."""
    key: str
    path: Path
    alt: str
    caption: str = ""


@dataclass
class Section:
    id: str
    title: str
    plots: list[Plot] = field(default_factory=list)
    html: str = ""          # extra content (a table), already escaped


def load_model(run: Run):
    """(trainer, main model, what the model is) rebuilt from the run directory, or None with a note."""
    if run.recipe_text is None:
        return None
    from .checkpoint import WEIGHTS
    from .trainer import Trainer

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = Trainer.from_run_dir(run.dir, quiet=True)
            model = trainer.trained_models(calibrated=False)[""]     # the same argmax as the calibrated one
        run.notes += [f"warning: {w.message}" for w in caught if issubclass(w.category, UserWarning)]
    except (DojoError, OSError, RuntimeError, ValueError) as exc:   # a damaged run still gets its curves
        run.notes.append(f"no test-split plots: {exc}")
        return None
    if len(trainer.state.data.split("test")) == 0:
        run.notes.append("no test-split plots: the test split is empty")
        return None
    finished = (run.dir / "checkpoints" / "final" / WEIGHTS).is_file()
    source = "the final model" if finished else f"the model of the checkpoint at step {trainer.checkpoint_step}"
    return trainer, model, source


def model_sections(run: Run, out: Path, say: Callable[[str], None]) -> list[Section]:
    """From the run's model on the test split: the confusion matrix and, after `dojo calibrate`, the
    reliability diagram (classification), predicted vs true values (regression), or, when the run's task
    is unsupervised (an autoencoder's: `task_type` "any"), inputs next to their reconstructions."""
    say("loading the model")
    loaded = load_model(run)
    if loaded is None:
        return []
    trainer, model, source = loaded
    info = trainer.state.data.info
    say("predicting the test split")
    outputs, y = _test_predictions(trainer, model)
    if getattr(trainer.state.task, "task_type", None) == "any":      # unsupervised: outputs reconstruct x
        return reconstruction_section(run, trainer.state.data.split("test").x, outputs, info, source, out, say)
    if info.task_type != "classification":
        pred = info.target_to_original(outputs.double().reshape(y.shape))
        path = plot_pred_vs_true(pred.numpy(), info.target_to_original(y.double()).numpy(), out / "pred_vs_true.png",
                                 f"predicted vs true, test split ({len(y)} samples)")
        return [Section("pred-vs-true", "Predicted vs true (test split)", [Plot(
            "pred_vs_true", path, "predicted against true values on the test split",
            f"Each point is one test sample, predicted by {source} (original units).")])]
    k = info.num_outputs
    names = [str(c) for c in info.class_names] or [str(i) for i in range(k)]
    counts = confusion_counts(y, outputs.argmax(1), k)
    path = plot_confusion(counts.numpy(), names, out / "confusion_matrix.png",
                          f"confusion matrix, test split ({len(y)} samples)")
    sections = [Section("confusion", "Confusion matrix (test split)", [Plot(
        "confusion_matrix", path, "confusion matrix on the test split",
        f"Rows: true class; columns: class predicted by {source}.")], _confusion_table(counts.tolist(), names))]
    return sections + reliability_section(run, outputs, y, out, say)


def reconstruction_section(run: Run, x, outputs, info, source: str, out: Path,
                           say: Callable[[str], None]) -> list[Section]:
    """The first RECON_SAMPLES test inputs and their reconstructions (the model's outputs, e.g. an
    autoencoder's; a VAE's `forward` decodes the mean code), with the mean squared error per value."""
    x = x.float().cpu()
    if tuple(outputs.shape) != tuple(x.shape):
        run.notes.append(f"no reconstructions: the model's outputs have shape {tuple(outputs.shape[1:])}, "
                         f"its inputs {tuple(x.shape[1:])}")
        return []
    say("drawing reconstructions")
    n = min(RECON_SAMPLES, len(x))
    mse_all = _mse(outputs, x)
    mse_shown = _mse(outputs[:n], x[:n])
    path = plot_reconstructions(x[:n].numpy(), outputs[:n].numpy(), info.kind, out / "reconstructions.png",
                                f"inputs and reconstructions, first {n} test samples: {run.name}",
                                feature_names=[str(f) for f in info.feature_names])
    scale = " (standardised, as the model sees them)" if info.x_mean is not None else ""
    return [Section("reconstructions", "Reconstructions (test split)", [Plot(
        "reconstructions", path, "test inputs and their reconstructions",
        f"The first {n} test inputs{scale} and their reconstructions by {source}. Mean squared error per "
        f"value: {mse_shown:.4g} over these {n} samples, {mse_all:.4g} over the test split ({len(x)} samples).")])]


def _mse(a, b) -> float:
    """Mean squared difference per value of two tensors of the same shape."""
    return float(((a.double() - b.double()) ** 2).mean())


def reliability_section(run: Run, logits, y, out: Path, say: Callable[[str], None]) -> list[Section]:
    """The test split's reliability diagram before and after the temperature in calibration.json."""
    import torch

    from .calibrate import load_calibration
    from .calibration import reliability_diagram

    try:
        scaling = load_calibration(run.dir)
    except DojoError as exc:
        run.notes.append(f"no reliability diagram: {exc}")
        return []
    if scaling is None:
        return []
    say("drawing the reliability diagram")
    z, t = logits.double(), scaling.temperature
    path = out / "reliability.png"
    names = ("before", f"after temperature scaling (T = {t:.3g})")
    ece = reliability_diagram(torch.softmax(z, 1), y, path, title=f"{run.name}, test split",
                              probs_after=scaling.probs(z), names=names)
    return [Section("reliability", "Reliability diagram (test split)", [Plot(
        "reliability", path, "reliability diagram on the test split before and after temperature scaling",
        f"ECE {100 * ece['ece']:.2f}% before, {100 * ece['ece_after']:.2f}% after temperature scaling "
        f"(T = {t:.4g} from calibration.json).")])]


def _confusion_table(counts: list[list[int]], names: list[str]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(n)}</th>" for n in names)
    rows = "".join(f"<tr><th>{e(n)}</th>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                   for n, row in zip(names, counts))
    return (f'<details><summary>counts</summary><table class="counts" id="confusion-counts">'
            f"<tr><th>true \\ predicted</th>{head}</tr>{rows}</table></details>")


# --------------------------------------------------------------------------------------------- sections

def curve_sections(run: Run, out: Path, say: Callable[[str], None]) -> list[Section]:
    starts = phase_starts(run)
    sections = []
    say("plotting loss and metric curves")
    figs = []
    if plot_loss(run, out / "loss.png", starts):
        figs.append(Plot("loss", out / "loss.png", "loss curves",
                         "Train loss (mean since the previous log point), validation loss, and the final "
                         "model's val and test values; dashed lines are phase boundaries."))
    for metric in val_metric_names(run):
        key = "metric_" + re.sub(r"[^A-Za-z0-9_.-]", "_", metric)
        if plot_metric(run, metric, out / f"{key}.png", starts):
            figs.append(Plot(key, out / f"{key}.png", f"validation {metric}"))
    events = run.steps_of(lambda e: _is_event(e) and isinstance(e.get("event"), str))
    if figs or events:
        sections.append(Section("curves", "Loss and metrics", figs, _events_table(events)))
    if plot_lr(run, out / "lr.png", starts):
        sections.append(Section("lr", "Learning rate", [Plot("lr", out / "lr.png", "LR per parameter group")]))
    say("plotting diagnostics")
    figs = []
    if plot_grad_heatmap(run, out / "grad_norm_heatmap.png", starts):
        figs.append(Plot("grad_norm_heatmap", out / "grad_norm_heatmap.png", "gradient norm heatmap",
                         "log10 of each parameter's gradient norm at each logged step (grey: missing or zero)."))
    for family, label, log in DIAG_LINES:
        if plot_diag_lines(run, family, out / f"{family}.png", starts, label, log):
            figs.append(Plot(family, out / f"{family}.png", label))
    if plot_throughput(run, out / "throughput.png", starts):
        figs.append(Plot("throughput", out / "throughput.png", "throughput and peak memory"))
    if figs:
        sections.append(Section("diagnostics", "Diagnostics", figs))
    return sections


def _events_table(events: list[dict]) -> str:
    if not events:
        return ""
    e = html.escape
    rows = "".join(f"<tr><td>{e(str(ev['step']))}</td><td>{e(str(ev['event']))}</td><td>"
                   + e(", ".join(f"{k}={v}" for k, v in ev.items() if k not in ("step", "event"))) + "</td></tr>"
                   for ev in events)
    return f'<table id="events"><tr><th>step</th><th>event</th><th>details</th></tr>{rows}</table>'


def models_section(run: Run, out: Path) -> list[Section]:
    found = named_model_metrics(run.metrics)
    if found is None:
        return []
    split, metric, values = found
    path = plot_models(split, metric, values, out / "models.png", f"{split} {metric} per model: {run.name}")
    return [Section("models", "Ensemble and named models", [Plot("models", path, f"{split} {metric} per model")])]


# --------------------------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d232b; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 2rem 3rem; background: #fff; }
h1 { margin: 0 0 .3rem; font-size: 1.7rem; }
h2 { border-bottom: 2px solid #e3e6ea; padding-bottom: .2rem; margin-top: 2.2rem; }
nav { font-size: .9rem; margin: .6rem 0 1rem; } nav a { margin-right: .9rem; color: #2458a6; }
.status { display: inline-block; padding: .1rem .6rem; border-radius: 1rem; font-weight: 600; color: #fff;
          background: #6b7480; }
.status.finished { background: #2e8540; } .status.interrupted { background: #c27c0e; }
.status.failed { background: #b8322a; }
.facts span { margin-right: 1.3rem; } .error { color: #b8322a; font-family: monospace; white-space: pre-wrap; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #dde1e6; padding: .25rem .6rem; }
td { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f0f2f5; text-align: left; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eceef1; }
figcaption { font-size: .85rem; color: #555e69; }
pre { background: #f3f4f6; padding: .8rem 1rem; overflow-x: auto; font-size: .85rem; border-radius: 4px; }
.notes { color: #7a5a00; font-size: .9rem; }
"""


def _duration(seconds) -> str:
    s = _number(seconds)
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    minutes, sec = divmod(int(round(s)), 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def metrics_table(metrics: dict[str, float]) -> str:
    """Rows: metric names (`ensemble/accuracy` for named models); columns: splits."""
    if not metrics:
        return ""
    e = html.escape
    order = ["train", "val", "test"]
    splits = sorted({k.split("/", 1)[0] for k in metrics if "/" in k},
                    key=lambda s: order.index(s) if s in order else 9)
    names = list(dict.fromkeys(k.split("/", 1)[1] for k in metrics if "/" in k))
    head = "".join(f"<th>{e(s)}</th>" for s in splits)
    rows = "".join(f"<tr><th>{e(n)}</th>" + "".join(f"<td>{e(fmt(metrics.get(f'{s}/{n}', '')))}</td>"
                                                   for s in splits) + "</tr>" for n in names)
    return f'<table id="final-metrics"><tr><th>metric</th>{head}</tr>{rows}</table>'


def header_html(run: Run) -> str:
    e = html.escape
    s = run.summary
    status = s.get("status") if isinstance(s.get("status"), str) else "unknown"
    last = run.steps_of(lambda e: True)
    steps = s.get("steps", last[-1]["step"] if last else "-")
    epochs = s.get("epochs", next((x["epoch"] for x in reversed(last) if _number(x.get("epoch")) is not None), "-"))
    facts = [f"<span><b>steps</b> {e(fmt(steps))}</span>", f"<span><b>epochs</b> {e(fmt(epochs))}</span>",
             f"<span><b>wall time</b> {e(_duration(s.get('wall_seconds')))}</span>"]
    badge = f'<span class="status {e(status)}" id="status">{e(status)}</span>'
    parts = [f"<h1>{e(run.name)}</h1>", f'<p class="facts">{badge} {" ".join(facts)}</p>',
             f"<p>run directory: <code>{e(str(run.dir))}</code></p>"]
    if s.get("error"):
        parts.append(f'<p class="error" id="error">{e(str(s["error"]))}</p>')
    if s.get("stop_reason"):
        parts.append(f"<p>stopped early: {e(str(s['stop_reason']))}</p>")
    return "\n".join(parts)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(run: Run, sections: list[Section]) -> str:
    e = html.escape
    table = metrics_table(run.metrics)
    if table:
        sections = [Section("metrics", "Final metrics", html=table)] + sections
    nav = " ".join(f'<a href="#{s.id}">{e(s.title)}</a>' for s in sections)
    body = []
    for s in sections:
        figs = "".join(f'<figure><img id="img-{f.key}" alt="{e(f.alt)}" src="{_data_uri(f.path)}">'
                       + (f"<figcaption>{e(f.caption)}</figcaption>" if f.caption else "") + "</figure>"
                       for f in s.plots)
        body.append(f'<section id="{s.id}"><h2>{e(s.title)}</h2>{figs}{s.html}</section>')
    notes = "".join(f"<li>{e(n)}</li>" for n in run.notes)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(run.name)}: torchdojo report</title><style>{CSS}</style></head>\n<body><main>\n"
            f"<header id=\"summary\">{header_html(run)}</header>\n"
            + (f"<nav>{nav}</nav>\n" if sections else "") + "\n".join(body)
            + (f'\n<section id="notes"><h2>Notes</h2><ul class="notes">{notes}</ul></section>' if notes else "")
            + "\n</main></body></html>\n")


def write_report(run_dir: str | Path, progress: Callable[[str], None] | None = None,
                 notes: list[str] | None = None) -> Path:
    """Write `run_dir/report.html` and its PNGs in `run_dir/report/` (older PNGs there are removed);
    return the HTML's path. `progress` receives a short text before each stage; `notes`, if given, is
    extended with what the report could not show and why (also listed at the end of the page)."""
    say = progress or (lambda text: None)
    run = read_run(run_dir)
    out = run.dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    sections = curve_sections(run, out, say)
    sections += model_sections(run, out, say)
    sections += models_section(run, out)
    if run.recipe_text is not None:
        recipe = f'<pre id="recipe-yaml">{html.escape(run.recipe_text)}</pre>'
        sections.append(Section("recipe", "Recipe (recipe.yaml)", html=recipe))
    say("writing report.html")
    path = run.dir / REPORT_HTML
    atomic_write_text(path, render_html(run, sections))
    if notes is not None:
        notes.extend(run.notes)
    return path


@click.command("report", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@handle_errors
def report_command(run_dir, quiet):
    """Write RUN_DIR/report.html: one self-contained page (plots inline) showing what the run did.

    Loss and metric curves with phase boundaries, learning rates, diagnostics (gradient-norm heatmap,
    update ratios, dead ReLUs) when logged, the test confusion matrix (test reconstructions for
    autoencoders), the reliability diagram after `dojo calibrate`, ensemble members, and the recipe.
    The PNGs also go to RUN_DIR/report/.

    \b
    Example:
      dojo report runs/quickstart-20250101-120000
      xdg-open runs/quickstart-20250101-120000/report.html"""
    from rich.console import Console

    notes: list[str] = []
    if quiet:
        path = write_report(run_dir, notes=notes)
    else:
        console = Console(stderr=True)
        with console.status("report: reading the run") as status:
            path = write_report(run_dir, progress=lambda text: status.update(f"report: {text}"), notes=notes)
    if not quiet:
        for note in notes:
            click.echo(f"note: {note}", err=True)
        plots = len(list((Path(run_dir) / REPORT_DIR).glob("*.png")))
        click.echo(f"wrote {path} ({plots} plots, also in {Path(run_dir) / REPORT_DIR}/)")
