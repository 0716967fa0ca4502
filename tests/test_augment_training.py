"""Augmentation in recipes (a phase's `augment:` list, applied to training batches only) and test-time
augmentation (`eval.tta`, `dojo eval/predict --tta N`)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from torchdojo import Trainer, load_recipe
from torchdojo.augment import Compose, Mixup, Noise
from torchdojo.cli import main
from torchdojo.errors import ConfigError, DojoError
from torchdojo.methods import Method
from torchdojo.registry import METHODS
from torchdojo.tta import TestTimeAugmentation

from helpers import assert_same_weights, final_weights


class SeeBatches(Method):
    """Keeps the training batches the model sees (after the loader's augmentation)."""

    def on_fit_start(self, state):
        self.batches = []

    def on_batch(self, state, batch):
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


@pytest.fixture
def see_batches():
    METHODS.register("see_batches", SeeBatches)
    yield
    METHODS.unregister("see_batches")


def _run(recipe, run_dir=None):
    trainer = Trainer(load_recipe(copy.deepcopy(recipe)), run_dir, quiet=True)
    trainer.fit()
    return trainer


def test_training_batches_are_augmented_reproducibly_and_eval_is_not(see_batches, tiny_recipe, tmp_path):
    tiny_recipe["methods"] = [{"name": "see_batches"}]
    plain = _run(tiny_recipe)
    tiny_recipe["phases"][0]["augment"] = [{"name": "gaussian", "std": 0.5}]
    aug = _run(tiny_recipe, tmp_path / "a")
    _run(tiny_recipe, tmp_path / "b")                              # the same run again: same weights below
    first_plain, first_aug = plain.methods[0].batches[0], aug.methods[0].batches[0]
    assert torch.equal(first_plain["y"], first_aug["y"])          # same rows in the same order ...
    assert not torch.allclose(first_plain["x"], first_aug["x"])   # ... with noise on them
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    # The second phase carries the augmentation over; evaluation data is untouched.
    last_plain, last_aug = plain.methods[0].batches[-1], aug.methods[0].batches[-1]
    assert not torch.allclose(last_plain["x"], last_aug["x"])
    assert torch.equal(aug.state.data.val.x, plain.state.data.val.x)


def test_an_empty_list_turns_augmentation_off_in_a_later_phase(tiny_recipe):
    tiny_recipe["phases"][0]["augment"] = [{"name": "swap_noise", "p": 0.2}]
    tiny_recipe["phases"][1]["augment"] = []
    trainer = Trainer(load_recipe(tiny_recipe), quiet=True)
    assert trainer.train_loader(0).transform is not None and trainer.train_loader(1).transform is None


def test_augmentation_must_fit_the_data(tiny_recipe):
    tiny_recipe["phases"][0]["augment"] = [{"name": "hflip"}]
    with pytest.raises(ConfigError, match=r"phases.0.augment.0: .*'hflip' is for image data, but data "
                                          r"'synthetic_tabular' is table data"):
        Trainer(load_recipe(tiny_recipe), quiet=True)


def test_unknown_augmentation_and_option_are_config_errors(tiny_recipe):
    tiny_recipe["phases"][0]["augment"] = [{"name": "swapnoise"}]
    with pytest.raises(ConfigError, match=r"phases.0.augment.0.name: .*did you mean 'swap_noise'"):
        load_recipe(tiny_recipe)
    tiny_recipe["phases"][0]["augment"] = [{"name": "swap_noise", "rate": 0.1}]
    with pytest.raises(ConfigError, match=r"phases.0.augment.0.rate: unknown key"):
        load_recipe(tiny_recipe)


def test_mixup_trains_with_soft_targets_and_needs_classes(see_batches, tiny_recipe):
    tiny_recipe["methods"] = [{"name": "see_batches"}]
    tiny_recipe["phases"][0]["augment"] = [{"name": "mixup", "alpha": 0.4}]
    trainer = _run(tiny_recipe)
    y = trainer.methods[0].batches[0]["y"]
    assert y.shape == (32, 3) and y.is_floating_point()
    torch.testing.assert_close(y.sum(1), torch.ones(32))
    tiny_recipe["data"] = {"name": "diabetes"}
    tiny_recipe["task"] = {"name": "regress"}
    tiny_recipe["methods"] = []
    with pytest.raises(ConfigError, match="'mixup' mixes class labels: it needs classification data"):
        Trainer(load_recipe(tiny_recipe), quiet=True)


# -- test-time augmentation ----------------------------------------------------------------------

def test_tta_with_identity_views_equals_plain_prediction():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4))
    x = torch.randn(20, 5)
    tta = TestTimeAugmentation(model, Compose([Noise(std=0.0)]), views=6)
    torch.testing.assert_close(tta(x).exp(), torch.softmax(model(x), 1))
    noisy = TestTimeAugmentation(model, Compose([Noise(std=1.0)]), views=6)
    assert not torch.allclose(noisy(x).exp(), torch.softmax(model(x), 1))
    torch.testing.assert_close(noisy(x), noisy(x))                      # reproducible


def test_tta_refuses_label_mixing():
    with pytest.raises(ValueError, match="label-mixing"):
        TestTimeAugmentation(torch.nn.Linear(2, 2), Compose([Mixup(num_classes=2)]), views=2)


def test_recipe_tta_reports_tta_metrics(tiny_recipe, tmp_path):
    tiny_recipe["eval"] = {"tta": {"views": 4, "augment": [{"name": "gaussian", "std": 0.0}]}}
    summary = Trainer(load_recipe(tiny_recipe), tmp_path / "run", quiet=True).fit()
    m = summary["metrics"]
    assert m["test/tta/accuracy"] == m["test/accuracy"]           # zero-noise views change nothing
    assert m["test/tta/nll"] == pytest.approx(m["test/nll"], rel=1e-5)


def test_dojo_eval_and_predict_with_tta(tiny_recipe, tmp_path):
    tiny_recipe["phases"][0]["augment"] = [{"name": "gaussian", "std": 0.3}, {"name": "mixup"}]
    Trainer(load_recipe(tiny_recipe), tmp_path / "run", quiet=True).fit()
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--tta", "3", "-q"])
    assert res.exit_code == 0, res.output
    assert "tta/accuracy" in res.output
    inputs = tmp_path / "x.npz"
    np.savez(inputs, x=np.random.default_rng(0).normal(size=(7, 8)).astype("float32"))
    res = CliRunner().invoke(main, ["predict", str(tmp_path / "run"), "--input", str(inputs), "--tta", "3"])
    assert res.exit_code == 0, res.output
    header = res.stdout.splitlines()[0].split(",")
    assert "prediction" in header and "tta/prediction" in header


def test_tta_without_augmentations_is_a_clear_error(tiny_recipe, tmp_path):
    Trainer(load_recipe(tiny_recipe), tmp_path / "run", quiet=True).fit()
    trainer = Trainer.from_run_dir(tmp_path / "run", quiet=True)
    with pytest.raises(DojoError, match="test-time augmentation needs augmentations"):
        trainer.trained_models(tta_views=3)
