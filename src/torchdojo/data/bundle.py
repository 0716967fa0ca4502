"""Splitting a dataset into train/val/test and the metadata a run keeps to predict on new inputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import ConfigError, DojoError
from ..runfiles import kind_of
from .raw import RawDataset

# `data:` keys that make_bundle and the trainer handle, not the dataset factory.
SPLIT_KEYS = ("val_fraction", "test_fraction", "split_seed", "standardize", "imbalance", "sampler", "num_workers",
              "classes", "train_size", "unlabeled")


@dataclass
class DataInfo:
    """What a model and `dojo predict` need to know about the data; saved as `data_info.json`."""
    task_type: str
    kind: str
    input_shape: list[int]
    num_outputs: int
    class_names: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)
    x_mean: list[float] | None = None   # per-feature standardisation fitted on train (tables)
    x_std: list[float] | None = None
    y_mean: list[float] | None = None   # regression targets are trained standardised
    y_std: list[float] | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    train_class_counts: list[int] | None = None   # rows per class in train (classification)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataInfo":
        return cls(**d)

    def prepare(self, x: np.ndarray, source: str | None = None) -> torch.Tensor:
        """Raw inputs (as in the data files) to the tensor the model was trained on. `source` (the input
        file) prefixes error messages."""
        at = f"{source}: " if source else ""
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise DojoError(f"{at}inputs must be numbers (got an array of dtype {x.dtype})")
        with np.errstate(over="ignore"):        # float64 beyond float32's range becomes inf: refused below
            x = x.astype(np.float32)
        if x.ndim == len(self.input_shape) and len(self.input_shape) > 1:
            x = x[None]
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            if x.ndim == 2 and int(np.prod(self.input_shape)) == x.shape[1]:
                x = x.reshape(len(x), *self.input_shape)   # flattened images or sequences in a CSV
            else:
                raise DojoError(f"{at}inputs have shape {tuple(x.shape[1:])} per row, the model expects "
                                f"{tuple(self.input_shape)}")
        if not np.all(np.isfinite(x)):
            row = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
            raise DojoError(f"{at}inputs contain NaN or infinite values (row {row})")
        if self.x_mean is not None:
            shape = tuple(self.input_shape)
            x = (x - np.asarray(self.x_mean, np.float32).reshape(shape)) / np.asarray(self.x_std, np.float32).reshape(shape)
        return torch.from_numpy(np.ascontiguousarray(x))

    def check_same_data(self, saved: dict, source: str, info_file: str = "the run's data_info.json") -> None:
        """Refuse data that no longer fits a trained run. `saved` is the run's `data_info.json` (read
        from `info_file`; a damaged one is a DojoError naming it) and this the info of the data as it
        reads now (a CSV may have been edited since): a new label, a lost class, another shape or other
        feature columns would not match the model's weights."""
        from .files import DataError

        if not isinstance(saved, dict):
            raise DojoError(f"{info_file}: expected a JSON object, found {kind_of(saved)}")
        for key in ("class_names", "input_shape", "feature_names"):
            if not isinstance(saved.get(key) or [], list):
                raise DojoError(f"{info_file}: \"{key}\" must be a list, found {kind_of(saved[key])}")
        if saved.get("task_type") != self.task_type:
            raise DataError(f"{source}: the data now reads as {self.task_type} data; the run was trained on "
                            f"{saved.get('task_type')} data")
        old = [str(c) for c in saved.get("class_names") or []]
        new_labels = [c for c in self.class_names if c not in old]
        if new_labels:
            raise DataError(f"{source}: label {new_labels[0]!r} is not one of the {len(old)} classes the run was "
                            f"trained on ({', '.join(old[:10])}{', ...' if len(old) > 10 else ''})")
        if list(self.class_names) != old:
            lost = [c for c in old if c not in self.class_names]
            raise DataError(f"{source}: the data no longer has the class(es) the run was trained on: "
                            f"{', '.join(lost[:5])}")
        if list(self.input_shape) != list(saved.get("input_shape") or []):
            raise DataError(f"{source}: rows have shape {tuple(self.input_shape)}, the run was trained on "
                            f"{tuple(saved.get('input_shape') or ())}")
        if self.num_outputs != saved.get("num_outputs"):
            raise DataError(f"{source}: the data has {self.num_outputs} target(s), the run was trained on "
                            f"{saved.get('num_outputs')}")
        old_features = list(saved.get("feature_names") or [])
        if old_features and list(self.feature_names) != old_features:
            missing = [f for f in old_features if f not in self.feature_names]
            raise DataError(f"{source}: the feature columns changed since training"
                            + (f" (missing: {', '.join(missing[:5])})" if missing else ""))

    def target_to_original(self, y: torch.Tensor) -> torch.Tensor:
        if self.y_mean is None:
            return y
        return y * torch.tensor(self.y_std, device=y.device) + torch.tensor(self.y_mean, device=y.device)


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class DataBundle:
    """The splits of one dataset plus its DataInfo, and, for semi-supervised learning, the `unlabeled`
    training rows (inputs only: their labels are -1)."""
    train: Split
    val: Split
    test: Split
    info: DataInfo
    unlabeled: Split | None = None

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise DojoError(f"unknown split '{name}'; choose train, val or test")
        return getattr(self, name)

    def to(self, device) -> "DataBundle":
        return DataBundle(self.train.to(device), self.val.to(device), self.test.to(device), self.info,
                          self.unlabeled.to(device) if self.unlabeled is not None else None)


def _split_indices(y: np.ndarray, fraction: float, seed: int, stratify: bool, what: str, source: str = "data"):
    from sklearn.model_selection import train_test_split

    n = len(y)
    n_out = int(round(n * fraction))
    if n_out < 1 or n - n_out < 1:
        raise DojoError(f"{source}: a {what} fraction of {fraction:.4g} of {n} rows leaves an empty split; "
                        "change the fraction or use more data")
    idx = np.arange(n)
    # Stratify only where every class can be in both parts (else sklearn refuses the split).
    n_classes = len(np.unique(y))
    strat = y if stratify and np.min(np.bincount(y)) >= 2 and min(n_out, n - n_out) >= n_classes else None
    keep, out = train_test_split(idx, test_size=n_out, random_state=seed, shuffle=True, stratify=strat)
    return np.sort(keep), np.sort(out)


def _check_class_ids(ids: list[int], num_classes: int, path: str) -> None:
    """ConfigError at `path` for class ids out of range or listed twice."""
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(path, f"class ids {bad} are out of range: the data has {num_classes} classes "
                                f"(ids 0 to {num_classes - 1})")
    if len(set(ids)) != len(ids):
        raise ConfigError(path, f"a class id is listed twice (got {list(ids)})")


def _imbalance_train(y_train: np.ndarray, num_classes: int, ratio: float, minority: list[int] | None,
                     seed: int) -> np.ndarray:
    """Sorted indices of the training rows kept by `imbalance`: every row of the majority classes and
    round(n_c / ratio) rows (at least 1) of each minority class c, drawn with a generator seeded by
    `seed`. `minority` defaults to the second half of the classes (ids >= K // 2)."""
    if minority is None:
        minority = list(range(num_classes // 2, num_classes))
    _check_class_ids(minority, num_classes, "data.imbalance.minority")
    rng = np.random.default_rng(seed)
    keep = [np.flatnonzero(~np.isin(y_train, minority))]
    for c in sorted(minority):
        rows = np.flatnonzero(y_train == c)
        if len(rows) == 0:
            continue
        n_keep = max(1, round(len(rows) / ratio))
        keep.append(rng.choice(rows, size=n_keep, replace=False))
    return np.sort(np.concatenate(keep))


def select_classes(raw: RawDataset, classes: list[int]) -> RawDataset:
    """Only the rows of `classes`, relabelled 0.. in the order given (test rows too)."""
    if raw.task_type != "classification":
        raise ConfigError("data.classes", f"needs classification data; this dataset is {raw.task_type} data")
    num_classes = len(raw.class_names) or int(np.max(raw.y)) + 1
    _check_class_ids(classes, num_classes, "data.classes")
    relabel = np.full(num_classes, -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))

    def keep(x, y):
        rows = relabel[y] >= 0
        return x[rows], relabel[y[rows]]
    x, y = keep(raw.x, raw.y)
    x_test, y_test = keep(raw.x_test, raw.y_test) if raw.x_test is not None else (None, None)
    names = [raw.class_names[c] for c in classes] if raw.class_names else [str(c) for c in classes]
    return RawDataset(x, y, raw.task_type, raw.kind, class_names=names, feature_names=list(raw.feature_names),
                      x_test=x_test, y_test=y_test)


def _subsample_train(y_train: np.ndarray, size: int, seed: int, classify: bool) -> np.ndarray:
    """Sorted indices of `size` training rows, stratified by class where every class can keep a row."""
    if size > len(y_train):
        raise ConfigError("data.train_size", f"{size} is more than the {len(y_train)} training rows")
    if size == len(y_train):
        return np.arange(size)
    from sklearn.model_selection import train_test_split
    n_classes = len(np.unique(y_train)) if classify else 0
    # Stratify only where sklearn can: every class twice, and each part at least one row per class.
    strat = y_train if classify and min(size, len(y_train) - size) >= n_classes \
        and np.min(np.bincount(y_train)) >= 2 else None
    keep, _ = train_test_split(np.arange(len(y_train)), train_size=size, random_state=seed, shuffle=True,
                               stratify=strat)
    return np.sort(keep)


def make_bundle(raw: RawDataset, val_fraction: float, test_fraction: float, seed: int,
                standardize: bool | None = None, imbalance: dict | None = None,
                source: str = "data", train_size: int | None = None,
                unlabeled: bool | np.ndarray = False) -> DataBundle:
    """Stratified (for classes) train/val/test split, standardisation fitted on train only.

    Both fractions are shares of the whole dataset; with a dataset's own test set, `val_fraction` is a
    share of its training rows. `imbalance` ({ratio, minority}) then subsamples the minority classes of
    the training split only (val and test keep every row, so their metrics stay comparable), and
    `train_size` keeps that many training rows (stratified); with `unlabeled` true, the training rows it
    leaves out become the `unlabeled` stream, without their labels; an array `unlabeled` is that stream
    (standardised like train). `source` (the data file, or "data") starts error messages."""
    classify = raw.task_type == "classification"
    if len(raw.x) == 0:
        raise DojoError(f"{source}: the dataset is empty")
    if classify and raw.class_names and np.max(raw.y) >= len(raw.class_names):
        raise DojoError(f"{source}: label {int(np.max(raw.y))} is out of range for {len(raw.class_names)} classes")
    x, y = raw.x, raw.y
    if raw.x_test is not None:
        x_test, y_test = raw.x_test, raw.y_test
    else:
        keep, test_idx = _split_indices(y, test_fraction, seed, classify, "test", source)
        x, y, x_test, y_test = x[keep], y[keep], x[test_idx], y[test_idx]
    if raw.x_test is None:
        if val_fraction + test_fraction >= 1:
            raise DojoError(f"{source}: val_fraction + test_fraction = {val_fraction + test_fraction:.4g} leaves no "
                            "training data")
        val_fraction = val_fraction / (1 - test_fraction)   # both fractions are shares of the whole set
    keep, val_idx = _split_indices(y, val_fraction, seed + 1, classify, "val", source)
    x_train, y_train, x_val, y_val = x[keep], y[keep], x[val_idx], y[val_idx]
    num_classes = (len(raw.class_names) or int(np.max(raw.y)) + 1) if classify else 0
    if imbalance is not None:
        if not classify:
            raise ConfigError("data.imbalance", f"needs classification data; this dataset is "
                                                f"{raw.task_type} data")
        kept = _imbalance_train(y_train, num_classes, float(imbalance.get("ratio", 1.0)),
                                imbalance.get("minority"), seed)
        x_train, y_train = x_train[kept], y_train[kept]
    x_unlabeled = None
    if isinstance(unlabeled, np.ndarray):
        if tuple(unlabeled.shape[1:]) != tuple(x.shape[1:]) or len(unlabeled) == 0:
            raise ConfigError("data.unlabeled", f"the unlabelled rows have shape {tuple(unlabeled.shape[1:])} "
                                                f"({len(unlabeled)} rows), the data {tuple(x.shape[1:])}")
        x_unlabeled, unlabeled = unlabeled.astype(np.float32), False
    elif unlabeled and train_size is None:
        raise ConfigError("data.unlabeled", "needs data.train_size: the training rows beyond it are the unlabeled ones")
    if train_size is not None:
        kept = _subsample_train(y_train, train_size, seed + 2, classify)
        if unlabeled:
            x_unlabeled = np.delete(x_train, kept, axis=0)
            if len(x_unlabeled) == 0:
                raise ConfigError("data.unlabeled", f"train_size {train_size} keeps every training row: none is "
                                                    f"left unlabeled")
        x_train, y_train = x_train[kept], y_train[kept]

    info = DataInfo(task_type=raw.task_type, kind=raw.kind, input_shape=list(x.shape[1:]),
                    num_outputs=len(raw.class_names) if classify else (1 if y.ndim == 1 else y.shape[1]),
                    class_names=list(raw.class_names), feature_names=list(raw.feature_names),
                    sizes={"train": len(x_train), "val": len(x_val), "test": len(x_test)},
                    train_class_counts=np.bincount(y_train, minlength=num_classes).tolist() if classify else None)
    if standardize if standardize is not None else raw.kind == "tabular":
        mean, std = x_train.mean(axis=0), x_train.std(axis=0)
        std = np.where(std > 1e-8, std, 1.0)   # constant columns stay as they are
        info.x_mean, info.x_std = mean.ravel().tolist(), std.ravel().tolist()
        mean, std = mean.astype(np.float32), std.astype(np.float32)
        x_train, x_val, x_test = [(a - mean) / std for a in (x_train, x_val, x_test)]
        if x_unlabeled is not None:
            x_unlabeled = (x_unlabeled - mean) / std
    if not classify:
        y_mean, y_std = y_train.mean(axis=0), y_train.std(axis=0)
        y_std = np.where(y_std > 1e-8, y_std, 1.0)
        info.y_mean, info.y_std = np.atleast_1d(y_mean).tolist(), np.atleast_1d(y_std).tolist()
        y_train, y_val, y_test = [((a - y_mean) / y_std).astype(np.float32) for a in (y_train, y_val, y_test)]

    def as_split(a, b):
        return Split(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)),
                     torch.from_numpy(np.ascontiguousarray(b)))
    stream = None
    if x_unlabeled is not None:
        info.sizes["unlabeled"] = len(x_unlabeled)
        stream = as_split(x_unlabeled, np.full(len(x_unlabeled), -1, dtype=np.int64))
    return DataBundle(as_split(x_train, y_train), as_split(x_val, y_val), as_split(x_test, y_test), info, stream)


def load_data(spec: dict, seed: int) -> DataBundle:
    """Build the bundle from a validated `data:` recipe section."""
    from ..registry import DATASETS

    raw = DATASETS.build(spec, "data", extra_keys=SPLIT_KEYS)
    if spec.get("sampler", "uniform") == "balanced" and raw.task_type != "classification":
        raise ConfigError("data.sampler", f"`balanced` draws rows by class, so it needs classification data; "
                                          f"this dataset is {raw.task_type} data")
    if spec.get("classes") is not None:
        raw = select_classes(raw, list(spec["classes"]))
    unlabeled = spec.get("unlabeled", False)
    if isinstance(unlabeled, str):          # an NPZ file of unlabelled inputs: its array `x`
        from .files import _check_numbers, read_npz_arrays
        arrays = read_npz_arrays(unlabeled)
        if "x" not in arrays:
            raise DojoError(f"{unlabeled}: missing array 'x' (found: {', '.join(arrays) or 'none'})")
        _check_numbers(arrays["x"], unlabeled, "x")
        unlabeled = arrays["x"]
    split_seed = spec.get("split_seed")
    return make_bundle(raw, spec.get("val_fraction", 0.1), spec.get("test_fraction", 0.2),
                       seed if split_seed is None else split_seed, spec.get("standardize"), spec.get("imbalance"),
                       source=f"data ({spec['path']})" if spec.get("path") else "data",
                       train_size=spec.get("train_size"), unlabeled=unlabeled)
