"""`data.classes` (a subset of the classes, relabelled) and `data.train_size` (a small labelled set):
what pretraining and fine-tuning recipes use to carve a big source task and a small target task."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torchdojo import ConfigError, Trainer, load_recipe
from torchdojo.data import load_data

from conftest import make_tiny_recipe

DIGITS = {"name": "digits", "val_fraction": 0.1, "test_fraction": 0.2}


def digits(seed: int = 0, **options):
    return load_data({**DIGITS, **options}, seed)


def rows(split) -> set[bytes]:
    return {row.numpy().tobytes() for row in split.x}


def test_classes_keeps_only_those_rows_relabelled_in_the_given_order():
    full, sub = digits(), digits(classes=[7, 2, 9])
    assert sub.info.class_names == ["7", "2", "9"] and sub.info.num_outputs == 3
    from sklearn.datasets import load_digits
    d = load_digits()
    images = {(img / 16.0).astype(np.float32)[None].tobytes(): int(t) for img, t in zip(d.images, d.target)}
    seen = 0
    for name in ("train", "val", "test"):
        split = sub.split(name)
        assert set(split.y.tolist()) == {0, 1, 2}
        for row, label in zip(split.x, split.y):
            # each row is one of the original digits 7, 2, 9, with the label of its position in the list
            assert images[row.numpy().tobytes()] == [7, 2, 9][int(label)]
        seen += len(split)
    assert seen == int(np.isin(d.target, [7, 2, 9]).sum())
    assert len(sub.train) < len(full.train)


def test_classes_on_a_dataset_with_its_own_test_set():
    sub = load_data({"name": "mnist1d", "num_samples": 1000, "classes": [5, 6, 7, 8, 9]}, 0)
    assert sub.info.num_outputs == 5 and sub.info.class_names == ["5", "6", "7", "8", "9"]
    assert set(sub.test.y.tolist()) == set(range(5)) and len(sub.test) < 200 + 50


def test_train_size_is_a_stratified_deterministic_subset_of_train():
    full, small = digits(), digits(train_size=100)
    assert len(small.train) == 100 and small.info.sizes["train"] == 100
    assert rows(small.train) <= rows(full.train)
    # val and test are those of the full data: metrics stay comparable
    assert rows(small.val) == rows(full.val) and rows(small.test) == rows(full.test)
    counts = np.bincount(small.train.y.numpy(), minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11 and small.info.train_class_counts == counts.tolist()
    assert rows(digits(train_size=100).train) == rows(small.train)
    assert rows(digits(train_size=100, split_seed=5).train) != rows(small.train)


def test_classes_and_train_size_together():
    d = digits(classes=[0, 1], train_size=20)
    assert len(d.train) == 20 and np.bincount(d.train.y.numpy()).tolist() == [10, 10]


@pytest.mark.parametrize("options, path, words", [
    ({"classes": [3, 10]}, "data.classes", "[10] are out of range"),
    ({"classes": [2, 2]}, "data.classes", "listed twice"),
    ({"train_size": 100_000}, "data.train_size", "more than the"),
])
def test_bad_subsets_are_config_errors(options, path, words):
    with pytest.raises(ConfigError) as info:
        digits(**options)
    assert info.value.path == path and words in info.value.message


def test_classes_needs_classification_and_at_least_two_classes():
    r = make_tiny_recipe()
    r["data"] = {"name": "diabetes", "classes": [0, 1]}
    r["task"] = {"name": "regress"}
    with pytest.raises(ConfigError, match="data.classes"):
        Trainer(load_recipe(r), None, quiet=True)
    r = make_tiny_recipe()
    r["data"]["classes"] = [1]
    with pytest.raises(ConfigError, match="data.classes"):
        load_recipe(r)


def _max_correlation(a, b) -> float:
    """The highest correlation between a row of `a` and a row of `b` (equal up to an affine rescaling: 1)."""
    za = (a - a.mean(1, keepdim=True)) / a.std(1, keepdim=True)
    zb = (b - b.mean(1, keepdim=True)) / b.std(1, keepdim=True)
    return float((za @ zb.T / (a.shape[1] - 1)).max())


def test_mnist1d_generator_seed_gives_a_disjoint_pool():
    """`data.seed` is MNIST-1D's generator seed. A bigger pool with the published set's seed (42) holds
    the published set's first digit-0 signals (each set standardised on its own: not byte-equal); with
    another seed, as mnist1d-pretrain and mnist1d-dae use, no signal of the published set is in it."""
    from torchdojo.recipe import load_recipe
    published = load_data({"name": "mnist1d", "classes": [0]}, 0)
    target = torch.cat([published.train.x, published.val.x, published.test.x]).flatten(1).double()
    same = load_data({"name": "mnist1d", "num_samples": 6000, "classes": [0]}, 0)
    other = load_data({"name": "mnist1d", "num_samples": 6000, "seed": 2024, "classes": [0]}, 0)
    rows = lambda d: torch.cat([d.train.x, d.val.x, d.test.x]).flatten(1).double()  # noqa: E731
    assert _max_correlation(rows(same), target) > 0.9999
    assert _max_correlation(rows(other), target) < 0.999
    for name in ("mnist1d-pretrain", "mnist1d-dae"):
        assert load_recipe(name).data.model_dump()["seed"] == 2024
