"""`dojo runs [DIR]`: the run directories under DIR (default `runs/`) as a table.

A run directory is a folder with any of summary.json, recipe.yaml, metrics.jsonl or checkpoints/. They
are looked for up to three levels below DIR (not inside runs), so `runs/compare-<timestamp>/<variant>/
seed<k>/` shows up next to `runs/<recipe>-<timestamp>/`.

Status: summary.json's `status` (finished, interrupted, failed); no summary.json: `incomplete` (still
running, or killed before it could write one); a summary.json that cannot be read: `unknown`.

    from torchdojo.runs import list_runs
    rows = list_runs("runs")          # the rows of `dojo runs --json`, oldest first
"""
from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from .cli_errors import handle_errors
from .errors import DojoError
from .runfiles import read_json_object, read_metrics_tolerant

RUN_MARKERS = ("summary.json", "recipe.yaml", "metrics.jsonl", "checkpoints")
# The timestamp default run directories end with (`quickstart-20250101-120000`, `compare-...`).
NAME_TIMESTAMP = re.compile(r"(\d{8}-\d{6})$")
# Per kind of metric the first one a run has is shown: the best over metrics.jsonl for val, the final
# value in summary.json for test.
BEST_VAL = (("val/accuracy", max), ("val/loss", min))
FINAL_TEST = ("test/accuracy", "test/mse", "test/loss")


def is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def find_runs(root: Path, max_depth: int = 3) -> list[Path]:
    """Run directories in `root` (itself, if it is one), at most `max_depth` levels below it."""
    if is_run_dir(root):
        return [root]
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            if is_run_dir(child):
                found.append(child)
            elif depth < max_depth:
                walk(child, depth + 1)

    walk(root, 1)
    return found


def read_status(run_dir: Path) -> tuple[str, dict]:
    """(status, summary) for a run directory; see the module docstring."""
    path = run_dir / "summary.json"
    if not path.exists():
        return "incomplete", {}
    try:
        summary = read_json_object(path)
    except DojoError:          # listed, not refused: the other runs still show
        return "unknown", {}
    status = summary.get("status")
    return (status if isinstance(status, str) and status else "unknown"), summary


def _number(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def scan_metrics(path: Path) -> dict[str, Any]:
    """From metrics.jsonl: the best value of each BEST_VAL metric (with its step) and the last step."""
    best: dict[str, dict] = {}
    last_step = None
    try:
        entries, _ = read_metrics_tolerant(path)      # lines that do not parse (a run writing one) are left out
    except DojoError:
        return {"best": best, "last_step": None}
    for entry in entries:
        step = entry.get("step")
        if isinstance(step, int):
            last_step = step if last_step is None else max(last_step, step)
        for name, better in BEST_VAL:
            v = _number(entry.get(name))
            if v is not None and (name not in best or better(v, best[name]["value"]) != best[name]["value"]):
                best[name] = {"value": v, "step": step}
    return {"best": best, "last_step": last_step}


def _checkpoint_step(run_dir: Path) -> int | None:
    steps = []
    for p in (run_dir / "checkpoints").glob("step-*"):
        try:
            steps.append(int(p.name.split("-", 1)[1].split(".")[0]))
        except ValueError:
            pass
    return max(steps) if steps else None


def started_at(run_dir: Path) -> datetime:
    """The timestamp in the directory's name, else the oldest modification time of its first files."""
    match = NAME_TIMESTAMP.search(run_dir.name)
    if match:
        try:
            return datetime.strptime(match.group(1), "%Y%m%d-%H%M%S")
        except ValueError:
            pass
    times = []
    for p in (run_dir / "recipe.yaml", run_dir / "data_info.json", run_dir):
        try:
            times.append(p.stat().st_mtime)
        except OSError:
            pass
    return datetime.fromtimestamp(min(times)) if times else datetime.fromtimestamp(0)


def _recipe_name(run_dir: Path, summary: dict) -> str | None:
    if isinstance(summary.get("recipe"), str):
        return summary["recipe"]
    try:
        text = (run_dir / "recipe.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    match = re.search(r"^name:\s*(.+?)\s*$", text, re.MULTILINE)     # no need to parse the whole file
    return match.group(1).strip("'\"") if match else None


def run_row(run_dir: Path, root: Path) -> dict[str, Any]:
    status, summary = read_status(run_dir)
    scan = scan_metrics(run_dir / "metrics.jsonl")
    best_val = next(({"metric": n, **scan["best"][n]} for n, _ in BEST_VAL if n in scan["best"]), None)
    metrics = summary.get("metrics") if isinstance(summary.get("metrics"), dict) else {}
    test = next(({"metric": n, "value": _number(metrics[n])} for n in FINAL_TEST if _number(metrics.get(n)) is not None),
                None)
    steps = summary.get("steps") if isinstance(summary.get("steps"), int) else None
    if steps is None:
        steps = scan["last_step"] if scan["last_step"] is not None else _checkpoint_step(run_dir)
    started = started_at(run_dir)
    name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    return {"name": name or ".", "path": str(run_dir), "recipe": _recipe_name(run_dir, summary), "status": status,
            "error": summary.get("error") if isinstance(summary.get("error"), str) else None,
            "best_val": best_val, "test": test, "steps": steps,
            "wall_seconds": _number(summary.get("wall_seconds")), "started": started.isoformat(timespec="seconds")}


def list_runs(root: str | Path) -> list[dict[str, Any]]:
    """The rows of every run directory under `root`, oldest first (see `run_row`)."""
    root = Path(root)
    rows = [run_row(r, root) for r in find_runs(root)]
    return sorted(rows, key=lambda r: (r["started"], r["name"]))


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def _metric_cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    return f"{entry['metric'].split('/', 1)[1]} {entry['value']:.4g}"


STATUS_STYLE = {"finished": "green", "interrupted": "yellow", "failed": "red", "incomplete": "yellow",
                "unknown": "magenta"}


@click.command("runs", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", default="runs", required=False, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (a list of objects) instead.")
@handle_errors
def runs_command(directory, as_json):
    """List the runs in DIRECTORY (default: runs/), oldest first.

    Shows every run directory up to three levels down (so the runs of a `dojo compare` folder appear):
    its name, recipe, status (finished, interrupted, failed; incomplete: no summary.json yet, the run
    is still going or was killed; unknown: unreadable summary.json), the best val/accuracy (or val/loss)
    over metrics.jsonl, the final test/accuracy (or test/mse, test/loss), steps, wall time and start
    time (from the timestamp in the name, else the files' times)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    root = Path(directory)
    if not root.exists():
        raise DojoError(f"no directory {directory} (runs appear there after `dojo train RECIPE`)")
    if not root.is_dir():
        raise DojoError(f"{directory} is not a directory")
    rows = list_runs(root)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no runs in {directory}")
        return
    table = Table(title=f"runs in {directory} ({len(rows)})")
    for col, justify in (("name", "left"), ("recipe", "left"), ("status", "left"), ("best val", "right"),
                         ("test", "right"), ("steps", "right"), ("wall", "right"), ("started", "left")):
        table.add_column(col, justify=justify, overflow="fold", no_wrap=col in ("status", "started", "steps"))
    for r in rows:
        table.add_row(escape(r["name"]), escape(r["recipe"] or "-"), Text(r["status"], style=STATUS_STYLE.get(r["status"], "")),
                      _metric_cell(r["best_val"]), _metric_cell(r["test"]),
                      "-" if r["steps"] is None else str(r["steps"]), fmt_seconds(r["wall_seconds"]),
                      r["started"].replace("T", " "))
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(width=160)        # piped: keep a row on one line
    console.print(table)
    for r in rows:
        if r["error"]:
            console.print(f"{r['name']}: {r['error']}", highlight=False, markup=False)
