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


def did_you_mean(word: str, choices) -> str:
    """A ' (did you mean 'x'?)' suffix when a close match exists, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def choices_text(choices) -> str:
    return ", ".join(sorted(str(c) for c in choices))
