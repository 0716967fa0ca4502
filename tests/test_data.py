"""Data: built-in datasets, splits, standardisation, user CSV/NPZ files, TensorLoader, DataInfo."""
from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import pytest
import torch

from torchdojo.data import DataInfo, Split, TensorLoader, load_data
from torchdojo.data.bundle import make_bundle
from torchdojo.data.files import csv as read_csv
from torchdojo.data.files import npz as read_npz
from torchdojo.data.raw import RawDataset
from torchdojo.errors import DojoError


@functools.lru_cache(maxsize=None)
def bundle(name: str, seed: int = 0, val: float = 0.1, test: float = 0.2, standardize=None, **options):
    spec = {"name": name, "val_fraction": val, "test_fraction": test, "standardize": standardize, **options}
    return load_data(spec, seed)


def all_y(b) -> np.ndarray:
    return np.concatenate([b.train.y.numpy(), b.val.y.numpy(), b.test.y.numpy()])


# -- built-in datasets ---------------------------------------------------------------------------

BUILTIN = {
    # name: (task_type, kind, input_shape, num_outputs, rows)
    "digits": ("classification", "image", [1, 8, 8], 10, 1797),
    "breast_cancer": ("classification", "tabular", [30], 2, 569),
    "wine": ("classification", "tabular", [13], 3, 178),
    "iris": ("classification", "tabular", [4], 3, 150),
    "diabetes": ("regression", "tabular", [10], 1, 442),
    "synthetic_tabular": ("classification", "tabular", [20], 3, 2000),
}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_dataset_shapes_and_classes(name):
    task_type, kind, shape, outputs, rows = BUILTIN[name]
    b = bundle(name)
    info = b.info
    assert (info.task_type, info.kind, info.input_shape, info.num_outputs) == (task_type, kind, shape, outputs)
    assert sum(info.sizes.values()) == rows
    for split in ("train", "val", "test"):
        s = b.split(split)
        assert len(s) == info.sizes[split] > 0
        assert tuple(s.x.shape[1:]) == tuple(shape) and s.x.dtype == torch.float32
        assert torch.isfinite(s.x).all()
        assert s.y.shape == (len(s),)
    y = all_y(b)
    if task_type == "classification":
        assert b.train.y.dtype == torch.int64
        assert set(np.unique(y)) == set(range(outputs))      # every class present, ids 0..K-1
        assert len(info.class_names) == outputs
    else:
        assert b.train.y.dtype == torch.float32 and info.class_names == []


def test_digits_pixels_in_unit_range_and_not_standardised():
    b = bundle("digits")
    x = torch.cat([b.train.x, b.val.x, b.test.x])
    assert x.min() == 0.0 and x.max() == 1.0
    assert b.info.x_mean is None


def test_mnist1d_keeps_its_own_test_set():
    b = bundle("mnist1d")
    assert (b.info.task_type, b.info.kind, b.info.input_shape, b.info.num_outputs) == \
        ("classification", "sequence", [1, 40], 10)
    # 4,000 generated training rows are split into train/val; the 1,000-row test set is MNIST-1D's own.
    assert b.info.sizes == {"train": 3600, "val": 400, "test": 1000}
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = 5000, 0.8, 42
    ref = make_dataset(args)
    np.testing.assert_array_equal(b.test.y.numpy(), np.asarray(ref["y_test"]))
    np.testing.assert_allclose(b.test.x.numpy()[:, 0, :], np.asarray(ref["x_test"], dtype=np.float32))


def test_diabetes_is_regression_with_standardised_targets():
    b = bundle("diabetes")
    info = b.info
    assert info.task_type == "regression" and info.num_outputs == 1
    ytr = b.train.y.numpy().astype(np.float64)
    assert abs(ytr.mean()) < 1e-5 and ytr.std() == pytest.approx(1.0, abs=1e-5)
    # target_to_original undoes the standardisation exactly: values are the dataset's raw targets.
    from sklearn.datasets import load_diabetes
    raw_targets = set(np.round(load_diabetes().target, 3))
    back = info.target_to_original(b.test.y).numpy()
    assert set(np.round(back.astype(np.float64), 3)) <= raw_targets
    assert 25 <= back.min() and back.max() <= 346


def test_synthetic_tabular_options():
    b = bundle("synthetic_tabular", n_samples=300, n_features=6, n_informative=3, n_classes=4)
    assert b.info.input_shape == [6] and b.info.num_outputs == 4 and sum(b.info.sizes.values()) == 300


# -- splitting -----------------------------------------------------------------------------------

def _row_counts(x) -> Counter[bytes]:
    x = np.asarray(x, dtype=np.float32)
    return Counter(row.tobytes() for row in x.reshape(len(x), -1))


@pytest.mark.parametrize("name", ["digits", "iris", "diabetes"])
def test_splits_partition_the_dataset(name):
    """train + val + test hold every raw row exactly as often as the dataset does (a partition)."""
    from torchdojo.data import DATASETS
    raw = DATASETS[name]()
    b = bundle(name, standardize=False)
    together = _row_counts(b.train.x) + _row_counts(b.val.x) + _row_counts(b.test.x)
    assert together == _row_counts(raw.x)


def test_splits_are_disjoint_by_row_id():
    n = 101
    x = np.stack([np.arange(n), np.random.default_rng(0).normal(size=n)], axis=1).astype(np.float32)
    raw = RawDataset(x, np.arange(n) % 3, "classification", "tabular", class_names=["a", "b", "c"])
    b = make_bundle(raw, 0.15, 0.25, seed=5, standardize=False)
    parts = [set(s.x[:, 0].long().tolist()) for s in (b.train, b.val, b.test)]
    assert sum(map(len, parts)) == n and set().union(*parts) == set(range(n))
    # labels travel with their rows
    for s in (b.train, b.val, b.test):
        assert torch.equal(s.x[:, 0].long() % 3, s.y)


def test_split_sizes_match_fractions():
    for val, test in ((0.1, 0.2), (0.25, 0.3), (0.05, 0.5)):
        b = bundle("synthetic_tabular", val=val, test=test)
        n = 2000
        n_test = round(n * test)
        assert b.info.sizes["test"] == n_test
        # both fractions are shares of the whole dataset
        assert b.info.sizes["val"] == round(n * val)
        assert b.info.sizes["train"] == n - n_test - b.info.sizes["val"]


def test_fraction_that_empties_a_split_is_an_error():
    raw = RawDataset(np.zeros((5, 2), np.float32), np.array([0, 1, 0, 1, 0]), "classification", "tabular",
                     class_names=["a", "b"])
    with pytest.raises(DojoError, match="empty split"):
        make_bundle(raw, 0.1, 0.05, seed=0)


@pytest.mark.parametrize("name", ["digits", "wine", "breast_cancer"])
def test_stratification_keeps_class_proportions(name):
    b = bundle(name)
    k = b.info.num_outputs
    overall = np.bincount(all_y(b), minlength=k) / len(all_y(b))
    for split in (b.train, b.val, b.test):
        share = np.bincount(split.y.numpy(), minlength=k) / len(split)
        # stratified: each class's share differs from the overall share by at most ~1 row's worth
        assert np.max(np.abs(share - overall)) <= 1.5 / len(split) + 1e-9, (name, share, overall)


def test_unstratified_split_would_differ_measurably():
    """Guard for the test above: a random split of the same size is visibly less balanced."""
    y = all_y(bundle("wine"))
    overall = np.bincount(y, minlength=3) / len(y)
    rng = np.random.default_rng(0)
    worst = [np.max(np.abs(np.bincount(rng.permutation(y)[:14], minlength=3) / 14 - overall)) for _ in range(50)]
    assert max(worst) > 1.5 / 14


def test_standardisation_fitted_on_train_only():
    b = bundle("breast_cancer")
    xtr = b.train.x.numpy().astype(np.float64)
    np.testing.assert_allclose(xtr.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(xtr.std(axis=0), 1.0, atol=1e-4)
    # val/test use train's statistics, so they are close to but not exactly standardised.
    for s in (b.val, b.test):
        x = s.x.numpy().astype(np.float64)
        assert np.abs(x.mean(axis=0)).max() > 1e-2
        assert np.abs(x.std(axis=0) - 1).max() > 1e-2
    # The stored statistics are the raw train split's.
    raw = bundle("breast_cancer", standardize=False)
    np.testing.assert_allclose(b.info.x_mean, raw.train.x.numpy().mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(b.info.x_std, raw.train.x.numpy().std(axis=0), rtol=1e-4)


def test_standardize_false_keeps_raw_values():
    from sklearn.datasets import load_iris
    b = bundle("iris", standardize=False)
    assert b.info.x_mean is None
    raw_rows = {tuple(r) for r in load_iris().data.astype(np.float32)}
    assert {tuple(r) for r in b.train.x.numpy()} <= raw_rows


def test_constant_column_is_not_divided_by_zero():
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    x[:, 1] = 5.0
    raw = RawDataset(x, np.arange(40) % 2, "classification", "tabular", class_names=["a", "b"])
    b = make_bundle(raw, 0.2, 0.2, seed=0)
    assert torch.isfinite(b.train.x).all()
    assert torch.all(b.train.x[:, 1] == 0)


def test_same_seed_same_split_other_seed_different():
    a, again, other = (load_data({"name": "iris"}, seed) for seed in (0, 0, 1))
    assert torch.equal(a.train.x, again.train.x) and torch.equal(a.test.y, again.test.y)
    assert not torch.equal(a.test.x, other.test.x)
    # split_seed overrides the recipe seed
    by_split_seed = load_data({"name": "iris", "split_seed": 1}, seed=0)
    assert torch.equal(by_split_seed.test.x, other.test.x)


def test_label_out_of_range_rejected():
    raw = RawDataset(np.zeros((10, 2), np.float32), np.arange(10) % 3, "classification", "tabular",
                     class_names=["a", "b"])
    with pytest.raises(DojoError, match="label 2 is out of range for 2 classes"):
        make_bundle(raw, 0.2, 0.2, seed=0)


# -- CSV -----------------------------------------------------------------------------------------

def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_csv_numeric_features_string_labels(tmp_path):
    path = write(tmp_path, "d.csv", "a,b,label\n1,2.5,cat\n3,4,dog\n5,-6e1,cat\n7,8,bird\n")
    raw = read_csv(path, target="label")
    assert raw.task_type == "classification" and raw.kind == "tabular"
    assert raw.class_names == ["bird", "cat", "dog"]            # sorted
    np.testing.assert_array_equal(raw.y, [1, 2, 1, 0])
    np.testing.assert_allclose(raw.x, [[1, 2.5], [3, 4], [5, -60], [7, 8]])
    assert raw.feature_names == ["a", "b"]


def test_csv_numeric_labels_sorted_numerically_and_regression(tmp_path):
    raw = read_csv(write(tmp_path, "n.csv", "a,y\n1,10\n2,2\n3,10\n4,2\n"), target="y")
    assert raw.task_type == "classification" and raw.class_names == ["2", "10"]
    np.testing.assert_array_equal(raw.y, [1, 0, 1, 0])
    raw = read_csv(write(tmp_path, "r.csv", "a,y\n1,0.5\n2,1.5\n3,2.25\n"), target="y")
    assert raw.task_type == "regression" and raw.y.dtype == np.float32
    np.testing.assert_allclose(raw.y, [0.5, 1.5, 2.25])


def test_csv_feature_selection(tmp_path):
    path = write(tmp_path, "d.csv", "a,b,note,c,label\n1,2,x,3,0\n4,5,y,6,1\n")
    raw = read_csv(path, target="label", features=["c", "a"])
    assert raw.feature_names == ["c", "a"]
    np.testing.assert_allclose(raw.x, [[3, 1], [6, 4]])
    with pytest.raises(DojoError, match=r"no column 'cc' \(did you mean 'c'\?\)"):
        read_csv(path, target="label", features=["cc"])


def test_csv_non_numeric_column_rejected_or_dropped(tmp_path):
    path = write(tmp_path, "d.csv", "a,city,b,label\n1,Oslo,2,0\n3,Rome,4,1\n")
    with pytest.raises(DojoError) as info:
        read_csv(path, target="label")
    assert "'city'" in str(info.value) and "drop_non_numeric" in str(info.value)
    raw = read_csv(path, target="label", drop_non_numeric=True)
    assert raw.feature_names == ["a", "b"]
    np.testing.assert_allclose(raw.x, [[1, 2], [3, 4]])


def test_csv_missing_value_names_line_and_column(tmp_path):
    path = write(tmp_path, "d.csv", "a,b,label\n1,2,0\n3,4,1\n5,,0\n")
    with pytest.raises(DojoError) as info:
        read_csv(path, target="label")
    assert "line 4" in str(info.value) and "column 'b'" in str(info.value)
    assert "missing" in str(info.value)


def test_csv_ragged_row_names_line(tmp_path):
    path = write(tmp_path, "d.csv", "a,b,label\n1,2,0\n3,4\n5,6,1\n")
    with pytest.raises(DojoError) as info:
        read_csv(path, target="label")
    assert "line 3" in str(info.value) and "2 fields" in str(info.value) and "expected 3" in str(info.value)


@pytest.mark.parametrize("text, line", [
    ("a,b,label\n1,2,0\n\n3,4\n", 4),            # ragged row after a blank line
    ("a,b,label\n1,2,0\n\n3,,1\n", 4),           # missing value after a blank line
    ('a,b,label\n1,2,"x\ny"\n3,,y\n', 4),        # missing value after a quoted two-line field
])
def test_csv_error_line_numbers_are_physical_lines(tmp_path, text, line):
    """The reported line must be the file's line, so a user can jump to it in an editor."""
    path = write(tmp_path, "d.csv", text)
    with pytest.raises(DojoError) as info:
        read_csv(path, target="label")
    assert f"line {line}" in str(info.value), str(info.value)


def test_csv_missing_target_column_suggests(tmp_path):
    path = write(tmp_path, "d.csv", "a,b,label\n1,2,0\n")
    with pytest.raises(DojoError) as info:
        read_csv(path, target="lable")
    assert "did you mean 'label'" in str(info.value)


def test_csv_missing_label(tmp_path):
    path = write(tmp_path, "d.csv", "a,label\n1,cat\n2,\n3,dog\n")
    with pytest.raises(DojoError, match="missing labels"):
        read_csv(path, target="label")


def test_csv_empty_and_header_only_and_missing(tmp_path):
    with pytest.raises(DojoError, match="empty"):
        read_csv(write(tmp_path, "e.csv", ""), target="label")
    with pytest.raises(DojoError, match="no data rows"):
        read_csv(write(tmp_path, "h.csv", "a,label\n"), target="label")
    with pytest.raises(DojoError, match="not found"):
        read_csv(str(tmp_path / "nope.csv"), target="label")


def test_csv_through_load_data(tmp_path):
    rows = "\n".join(f"{i},{(i * 7) % 5},{'yes' if i % 2 else 'no'}" for i in range(40))
    path = write(tmp_path, "d.csv", "a,b,answer\n" + rows + "\n")
    b = load_data({"name": "csv", "path": path, "target": "answer", "val_fraction": 0.25,
                   "test_fraction": 0.25}, seed=0)
    assert b.info.class_names == ["no", "yes"] and b.info.feature_names == ["a", "b"]
    assert b.info.sizes == {"test": 10, "val": 10, "train": 20}   # fractions of the whole set
    assert b.info.x_mean is not None            # tables are standardised by default


# -- NPZ -----------------------------------------------------------------------------------------

def save_npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_table(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    raw = read_npz(save_npz(tmp_path, x=x, y=np.arange(30) % 3))
    assert (raw.task_type, raw.kind, raw.class_names) == ("classification", "tabular", ["0", "1", "2"])
    np.testing.assert_array_equal(raw.x, x)
    assert raw.feature_names == ["x0", "x1", "x2"]


def test_npz_rank3_is_sequence_and_rank4_is_image(tmp_path):
    raw = read_npz(save_npz(tmp_path, x=np.zeros((12, 2, 7)), y=np.arange(12) % 2))
    assert raw.kind == "sequence" and raw.x.shape == (12, 2, 7)
    raw = read_npz(save_npz(tmp_path, x=np.zeros((12, 1, 4, 4)), y=np.arange(12) % 2))
    assert raw.kind == "image"


def test_npz_float_targets_are_regression(tmp_path):
    raw = read_npz(save_npz(tmp_path, x=np.zeros((10, 2)), y=np.linspace(0, 1, 10)))
    assert raw.task_type == "regression" and raw.y.dtype == np.float32


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((10, 2))}, "missing array 'y'"),
    ({"x": np.where(np.eye(10, 2) > 0, np.nan, 0.0), "y": np.arange(10) % 2}, "NaN"),
    ({"x": np.zeros((10, 2)), "y": np.arange(10) % 2 - 1}, "non-negative"),
    ({"x": np.zeros((10, 2)), "y": np.arange(9) % 2}, "N=10"),
    ({"x": np.zeros(10), "y": np.arange(10) % 2}, "2, 3 or 4 dimensions"),
    ({"x": np.zeros((10, 2)), "y": np.arange(10) % 2, "x_test": np.zeros((4, 3)), "y_test": np.zeros(4)},
     "x_test"),
    ({"x": np.zeros((10, 2)), "y": np.arange(10) % 2, "x_test": np.zeros((4, 2))}, "must come together"),
])
def test_npz_bad_files(tmp_path, arrays, message):
    with pytest.raises(DojoError, match=message):
        read_npz(save_npz(tmp_path, **arrays))


def test_npz_nan_target_rejected(tmp_path):
    """A NaN in `y` must be an error like a NaN in `x`, not silently turn every target into NaN."""
    y = np.linspace(0, 1, 20)
    y[3] = np.nan
    path = save_npz(tmp_path, x=np.random.default_rng(0).normal(size=(20, 2)), y=y)
    with pytest.raises(DojoError, match="y"):
        load_data({"name": "npz", "path": path}, seed=0)


def test_npz_not_an_npz_and_missing(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_text("hello")
    with pytest.raises(DojoError, match="not a readable NPZ"):
        read_npz(str(path))
    with pytest.raises(DojoError, match="not found"):
        read_npz(str(tmp_path / "missing.npz"))


def test_npz_test_arrays_become_the_test_split(tmp_path):
    rng = np.random.default_rng(0)
    x, x_test = rng.normal(size=(40, 3)), rng.normal(size=(7, 3)) + 100.0
    path = save_npz(tmp_path, x=x, y=np.arange(40) % 2, x_test=x_test, y_test=np.arange(7) % 2)
    b = load_data({"name": "npz", "path": path, "val_fraction": 0.25, "standardize": False}, seed=0)
    assert b.info.sizes == {"train": 30, "val": 10, "test": 7}
    np.testing.assert_allclose(b.test.x.numpy(), x_test.astype(np.float32))
    np.testing.assert_array_equal(b.test.y.numpy(), np.arange(7) % 2)
    assert b.train.x.max() < 50 and b.val.x.max() < 50       # no test row leaked into train/val


# -- TensorLoader --------------------------------------------------------------------------------

def make_split(n=23):
    return Split(torch.arange(n, dtype=torch.float32)[:, None] * torch.ones(1, 2), torch.arange(n))


def ids(batches):
    return [b["y"].tolist() for b in batches]


def test_loader_shuffle_is_a_function_of_seed_and_epoch():
    split = make_split()
    a = TensorLoader(split, 5, shuffle=True, seed=3)
    b = TensorLoader(split, 5, shuffle=True, seed=3)
    assert ids(a.epoch(2)) == ids(b.epoch(2)) == ids(a.epoch(2))
    assert ids(a.epoch(0)) != ids(a.epoch(1))
    assert ids(a.epoch(0)) != ids(TensorLoader(split, 5, shuffle=True, seed=4).epoch(0))
    assert ids(a.epoch(0)) != [list(range(i, min(i + 5, 23))) for i in range(0, 23, 5)]
    # x and y stay paired
    for batch in a.epoch(1):
        assert torch.equal(batch["x"][:, 0], batch["y"].float())


def test_loader_start_equals_skipping():
    loader = TensorLoader(make_split(), 4, shuffle=True, seed=1)
    full = ids(loader.epoch(3))
    for k in range(len(loader) + 1):
        assert ids(loader.epoch(3, start=k)) == full[k:]


def test_loader_every_sample_once_per_epoch():
    loader = TensorLoader(make_split(), 5, shuffle=True, seed=0)
    assert len(loader) == 5
    for epoch in range(3):
        batches = ids(loader.epoch(epoch))
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        assert sorted(sum(batches, [])) == list(range(23))


def test_loader_without_shuffle_is_in_order():
    assert sum(ids(TensorLoader(make_split(), 5).epoch(0)), []) == list(range(23))
    assert sum(ids(TensorLoader(make_split(), 5)), []) == list(range(23))


def test_loader_drop_last():
    loader = TensorLoader(make_split(), 5, shuffle=True, seed=0, drop_last=True)
    assert len(loader) == 4
    batches = ids(loader.epoch(0))
    assert [len(b) for b in batches] == [5, 5, 5, 5]
    assert len(set(sum(batches, []))) == 20
    # with fewer rows than one batch, the epoch is one batch of everything
    small = TensorLoader(make_split(3), 5, shuffle=True, seed=0, drop_last=True)
    assert len(small) == 1 and sorted(ids(small.epoch(0))[0]) == [0, 1, 2]


def test_loader_rejects_empty_split():
    with pytest.raises(ValueError):
        TensorLoader(Split(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), 4)


# -- DataInfo.prepare ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["iris", "digits"])
def test_prepare_applies_stored_standardisation(name):
    std = bundle(name, standardize=True)
    raw = bundle(name, standardize=False)        # same seed: same split, raw values
    assert std.info.x_mean is not None
    prepared = std.info.prepare(raw.test.x.numpy())
    assert prepared.shape == std.test.x.shape
    torch.testing.assert_close(prepared, std.test.x, rtol=1e-5, atol=1e-5)


def test_prepare_without_standardisation_and_reshapes():
    info = bundle("digits").info
    x = bundle("digits").test.x[:3]
    torch.testing.assert_close(info.prepare(x.numpy()), x)
    torch.testing.assert_close(info.prepare(x.reshape(3, 64).numpy()), x)     # flattened rows (CSV)
    assert info.prepare(x[0].numpy()).shape == (1, 1, 8, 8)                   # one sample


def test_prepare_rejects_wrong_shapes_and_nan():
    info = bundle("iris").info
    with pytest.raises(DojoError, match=r"\(5,\).*\(4,\)"):
        info.prepare(np.zeros((2, 5)))
    with pytest.raises(DojoError):
        bundle("digits").info.prepare(np.zeros((2, 1, 7, 7)))
    with pytest.raises(DojoError, match="NaN"):
        info.prepare(np.array([[1.0, np.nan, 0.0, 0.0]]))


def test_datainfo_round_trips_through_a_dict():
    info = bundle("iris").info
    again = DataInfo.from_dict(info.to_dict())
    assert again == info
    x = np.random.default_rng(0).normal(size=(4, 4))
    torch.testing.assert_close(again.prepare(x), info.prepare(x))
