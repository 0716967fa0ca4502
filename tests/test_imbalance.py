"""Class imbalance: `data.imbalance` (an imbalanced training split), `data.sampler: balanced`, the loss
option `class_weights: balanced` / focal `alpha: balanced`, and per-class recall in the classify metrics."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from scipy.stats import chi2
from sklearn.metrics import recall_score
from torch import nn

from torchdojo import ConfigError, Trainer, load_recipe
from torchdojo.data import DataInfo, Split, TensorLoader, load_data
from torchdojo.log import print_metrics_table
from torchdojo.methods import Method
from torchdojo.registry import METHODS
from torchdojo.tasks import Classify

from conftest import make_tiny_recipe
from helpers import final_weights

DIGITS = {"name": "digits", "val_fraction": 0.1, "test_fraction": 0.2}


def digits(seed: int = 0, **options):
    return load_data({**DIGITS, **options}, seed)


def row_keys(split: Split) -> list[bytes]:
    return [row.numpy().tobytes() + bytes([int(label)]) for row, label in zip(split.x, split.y)]


# -- the imbalanced training split ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 3])
def test_ratio_subsamples_the_minority_classes_of_train_only(seed):
    full = digits(seed)
    imb = digits(seed, imbalance={"ratio": 20})
    k = full.info.num_outputs
    before = torch.bincount(full.train.y, minlength=k).tolist()
    after = torch.bincount(imb.train.y, minlength=k).tolist()
    minority = range(k // 2, k)                       # the default: the second half of the classes
    for c in range(k):
        expected = max(1, round(before[c] / 20)) if c in minority else before[c]
        assert after[c] == expected, c
    assert after[k - 1] < 10 <= 100 < after[0]        # digits: ~125 rows a class in train
    # The kept rows are rows of the original training split; majority classes keep every row.
    full_rows = row_keys(full.train)
    assert set(row_keys(imb.train)) <= set(full_rows)
    for c in range(k // 2):
        assert torch.equal(imb.train.x[imb.train.y == c], full.train.x[full.train.y == c])
    # Val and test are exactly those of the balanced data (metrics stay comparable).
    for name in ("val", "test"):
        assert torch.equal(imb.split(name).x, full.split(name).x)
        assert torch.equal(imb.split(name).y, full.split(name).y)
    assert imb.info.train_class_counts == after
    assert full.info.train_class_counts == before
    assert imb.info.sizes == {"train": sum(after), "val": len(full.val), "test": len(full.test)}


def test_imbalance_is_deterministic_per_split_seed():
    a, again = digits(0, imbalance={"ratio": 20}), digits(0, imbalance={"ratio": 20})
    assert torch.equal(a.train.x, again.train.x) and torch.equal(a.train.y, again.train.y)
    other = digits(0, imbalance={"ratio": 20}, split_seed=7)
    same_split = digits(0, split_seed=7)
    assert torch.equal(other.test.x, same_split.test.x)                     # the split follows split_seed
    assert set(row_keys(other.train)) <= set(row_keys(same_split.train))
    # A different seed picks different minority rows (same counts per class).
    b = digits(1, imbalance={"ratio": 20})
    assert not torch.equal(a.train.x, b.train.x)


def test_explicit_minority_classes_and_ratio_one():
    full = digits(0)
    imb = digits(0, imbalance={"ratio": 4, "minority": [0, 3]})
    before, after = full.info.train_class_counts, imb.info.train_class_counts
    assert after == [max(1, round(n / 4)) if c in (0, 3) else n for c, n in enumerate(before)]
    assert digits(0, imbalance={"ratio": 1}).info.train_class_counts == before
    # At least one row is kept, even at a ratio larger than the class.
    assert digits(0, imbalance={"ratio": 10_000, "minority": [9]}).info.train_class_counts[9] == 1


def test_imbalance_in_a_recipe_and_data_info(tmp_path):
    r = make_tiny_recipe()
    r["data"]["imbalance"] = {"ratio": 5}
    recipe = load_recipe(r)
    assert recipe.data.imbalance.ratio == 5 and recipe.data.imbalance.minority is None
    assert recipe.data.sampler == "uniform"
    trainer = Trainer(recipe, tmp_path / "run", quiet=True)
    counts = trainer.state.data.info.train_class_counts
    assert counts[0] > 80 and counts[1] < 25 and counts[2] < 25      # 3 classes: minority = [1, 2]
    trainer.fit()
    info = json.loads((tmp_path / "run" / "data_info.json").read_text())
    assert info["train_class_counts"] == counts and info["sizes"]["train"] == sum(counts)
    assert DataInfo.from_dict(info).train_class_counts == counts
    # Old data_info.json files without the field still load.
    del info["train_class_counts"]
    assert DataInfo.from_dict(info).train_class_counts is None


@pytest.mark.parametrize("imbalance, path, words", [
    ({"ratio": 20, "minority": [3, 10]}, "data.imbalance.minority", "[10] are out of range"),
    ({"ratio": 20, "minority": [-1]}, "data.imbalance.minority", "out of range"),
    ({"ratio": 20, "minority": [2, 2]}, "data.imbalance.minority", "listed twice"),
])
def test_bad_minority_ids_are_config_errors(imbalance, path, words):
    r = make_tiny_recipe()
    r["data"] = {**DIGITS, "imbalance": imbalance}
    with pytest.raises(ConfigError) as info:
        Trainer(load_recipe(r), None, quiet=True)
    assert info.value.path == path and words in info.value.message
    with pytest.raises(ConfigError, match=path):
        digits(0, imbalance=imbalance)


@pytest.mark.parametrize("imbalance, path", [
    ({"ratio": 0.5}, "data.imbalance.ratio"),
    ({"ratio": 20, "minority": []}, "data.imbalance.minority"),
    ({"ratio": 20, "majority": [1]}, "data.imbalance.majority"),
    ({}, "data.imbalance.ratio"),
])
def test_bad_imbalance_options_are_config_errors_at_load_time(imbalance, path):
    r = make_tiny_recipe()
    r["data"]["imbalance"] = imbalance
    with pytest.raises(ConfigError) as info:
        load_recipe(r)
    assert info.value.path == path


def test_imbalance_and_balanced_sampler_need_classification_data():
    regression = {"name": "diabetes", "imbalance": {"ratio": 20}}
    with pytest.raises(ConfigError) as info:
        load_data(regression, 0)
    assert info.value.path == "data.imbalance" and "classification" in info.value.message
    with pytest.raises(ConfigError) as info:
        load_data({"name": "diabetes", "sampler": "balanced"}, 0)
    assert info.value.path == "data.sampler"
    # In a recipe, the regression task is caught when the recipe is validated.
    r = make_tiny_recipe()
    r["data"] = dict(regression)
    r["task"] = {"name": "regress"}
    with pytest.raises(ConfigError) as info:
        load_recipe(r)
    assert info.value.path == "data.imbalance"
    r["data"] = {"name": "diabetes", "sampler": "balanced"}
    with pytest.raises(ConfigError) as info:
        load_recipe(r)
    assert info.value.path == "data.sampler"
    r["data"] = {"name": "diabetes", "sampler": "weighted"}
    with pytest.raises(ConfigError, match="data.sampler"):
        load_recipe(r)


# -- the class-balanced sampler ------------------------------------------------------------------------

def balanced_loader(split: Split, batch_size: int = 32, seed: int = 5) -> TensorLoader:
    counts = torch.bincount(split.y)
    return TensorLoader(split, batch_size, shuffle=True, seed=seed, drop_last=True,
                        weights=1.0 / counts.double()[split.y])


def test_balanced_sampler_draws_classes_uniformly():
    train = digits(0, imbalance={"ratio": 20}).train            # 5 classes of ~125 rows, 5 of 6
    loader = balanced_loader(train)
    k, epochs = 10, 40
    seen = torch.zeros(k, dtype=torch.long)
    for epoch in range(epochs):
        ys = torch.cat([b["y"] for b in loader.epoch(epoch)])
        assert len(ys) == len(loader) * 32
        seen += torch.bincount(ys, minlength=k)
    expected = seen.sum().item() / k
    stat = (((seen.double() - expected) ** 2) / expected).sum().item()
    assert chi2.sf(stat, k - 1) > 1e-3, seen.tolist()
    # The uniform loader keeps the imbalance: the minority classes are ~5 % of what a majority class gets.
    plain = TensorLoader(train, 32, shuffle=True, seed=5, drop_last=True)
    ys = torch.cat([b["y"] for b in plain.epoch(0)])
    assert torch.bincount(ys, minlength=k)[5:].sum() < 40
    # Each epoch samples with replacement: minority rows repeat within an epoch.
    order = loader.order(0)
    assert len(order) == len(train) and len(order.unique()) < len(train)


def test_balanced_order_is_a_pure_function_of_seed_and_epoch():
    train = digits(0, imbalance={"ratio": 20}).train
    a, b = balanced_loader(train), balanced_loader(train)
    for epoch in (0, 1, 7):
        torch.rand(3)                                            # the global RNG plays no part
        assert torch.equal(a.order(epoch), b.order(epoch))
    later = [a.order(e) for e in range(5)]
    assert torch.equal(balanced_loader(train).order(4), later[4])   # no state carried between epochs
    assert not torch.equal(later[0], later[1])
    assert not torch.equal(a.order(0), balanced_loader(train, seed=6).order(0))
    # Starting mid-epoch gives the tail of the same epoch.
    full = [bt["y"] for bt in a.epoch(3)]
    tail = [bt["y"] for bt in b.epoch(3, start=4)]
    assert all(torch.equal(x, y) for x, y in zip(full[4:], tail)) and len(tail) == len(full) - 4


def test_tensor_loader_rejects_bad_weights():
    split = Split(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    for bad in (torch.ones(3), torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.zeros(4),
                torch.tensor([1.0, float("nan"), 1.0, 1.0])):
        with pytest.raises(ValueError, match="weights"):
            TensorLoader(split, 2, weights=bad)


def test_trainer_uses_the_balanced_sampler_for_training_only():
    r = make_tiny_recipe()
    r["data"]["imbalance"] = {"ratio": 5}
    r["data"]["sampler"] = "balanced"
    trainer = Trainer(load_recipe(r), None, quiet=True)
    train = trainer.state.data.train
    counts = torch.bincount(train.y)
    loader = trainer.train_loader(0, 0)
    assert torch.equal(loader.weights, 1.0 / counts.double()[train.y])
    assert len(loader) == len(train) // 32                    # an epoch is still len(train) rows
    assert trainer.eval_loader("val").weights is None and trainer.eval_loader("val").order(0) is None
    ys = torch.cat([trainer.train_loader(0, e).order(e) for e in range(30)])
    drawn = torch.bincount(train.y[ys], minlength=3).double()
    assert (drawn / drawn.sum() - 1 / 3).abs().max() < 0.03   # about 1/3 each, from ~70/15/15 %
    r["data"]["sampler"] = "uniform"
    assert Trainer(load_recipe(r), None, quiet=True).train_loader(0, 0).weights is None


# -- exact resume with the balanced sampler ------------------------------------------------------------

PROBE = "imbalance_probe"


class BatchProbe(Method):
    """Records the labels of every training batch."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def on_batch(self, state, batch):
        self.batches.append(batch["y"].tolist())
        return batch


@pytest.fixture(scope="module", autouse=True)
def probe_registered():
    METHODS.register(PROBE, BatchProbe)
    yield
    METHODS.unregister(PROBE)


def read_metrics(run_dir: Path) -> list[dict]:
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in e.items() if k != "train/samples_per_sec"} for e in entries]


@pytest.fixture(scope="module")
def balanced_run(tmp_path_factory):
    r = make_tiny_recipe()
    r["data"]["imbalance"] = {"ratio": 5}
    r["data"]["sampler"] = "balanced"
    r["phases"][0]["losses"] = [{"name": "cross_entropy", "class_weights": "balanced"}]
    r["methods"] = [{"name": PROBE}]
    r["checkpoint"] = {"every_epochs": None, "every_steps": 5, "keep_last": 10}
    src = tmp_path_factory.mktemp("balanced") / "run"
    trainer = Trainer(load_recipe(r), src, quiet=True)
    return src, trainer, trainer.fit()


@pytest.mark.parametrize("step", [5, 10, 15])
def test_resume_mid_epoch_with_the_balanced_sampler_is_bit_identical(step, balanced_run, tmp_path):
    src, ref_trainer, ref_summary = balanced_run
    # ~131 training rows (94/19/18): 4 steps an epoch at batch size 32, so each checkpoint is mid-epoch.
    spe = len(ref_trainer.train_loader(0, 0))
    assert spe == 4 and ref_summary["steps"] == 20
    state = torch.load(src / "checkpoints" / f"step-{step:08d}" / "state.pt", weights_only=True)
    assert (state["phase_index"], state["epoch_in_phase"], state["batch_in_epoch"]) == (0, step // spe, step % spe)
    assert step % spe != 0
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "final")
    (dst / "summary.json").unlink()
    trainer = Trainer.from_run_dir(dst, quiet=True, checkpoint=dst / "checkpoints" / f"step-{step:08d}")
    assert trainer.recipe.data.sampler == "balanced"
    assert trainer.recipe.phases[0].losses[0]["class_weights"] == "balanced"
    summary = trainer.fit()
    ref_batches = next(m for m in ref_trainer.methods if isinstance(m, BatchProbe)).batches
    got_batches = next(m for m in trainer.methods if isinstance(m, BatchProbe)).batches
    assert got_batches == ref_batches[step:]
    ref_w, got_w = final_weights(src), final_weights(dst)
    assert ref_w.keys() == got_w.keys() and all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert summary["metrics"] == ref_summary["metrics"]
    assert read_metrics(dst) == read_metrics(src)


# -- class_weights: balanced ---------------------------------------------------------------------------

def balanced_weights(y: torch.Tensor, k: int) -> list[float]:
    counts = np.bincount(y.numpy(), minlength=k)
    return (len(y) / (k * counts)).tolist()


def test_class_weights_balanced_is_n_over_k_times_class_count():
    r = make_tiny_recipe()
    r["data"] = {**DIGITS, "imbalance": {"ratio": 20}}
    r["phases"][0]["losses"] = [{"name": "cross_entropy", "class_weights": "balanced", "label_smoothing": 0.1},
                                {"name": "focal", "alpha": "balanced", "gamma": 1, "weight": 0.5}]
    recipe = load_recipe(r)
    assert recipe.phases[0].losses[0]["class_weights"] == "balanced"
    assert load_recipe(recipe.model_dump(mode="json")).phases[0].losses == recipe.phases[0].losses
    trainer = Trainer(recipe, None, quiet=True)
    y = trainer.state.data.train.y
    expected = balanced_weights(y, 10)
    # sklearn's "balanced" class weights are the same formula.
    from sklearn.utils.class_weight import compute_class_weight
    assert np.allclose(expected, compute_class_weight("balanced", classes=np.arange(10), y=y.numpy()))
    ce, focal = (t.fn for t in trainer.build_losses(0))
    assert ce.class_weights.tolist() == pytest.approx(expected, rel=1e-12)
    assert focal.alpha.tolist() == pytest.approx(expected, rel=1e-12)
    assert ce.label_smoothing == 0.1 and focal.gamma == 1.0
    assert expected[9] > 10 * expected[0]                     # the minority classes weigh ~20x more
    # The later phase (no losses of its own) keeps the same terms.
    assert [t.fn.class_weights.tolist() for t in trainer.build_losses(1)[:1]] == [ce.class_weights.tolist()]


@pytest.mark.parametrize("loss, key", [({"name": "cross_entropy", "class_weights": "heavy"}, "class_weights"),
                                       ({"name": "focal", "alpha": "inverse"}, "alpha")])
def test_other_words_for_class_weights_are_config_errors(loss, key):
    r = make_tiny_recipe()
    r["phases"][0]["losses"] = [loss]
    with pytest.raises(ConfigError) as info:
        load_recipe(r)
    assert info.value.path == f"phases.0.losses.0.{key}"
    assert "'balanced'" in info.value.message and repr(loss[key]) in info.value.message


def test_class_weights_balanced_needs_classification_data():
    r = make_tiny_recipe()
    r["data"] = {"name": "diabetes"}
    r["task"] = {"name": "regress"}
    r["phases"][0]["losses"] = [{"name": "cross_entropy", "class_weights": "balanced"}]
    trainer = Trainer(load_recipe(r), None, quiet=True)
    with pytest.raises(ConfigError) as info:
        trainer.build_losses(0)
    assert info.value.path == "phases.0.losses.0.class_weights"


# -- per-class recall ----------------------------------------------------------------------------------

def class_info(k: int, names=None) -> DataInfo:
    return DataInfo(task_type="classification", kind="tabular", input_shape=[k], num_outputs=k,
                    class_names=names if names is not None else [str(i) for i in range(k)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_recall_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 300, 5
    logits = torch.randn(n, k, generator=g) * 2
    y = torch.randint(0, k, (n,), generator=g)
    logits[y == 0, 0] += 2.0
    names = ["cat", "dog", "owl", "eel", "yak"]
    metrics = Classify().evaluate(nn.Identity(), TensorLoader(Split(logits, y), 64), class_info(k, names))
    expected = recall_score(y.numpy(), logits.argmax(1).numpy(), labels=list(range(k)), average=None)
    assert [metrics[f"recall/{name}"] for name in names] == pytest.approx(expected.tolist(), abs=1e-12)
    assert metrics["recall_min"] == pytest.approx(expected.min(), abs=1e-12)
    assert {"loss", "nll", "accuracy", "f1_macro", "ece", "brier"} <= metrics.keys()   # the old keys stay


def test_recall_of_a_class_absent_from_the_split():
    logits = torch.eye(4)[[0, 0, 1, 2, 3, 3]]
    y = torch.tensor([0, 1, 1, 2, 2, 0])                    # class 3 has no rows here
    metrics = Classify().evaluate(nn.Identity(), TensorLoader(Split(logits, y), 4), class_info(4))
    expected = recall_score(y.numpy(), logits.argmax(1).numpy(), labels=list(range(4)), average=None,
                            zero_division=0)
    assert [metrics[f"recall/{c}"] for c in range(4)] == pytest.approx(expected.tolist())
    assert metrics["recall/3"] == 0.0
    assert metrics["recall_min"] == 0.5                      # the worst of the classes present


# -- end to end ----------------------------------------------------------------------------------------

def test_an_imbalanced_run_trains_end_to_end(tmp_path):
    r = {
        "name": "imbalanced-digits", "seed": 0,
        "data": {**DIGITS, "imbalance": {"ratio": 20}, "sampler": "balanced"},
        "model": {"name": "mlp", "hidden": [64]},
        "phases": [{"epochs": 6, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01}}],
        "log": {"every_steps": 5},
    }
    summary = Trainer(load_recipe(r), tmp_path / "run", quiet=True).fit()
    m = summary["metrics"]
    assert summary["status"] == "finished"
    assert m["test/accuracy"] > 0.7
    for split in ("val", "test"):
        assert {f"{split}/recall/{c}" for c in range(10)} | {f"{split}/recall_min", f"{split}/f1_macro"} <= m.keys()
        assert m[f"{split}/recall_min"] == min(m[f"{split}/recall/{c}"] for c in range(10))
    # The minority classes (6 training rows each) are still recognised.
    assert np.mean([m[f"test/recall/{c}"] for c in range(5, 10)]) > 0.4
    # The final table keeps one row per metric: recall/<class> rows with a val and a test column.
    console = Console(record=True, width=120)
    print_metrics_table(m, "final", console)
    text = console.export_text()
    for row in ("recall/0", "recall/9", "recall_min", "f1_macro"):
        assert any(line.strip("│ ").startswith(row) for line in text.splitlines()), row
    recipe_yaml = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "sampler: balanced" in recipe_yaml and "ratio: 20" in recipe_yaml
