"""How every `dojo` command reports problems: user errors are one line on stderr and exit code 2;
an interrupted training run exits 130 (SIGINT) or 143 (SIGTERM) after printing how to resume, and so
does one stopped before training starts, with one line instead of click's "Aborted!" (exit 1)."""
from __future__ import annotations

import functools
import sys

import click

from .errors import DojoError, StoppedBySignal


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .trainer import Interrupted   # the trainer imports torch: only when a command runs
        try:
            return fn(*args, **kwargs)
        except DojoError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(getattr(exc, "exit_code", 2))     # 2, or e.g. DiskFull.exit_code
        except Interrupted as exc:
            click.echo(f"\n{exc}", err=True)
            sys.exit(exc.exit_code)
        except StoppedBySignal as exc:
            exc.handled()
            click.echo(str(exc), err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:       # Ctrl-C in a command that installs no handler (eval, report, ...)
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper
