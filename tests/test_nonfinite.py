"""`nonfinite` policy: a NaN loss or an inf gradient is skipped (parameters and optimizer untouched),
rolled back to the last good checkpoint with a lower LR, or stops the run with the step and the
tensors named."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from click.testing import CliRunner

from torchdojo import Trainer, load_recipe
from torchdojo.cli import main
from torchdojo.errors import ConfigError, DojoError
from torchdojo.methods import Method
from torchdojo.registry import METHODS
from torchdojo.trainer import NonFiniteError

from helpers import assert_same_weights, comparable, final_weights, read_metrics, train_entries


class Poison(Method):
    """Makes the loss NaN (`what: loss`) or one gradient inf (`what: grad`) at the given 1-based steps,
    and records the weights and optimizer state around each step."""

    def __init__(self, steps: list[int], what: str = "loss", once: bool = False):
        self.steps, self.what, self.once = set(steps), what, once
        self.fired: set[int] = set()      # with `once`, a step replayed after a rollback stays clean
        self.before: dict[int, tuple] = {}
        self.after: dict[int, tuple] = {}

    def _snap(self, state):
        return ({k: v.detach().clone() for k, v in state.model.state_dict().items()},
                copy.deepcopy(state.optimizer.state_dict()))

    def _fire(self, step: int, what: str) -> bool:
        if self.what != what or step not in self.steps or (self.once and step in self.fired):
            return False
        self.fired.add(step)
        return True

    def on_loss(self, state, loss, parts):
        step = state.step + 1
        self.before[step] = self._snap(state)
        if self._fire(step, "loss"):
            return loss * float("nan")
        return loss

    def on_after_backward(self, state) -> None:
        if self._fire(state.step + 1, "grad"):
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


def recipe(tiny_recipe, policy: str, steps, what="loss", once=False, **extra) -> dict:
    tiny_recipe["methods"] = [{"name": "poison", "steps": list(steps), "what": what, "once": once}]
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
    entries = {e["step"]: e for e in read_metrics(tmp_path / "run") if "train/nonfinite_skips" in e}
    assert entries[4]["train/nonfinite_skips"] == 0
    assert entries[5]["train/nonfinite_skips"] == 1
    assert entries[22]["train/nonfinite_skips"] == 2
    assert all(torch.isfinite(torch.tensor(e["train/grad_norm"])) for s, e in entries.items() if s not in (5, 9))
    # A skipped step's loss stays out of the running mean: with a log line every step, it has none.
    assert "train/loss" not in entries[5] and "train/loss" in entries[6]


def test_skipped_nan_stays_out_of_the_logged_mean(poison, tiny_recipe, tmp_path):
    r = recipe(tiny_recipe, "skip", [5])
    r["log"] = {"every_steps": 3}                  # steps 4-6 are averaged into the line at step 6
    Trainer(load_recipe(r), tmp_path / "run", quiet=True).fit()
    losses = {e["step"]: e["train/loss"] for e in train_entries(read_metrics(tmp_path / "run"))}
    assert all(math.isfinite(v) for v in losses.values()) and 6 in losses


def test_skipped_cycle_end_still_gives_its_snapshot(poison, tiny_recipe, tmp_path):
    r = recipe(tiny_recipe, "skip", [6])
    r["phases"] = [{"name": "cycles", "steps": 12, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01},
                    "schedule": [{"name": "cosine_restarts", "cycles": 2}]}]     # cycle ends: steps 6, 12
    r["methods"].append({"name": "snapshot_ensemble"})
    trainer = Trainer(load_recipe(r), tmp_path / "run", quiet=True)
    trainer.fit()
    snapshots = next(m for m in trainer.methods if m.__class__.__name__ == "SnapshotEnsemble").snapshots
    assert len(snapshots) == 2
    before_skip = probe(trainer).before[6][0]       # step 6 was skipped: its snapshot is the step-5 weights
    assert_same_weights(snapshots[0], before_skip)


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


def test_unknown_policy_is_a_config_error(tiny_recipe):
    tiny_recipe["nonfinite"] = {"policy": "retry"}
    with pytest.raises(ConfigError, match="nonfinite.policy: .*unknown policy 'retry'.*rollback"):
        load_recipe(tiny_recipe)


def _rollback_recipe(tiny_recipe, steps, what="loss", once=True, **extra):
    r = recipe(tiny_recipe, "rollback", steps, what, once, **extra)
    r["checkpoint"] = {"every_steps": 4, "keep_last": 10}
    return r


def test_rollback_restores_last_checkpoint_and_lowers_the_lr(poison, tiny_recipe, tmp_path):
    clean = make_clean(tiny_recipe, tmp_path)
    r = _rollback_recipe(copy.deepcopy(tiny_recipe), [7], lr_factor=0.25)
    summary = Trainer(load_recipe(r), tmp_path / "run", quiet=True).fit()
    assert summary["status"] == "finished" and summary["steps"] == 22
    entries = read_metrics(tmp_path / "run")
    events = [i for i, e in enumerate(entries) if e.get("event") == "rollback"]
    assert len(events) == 1
    event = entries[events[0]]
    assert (event["step"], event["nonfinite_step"], event["lr_factor"]) == (4, 7, 0.25)
    assert event["nonfinite"].startswith("loss, ")        # a NaN loss makes every gradient NaN too
    # Before the rollback line: exactly the clean run's lines up to the checkpoint at step 4.
    assert comparable(entries[:events[0]]) == comparable([e for e in clean if e["step"] <= 4])[:events[0]]
    after = {e["step"]: e for e in train_entries(entries[events[0] + 1:])}
    clean_train = {e["step"]: e for e in train_entries(clean)}
    # Step 5 starts from the restored step-4 weights on the same batch: the same loss as the clean run,
    # and every LR from then on is a quarter of the clean run's.
    assert after[5]["train/loss"] == clean_train[5]["train/loss"]
    assert after[6]["train/loss"] != clean_train[6]["train/loss"]
    for step in (5, 6, 12, 22):
        assert after[step]["lr/group0"] == pytest.approx(0.25 * clean_train[step]["lr/group0"], rel=1e-12)


def make_clean(tiny_recipe, tmp_path):
    Trainer(load_recipe(copy.deepcopy(tiny_recipe)), tmp_path / "clean", quiet=True).fit()
    return read_metrics(tmp_path / "clean")


def test_rollback_on_inf_gradient_before_the_first_checkpoint(poison, tiny_recipe, tmp_path):
    """A non-finite gradient is caught before the update, so no checkpoint is ever poisoned; before the
    first periodic checkpoint the run rolls back to the one written at step 0."""
    r = _rollback_recipe(tiny_recipe, [3], what="grad")
    Trainer(load_recipe(r), tmp_path / "run", quiet=True).fit()
    event = next(e for e in read_metrics(tmp_path / "run") if e.get("event") == "rollback")
    assert (event["step"], event["nonfinite_step"], event["lr_factor"]) == (0, 3, 0.5)
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "run").values())


def test_repeated_rollbacks_to_one_checkpoint_raise(poison, tiny_recipe, tmp_path):
    r = _rollback_recipe(tiny_recipe, [7], once=False, max_consecutive=2)
    with pytest.raises(NonFiniteError, match=r"step 7 after 2 rollbacks to the checkpoint at step 4 .*in: loss"):
        Trainer(load_recipe(r), tmp_path / "run", quiet=True).fit()
    # Each rollback cuts metrics.jsonl back to the checkpoint; the line left counts them all.
    events = [e for e in read_metrics(tmp_path / "run") if e.get("event") == "rollback"]
    assert [(e["rollbacks"], e["lr_factor"]) for e in events] == [(2, 0.25)]


def test_lowered_lr_survives_resume(poison, tiny_recipe, tmp_path):
    r = _rollback_recipe(tiny_recipe, [7])
    Trainer(load_recipe(r), tmp_path / "a", quiet=True).fit()
    weights = final_weights(tmp_path / "a")
    lines = comparable(read_metrics(tmp_path / "a"))
    Trainer.from_run_dir(tmp_path / "a", quiet=True, checkpoint=tmp_path / "a" / "checkpoints" / "step-00000012").fit()
    assert_same_weights(final_weights(tmp_path / "a"), weights)
    assert comparable(read_metrics(tmp_path / "a")) == lines


def test_rollback_needs_a_run_directory(poison, tiny_recipe):
    with pytest.raises(DojoError, match="rollback .* needs a run directory"):
        Trainer(load_recipe(_rollback_recipe(tiny_recipe, [7])), quiet=True).fit()
