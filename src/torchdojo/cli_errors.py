"""How every `dojo` command reports problems: user errors are one line on stderr and exit code 2;
an interrupted training run exits 130 (SIGINT) or 143 (SIGTERM) after printing how to resume."""
from __future__ import annotations

import functools
import sys

import click

from .errors import DojoError


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .trainer import Interrupted   # the trainer imports torch: only when a command runs
        try:
            return fn(*args, **kwargs)
        except DojoError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except Interrupted as exc:
            click.echo(f"\n{exc}", err=True)
            sys.exit(exc.exit_code)
    return wrapper
