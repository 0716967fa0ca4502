"""User data: CSV tables and NPZ arrays, checked so bad files fail with one clear message."""
from __future__ import annotations

import csv as _csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import DojoError, did_you_mean
from .raw import RawDataset

TaskType = Literal["auto", "classification", "regression"]
# "auto" treats an integer target with at most this many distinct values as class labels.
MAX_AUTO_CLASSES = 50


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


@dataclass
class CsvTable:
    path: str
    columns: dict[str, list[str]]   # column name -> cell texts, in row order
    lines: list[int]                 # each data row's physical line number, for error messages


def read_csv(path: str) -> CsvTable:
    p = _existing(path)
    with p.open(newline="") as fh:
        reader = _csv.reader(fh)
        # Keep each row's physical line number (the line it ends on) for error messages.
        rows = [(r, reader.line_num) for r in reader if r]
    if not rows:
        raise DataError(f"{path}: the file is empty")
    header, body = rows[0][0], rows[1:]
    if len(set(header)) != len(header):
        raise DataError(f"{path}: duplicate column names in the header")
    for r, line in body:
        if len(r) != len(header):
            raise DataError(f"{path}, line {line}: {len(r)} fields, expected {len(header)} as in the header")
    if not body:
        raise DataError(f"{path}: no data rows after the header")
    return CsvTable(path, {name: [r[j] for r, _ in body] for j, name in enumerate(header)},
                    [line for _, line in body])


def numeric_matrix(table: CsvTable, names: list[str]) -> np.ndarray:
    """Parse the named columns as floats; a non-number or empty cell is an error naming line and column."""
    out = np.empty((len(table.lines), len(names)), dtype=np.float32)
    path = table.path
    for j, name in enumerate(names):
        for i, text in enumerate(table.columns[name]):
            value = _to_float(text)
            if value is None or not math.isfinite(value):
                what = "missing value" if value is not None and math.isnan(value) else f"value {text!r}"
                raise DataError(f"{path}, line {table.lines[i]}, column '{name}': {what} is not a finite number")
            out[i, j] = value
    return out


def _is_numeric(values: list[str]) -> bool:
    return all(_to_float(v) is not None for v in values)


def _labels(y_text: list[str], task_type: str, path: str, target: str):
    numeric = _is_numeric(y_text)
    if task_type == "auto":
        if not numeric:
            task_type = "classification"
        else:
            vals = np.array([float(v) for v in y_text])
            integral = np.all(np.isfinite(vals)) and np.all(vals == np.round(vals))
            task_type = "classification" if integral and len(np.unique(vals)) <= MAX_AUTO_CLASSES else "regression"
    if task_type == "regression":
        if not numeric:
            raise DataError(f"{path}: target column '{target}' has non-numeric values; use task_type: classification")
        y = np.array([float(v) for v in y_text], dtype=np.float32)
        if not np.all(np.isfinite(y)):
            raise DataError(f"{path}: target column '{target}' has missing or non-finite values")
        return y, task_type, []
    if any(v.strip() == "" for v in y_text):
        raise DataError(f"{path}: target column '{target}' has missing labels")
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
    y, kind, classes = _labels(columns[target], task_type, path, target)
    return RawDataset(x, y, kind, "tabular", class_names=classes, feature_names=list(names))


def npz(path: str, task_type: TaskType = "auto") -> RawDataset:
    """An NPZ file with arrays `x` (N, ...) and `y` (N,); optional `x_test`, `y_test`.

    x of rank 2 is a table, rank 3 (N, C, L) a sequence, rank 4 (N, C, H, W) an image batch."""
    p = _existing(path)
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable NPZ file ({exc})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array '{key}' (found: {', '.join(arrays) or 'none'})")
    x, y = arrays["x"], arrays["y"]
    _check_pair(x, y, path, "x", "y")
    if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
        raise DataError(f"{path}: array 'x' must be numeric and finite (NaN or inf found)")
    for name in ("y", "y_test"):
        if name in arrays and (not np.issubdtype(arrays[name].dtype, np.number) or not np.all(np.isfinite(arrays[name]))):
            raise DataError(f"{path}: array '{name}' must be numeric and finite (NaN or inf found)")
    kind = {2: "tabular", 3: "sequence", 4: "image"}[x.ndim]
    if task_type == "auto":
        integral = np.issubdtype(y.dtype, np.integer) or (np.all(np.isfinite(y)) and np.all(y == np.round(y)))
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
    if task_type == "classification":
        for arr, name in ((y, "y"), (y_test, "y_test")):
            if arr is not None and (np.any(arr < 0) or np.any(arr != np.round(arr))):
                raise DataError(f"{path}: '{name}' must hold class ids 0..K-1 (non-negative integers)")
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
    if y.ndim not in (1, 2) or len(y) != len(x):
        raise DataError(f"{path}: '{yn}' must have shape (N,) with N={len(x)} as '{xn}', got {y.shape}")
