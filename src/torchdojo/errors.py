"""Errors a user can act on: each names what is wrong and where, and the CLI turns it into exit code 2."""
from __future__ import annotations

import difflib


class DojoError(Exception):
    """A problem with the user's input (recipe, override, data file, run directory)."""


class ConfigError(DojoError):
    """A recipe value is invalid. `path` is the dotted key path, e.g. `phases.0.optimizer.lr`."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class StoppedBySignal(BaseException):
    """SIGINT or SIGTERM while no training step runs (the data loads, the model builds): the command
    stops with `exit_code` (130 or 143) and this message, as there is nothing new to save.

    A BaseException, like KeyboardInterrupt: it is raised by a signal handler wherever the program is,
    and an `except Exception` there (a loader turning any failure into "file X is damaged", `dojo
    compare` going on with the next run) must not swallow it."""

    # The last one raised and not yet reported (see `raise_pending`).
    pending: "StoppedBySignal | None" = None

    def __init__(self, exit_code: int, message: str = "interrupted before training started"):
        self.exit_code = exit_code
        super().__init__(message)
        StoppedBySignal.pending = self
        self._exit_if_swallowed()

    @classmethod
    def raise_pending(cls) -> None:
        """Raise the stop again if it was swallowed. A signal handler's exception can land inside C code
        that drops it (seen: numpy's extension modules while they are imported), so the setup checks
        this at a few points (after the data and model are built, before the run directory is written)."""
        if cls.pending is not None:
            stop, cls.pending = cls.pending, None       # once: whoever catches it has it
            raise stop

    def _exit_if_swallowed(self, seconds: float = 10.0) -> None:
        """The last resort when the stop was swallowed and no check came: the process ends `seconds`
        later with the same message and exit code (a daemon timer, gone when the process exits)."""
        import os
        import sys
        import threading

        def exit_now():
            print(str(self), file=sys.stderr, flush=True)
            os._exit(self.exit_code)
        self._timer = threading.Timer(seconds, exit_now)
        self._timer.daemon = True
        self._timer.start()

    def handled(self) -> None:
        """It reached the code that reports it (or the caller of `Trainer.fit`): no fallback any more."""
        self._timer.cancel()
        if StoppedBySignal.pending is self:
            StoppedBySignal.pending = None


def did_you_mean(word: str, choices) -> str:
    """A ' (did you mean 'x'?)' suffix when a close match exists, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def choices_text(choices) -> str:
    return ", ".join(sorted(str(c) for c in choices))


class DiskFull(DojoError):
    """The device holding the run directory is full (ENOSPC, or a quota: EDQUOT). Nothing saved before
    is lost: the run resumes from its last good checkpoint once there is space. `dojo` exits with
    `exit_code` 75 (EX_TEMPFAIL of sysexits.h: a temporary failure, try again later), not 2."""
    exit_code = 75
