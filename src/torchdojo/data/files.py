"""User data: CSV tables and NPZ arrays, checked so bad files fail with one clear message."""
from __future__ import annotations

import csv as _csv
import io
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import DojoError, did_you_mean
from .raw import RawDataset

TaskType = Literal["auto", "classification", "regression"]
# "auto" treats an integer target with at most this many distinct values as class labels.
MAX_AUTO_CLASSES = 50
# Classification data may use class ids up to this (or up to its number of rows, if more).
MAX_CLASSES = 1000
FLOAT32_MAX = float(np.finfo(np.float32).max)


class DataError(DojoError):
    """A data file cannot be used as it is; the message says what and where."""


def _existing(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file not found: {path}")
    return p


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan if text.strip() == "" else None  # type: ignore[return-value]


def _finite32(value: float) -> bool:
    """Finite, and still finite as a float32 (1e39 is not)."""
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


@dataclass
class CsvTable:
    path: str
    columns: dict[str, list[str]]   # column name -> cell texts, in row order
    lines: list[int]                 # each data row's physical line number, for error messages


def _decode_utf8(data: bytes, path: str) -> str:
    """The file's text (UTF-8, an optional byte-order mark dropped); anything else is a DataError
    naming the line and byte offset of the first byte that is not UTF-8."""
    bom = data.startswith(b"\xef\xbb\xbf")
    try:
        return data[3 if bom else 0:].decode("utf-8")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if bom else 0)
        line = data.count(b"\n", 0, start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte {start}: {data[start:start + 1]!r}); "
                        "save the file as UTF-8") from None


def _read_bytes(p: Path, path: str) -> bytes:
    try:
        return p.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def read_csv(path: str) -> CsvTable:
    p = _existing(path)
    text = _decode_utf8(_read_bytes(p, path), path)
    reader = _csv.reader(io.StringIO(text, newline=""))
    # Keep each row's physical line number (the line it ends on) for error messages.
    try:
        rows = [(r, reader.line_num) for r in reader if r]
    except _csv.Error as exc:   # e.g. a field longer than the csv module's limit
        raise DataError(f"{path}, line {reader.line_num}: not a readable CSV row ({exc})") from None
    if not rows:
        raise DataError(f"{path}: the file is empty")
    header, body = rows[0][0], rows[1:]
    if len(set(header)) != len(header):
        dup = next(name for i, name in enumerate(header) if name in header[:i])
        raise DataError(f"{path}, line {rows[0][1]}: duplicate column name {dup!r} in the header")
    for r, line in body:
        if len(r) != len(header):
            raise DataError(f"{path}, line {line}: {len(r)} fields, expected {len(header)} as in the header")
    if not body:
        raise DataError(f"{path}: no data rows after the header")
    return CsvTable(path, {name: [r[j] for r, _ in body] for j, name in enumerate(header)},
                    [line for _, line in body])


def numeric_matrix(table: CsvTable, names: list[str]) -> np.ndarray:
    """Parse the named columns as floats; a non-number, an empty cell or a value that is not finite as
    a 32-bit float (NaN, inf, 1e39) is an error naming line and column."""
    out = np.empty((len(table.lines), len(names)), dtype=np.float32)
    path = table.path
    for j, name in enumerate(names):
        for i, text in enumerate(table.columns[name]):
            value = _to_float(text)
            if value is None or not _finite32(value):
                what = "missing value" if text.strip() == "" else f"value {text!r}"
                raise DataError(f"{path}, line {table.lines[i]}, column '{name}': {what} is not a finite number")
            out[i, j] = value
    return out


def _is_numeric(values: list[str]) -> bool:
    return all(_to_float(v) is not None for v in values)


def _labels(y_text: list[str], task_type: str, table: CsvTable, target: str):
    path = table.path
    for i, v in enumerate(y_text):
        if v.strip() == "":
            raise DataError(f"{path}, line {table.lines[i]}, column '{target}': missing label "
                            f"(the target column has missing labels)")
    numeric = _is_numeric(y_text)
    if numeric:
        # Numbers are labels or targets; NaN/inf (or beyond float32's range) is a missing value in disguise.
        for i, v in enumerate(y_text):
            if not _finite32(float(v)):
                raise DataError(f"{path}, line {table.lines[i]}, column '{target}': label {v!r} is not a finite "
                                "number (the target column has missing or non-finite values)")
    if task_type == "auto":
        if not numeric:
            task_type = "classification"
        else:
            vals = np.array([float(v) for v in y_text])
            integral = np.all(vals == np.round(vals))
            task_type = "classification" if integral and len(np.unique(vals)) <= MAX_AUTO_CLASSES else "regression"
    if task_type == "regression":
        if not numeric:
            i = next(i for i, v in enumerate(y_text) if _to_float(v) is None)
            raise DataError(f"{path}, line {table.lines[i]}, column '{target}': target column '{target}' has "
                            f"non-numeric values ({y_text[i]!r}); use task_type: classification")
        return np.array([float(v) for v in y_text], dtype=np.float32), task_type, []
    # Sort numerically when labels are numbers, so class ids follow the labels' order.
    uniq = sorted(set(y_text), key=(lambda v: float(v)) if numeric else str)
    index = {v: i for i, v in enumerate(uniq)}
    return np.array([index[v] for v in y_text], dtype=np.int64), task_type, uniq


def csv(path: str, target: str, features: list[str] | None = None, drop_non_numeric: bool = False,
        task_type: TaskType = "auto") -> RawDataset:
    """A CSV table with a header row: numeric feature columns and one target column.

    `features` picks columns (default: every other column). A non-numeric column is an error unless
    `drop_non_numeric: true`. Labels may be strings; `task_type: auto` decides classification vs
    regression from the target's values."""
    table = read_csv(path)
    columns = table.columns
    if target not in columns:
        raise DataError(f"{path}: no target column '{target}'{did_you_mean(target, columns)}; "
                        f"columns: {', '.join(columns)}")
    names = features if features is not None else [c for c in columns if c != target]
    missing = [c for c in names if c not in columns]
    if missing:
        raise DataError(f"{path}: no column '{missing[0]}'{did_you_mean(missing[0], columns)}")
    non_numeric = [c for c in names if not _is_numeric(columns[c])]
    if non_numeric and features is None and drop_non_numeric:
        names = [c for c in names if c not in non_numeric]
    elif non_numeric:
        raise DataError(f"{path}: column(s) {', '.join(repr(c) for c in non_numeric)} are not numeric; "
                        "remove them, list the numeric ones in `features`, or set `drop_non_numeric: true`")
    if not names:
        raise DataError(f"{path}: no numeric feature columns left")
    x = numeric_matrix(table, names)
    y, kind, classes = _labels(columns[target], task_type, table, target)
    return RawDataset(x, y, kind, "tabular", class_names=classes, feature_names=list(names))


# What reading an NPZ can raise for a file that is not one, or a damaged one: numpy's refusal of pickles
# and bad array headers (ValueError), a truncated or non-zip file (BadZipFile, EOFError, zlib.error),
# an unsupported or encrypted zip member (NotImplementedError, RuntimeError), and I/O errors.
_NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


def read_npz_arrays(path: str) -> dict[str, np.ndarray]:
    """Every array of an NPZ file (pickled objects refused); a file that is not a readable NPZ archive
    is a DataError naming it."""
    p = _existing(path)
    try:
        f = np.load(p, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):     # a plain .npy array, not an archive
            raise DataError(f"{path}: not an NPZ archive (a single .npy array); save it with numpy.savez")
        with f:
            return {k: f[k] for k in f.files}
    except _NPZ_ERRORS as exc:
        raise DataError(f"{path}: not a readable NPZ file ({type(exc).__name__}: {exc})") from None


def _check_numbers(arr: np.ndarray, path: str, name: str) -> None:
    """Integers or floats, every value finite (also as float32); the error names the first bad row."""
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{path}: array '{name}' must be numeric and finite (it has dtype {arr.dtype})")
    if arr.dtype.kind == "f" and arr.size:
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(arr) & (np.abs(arr) <= FLOAT32_MAX)
        if not ok.all():
            row = int(np.flatnonzero(~ok.reshape(len(arr), -1).all(axis=1))[0]) if arr.ndim else 0
            raise DataError(f"{path}: array '{name}' must be numeric and finite (NaN or inf found in row {row})")


def npz(path: str, task_type: TaskType = "auto") -> RawDataset:
    """An NPZ file with arrays `x` (N, ...) and `y` (N,); optional `x_test`, `y_test`.

    x of rank 2 is a table, rank 3 (N, C, L) a sequence, rank 4 (N, C, H, W) an image batch."""
    arrays = read_npz_arrays(path)
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array '{key}' (found: {', '.join(arrays) or 'none'})")
    x, y = arrays["x"], arrays["y"]
    _check_pair(x, y, path, "x", "y")
    for name in ("x", "y", "x_test", "y_test"):
        if name in arrays:
            _check_numbers(arrays[name], path, name)
    kind = {2: "tabular", 3: "sequence", 4: "image"}[x.ndim]
    if task_type == "auto":
        integral = np.issubdtype(y.dtype, np.integer) or np.all(y == np.round(y))
        task_type = "classification" if y.ndim == 1 and integral and len(np.unique(y)) <= MAX_AUTO_CLASSES \
            else "regression"
    x_test = y_test = None
    if "x_test" in arrays or "y_test" in arrays:
        x_test, y_test = arrays.get("x_test"), arrays.get("y_test")
        if x_test is None or y_test is None:
            raise DataError(f"{path}: 'x_test' and 'y_test' must come together")
        _check_pair(x_test, y_test, path, "x_test", "y_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: 'x_test' has shape {x_test.shape[1:]} per row, 'x' has {x.shape[1:]}")
        if y_test.shape[1:] != y.shape[1:]:
            raise DataError(f"{path}: 'y_test' has shape {y_test.shape[1:]} per row, 'y' has {y.shape[1:]}")
    if task_type == "classification":
        rows = len(y) + (len(y_test) if y_test is not None else 0)
        for arr, name in ((y, "y"), (y_test, "y_test")):
            if arr is None:
                continue
            if arr.ndim != 1:
                raise DataError(f"{path}: '{name}' must have shape (N,) of class ids for classification, "
                                f"got {arr.shape}")
            bad = np.flatnonzero((arr < 0) | (arr != np.round(arr)))
            if len(bad):
                raise DataError(f"{path}: '{name}' must hold class ids 0..K-1 (non-negative integers); "
                                f"row {int(bad[0])} has {arr[bad[0]].item()!r}")
            # Class ids index the model's outputs: an id far beyond the number of rows is a mistake
            # (and would make a model with that many outputs).
            too_big = np.flatnonzero(arr >= max(MAX_CLASSES, rows))
            if len(too_big):
                raise DataError(f"{path}: class id {arr[too_big[0]].item()!r} in '{name}' row {int(too_big[0])} is out "
                                f"of range: class ids must be 0..K-1 with K at most {max(MAX_CLASSES, rows)}")
        n_classes = int(max(y.max(), y_test.max() if y_test is not None else 0)) + 1
        cast = lambda a: None if a is None else a.astype(np.int64)  # noqa: E731
        names = [str(i) for i in range(n_classes)]
    else:
        cast = lambda a: None if a is None else a.astype(np.float32)  # noqa: E731
        names = []
    return RawDataset(x.astype(np.float32), cast(y), task_type, kind, class_names=names,
                      feature_names=[f"x{i}" for i in range(x.shape[1])] if kind == "tabular" else [],
                      x_test=None if x_test is None else x_test.astype(np.float32), y_test=cast(y_test))


def _check_pair(x: np.ndarray, y: np.ndarray, path: str, xn: str, yn: str) -> None:
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{path}: '{xn}' must have 2, 3 or 4 dimensions (N, ...), got shape {x.shape}")
    if len(x) == 0:
        raise DataError(f"{path}: '{xn}' is empty")
    if 0 in x.shape[1:]:
        raise DataError(f"{path}: '{xn}' has an empty dimension (shape {x.shape})")
    if y.ndim not in (1, 2) or len(y) != len(x) or 0 in y.shape[1:]:
        raise DataError(f"{path}: '{yn}' must have shape (N,) with N={len(x)} as '{xn}', got {y.shape}")
