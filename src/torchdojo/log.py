"""Where a run reports: `metrics.jsonl` in the run directory and the terminal (a rich progress bar
when interactive, one line per epoch otherwise, nothing with --quiet)."""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import runfiles
from .atomic import atomic_write_text


class TensorBoardSink:
    """Every numeric value of a metrics line as a TensorBoard scalar (tag = its metrics.jsonl key, x =
    its `step`), under the run's `tb/` folder: `tensorboard --logdir runs` shows all runs.

    One event per line with all its values, written with tensorboard's own event-file writer: about 30x
    cheaper than `SummaryWriter.add_scalar` per value, which would cost a tiny run several percent. On
    resume, a SessionLog START at the checkpoint's next step makes TensorBoard drop the events from that
    step on, as they will be logged again (what SummaryWriter's purge_step does)."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        # Imported here: only runs that write TensorBoard files pay for the import.
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self._event, self._summary = Event, Summary
        self.writer = EventFileWriter(str(folder), flush_secs=10)
        if purge_step is not None:
            self.writer.add_event(Event(wall_time=time.time(), step=purge_step,
                                        session_log=SessionLog(status=SessionLog.START)))

    def write(self, entry: dict) -> None:
        step = entry.get("step")
        if not isinstance(step, int):
            return
        values = [self._summary.Value(tag=key, simple_value=float(value)) for key, value in entry.items()
                  if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool)]
        if values:
            self.writer.add_event(self._event(wall_time=time.time(), step=step, summary=self._summary(value=values)))

    def close(self) -> None:
        self.writer.close()


class MetricsFile:
    """Appends one JSON object per line; each line is flushed so a crash loses nothing logged. With a
    `tensorboard` sink, the same lines also go to TensorBoard."""

    def __init__(self, path: Path, keep_lines: int | None = None, tensorboard: TensorBoardSink | None = None):
        """`keep_lines`: on resume, keep only the first `keep_lines` lines (a checkpoint records how many
        had been written when it was saved); the rest will be produced again.

        An existing file is read line by line, so a damaged one (a line cut by a crash, a stray byte, a
        garbage line) costs only its bad lines: they are dropped with a warning (`dropped` says how
        many), and the file is rewritten from the lines that parse. Appending to it as it was would
        leave a file that `dojo report` and `dojo compare` refuse."""
        self.path, self.tensorboard = path, tensorboard
        scan = runfiles.scan_metrics(runfiles.read_bytes(path)) if path.exists() else runfiles.MetricsScan()
        texts = scan.texts if keep_lines is None else scan.texts[:keep_lines]
        self.dropped = len(scan.bad)
        if self.dropped:
            line, why = scan.bad[0]
            warnings.warn(f"{path}: dropped {self.dropped} line(s) that do not parse (line {line}: {why})",
                          stacklevel=2)
        if self.dropped or len(texts) < len(scan.texts) or scan.unterminated:
            # Atomically: a kill during the rewrite must not lose lines the checkpoint covers.
            atomic_write_text(path, "".join(text + "\n" for text in texts))
        self.lines = len(texts)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, entry: dict) -> None:
        self._fh.write(json.dumps(entry, allow_nan=True) + "\n")
        self._fh.flush()
        self.lines += 1
        if self.tensorboard is not None:
            self.tensorboard.write(entry)

    def close(self) -> None:
        self._fh.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: Path) -> list[dict]:
    """Every line of a metrics.jsonl; a damaged line is a DojoError naming the file and the line."""
    return runfiles.read_metrics(path)


def fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


class TaskProgress:
    """A rich progress bar for a counted piece of work (`dojo eval`, ...), drawn only on a terminal and
    without `quiet`; otherwise silent. Use as a context manager and call `advance(label)`."""

    def __init__(self, description: str, total: int, quiet: bool = False, console: Console | None = None):
        console = console or Console(stderr=True)
        self.progress, self.quiet = None, quiet
        if not quiet and console.is_terminal:
            self.progress = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[label]}"), TimeRemainingColumn(),
                                     console=console, transient=True)
            self._task = self.progress.add_task("", total=total, label="")

    def __enter__(self) -> "TaskProgress":
        if self.progress is not None:
            self.progress.start()
        return self

    def advance(self, label: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self._task, advance=1, label=label)

    def show(self, label: str) -> None:
        """What is being worked on now, without advancing."""
        if self.progress is not None:
            self.progress.update(self._task, label=label)

    def note(self, text: str, with_bar: bool = True) -> None:
        """A line about a finished piece: above the bar on a terminal (only when `with_bar`), on stderr
        otherwise (one line per piece for logs), nothing when quiet."""
        if self.quiet:
            return
        if self.progress is None:
            print(text, file=sys.stderr, flush=True)
        elif with_bar:
            self.progress.console.print(text, highlight=False, markup=False)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()          # safe to call twice (compare and pair-search may)


class Reporter:
    """Terminal output of a training run."""

    def __init__(self, total_steps: int, quiet: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=False)
        self.quiet = quiet
        self.interactive = self.console.is_terminal and not quiet
        self.total_steps = total_steps
        self.progress: Progress | None = None
        self._task = None
        self._t0 = time.perf_counter()

    def start(self, step: int) -> None:
        if not self.interactive:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} samples/s"), TimeRemainingColumn(),
            console=self.console, transient=False)
        self.progress.start()
        self._task = self.progress.add_task("", total=self.total_steps, completed=step,
                                            loss="-", lr="-", speed="-")

    def update(self, step: int, phase: str, epoch: float, loss: float, lr: float, speed: float) -> None:
        if self.progress is not None:
            self.progress.update(self._task, completed=step, description=f"{phase} · epoch {epoch:.1f}",
                                 loss=f"{loss:.4f}", lr=f"{lr:.2e}", speed=f"{speed:,.0f}")

    def epoch_line(self, entry: dict) -> None:
        if self.quiet:
            return
        parts = [f"{entry['phase']}", f"epoch {entry['epoch']:.1f}", f"step {entry['step']}/{self.total_steps}"]
        # One line per epoch stays short: the main scalars, not per-class recalls or duplicates of loss.
        parts += [f"{k} {fmt(v)}" for k, v in entry.items()
                  if (k == "train/loss" or k.startswith("val/")) and k.count("/") == 1
                  and k not in ("val/nll", "val/brier")]
        line = " | ".join(parts)
        if self.progress is not None:
            self.progress.console.print(line, highlight=False)
        else:
            print(line, flush=True)

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def table(self, metrics: dict, title: str) -> None:
        if self.quiet:
            return
        print_metrics_table(metrics, title, self.console)


def print_metrics_table(metrics: dict, title: str, console: Console | None = None) -> None:
    """Rows are metric names, columns are splits (`split/name` keys)."""
    console = console or Console()
    splits = sorted({k.split("/", 1)[0] for k in metrics}, key=lambda s: ["train", "val", "test"].index(s)
                    if s in ("train", "val", "test") else 9)
    names = list(dict.fromkeys(k.split("/", 1)[1] for k in metrics))
    table = Table(title=title)
    table.add_column("metric")
    for split in splits:
        table.add_column(split, justify="right")
    for name in names:
        table.add_row(name, *[fmt(metrics[f"{s}/{name}"]) if f"{s}/{name}" in metrics else "" for s in splits])
    console.print(table)


def stdout_console() -> Console:
    return Console(file=sys.stdout)
