"""Readers of the JSON files in a run directory (summary.json, data_info.json, metrics.jsonl, ...) that
turn anything malformed into one DojoError naming the file (and the line, for metrics.jsonl): a file
that is not UTF-8, does not parse, is nested too deeply for the parser, or holds the wrong kind of value.

metrics.jsonl is written one whole line at a time, each ending in a newline, so a last line without its
newline that does not parse is a line being written right now (the run is still going) or one a crash
cut short: readers leave it out rather than fail on it (`MetricsScan.torn`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DojoError


def _parse_object(data: bytes) -> dict:
    """The JSON object in `data`; ValueError saying why when it is not UTF-8 JSON or not an object."""
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:           # e.g. an integer beyond Python's digit limit
        raise ValueError(f"invalid JSON ({exc})") from None
    except RecursionError:              # json recurses once per nesting level
        raise ValueError("invalid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, found {kind_of(value)}")
    return value


def kind_of(value: Any) -> str:
    """What a JSON value is, for messages: "a list", "a string", ..."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DojoError(f"{path} cannot be read: {exc.strerror or exc}") from None


def read_json_object(path: str | Path, fix: str = "") -> dict:
    """The JSON object in `path`; DojoError naming the file when it cannot be read, is not UTF-8 JSON,
    or holds something other than an object. `fix` (e.g. "delete it and run X again") ends the message."""
    try:
        return _parse_object(read_bytes(path))
    except ValueError as exc:
        raise DojoError(f"{path}: {exc}{'; ' + fix if fix else ''}") from None


def _is_metric_value(v: Any) -> bool:
    # null and NaN are what an undefined metric is written as (an F1 with no positive sample, ...).
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def read_summary(path: str | Path) -> dict:
    """A run's summary.json: an object whose `metrics`, if present, maps names to numbers (or null);
    DojoError naming the file and the key otherwise."""
    summary = read_json_object(path)
    metrics = summary.get("metrics")
    if metrics is None:
        return summary
    if not isinstance(metrics, dict):
        raise DojoError(f"{path}: \"metrics\" must be an object of metric names and numbers, found {kind_of(metrics)}")
    for name, value in metrics.items():
        if not _is_metric_value(value):
            raise DojoError(f"{path}: metric \"{name}\" must be a number, found {kind_of(value)}")
    return summary


# -- metrics.jsonl ------------------------------------------------------------------------------------

@dataclass
class MetricsScan:
    """metrics.jsonl line by line; blank lines are ignored."""
    entries: list[dict] = field(default_factory=list)     # the lines that are JSON objects, in file order
    texts: list[str] = field(default_factory=list)        # those lines as written (no newline)
    bad: list[tuple[int, str]] = field(default_factory=list)   # (line number from 1, why) of the others
    torn: bool = False           # the last of `bad` is the file's unfinished last line (no newline)
    unterminated: bool = False   # the file does not end in a newline (an append would join two lines)

    def check(self, path: str | Path) -> None:
        """DojoError naming `path` and its first damaged line; an unfinished last line is not damage."""
        damaged = self.bad[:-1] if self.torn else self.bad
        if damaged:
            line, why = damaged[0]
            more = f" (and {len(damaged) - 1} more line(s))" if len(damaged) > 1 else ""
            raise DojoError(f"{path}, line {line}: {why}{more}")


def scan_metrics(data: bytes) -> MetricsScan:
    """Each line of a metrics.jsonl's bytes, decoded on its own so one bad byte costs one line."""
    scan = MetricsScan(unterminated=bool(data) and not data.endswith(b"\n"))
    raw_lines = data.split(b"\n")
    for number, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        try:
            entry = _parse_object(raw)
        except ValueError as exc:
            scan.bad.append((number, str(exc)))
            scan.torn = number == len(raw_lines) and scan.unterminated
            continue
        scan.entries.append(entry)
        scan.texts.append(raw.decode("utf-8").strip())
    return scan


def read_metrics(path: str | Path, strict: bool = True) -> list[dict]:
    """The lines of a metrics.jsonl. `strict`: a line that is not a JSON object is a DojoError naming the
    file and the line, except an unfinished last line (see the module docstring), which is left out.
    Not strict: every such line is left out."""
    scan = scan_metrics(read_bytes(path))
    if strict:
        scan.check(path)
    return scan.entries


def read_metrics_tolerant(path: str | Path) -> tuple[list[dict], int]:
    """(the lines of a metrics.jsonl that are JSON objects, how many other lines were left out)."""
    scan = scan_metrics(read_bytes(path))
    return scan.entries, len(scan.bad)
