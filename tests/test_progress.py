"""Progress output: a bar on a terminal, nothing with --quiet or when the output is not a terminal."""
from __future__ import annotations

import io

from rich.console import Console

from torchdojo.log import TaskProgress


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=100), out


def test_task_progress_draws_a_bar_on_a_terminal():
    console, out = _console(True)
    with TaskProgress("eval", 3, console=console) as progress:
        for label in ("val", "test", "train"):
            progress.advance(label)
        assert progress.progress.tasks[0].completed == 3
    assert "eval" in out.getvalue()


def test_task_progress_is_silent_when_quiet_or_not_a_terminal():
    for quiet, terminal in ((True, True), (False, False)):
        console, out = _console(terminal)
        with TaskProgress("eval", 2, quiet=quiet, console=console) as progress:
            progress.advance("val")
            assert progress.progress is None
        assert out.getvalue() == ""
