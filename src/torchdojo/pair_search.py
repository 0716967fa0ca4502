"""Which encoders go well together: `dojo pair-search`.

    dojo pair-search runs/mlp-a runs/cnn1d-b runs/gru-c --recipe head.yaml [--out DIR] [-q] [key.path=value ...]

For every single run and every pair of runs, a head is trained on top of the frozen encoder(s) (the
runs' final models minus their output layers) with the recipe R: R supplies the data, phases and
optimizer; its `model` becomes `{name: concat, encoders: [{run: A, freeze: true}, {run: B, freeze: true}],
head: ...}` (the `head` of R's model when R's model is a concat, else a linear head; override it with
`model.head.hidden=[64]` and the like). Each run goes to OUT/<label>/ (A, B, A+B, ...).

The table shows each single's test accuracy (and that of the run's own model), and for each pair its
test accuracy, the better single's accuracy, the gain over it, and the disagreement of the two runs' own
models on the test split: the share of test rows on which their predicted classes differ. The lecture's
claim to check: pairs of encoders that differ more (higher disagreement) gain more.

The runs must have been trained on R's data with R's split (the same `data` section and split seed):
otherwise an encoder may have seen rows of the test split, and its inputs would be standardised
differently. Classification only.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import click

from .cli_errors import handle_errors
from .compare import _dir_name, _num, _read_summary, _same_recipe, _signed, wide_console
from .errors import DojoError
from .run_lock import LOCK_NAME
from .runfiles import read_json_object

JSON_NAME = "pair_search.json"
MD_NAME = "pair_search.md"
METRIC = "test/accuracy"
# `data` keys that do not change which rows land in which split or how inputs are prepared.
_DATA_KEYS_IGNORED = ("sampler", "num_workers")


@dataclass
class Job:
    """One head to train: on one run's encoder (a single) or two runs' (a pair)."""
    runs: tuple[int, ...]            # indices into the run list
    label: str                       # "a" or "a + b"
    dirname: str
    recipe: Any = None               # the validated Recipe
    action: str = "train"            # train | resume | reuse
    status: str = "pending"          # finished | failed
    error: str = ""
    seconds: float = 0.0
    accuracy: float | None = None


@dataclass
class RunInfo:
    path: Path
    label: str
    own_accuracy: float | None = None     # the run's own model on the test split
    outputs: Any = None                    # its logits on the test split
    extra: dict = field(default_factory=dict)


# -- planning -------------------------------------------------------------------------------------

def run_labels(paths: Sequence[Path]) -> list[str]:
    """Short unique labels: each run directory's name, with as many parent folders as it takes to tell
    them apart (`a/seed0`, `b/seed0`), else numbered."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{p.name}#{i}" for i, p in enumerate(paths)]


def check_runs(paths: Sequence[Path]) -> None:
    """Every path is a distinct finished run directory."""
    if len(paths) < 2:
        raise DojoError("pair-search needs at least two run directories")
    seen: dict[Path, Path] = {}
    for p in paths:
        if not (p / "recipe.yaml").is_file():
            raise DojoError(f"{p} is not a run directory (no recipe.yaml)")
        status = (_read_summary(p) or {}).get("status")
        if status != "finished" or not (p / "checkpoints" / "final").is_dir():
            raise DojoError(f"{p} has not finished ({status or 'no summary.json'}); only finished runs can be "
                            "encoders (`dojo resume` it first)")
        r = p.resolve()
        if r in seen:
            raise DojoError(f"{p} is given twice (also as {seen[r]})")
        seen[r] = p


def _data_identity(recipe) -> dict:
    """What fixes a recipe's rows, split and input preparation: its `data` section (without the keys that
    do not) and the effective split seed."""
    data = {k: v for k, v in recipe.data.model_dump(mode="json").items() if k not in _DATA_KEYS_IGNORED}
    data["split_seed"] = data.get("split_seed") if data.get("split_seed") is not None else recipe.seed
    return data


def check_same_data(recipe, run: Path) -> None:
    """Refuse a run trained on other data or another split than the pair-search recipe."""
    from .recipe import load_recipe

    try:
        theirs = _data_identity(load_recipe(str(run / "recipe.yaml")))
    except DojoError as exc:
        raise DojoError(f"{run}/recipe.yaml: {exc}") from None
    ours = _data_identity(recipe)
    for key in dict.fromkeys([*ours, *theirs]):
        if ours.get(key) != theirs.get(key):
            shown = "data.split_seed (or seed)" if key == "split_seed" else f"data.{key}"
            raise DojoError(
                f"{run} was trained on other data or another split than the recipe ({shown}: "
                f"{theirs.get(key)!r} in the run, {ours.get(key)!r} in the recipe): its encoder may have seen "
                f"rows of this test split, and its inputs may be prepared differently. Use the runs' data "
                f"section and split (e.g. override data.split_seed={theirs.get('split_seed')!r})")
    info = run / "data_info.json"
    task_type = read_json_object(info).get("task_type") if info.is_file() else None
    if task_type not in (None, "classification"):
        raise DojoError(f"{run} is a {task_type} run; pair-search compares classifiers (accuracy, disagreement)")


def concat_model(base: dict, runs: Sequence[Path]) -> dict:
    """The concat model spec over frozen run encoders (absolute paths, so the runs' recipes work from
    any directory)."""
    return {**base, "name": "concat", "encoders": [{"run": str(p.resolve()), "freeze": True} for p in runs]}


def plan_jobs(source: str, overrides: Sequence[str], paths: Sequence[Path], labels: Sequence[str],
              out: Path) -> list[Job]:
    """Singles then pairs, each with its validated recipe; a finished run of the same recipe in its
    folder is reused, an interrupted one resumed; any other content is an error."""
    from .recipe import load_recipe, read_recipe_source

    raw, _ = read_recipe_source(source)
    model = raw.get("model")
    base = {k: v for k, v in model.items() if k not in ("name", "encoders")} \
        if isinstance(model, dict) and model.get("name") == "concat" else {}
    combos = [(i,) for i in range(len(paths))] + list(itertools.combinations(range(len(paths)), 2))
    jobs, names = [], set()
    for combo in combos:
        label = " + ".join(labels[i] for i in combo)
        name = _dir_name("+".join(labels[i].replace("/", "_") for i in combo))
        stem, k = name, 2
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names.add(name)
        spec = copy.deepcopy(raw)
        spec["model"] = concat_model(base, [paths[i] for i in combo])
        try:
            recipe = load_recipe(spec, list(overrides))
        except DojoError as exc:
            raise DojoError(f"{label}: {exc}") from None
        job = Job(combo, label, name, recipe)
        run_dir = out / name
        # A lone .lock: a run stopped before it wrote anything.
        if run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
            status = (_read_summary(run_dir) or {}).get("status")
            if not _same_recipe(run_dir, recipe.to_yaml()):
                raise DojoError(f"{run_dir} holds another recipe than {label}; choose another --out")
            if status == "finished":
                job.action = "reuse"
            elif status in (None, "interrupted"):
                job.action = "resume"
            else:
                raise DojoError(f"{run_dir} holds a {status} run; delete it to train it again")
        jobs.append(job)
    return jobs


# -- running --------------------------------------------------------------------------------------

def run_job(job: Job, out: Path) -> None:
    from .trainer import Interrupted, Trainer

    run_dir = out / job.dirname
    t0 = time.perf_counter()
    try:
        if job.action == "train":
            Trainer(job.recipe, run_dir, quiet=True).fit()
        elif job.action == "resume":
            trainer = Trainer.from_run_dir(run_dir, quiet=True)
            if trainer.checkpoint_step is None:
                raise DojoError(f"{run_dir} has no checkpoint to resume from; delete it to train it again")
            trainer.fit()
    except Interrupted:
        raise
    except Exception as exc:         # one failed head must not stop the others
        job.error = str(exc) if isinstance(exc, DojoError) else f"{type(exc).__name__}: {exc}"
    job.seconds = time.perf_counter() - t0
    summary = _read_summary(run_dir) or {}
    job.status = "finished" if summary.get("status") == "finished" and not job.error else "failed"
    if job.status == "finished":
        value = (summary.get("metrics") or {}).get(METRIC)
        if not isinstance(value, (int, float)):
            job.status, job.error = "failed", f"the run has no {METRIC} (is the recipe a classification task?)"
        else:
            job.accuracy = float(value)
    elif not job.error:
        job.error = f"status {summary.get('status')}"


def disagreement(outputs_a, outputs_b) -> float:
    """The share of rows on which two models' predicted classes (argmax of their outputs) differ."""
    import torch

    from .ensembles import pairwise_disagreement
    return pairwise_disagreement(torch.stack([outputs_a, outputs_b]))


def own_test_outputs(runs: list[RunInfo], recipe) -> Any:
    """Each run's own model's logits on the recipe's test split (kept in `runs[i].outputs`, and its
    accuracy in `own_accuracy`); returns the test labels."""
    import torch

    from .data import load_data
    from .models.concat import load_run_encoder
    from .trainer import resolve_device

    device = resolve_device(recipe.device)
    test = load_data(recipe.data.model_dump(), recipe.seed).test
    x, y = test.x.to(device), test.y.to(device)
    size = recipe.eval.batch_size
    for info in runs:
        model, _ = load_run_encoder(info.path)
        model = model.to(device).eval()
        with torch.no_grad():
            logits = torch.cat([model(x[i:i + size]).float() for i in range(0, len(x), size)])
        info.outputs = logits.cpu()
        info.own_accuracy = (logits.argmax(1) == y).double().mean().item()
    return y.cpu()


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(xs, ys))
    sxx, syy = sum((a - mx) ** 2 for a in xs), sum((b - my) ** 2 for b in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def build_result(jobs: list[Job], runs: list[RunInfo], out: Path) -> dict:
    singles, pairs = [], []
    by_run = {job.runs[0]: job for job in jobs if len(job.runs) == 1}
    for job in jobs:
        entry = {"label": job.label, "runs": [runs[i].label for i in job.runs], "dir": str(out / job.dirname),
                 "status": job.status, "error": job.error or None, "seconds": round(job.seconds, 3),
                 "test_accuracy": job.accuracy}
        if len(job.runs) == 1:
            entry["own_test_accuracy"] = runs[job.runs[0]].own_accuracy
            singles.append(entry)
            continue
        a, b = job.runs
        known = [(by_run[i].accuracy, runs[i].label) for i in (a, b) if by_run[i].accuracy is not None]
        best = max(known) if known else (None, None)
        entry.update(best_single=best[1], best_single_accuracy=best[0],
                     gain=job.accuracy - best[0] if job.accuracy is not None and best[0] is not None else None,
                     disagreement=disagreement(runs[a].outputs, runs[b].outputs))
        pairs.append(entry)
    with_gain = [p for p in pairs if p["gain"] is not None]
    return {"metric": METRIC, "singles": singles, "pairs": pairs,
            "disagreement_gain_correlation": _pearson([p["disagreement"] for p in with_gain],
                                                      [p["gain"] for p in with_gain])}


# -- rendering ------------------------------------------------------------------------------------

HEADERS = ["encoders", "test acc", "own model acc", "better single", "gain", "disagreement"]
LEGEND = ("test acc: a head trained on the frozen encoder(s); own model acc: the run's own model; better "
          "single: the higher test acc of the pair's two singles; gain: pair - better single; disagreement: "
          "share of test rows where the two runs' own models predict different classes.")


def table_rows(result: dict) -> tuple[list[list[str]], list[list[str]]]:
    """(single rows, pair rows with the pairs by test accuracy, best first) as display strings."""
    def acc(v):
        return _num(v) if v is not None else "failed"

    singles = [[s["label"], acc(s["test_accuracy"]), _num(s["own_test_accuracy"]), "", "", ""]
               for s in result["singles"]]
    ordered = sorted(result["pairs"], key=lambda p: -(p["test_accuracy"] if p["test_accuracy"] is not None else -1))
    pairs = [[p["label"], acc(p["test_accuracy"]), "",
              f"{_num(p['best_single_accuracy'])} ({p['best_single']})" if p["best_single"] else "n/a",
              _signed(p["gain"]) if p["gain"] is not None else "n/a", f"{p['disagreement']:.3f}"]
             for p in ordered]
    return singles, pairs


def _correlation_line(result: dict) -> str | None:
    r = result["disagreement_gain_correlation"]
    n = sum(p["gain"] is not None for p in result["pairs"])
    return None if r is None else f"Pearson correlation of disagreement and gain over {n} pairs: r = {r:+.2f}"


def print_table(result: dict, title: str, console=None) -> None:
    from rich.table import Table
    from rich.text import Text

    console = console or wide_console()
    table = Table(title=title)
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right", overflow="fold", no_wrap=i != 0)
    singles, pairs = table_rows(result)
    for j, row in enumerate(singles):
        table.add_row(*[Text(c) for c in row], end_section=j == len(singles) - 1)
    for row in pairs:
        style = "green" if row[4].startswith("+") else ("red" if row[4].startswith("-") else None)
        table.add_row(*[Text(c) for c in row], style=style)
    console.print(table)
    console.print(LEGEND, highlight=False)
    line = _correlation_line(result)
    if line:
        console.print(line, highlight=False)


def render_markdown(result: dict, title: str, command: str | None) -> str:
    lines = [f"# {title}", ""]
    if command:
        lines += ["```", command, "```", ""]
    singles, pairs = table_rows(result)
    lines += [LEGEND, "", "## Singles", "", "| encoder | test acc | own model acc |", "|---|---:|---:|"]
    lines += [f"| `{r[0]}` | {r[1]} | {r[2]} |" for r in singles]
    lines += ["", "## Pairs (best first)", "", "| encoders | test acc | better single | gain | disagreement |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| `{r[0]}` | {r[1]} | {r[3]} | {r[4]} | {r[5]} |" for r in pairs]
    line = _correlation_line(result)
    if line:
        lines += ["", line + "."]
    return "\n".join(lines) + "\n"


# -- the command ----------------------------------------------------------------------------------

class _Progress:
    """A rich progress bar on stderr in a terminal, one line per finished head otherwise, nothing with -q."""

    def __init__(self, total: int, quiet: bool):
        from .log import TaskProgress

        self.total, self.done = total, 0
        self.bar = TaskProgress("pair-search", total, quiet).__enter__()

    def starting(self, job: Job) -> None:
        self.bar.show(job.label)

    def finished(self, job: Job) -> None:
        self.done += 1
        what = {"reuse": "reused", "resume": "resumed"}.get(job.action, job.status)
        if job.status != "finished":
            text = f"[{self.done}/{self.total}] {job.label}: FAILED: {job.error}"
        else:
            secs = f" in {job.seconds:.1f} s" if job.action != "reuse" else ""
            text = f"[{self.done}/{self.total}] {job.label}: {what}{secs}, {METRIC} {_num(job.accuracy)}"
        self.bar.advance(job.label)
        self.bar.note(text, with_bar=job.status != "finished")

    def stop(self) -> None:
        self.bar.__exit__()


def pair_search(run_dirs: Sequence[str | Path], recipe: str, out: str | Path, overrides: Sequence[str] = (),
                quiet: bool = True, command: str | None = None, print_result: bool = False) -> dict:
    """Python API of `dojo pair-search`: train the heads (reusing finished ones in `out`), write
    pair_search.json/md and return the result (as in the json)."""
    from .trainer import Interrupted

    paths = [Path(p) for p in run_dirs]
    out = Path(out)
    check_runs(paths)
    labels = run_labels(paths)
    jobs = plan_jobs(recipe, overrides, paths, labels, out)
    for p in paths:
        check_same_data(jobs[0].recipe, p)
    runs = [RunInfo(p, label) for p, label in zip(paths, labels)]
    if not quiet:
        todo = {a: sum(j.action == a for j in jobs) for a in ("train", "resume", "reuse")}
        extra = ", ".join(f"{n} to {a}" for a, n in todo.items() if n and a != "train")
        click.echo(f"pair-search: {len(paths)} runs, {len(paths)} single(s) + {len(jobs) - len(paths)} pair(s) "
                   f"in {out}{' (' + extra + ')' if extra else ''}", err=True)
    progress = _Progress(len(jobs), quiet)
    try:
        for job in jobs:
            progress.starting(job)
            run_job(job, out)
            progress.finished(job)
    except (KeyboardInterrupt, Interrupted):
        progress.stop()
        click.echo(f"\npair-search interrupted; run the same command with --out {out} to resume it", err=True)
        sys.exit(130)
    finally:
        progress.stop()
    from .models.concat import clear_encoder_cache
    try:
        own_test_outputs(runs, jobs[0].recipe)
    finally:
        clear_encoder_cache()          # the encoders loaded for the heads, kept between them
    result = build_result(jobs, runs, out)
    title = f"pair-search: {len(paths)} encoders, recipe {Path(recipe).stem if Path(recipe).is_file() else recipe}"
    doc = {"title": title, "command": command, "recipe": str(recipe), "overrides": list(overrides),
           "test_rows": len(runs[0].outputs),
           "runs": [{"label": r.label, "run_dir": str(r.path), "own_test_accuracy": r.own_accuracy} for r in runs],
           **result}
    from .atomic import atomic_write_text
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / JSON_NAME, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / MD_NAME, render_markdown(result, title, command))
    if print_result:
        from rich.console import Console
        Console().print()
        print_table(result, title)
    return doc


@click.command("pair-search", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("args", nargs=-1, required=True, metavar="RUN_DIRS... [key.path=value ...]")
@click.option("--recipe", "-r", "recipe", required=True,
              help="The recipe for the heads (file or built-in name): its data, phases and optimizer; its model "
                   "is replaced by a concat of the frozen run encoders.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for the heads' runs and pair_search.md/json (default: runs/pair-search-<timestamp>/).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output; print only the table.")
@handle_errors
def pair_search_command(args, recipe, out_dir, quiet):
    """Train a head on every single and every pair of frozen run encoders, and tabulate the gains.

    \b
    dojo pair-search RUN_DIR RUN_DIR [RUN_DIR ...] --recipe R [--out DIR] [-q] [key.path=value ...]

    For each run directory and each pair of them, R is trained with its model replaced by
    {name: concat, encoders: [{run: A, freeze: true}, {run: B, freeze: true}], head: ...} in OUT/<label>/.
    The head is R's model's `head` when R's model is a concat, else a linear head; the overrides apply
    after the replacement, so `model.head.hidden=[64]` works. The runs must be finished classification
    runs trained on R's data and split.

    The table lists each single's test accuracy and its run's own model's, and for each pair its test
    accuracy, the better single's, the gain, and the disagreement of the two runs' own models on the test
    split (the share of rows where their predicted classes differ). Rerunning with the same --out reuses
    finished heads and resumes interrupted ones. Exit code 1 when a head failed to train.

    \b
    Example:
      dojo pair-search runs/mlp runs/cnn1d runs/gru --recipe head.yaml --out runs/pairs model.head.hidden=[64]"""
    runs, overrides = [], []
    for a in args:
        if Path(a).is_dir():
            runs.append(a)
        elif "=" in a:
            overrides.append(a)
        else:
            raise DojoError(f"{a}: neither a run directory nor an override key.path=value")
    out = Path(out_dir) if out_dir else Path("runs") / f"pair-search-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    argv = ["dojo", "pair-search", *runs, "--recipe", recipe, "--out", str(out), *overrides]
    doc = pair_search(runs, recipe, out, overrides, quiet=quiet, command=shlex.join(argv), print_result=True)
    click.echo(f"wrote {out / MD_NAME}, {out / JSON_NAME}")
    failed = [j for j in doc["singles"] + doc["pairs"] if j["status"] != "finished"]
    if failed:
        click.echo(f"{len(failed)} head(s) did not train:", err=True)
        for j in failed:
            click.echo(f"  {j['dir']}: {j['error']}", err=True)
        sys.exit(1)
