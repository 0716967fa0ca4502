"""`nonfinite` policy: a NaN loss or an inf gradient is skipped (parameters and optimizer untouched)
or stops the run with the step and the tensors named; `rollback` is not implemented yet."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml
from click.testing import CliRunner

from torchdojo import Trainer, load_recipe
from torchdojo.cli import main
from torchdojo.errors import ConfigError
from torchdojo.methods import Method
from torchdojo.registry import METHODS
from torchdojo.trainer import NonFiniteError

from helpers import read_metrics, train_entries


class Poison(Method):
    """Makes the loss NaN (`what: loss`) or one gradient inf (`what: grad`) at the given 1-based steps,
    and records the weights and optimizer state around each step."""

    def __init__(self, steps: list[int], what: str = "loss"):
        self.steps, self.what = set(steps), what
        self.before: dict[int, tuple] = {}
        self.after: dict[int, tuple] = {}

    def _snap(self, state):
        return ({k: v.detach().clone() for k, v in state.model.state_dict().items()},
                copy.deepcopy(state.optimizer.state_dict()))

    def on_loss(self, state, loss, parts):
        step = state.step + 1
        self.before[step] = self._snap(state)
        if self.what == "loss" and step in self.steps:
            return loss * float("nan")
        return loss

    def on_after_backward(self, state) -> None:
        if self.what == "grad" and state.step + 1 in self.steps:
            next(p for p in state.model.parameters() if p.grad is not None).grad[0].fill_(float("inf"))

    def on_batch(self, state, batch):
        if state.step in self.before:          # the previous step has finished (or was skipped)
            self.after.setdefault(state.step, self._snap(state))
        return batch


@pytest.fixture
def poison():
    METHODS.register("poison", Poison)
    yield
    METHODS.unregister("poison")


def recipe(tiny_recipe, policy: str, steps, what="loss", **extra) -> dict:
    tiny_recipe["methods"] = [{"name": "poison", "steps": list(steps), "what": what}]
    tiny_recipe["nonfinite"] = {"policy": policy, **extra}
    return tiny_recipe


def probe(trainer) -> Poison:
    return next(m for m in trainer.methods if isinstance(m, Poison))


def assert_same_state(a, b) -> None:
    weights_a, opt_a = a
    weights_b, opt_b = b
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i in opt_a["state"]:
        for k, v in opt_a["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b["state"][i][k])), (i, k)


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_skip_leaves_parameters_and_optimizer_untouched(poison, tiny_recipe, tmp_path, what):
    trainer = Trainer(load_recipe(recipe(tiny_recipe, "skip", [5, 9], what)), tmp_path / "run", quiet=True)
    summary = trainer.fit()
    assert summary["status"] == "finished" and summary["steps"] == 22
    p = probe(trainer)
    for step in (5, 9):
        assert_same_state(p.before[step], p.after[step])            # the skipped step changed nothing
    changed = [k for k in p.before[6][0] if not torch.equal(p.before[6][0][k], p.after[6][0][k])]
    assert changed                                                   # a good step still trains
    entries = {e["step"]: e for e in train_entries(read_metrics(tmp_path / "run"))}
    assert entries[4]["train/nonfinite_skips"] == 0
    assert entries[5]["train/nonfinite_skips"] == 1
    assert entries[22]["train/nonfinite_skips"] == 2
    assert all(torch.isfinite(torch.tensor(e["train/grad_norm"])) for s, e in entries.items() if s not in (5, 9))


def test_skip_count_survives_resume(poison, tiny_recipe, tmp_path):
    r = recipe(tiny_recipe, "skip", [3])
    r["checkpoint"] = {"every_steps": 6, "keep_last": 5}
    Trainer(load_recipe(r), tmp_path / "a", quiet=True).fit()
    trainer = Trainer.from_run_dir(tmp_path / "a", quiet=True, checkpoint=tmp_path / "a" / "checkpoints" / "step-00000012")
    trainer.fit()
    entries = {e["step"]: e for e in train_entries(read_metrics(tmp_path / "a"))}
    assert entries[22]["train/nonfinite_skips"] == 1


def test_raise_names_step_and_tensors(poison, tiny_recipe):
    with pytest.raises(NonFiniteError, match=r"step 4 \(phase 'warm'\) in: loss"):
        Trainer(load_recipe(recipe(tiny_recipe, "raise", [4])), quiet=True).fit()
    with pytest.raises(NonFiniteError, match=r"step 7 .* in: [\w.]*weight"):
        Trainer(load_recipe(recipe(tiny_recipe, "raise", [7], "grad")), quiet=True).fit()


def test_raise_is_the_default(poison, tiny_recipe):
    r = recipe(tiny_recipe, "raise", [2])
    del r["nonfinite"]
    with pytest.raises(NonFiniteError, match="step 2"):
        Trainer(load_recipe(r), quiet=True).fit()


def test_too_many_consecutive_skips_raise(poison, tiny_recipe):
    r = recipe(tiny_recipe, "skip", [3, 4, 5, 6], max_consecutive=3)
    with pytest.raises(NonFiniteError, match=r"4 non-finite steps in a row .*max_consecutive=3.*step 6"):
        Trainer(load_recipe(r), quiet=True).fit()
    r = recipe(tiny_recipe, "skip", [3, 4, 5, 7, 8, 9], max_consecutive=3)   # never more than 3 in a row
    assert Trainer(load_recipe(r), quiet=True).fit()["status"] == "finished"


def test_cli_exits_2_with_one_line(poison, tiny_recipe, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_recipe, "raise", [4])))
    result = CliRunner().invoke(main, ["train", str(path), "--run-dir", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "non-finite values at step 4" in lines[0] and "loss" in lines[0]


def test_rollback_is_not_implemented(tiny_recipe):
    tiny_recipe["nonfinite"] = {"policy": "rollback"}
    with pytest.raises(ConfigError, match="nonfinite.policy: .*rollback.* not implemented"):
        load_recipe(tiny_recipe)
