"""Whole-file writes that a crash cannot tear: write a temporary file next to the target, fsync it,
rename it over the target (atomic on POSIX), fsync the folder. A reader, or a run killed with SIGKILL
at any moment, sees the old content or the new, never a mix or an empty file."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
