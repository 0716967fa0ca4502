"""Ablations with confidence intervals: `dojo compare`.

    dojo compare RECIPE --vary phases.main.optimizer.lr=3e-3,1e-3 --seeds 3 [--jobs 2] [key.path=value ...]
    dojo compare runs/compare-20250101-120000 [runs/other ...] [--out DIR]

The first form trains every variant (the cartesian product of the `--vary` values; the first value of
each `--vary` is the baseline) with every seed, each run in `OUT/<variant>/seed<k>/`, and compares them;
the second compares runs that already exist, grouping runs whose recipe.yaml differs only in `seed`.

The statistics are plain small-sample ones, in pure functions that the tests check against scipy:

- `mean_ci(values)`: mean, sample standard deviation s (ddof=1), n, and the Student-t confidence interval
  of the mean, mean ± t_{(1+c)/2, n-1} · s / sqrt(n). With n = 1 there is no interval (None, "n/a").
- `welch_diff_ci(variant, baseline)`: the difference of means d = mean(variant) - mean(baseline) with
  Welch's interval d ± t_{(1+c)/2, df} · se, se = sqrt(s_v²/n_v + s_b²/n_b) and the Welch-Satterthwaite
  df (no equal-variance assumption); the same t statistic, df and p-value as
  `scipy.stats.ttest_ind(variant, baseline, equal_var=False)`. A variant is marked better or worse when
  this interval excludes 0 (equivalently p < 1 - c), in the metric's direction (`higher_is_better`).

Seeds change the initialisation, the batch order and, unless the recipe sets `data.split_seed`, the
train/val/test split: the spread over seeds is the spread a user would see when rerunning a recipe.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import click

from .cli_errors import handle_errors
from .errors import DojoError, choices_text, did_you_mean
from .run_lock import LOCK_NAME
from .runfiles import read_json_object, read_summary

JSON_NAME = "compare.json"
MD_NAME = "compare.md"
PNG_NAME = "compare.png"

# The last part of a metric name (`test/loss`, `test/ensemble/nll`) decides its direction.
LOWER_IS_BETTER = frozenset({"loss", "nll", "ece", "brier", "mse", "mae", "rmse"})
# The metric drawn in compare.png when --metric does not choose one: the first of these that exists.
MAIN_METRICS = ("test/accuracy", "test/mse", "test/loss")
_PER_CLASS = re.compile(r"/\d+$")


# -- statistics (pure functions) ------------------------------------------------------------------

def _t_quantile(confidence: float, df: float) -> float:
    from scipy import stats
    return float(stats.t.ppf((1 + confidence) / 2, df))


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise DojoError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, sample std (ddof=1), n and the Student-t interval of the mean.

    Returns {"n", "mean", "std", "ci_low", "ci_high"}; `std` and the interval are None when n < 2
    (one run says nothing about the spread), `mean` is None when n == 0. With s == 0 the interval
    is the single point [mean, mean]."""
    _check_confidence(confidence)
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    mean = math.fsum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci_low": None, "ci_high": None}
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = _t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def welch_diff_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, Any] | None:
    """Welch's interval for mean(a) - mean(b) (a: the variant, b: the baseline).

    Returns {"diff", "se", "df", "t", "p", "ci_low", "ci_high", "excludes_zero"}, or None when either
    side has fewer than 2 values. `t`, `df` and `p` are those of scipy's
    `ttest_ind(a, b, equal_var=False)`; `excludes_zero` is True iff the interval lies on one side of 0
    (p < 1 - confidence). When both samples have zero spread the interval is the point [diff, diff]."""
    _check_confidence(confidence)
    xa, xb = [float(v) for v in a], [float(v) for v in b]
    na, nb = len(xa), len(xb)
    if na < 2 or nb < 2:
        return None
    from scipy import stats

    ma, mb = math.fsum(xa) / na, math.fsum(xb) / nb
    va = math.fsum((x - ma) ** 2 for x in xa) / (na - 1)
    vb = math.fsum((x - mb) ** 2 for x in xb) / (nb - 1)
    diff = ma - mb
    qa, qb = va / na, vb / nb
    se = math.sqrt(qa + qb)
    if se == 0:       # both constant: no noise to speak of; the difference is exact
        return {"diff": diff, "se": 0.0, "df": None, "t": None, "p": 1.0 if diff == 0 else 0.0,
                "ci_low": diff, "ci_high": diff, "excludes_zero": diff != 0}
    df = (qa + qb) ** 2 / (qa ** 2 / (na - 1) + qb ** 2 / (nb - 1))
    t = diff / se
    p = float(2 * stats.t.sf(abs(t), df))
    half = _t_quantile(confidence, df) * se
    low, high = diff - half, diff + half
    return {"diff": diff, "se": se, "df": df, "t": t, "p": p, "ci_low": low, "ci_high": high,
            "excludes_zero": low > 0 or high < 0}


def higher_is_better(metric: str) -> bool:
    """False for losses and errors (loss, nll, ece, brier, mse, mae, rmse), True for the rest."""
    return metric.rsplit("/", 1)[-1] not in LOWER_IS_BETTER


def verdict(diff: dict | None, metric: str) -> str:
    """"better", "worse", "no clear difference" (the interval contains 0) or "n/a" (no interval)."""
    if diff is None:
        return "n/a"
    if not diff["excludes_zero"]:
        return "no clear difference"
    return "better" if (diff["diff"] > 0) == higher_is_better(metric) else "worse"


def summarize(groups: Sequence[tuple[str, Sequence[dict]]], metrics: Sequence[str] | None = None,
              confidence: float = 0.95) -> dict[str, Any]:
    """Statistics of finished runs grouped into variants; the first group is the baseline.

    `groups`: [(label, [metrics dict of each run, e.g. summary["metrics"]])]. `metrics`: the names to
    compare (default: every `test/*` metric any run has, except per-class ones such as
    `test/recall/3`). Non-finite and missing values are left out
    (n counts the values used). Returns {"baseline", "confidence", "main_metric", "metrics",
    "variants": [{"label", "metrics": {name: {values, n, mean, std, ci_low, ci_high, diff, verdict}}}]}."""
    _check_confidence(confidence)
    if not groups:
        raise DojoError("nothing to compare: no variants")
    available = list(dict.fromkeys(k for _, runs in groups for run in runs for k in run))
    if metrics:
        names = []
        for m in metrics:
            name = m if "/" in m else f"test/{m}"
            if name not in available:
                raise DojoError(f"no metric '{m}' in the runs{did_you_mean(name, available)}; "
                                f"metrics: {choices_text(available)}")
            names.append(name)
        names = list(dict.fromkeys(names))
        main = names[0]
    else:
        # Per-class entries (test/recall/3) would bury the table; --metric still picks them.
        names = [k for k in available if k.startswith("test/") and not _PER_CLASS.search(k)]
        if not names:
            raise DojoError("the runs have no test/* metrics; choose metrics with --metric "
                            f"(available: {choices_text(available) or 'none'})")
        main = next((m for m in MAIN_METRICS if m in names), names[0])
        names.remove(main)
        names.insert(0, main)

    def values(runs, name):
        out = []
        for run in runs:
            v = run.get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(float(v))
        return out

    baseline_runs = groups[0][1]
    variants = []
    for i, (label, runs) in enumerate(groups):
        per_metric = {}
        for name in names:
            xs = values(runs, name)
            entry = {"values": xs, **mean_ci(xs, confidence)}
            if i == 0:
                entry["diff"], entry["verdict"] = None, "baseline"
            else:
                d = welch_diff_ci(xs, values(baseline_runs, name), confidence)
                entry["diff"], entry["verdict"] = d, verdict(d, name)
            per_metric[name] = entry
        variants.append({"label": label, "runs": len(runs), "metrics": per_metric})
    return {"baseline": groups[0][0], "confidence": confidence, "main_metric": main, "metrics": names,
            "higher_is_better": {n: higher_is_better(n) for n in names}, "variants": variants}


# -- rendering ------------------------------------------------------------------------------------

def _num(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    return f"{v:.{digits}g}" if 1e-4 <= abs(v) < 1e5 else f"{v:.{digits - 1}e}"


def _interval(low: float | None, high: float | None) -> str:
    return "n/a" if low is None else f"[{_num(low)}, {_num(high)}]"


def _signed(v: float) -> str:
    return ("+" if v > 0 else "") + _num(v)


VERDICT_MARK = {"baseline": "baseline", "better": "better", "worse": "worse", "no clear difference": "–",
                "n/a": "n/a"}


def table_rows(result: dict) -> list[tuple[str, list[list[str]]]]:
    """[(metric, [[variant, mean, std, n, CI, diff [CI], verdict], ...])] as display strings."""
    out = []
    for name in result["metrics"]:
        rows = []
        for v in result["variants"]:
            e = v["metrics"][name]
            d = e["diff"]
            if e["verdict"] == "baseline":
                diff = "(baseline)"
            elif d is None:
                diff = "n/a"
            else:
                diff = f"{_signed(d['diff'])} {_interval(d['ci_low'], d['ci_high'])}"
            rows.append([display_label(v), _num(e["mean"]), _num(e["std"]), str(e["n"]),
                         _interval(e["ci_low"], e["ci_high"]), diff, VERDICT_MARK[e["verdict"]]])
        out.append((name, rows))
    return out


def display_label(variant: dict) -> str:
    return variant.get("short_label") or variant["label"]


def _suffixes(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key -> its shortest ending of at least two parts that no other key shares
    (`phases.main.optimizer.lr` -> `optimizer.lr`, but `warm.optimizer.lr` next to
    `settle.optimizer.lr`); an ending never starts at a list index (`methods.1.decay`)."""
    parts = {k: k.split(".") for k in keys}
    out = {}
    for k, ps in parts.items():
        for m in range(min(2, len(ps)), len(ps) + 1):
            tail = ps[-m:]
            if tail[0].lstrip("-").isdigit() and m < len(ps):
                continue
            if not any(o != k and op[-m:] == tail for o, op in parts.items()):
                out[k] = ".".join(tail)
                break
        else:
            out[k] = k
    return out


def short_labels(assignments: Sequence[Sequence[tuple[str, str]]]) -> list[str]:
    """Display labels from each variant's (key, value) pairs, the keys shortened by `_suffixes`."""
    short = _suffixes(list(dict.fromkeys(k for pairs in assignments for k, _ in pairs)))
    return [", ".join(f"{short[k]}={v}" for k, v in pairs) for pairs in assignments]


def _headers(result: dict) -> list[str]:
    pct = f"{result['confidence'] * 100:g}%"
    return ["variant", "mean", "std", "n", f"{pct} CI", f"diff [{pct} CI]", "verdict"]


def legend(result: dict) -> str:
    pct = f"{result['confidence'] * 100:g}%"
    return (f"↑ higher is better, ↓ lower is better. std: sample standard deviation over seeds; {pct} CI: "
            f"Student-t interval of the mean; diff: variant - baseline with Welch's {pct} interval. "
            f"better/worse: that interval excludes 0; –: it contains 0 (no difference shown at this n); "
            f"n/a: fewer than 2 runs.")


def wide_console(width: int = 140):
    """A rich Console on stdout; piped output (no terminal, no COLUMNS) gets `width` columns, not 80."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(width=width)
    return console


def print_table(result: dict, title: str, console=None) -> None:
    from rich.table import Table
    from rich.text import Text

    console = console or wide_console()
    table = Table(title=title)
    for i, h in enumerate(_headers(result)):
        # Numbers stay whole; a long variant label folds instead.
        table.add_column(h, justify="left" if i == 0 else "right", overflow="fold", no_wrap=i not in (0, 5),
                         min_width=12 if i == 0 else None)
    sections = table_rows(result)
    for k, (name, rows) in enumerate(sections):
        arrow = "↑" if result["higher_is_better"][name] else "↓"
        table.add_row(Text(f"{name} {arrow}", style="bold"))
        for j, row in enumerate(rows):
            style = {"better": "green", "worse": "red"}.get(row[-1])
            table.add_row(*[Text(c) for c in row], style=style,
                          end_section=j == len(rows) - 1 and k < len(sections) - 1)
    console.print(table)
    console.print(legend(result), highlight=False)


def render_markdown(result: dict, title: str, command: str | None = None) -> str:
    lines = [f"# {title}", ""]
    if command:
        lines += ["```", command, "```", ""]
    base = result["variants"][0]
    lines += [f"Baseline: `{display_label(base)}`. {legend(result)}", ""]
    headers = _headers(result)
    for name, rows in table_rows(result):
        direction = "higher is better" if result["higher_is_better"][name] else "lower is better"
        lines += [f"## {name} ({direction})", "", "| " + " | ".join(headers) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(headers) - 2) + [":---:"]) + "|"]
        for row in rows:
            cells = [f"`{row[0]}`", *row[1:-1], f"**{row[-1]}**" if row[-1] in ("better", "worse") else row[-1]]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def plot(result: dict, path: Path, metric: str | None = None) -> None:
    """Horizontal bars: each variant's mean of `metric` (default: the main one) with its CI as an error
    bar and the single runs as dots; better variants green, worse red, the baseline grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or result["main_metric"]
    variants = result["variants"]
    colors = {"baseline": "0.55", "better": "tab:green", "worse": "tab:red"}
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.55 * len(variants)), dpi=100)
    try:
        for y, v in enumerate(variants):
            e = v["metrics"][metric]
            if e["mean"] is None:
                continue
            err = None if e["ci_low"] is None else [[e["mean"] - e["ci_low"]], [e["ci_high"] - e["mean"]]]
            ax.barh(y, e["mean"], color=colors.get(e["verdict"], "tab:blue"), alpha=0.75, height=0.6)
            if err is not None:
                ax.errorbar(e["mean"], y, xerr=err, color="black", capsize=4, linewidth=1.2)
            ax.plot(e["values"], [y] * len(e["values"]), "o", color="black", markersize=3, alpha=0.6)
        ax.set_yticks(range(len(variants)))
        ax.set_yticklabels([_wrap(display_label(v)) for v in variants], fontsize=8)
        ax.invert_yaxis()      # the baseline on top, as in the table
        pct = f"{result['confidence'] * 100:g}%"
        better = "higher" if result["higher_is_better"][metric] else "lower"
        ax.set_xlabel(f"{metric} ({better} is better)\nbars: mean, whiskers: {pct} CI, dots: single runs; "
                      "grey: baseline, red: worse, green: better")
        ax.set_title(f"{metric}: baseline {display_label(variants[0])}", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def _wrap(text: str, width: int = 34) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def write_results(result: dict, out: Path, title: str, command: str | None, extra: dict) -> list[Path]:
    from .atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    doc = {"title": title, "command": command, **extra, **result}
    atomic_write_text(out / JSON_NAME, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / MD_NAME, render_markdown(result, title, command))
    plot(result, out / PNG_NAME)
    return [out / MD_NAME, out / JSON_NAME, out / PNG_NAME]


# -- variants from --vary -------------------------------------------------------------------------

def split_values(text: str) -> list[str]:
    """Split `v1,v2,...` at the commas outside brackets, braces and quotes, so `[16,16],[32]` is two
    values."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_vary(spec: str) -> tuple[str, list[str]]:
    """`key.path=v1,v2` -> ("key.path", ["v1", "v2"]), each value checked to parse as YAML."""
    from .recipe import parse_yaml

    key, sep, text = spec.partition("=")
    key = key.strip()
    if not sep or not key or not text.strip():
        raise DojoError(f"--vary {spec!r}: write it as key.path=value1,value2,... (the first value is the baseline)")
    if key == "seed":
        raise DojoError("--vary seed: seeds are replicates, not variants; use --seeds")
    values = split_values(text)
    seen: dict[str, str] = {}
    for v in values:
        if not v:
            raise DojoError(f"--vary {key}: empty value in {text!r}")
        canon = json.dumps(parse_yaml(v, f"--vary {key}"), sort_keys=True, default=str)
        if canon in seen:
            raise DojoError(f"--vary {key}: the value {v!r} is listed twice (as {seen[canon]!r})")
        seen[canon] = v
    return key, values


def parse_seeds(text: str) -> list[int]:
    """`3` -> [0, 1, 2]; `0,5,7` -> [0, 5, 7]."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            count = int(text)
            if count < 1:
                raise DojoError(f"--seeds must be at least 1 (got {count})")
            seeds = list(range(count))
    except ValueError:
        raise DojoError(f"--seeds: give a count (3) or a list of seeds (0,5,7), got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise DojoError(f"--seeds: give distinct seeds, got {text!r}")
    return seeds


def _dir_name(label: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", label).strip("._") or "variant"
    return name[:120]


@dataclass
class Variant:
    label: str                       # `phases.0.optimizer.lr=0.01`, several joined by ", "
    dirname: str
    overrides: list[str]             # the --vary assignments of this variant
    pairs: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class RunSpec:
    variant: int
    seed: int
    run_dir: Path
    overrides: list[str]             # the user's overrides + the variant's + seed=k
    action: str = "train"            # train | resume | reuse
    status: str = "pending"          # finished | failed | interrupted
    error: str = ""
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)


def plan_variants(varies: Sequence[str], overrides: Sequence[str]) -> list[Variant]:
    import itertools

    parsed = [parse_vary(v) for v in varies]
    keys = [k for k, _ in parsed]
    for k in keys:
        if keys.count(k) > 1:
            raise DojoError(f"--vary {k} is given twice; list all its values in one --vary")
    for o in overrides:
        key = o.partition("=")[0].strip()
        if key == "seed":
            raise DojoError("seed=...: the seeds come from --seeds (a count, or a list such as 0,5,7)")
        if key in keys:
            raise DojoError(f"{key} is both overridden ({o}) and varied (--vary); drop one")
    if not parsed:
        return [Variant("recipe", "recipe", [])]
    variants, names = [], set()
    for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in parsed]):
        assignments = [f"{k}={v}" for k, v in combo]
        label = ", ".join(assignments)
        name = _dir_name("+".join(assignments))
        base, i = name, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.add(name)
        variants.append(Variant(label, name, assignments, list(combo)))
    return variants


def _same_recipe(run_dir: Path, expected_yaml: str) -> bool:
    """Whether the run's recipe.yaml holds the recipe of `expected_yaml`; a damaged one is a DojoError."""
    from .recipe import parse_yaml, read_recipe_source

    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return False
    return read_recipe_source(str(path))[0] == parse_yaml(expected_yaml, "the expected recipe")


def _read_summary(run_dir: Path) -> dict | None:
    """The run's summary.json, None when it has none; a damaged one is a DojoError naming it."""
    path = run_dir / "summary.json"
    return read_summary(path) if path.exists() else None


def plan_runs(source: str, overrides: Sequence[str], variants: list[Variant], seeds: list[int],
              out: Path) -> list[RunSpec]:
    """Validate every variant's recipe (a typo fails here, before any training, naming the variant) and
    decide per run: train it, reuse a finished run of the same recipe in its directory, or resume an
    unfinished one; any other content in a run directory is an error."""
    from .recipe import load_recipe

    specs = []
    for i, v in enumerate(variants):
        for seed in seeds:
            ovr = [*overrides, *v.overrides, f"seed={seed}"]
            try:
                recipe = load_recipe(source, ovr)
            except DojoError as exc:
                where = f"variant {v.label}" if v.overrides else "recipe"
                raise DojoError(f"{where}: {exc}") from None
            spec = RunSpec(i, seed, out / v.dirname / f"seed{seed}", ovr)
            # A lone .lock: a variant stopped before it wrote anything.
            if spec.run_dir.is_dir() and any(p.name != LOCK_NAME for p in spec.run_dir.iterdir()):
                summary = _read_summary(spec.run_dir)
                status = summary.get("status") if summary else None
                if not _same_recipe(spec.run_dir, recipe.to_yaml()):
                    raise DojoError(f"{spec.run_dir} holds another recipe than variant {v.label}, seed {seed}; "
                                    "choose another --out")
                if status == "finished":
                    spec.action = "reuse"
                elif status in (None, "interrupted"):
                    spec.action = "resume"
                else:
                    raise DojoError(f"{spec.run_dir} holds a {status} run; delete it to train it again")
            specs.append(spec)
    return specs


# -- running --------------------------------------------------------------------------------------

class _Runner:
    """Runs the RunSpecs in-process (jobs=1) or as `python -m torchdojo train` subprocesses."""

    def __init__(self, source: str, jobs: int, on_done):
        self.source = source
        self.jobs = jobs
        self.on_done = on_done
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def command(self, spec: RunSpec) -> list[str]:
        if spec.action == "resume":
            return ["resume", "-q", str(spec.run_dir)]
        return ["train", "--run-dir", str(spec.run_dir), "-q", "--", self.source, *spec.overrides]

    def run(self, specs: list[RunSpec]) -> None:
        todo = []
        for spec in specs:
            if spec.action == "reuse":
                self._finish(spec, 0.0)
            else:
                todo.append(spec)
        if self.jobs == 1:
            for spec in todo:
                self._in_process(spec)
        else:
            self._parallel(todo)

    def _finish(self, spec: RunSpec, seconds: float, error: str = "") -> None:
        summary = _read_summary(spec.run_dir) or {}
        spec.seconds = seconds
        spec.status = summary.get("status") or "failed"
        if error and spec.status == "finished":
            spec.status = "failed"
        spec.error = error or summary.get("error", "")
        if spec.status != "finished" and not spec.error:
            spec.error = f"status {spec.status}"
        spec.metrics = (summary.get("metrics") or {}) if spec.status == "finished" else {}
        if spec.status == "failed" and spec.run_dir.is_dir() and not (spec.run_dir / "summary.json").exists():
            from .atomic import atomic_write_text     # e.g. killed: `dojo runs` should still say failed
            atomic_write_text(spec.run_dir / "summary.json", json.dumps(
                {"status": "failed", "metrics": {}, "error": spec.error}, indent=2) + "\n")
        self.on_done(spec)

    def _in_process(self, spec: RunSpec) -> None:
        from .recipe import load_recipe
        from .trainer import Interrupted, Trainer

        t0 = time.perf_counter()
        error = ""
        try:
            if spec.action == "resume":
                trainer = Trainer.from_run_dir(spec.run_dir, quiet=True)
                if trainer.checkpoint_step is None:
                    raise DojoError(f"{spec.run_dir} has no checkpoint to resume from; delete it to train it again")
            else:
                trainer = Trainer(load_recipe(self.source, spec.overrides), spec.run_dir, quiet=True)
            trainer.fit()
        except Interrupted:
            raise
        except Exception as exc:        # one failed run must not stop the others
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, DojoError) else str(exc)
        self._finish(spec, time.perf_counter() - t0, error)

    def _subprocess(self, spec: RunSpec) -> None:
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torchdojo", *self.command(spec)]
        with self._lock:
            if self._stopping:
                return
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            self._procs.add(proc)
        try:
            out, err = proc.communicate()
        finally:
            with self._lock:
                self._procs.discard(proc)
        error = ""
        if proc.returncode != 0:
            lines = [ln for ln in (err or out or "").strip().splitlines() if ln.strip()]
            error = lines[-1] if lines else f"exit code {proc.returncode}"
            if error.startswith("error: "):
                error = error[len("error: "):]
            error = f"{error} (exit code {proc.returncode})"
        self._finish(spec, time.perf_counter() - t0, error)

    def _parallel(self, specs: list[RunSpec]) -> None:
        import signal

        pool = ThreadPoolExecutor(max_workers=self.jobs)
        futures = [pool.submit(self._subprocess, s) for s in specs]
        try:
            for f in as_completed(futures):
                f.result()
        except KeyboardInterrupt:
            with self._lock:
                self._stopping = True
                for proc in self._procs:       # each run checkpoints and exits, as with `dojo train`
                    proc.send_signal(signal.SIGINT)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


class _Progress:
    """A rich progress bar on stderr in a terminal, one line per finished run otherwise, nothing with -q."""

    def __init__(self, total: int, labels: list[str], main_metric_hint: Iterable[str], quiet: bool):
        from .log import TaskProgress

        self.total, self.labels, self.done = total, labels, 0
        self.hint = tuple(main_metric_hint)
        self._lock = threading.Lock()
        self.bar = TaskProgress("compare", total, quiet).__enter__()

    def line(self, spec: RunSpec) -> str:
        what = {"reuse": "reused", "resume": "resumed"}.get(spec.action, spec.status)
        secs = f" in {spec.seconds:.1f} s" if spec.action != "reuse" else ""
        if spec.status != "finished":
            tail = f": {spec.error}"
            what = spec.status.upper()
        else:
            metric = next((m for m in self.hint if m in spec.metrics), None)
            tail = f", {metric} {_num(spec.metrics[metric])}" if metric else ""
        return f"[{self.done}/{self.total}] {self.labels[spec.variant]} seed {spec.seed}: {what}{secs}{tail}"

    def __call__(self, spec: RunSpec) -> None:
        with self._lock:
            self._report(spec)

    def _report(self, spec: RunSpec) -> None:
        self.done += 1
        self.bar.advance(f"{self.labels[spec.variant]} seed {spec.seed}")
        self.bar.note(self.line(spec), with_bar=spec.status != "finished")

    def stop(self) -> None:
        self.bar.__exit__()


# -- existing runs ---------------------------------------------------------------------------------

def find_run_dirs(root: Path, max_depth: int = 4) -> list[Path]:
    """`root` itself when it is a run directory (has summary.json), else the run directories below it
    (at most `max_depth` levels down, not looking inside runs)."""
    if (root / "summary.json").is_file():
        return [root]
    found = []
    if max_depth <= 0:
        return found
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and p.name != "checkpoints")
    except OSError:
        return found
    for child in children:
        found += find_run_dirs(child, max_depth - 1)
    return found


def _compare_order(root: Path) -> dict[str, int]:
    """Variant directory -> position, from an earlier compare.json in `root` (baseline first)."""
    path = root / JSON_NAME
    if not path.exists():
        return {}
    variants = read_json_object(path).get("variants", [])
    if not isinstance(variants, list):
        raise DojoError(f"{path}: \"variants\" must be a list")
    dirs = [v.get("dir") if isinstance(v, dict) else None for v in variants]
    return {d: i for i, d in enumerate(dirs) if isinstance(d, str) and d}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": [1, {"c": 2}]}} -> {"a.b.0": 1, "a.b.1.c": 2} (empty containers stay values)."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
        return out
    return {prefix: value}


_UNSET = "<unset>"


def _show(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v, separators=(",", ":"))


@dataclass
class Group:
    recipe: dict                      # the recipe without `seed`
    runs: list[Path]
    label: str = ""
    short_label: str = ""
    differs: dict = field(default_factory=dict)


def group_runs(sources: Sequence[Path], max_label_keys: int = 3) -> tuple[list[Group], list[str]]:
    """Finished runs under `sources`, grouped by their recipe.yaml without `seed`; each group is labelled
    by the flattened keys that differ between groups (at most `max_label_keys` of them), else by its
    directory. Returns (groups in order of appearance, notes about runs left out). A damaged
    summary.json, recipe.yaml or compare.json is a DojoError naming the file."""
    from .recipe import read_recipe_source

    groups: dict[str, Group] = {}
    notes: list[str] = []
    seen: set[Path] = set()
    for root in sources:
        order = _compare_order(root)
        runs = find_run_dirs(root)
        runs.sort(key=lambda p: (order.get(p.relative_to(root).parts[0] if p != root else "", len(order)), str(p)))
        for run in runs:
            if run.resolve() in seen:
                continue
            seen.add(run.resolve())
            summary = _read_summary(run)
            status = summary.get("status") if summary else "unknown"
            if status != "finished":
                notes.append(f"{run}: left out ({status})")
                continue
            if not (run / "recipe.yaml").is_file():
                notes.append(f"{run}: left out (no recipe.yaml)")
                continue
            recipe, _ = read_recipe_source(str(run / "recipe.yaml"))     # a damaged one: one-line error
            recipe = {k: v for k, v in recipe.items() if k != "seed"}
            key = json.dumps(recipe, sort_keys=True, default=str)
            groups.setdefault(key, Group(recipe, [])).runs.append(run)
    result = list(groups.values())
    flat = [flatten(g.recipe) for g in result]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    differing = [k for k in keys if len({json.dumps(f.get(k, _UNSET), sort_keys=True, default=str) for f in flat}) > 1]
    by_keys = 1 <= len(differing) <= max_label_keys
    shorts = short_labels([[(k, _show(f.get(k, _UNSET))) for k in differing] for f in flat]) if by_keys else []
    for i, (g, f) in enumerate(zip(result, flat)):
        g.differs = {k: f.get(k, _UNSET) for k in differing}
        if by_keys:
            g.label = ", ".join(f"{k}={_show(v)}" for k, v in g.differs.items())
            g.short_label = shorts[i]
        else:
            g.label = g.short_label = _group_dir_label(g.runs)
    counts: dict[str, int] = {}
    for g in result:
        n = counts[g.label] = counts.get(g.label, 0) + 1
        if n > 1:
            g.label, g.short_label = f"{g.label} #{n}", f"{g.short_label} #{n}"
    return result, notes


def _group_dir_label(runs: list[Path]) -> str:
    if len(runs) == 1:
        return runs[0].name
    common = Path(os.path.commonpath([str(r.resolve()) for r in runs]))
    return common.name or str(common)


def _choose_baseline(groups: list[Group], text: str | None) -> list[Group]:
    if not text:
        return groups
    exact = [g for g in groups if text in (g.label, g.short_label)]
    matches = exact or [g for g in groups if text in g.label or any(text in str(r) for r in g.runs)]
    if len(matches) != 1:
        what = "no variant" if not matches else f"{len(matches)} variants"
        raise DojoError(f"--baseline {text!r} matches {what}; variants: " + "; ".join(g.label for g in groups))
    return [matches[0]] + [g for g in groups if g is not matches[0]]


# -- the command ----------------------------------------------------------------------------------

def _default_out() -> Path:
    return Path("runs") / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _command_line(argv: Sequence[str]) -> str:
    return shlex.join(["dojo", "compare", *argv])


@click.command("compare", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("sources", nargs=-1, required=True)
@click.option("--vary", "varies", multiple=True, metavar="KEY=V1,V2,...",
              help="A recipe key and its values; the FIRST value is the baseline. Repeat for a grid "
                   "(cartesian product; the baseline is then all first values). Values are YAML; commas "
                   "inside [...] or {...} do not split.")
@click.option("--seeds", default="3", show_default=True,
              help="Seeds per variant: a count N (seeds 0..N-1) or a list such as 0,5,7.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for the runs and compare.md/json/png (default: runs/compare-<timestamp>/; "
                   "with existing run directories: none, the table is only printed).")
@click.option("--jobs", "-j", type=click.IntRange(min=0), default=1, show_default=True,
              help="Runs at a time. 1: one after the other in this process; N > 1: N `dojo train` "
                   "subprocesses with one thread each; 0: one per CPU core.")
@click.option("--metric", "metrics", multiple=True,
              help="Metric to compare (repeatable; `accuracy` means test/accuracy); the first one is "
                   "plotted. Default: every test/* metric but the per-class ones (test/recall/<k>).")
@click.option("--baseline", help="With existing runs: the variant to compare against (its label or part of "
                                  "it, or part of a run path); default: the first one found.")
@click.option("--confidence", type=float, default=0.95, show_default=True, help="Level of the intervals.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output; print only the table.")
@handle_errors
def compare_command(sources, varies, seeds, out_dir, jobs, metrics, baseline, confidence, quiet):
    """Train recipe variants over several seeds and compare them with confidence intervals.

    \b
    dojo compare RECIPE --vary KEY=V1,V2,... [--vary ...] --seeds 3 [key.path=value ...]
    dojo compare DIR [DIR ...]

    With a RECIPE (file or built-in name) every variant (every combination of the --vary values) is
    trained with every seed, in OUT/<variant>/seed<k>/, with the key.path=value overrides applied to
    all of them and seed=k added. The FIRST value of each --vary is the baseline. Every variant's recipe
    is validated before anything trains. Rerunning the same command with the same --out reuses the
    finished runs and resumes interrupted ones.

    With existing directories (run directories, or folders of them such as an earlier compare's OUT or
    runs/), the finished runs are grouped into variants by their recipe.yaml apart from `seed`, labelled
    by the keys that differ.

    The table shows, per metric and variant, the mean over seeds, the sample std, n, the 95% interval of
    the mean (Student t), and the difference to the baseline with Welch's 95% interval; a variant is
    "better" or "worse" only when that interval excludes 0 (losses, NLL, ECE, Brier, MSE, MAE: lower is
    better). compare.md, compare.json (every number) and compare.png (the first metric) go to OUT.
    Exit code 1 when a run failed (the others are still compared).

    \b
    Examples:
      dojo compare quickstart --vary methods.1.decay=0.99,0.999 --seeds 3 --jobs 2
      dojo compare my.yaml --vary phases.0.optimizer.name=adamw,sgd --vary phases.0.optimizer.lr=1.0e-3,3.0e-3
      dojo compare runs/compare-20250101-120000 --metric accuracy --metric nll"""
    from rich.console import Console

    _check_confidence(confidence)
    argv = [*sources, *[a for v in varies for a in ("--vary", v)], *[a for m in metrics for a in ("--metric", m)]]
    argv += ["--out", out_dir] if out_dir else []
    argv += ["--baseline", baseline] if baseline else []
    argv += ["--confidence", str(confidence)] if confidence != 0.95 else []
    first = Path(sources[0])
    if first.is_dir():
        missing = [s for s in sources if not Path(s).is_dir()]
        if missing:
            raise DojoError(f"not a directory: {missing[0]} (compare either one RECIPE with --vary, or existing "
                            "run directories)")
        if varies:
            raise DojoError("--vary needs a RECIPE; with existing run directories nothing is trained")
        _compare_existing([Path(s) for s in sources], out_dir, metrics, baseline, confidence, _command_line(argv))
        return
    if baseline:
        raise DojoError("--baseline is for existing runs; with a RECIPE the first --vary values are the baseline")
    source, overrides = sources[0], list(sources[1:])
    for o in overrides:
        if "=" not in o:
            hint = " (compare several directories: they must all exist)" if "/" in o or "/" in source else ""
            raise DojoError(f"{o}: an override must look like key.path=value{hint}")
    seed_list = parse_seeds(seeds)
    variants = plan_variants(varies, overrides)
    out = Path(out_dir) if out_dir else _default_out()
    specs = plan_runs(source, overrides, variants, seed_list, out)
    jobs = jobs or os.cpu_count() or 1
    labels = short_labels([v.pairs for v in variants]) if varies else ["recipe"]
    if not quiet:
        todo = {a: sum(s.action == a for s in specs) for a in ("train", "resume", "reuse")}
        extra = ", ".join(f"{n} to {'reuse' if a == 'reuse' else a}" for a, n in todo.items() if n and a != "train")
        click.echo(f"compare: {len(variants)} variant(s) x {len(seed_list)} seed(s) = {len(specs)} runs in {out} "
                   f"(jobs {jobs}{', ' + extra if extra else ''}); baseline: {labels[0]}", err=True)
    hint = [m if "/" in m else f"test/{m}" for m in metrics] + list(MAIN_METRICS)
    progress = _Progress(len(specs), labels, hint, quiet)
    runner = _Runner(source, min(jobs, max(1, len(specs))), progress)
    from .trainer import Interrupted
    try:
        runner.run(specs)
    except (KeyboardInterrupt, Interrupted):
        progress.stop()
        click.echo(f"\ncompare interrupted; run the same command with --out {out} to resume it", err=True)
        sys.exit(130)
    finally:
        progress.stop()
    failed = [s for s in specs if s.status != "finished"]
    groups = [(v.label, [s.metrics for s in specs if s.variant == i and s.status == "finished"])
              for i, v in enumerate(variants)]
    title = f"{Path(source).stem if Path(source).is_file() else source}: {len(variants)} variant(s), seeds {seeds}"
    argv[len(sources):len(sources)] = ["--seeds", seeds] + (["--jobs", str(jobs)] if jobs != 1 else [])
    command = _command_line(argv)
    extra = {"recipe": source, "overrides": overrides, "seeds": seed_list,
             "variants_runs": [{"label": v.label, "dir": v.dirname, "overrides": v.overrides,
                                "runs": [{"seed": s.seed, "run_dir": str(s.run_dir), "status": s.status,
                                          "error": s.error or None, "seconds": round(s.seconds, 3)}
                                         for s in specs if s.variant == i]}
                               for i, v in enumerate(variants)]}
    if all(not runs for _, runs in groups):
        _report_failures(failed)
        raise DojoError(f"every run failed; nothing to compare (runs in {out})")
    try:
        result = summarize(groups, metrics, confidence)
    except DojoError as exc:
        raise DojoError(f"{exc} (the runs are kept in {out}: `dojo compare {out} --metric ...` compares them "
                        "again)") from None
    # compare.json lists the variants with their directories and runs (`dir` orders a later
    # `dojo compare OUT`); the statistics are merged into the same entries.
    shorts = short_labels([v.pairs for v in variants]) if varies else ["recipe"]
    for v, info, short in zip(result["variants"], extra.pop("variants_runs"), shorts):
        v.update({k: info[k] for k in ("dir", "overrides")}, short_label=short, run_dirs=info["runs"])
    Console().print()
    print_table(result, title)
    written = write_results(result, out, title, command, extra)
    click.echo(f"wrote {', '.join(str(p) for p in written)}")
    if failed:
        _report_failures(failed)
        sys.exit(1)


def _report_failures(failed: list[RunSpec]) -> None:
    if not failed:
        return
    click.echo(f"{len(failed)} run(s) did not finish:", err=True)
    for s in failed:
        click.echo(f"  {s.run_dir}: {s.status}: {s.error}", err=True)


def _compare_existing(dirs: list[Path], out_dir: str | None, metrics, baseline: str | None, confidence: float,
                      command: str | None) -> None:
    groups, notes = group_runs(dirs)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    if not groups:
        raise DojoError(f"no finished runs in {', '.join(map(str, dirs))}")
    groups = _choose_baseline(groups, baseline)
    summaries = [[(_read_summary(r) or {}).get("metrics") or {} for r in g.runs] for g in groups]
    result = summarize([(g.label, s) for g, s in zip(groups, summaries)], metrics, confidence)
    for v, g in zip(result["variants"], groups):
        common = Path(os.path.commonpath([str(r.resolve()) for r in g.runs])) if len(g.runs) > 1 else g.runs[0]
        v.update(dir=common.name, short_label=g.short_label, differs=g.differs,
                 run_dirs=[{"run_dir": str(r)} for r in g.runs])
    where = ", ".join(map(str, dirs)) if len(dirs) <= 2 else f"{len(dirs)} directories"
    title = f"{len(groups)} variant(s) from {where}"
    print_table(result, title)
    if out_dir:
        written = write_results(result, Path(out_dir), title, command, {"sources": [str(d) for d in dirs]})
        click.echo(f"wrote {', '.join(str(p) for p in written)}")
