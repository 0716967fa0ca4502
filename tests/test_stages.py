"""Training stages in the trainer: optimizer and batch-size switches at phase boundaries, a batch size
scheduled inside a phase (with exact resume), `lr_scaling`, `optimizer_state: carry`, and the
reduce-on-plateau schedule driven by the trainer's validation passes (with exact resume)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Optional

import pytest
import torch

from torchdojo import ConfigError, Trainer, load_recipe
from torchdojo.methods import Method
from torchdojo.registry import METHODS

from conftest import make_tiny_recipe
from helpers import assert_same_opt_state, assert_same_weights, comparable, final_weights, fit, read_metrics, train_entries

TRAIN_ROWS = 280            # the tiny recipe's data: 400 rows, 10 % val, 20 % test


# -- a probe method (registered under a name of its own for this module only) ------------------------

PROBE = "stages_probe"


def _clone_sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _opt_state(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[dict]:
    """Per-parameter optimizer state in the model's parameter order (not the groups' order), cloned."""
    return [{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in opt.state.get(p, {}).items()}
            for p in model.parameters()]


class StagesProbe(Method):
    """Records, per optimizer step, what the trainer trains with; optionally gradients and weights.
    With `val_script` (optimizer step -> value), replaces `val/accuracy` of the validation at that step
    before the plateau schedule sees it (a scripted, resume-safe metric sequence)."""

    def __init__(self, record_weights: bool = False, val_script: Optional[dict[int, float]] = None):
        self.record_weights = record_weights
        self.val_script = {int(k): float(v) for k, v in (val_script or {}).items()}
        self.phase_starts: list[dict] = []
        self.phase_ends: list[dict] = []
        self.steps: list[dict] = []
        self.evals: list[dict] = []

    def on_phase_start(self, state) -> None:
        opt = state.optimizer
        self.phase_starts.append({"phase": state.phase_name, "optimizer": opt, "type": type(opt),
                                  "opt_state": _opt_state(opt, state.model), "step": state.step,
                                  "lrs": [g["lr"] for g in opt.param_groups],
                                  "initial_lrs": [g["initial_lr"] for g in opt.param_groups],
                                  "momentum": opt.param_groups[0].get("momentum")})

    def on_batch(self, state, batch):
        opt = state.optimizer
        self.steps.append({
            "step": state.step + 1, "phase": state.phase_name, "step_in_phase": state.step_in_phase,
            "epoch_in_phase": state.epoch_in_phase, "batch_in_epoch": state.batch_in_epoch,
            "steps_per_epoch": state.steps_per_epoch, "batch_size": len(batch["x"]),
            "x_sum": float(batch["x"].double().sum()), "optimizer": opt, "type": type(opt),
            "lrs": [g["lr"] for g in opt.param_groups],
            "params_before": [p.detach().clone() for p in state.model.parameters()] if self.record_weights else None})
        return batch

    def on_after_backward(self, state) -> None:
        if self.record_weights:
            self.steps[-1]["grads"] = [p.grad.detach().clone() for p in state.model.parameters()]

    def on_step_end(self, state) -> None:
        if self.record_weights:
            self.steps[-1]["params_after"] = [p.detach().clone() for p in state.model.parameters()]
            self.steps[-1]["opt_state_after"] = _opt_state(state.optimizer, state.model)

    def on_eval_end(self, state, metrics: dict) -> None:
        if state.step in self.val_script:
            metrics["val/accuracy"] = self.val_script[state.step]
        self.evals.append({"step": state.step, **metrics})

    def on_phase_end(self, state) -> None:
        self.phase_ends.append({"phase": state.phase_name, "opt_state": _opt_state(state.optimizer, state.model),
                                "step": state.step})


@pytest.fixture(scope="module", autouse=True)
def stages_probe_registered():
    METHODS.register(PROBE, StagesProbe)
    yield
    METHODS.unregister(PROBE)


def probe_of(trainer: Trainer) -> StagesProbe:
    return next(m for m in trainer.methods if isinstance(m, StagesProbe))


# -- helpers --------------------------------------------------------------------------------------

def eval_entries(entries: list[dict]) -> list[dict]:
    return [e for e in entries if "val/loss" in e and not any(k.startswith("test/") for k in e)]


def resume_copy(src: Path, dst: Path, step: int) -> tuple[Trainer, dict]:
    """Copy a finished run and continue the copy from its checkpoint at `step`."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "final")
    (dst / "summary.json").unlink()
    trainer = Trainer.from_run_dir(dst, quiet=True, checkpoint=dst / "checkpoints" / f"step-{step:08d}")
    assert trainer.state.step == step
    return trainer, trainer.fit()


def checkpoint_state(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}" / "state.pt", weights_only=True)


# -- optimizer and batch size switch exactly at phase boundaries -----------------------------------------

def test_phase_switch_changes_optimizer_class_and_batch_size_at_the_boundary_step():
    r = make_tiny_recipe()
    r["phases"] = [
        {"name": "adam", "steps": 5, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01}},
        {"name": "sgd", "steps": 4, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
        {"name": "small", "steps": 3, "batch_size": 16},          # keeps the SGD optimizer
    ]
    r["methods"] = [{"name": PROBE}]
    trainer, summary = fit(r, None)
    steps = probe_of(trainer).steps
    assert summary["steps"] == 12
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert [s["type"] for s in steps] == [torch.optim.AdamW] * 5 + [torch.optim.SGD] * 7
    assert [s["batch_size"] for s in steps] == [32] * 5 + [64] * 4 + [16] * 3
    assert [s["phase"] for s in steps] == ["adam"] * 5 + ["sgd"] * 4 + ["small"] * 3
    # One optimizer object per optimizer phase; the third phase trains with the second's object.
    assert len({id(s["optimizer"]) for s in steps[:5]}) == 1
    assert len({id(s["optimizer"]) for s in steps[5:]}) == 1
    assert steps[4]["optimizer"] is not steps[5]["optimizer"]
    # The boundary steps use the new phase's base LR (no schedule: constant).
    assert steps[4]["lrs"][0] == pytest.approx(0.01) and steps[5]["lrs"][0] == pytest.approx(0.05)
    assert steps[-1]["lrs"][0] == pytest.approx(0.05)


# -- a batch size scheduled inside a phase ------------------------------------------------------------

GROW = {"start": 16, "end": 64, "every_epochs": 1}
GROW_BS = [16, 32, 64, 64]                                 # epochs 0..3 of the phase
GROW_SPE = [TRAIN_ROWS // bs for bs in GROW_BS]            # 17, 8, 4, 4
GROW_STEPS = sum(GROW_SPE)                                 # 33
AFTER_SPE = TRAIN_ROWS // 64                               # the next phase continues at `end`


def grow_recipe() -> dict:
    r = make_tiny_recipe()
    r["model"]["dropout"] = 0.1                            # randomness in every step, for the resume
    r["phases"] = [
        {"name": "grow", "epochs": 4, "batch_size": dict(GROW),
         "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
         "schedule": [{"name": "warmup", "steps": 5}, {"name": "cosine"}]},
        {"name": "after", "epochs": 1},                    # no batch size: the last one (64) carries over
    ]
    r["methods"] = [{"name": PROBE}]
    r["checkpoint"] = {"every_steps": 5, "every_epochs": 1, "keep_last": 100}
    return r


@pytest.fixture(scope="module")
def grow_run(tmp_path_factory, stages_probe_registered):
    run_dir = tmp_path_factory.mktemp("grow") / "run"
    trainer, summary = fit(grow_recipe(), run_dir)
    return run_dir, trainer, summary


def test_scheduled_batch_size_per_epoch_and_steps_per_epoch(grow_run):
    _, trainer, summary = grow_run
    recipe = trainer.recipe
    assert [recipe.batch_size(0, e) for e in range(6)] == [16, 32, 64, 64, 64, 64]
    assert recipe.batch_size(1, 0) == 64
    assert len(trainer.state.data.train) == TRAIN_ROWS
    steps = probe_of(trainer).steps
    per_epoch: dict[tuple[str, int], list[int]] = {}
    for s in steps:
        per_epoch.setdefault((s["phase"], s["epoch_in_phase"]), []).append(s["batch_size"])
    assert list(per_epoch) == [("grow", 0), ("grow", 1), ("grow", 2), ("grow", 3), ("after", 0)]
    for (phase, epoch), sizes in per_epoch.items():
        bs = GROW_BS[epoch] if phase == "grow" else 64
        # Every batch of an epoch has that epoch's size; the ragged rest is dropped.
        assert sizes == [bs] * (TRAIN_ROWS // bs), (phase, epoch)
    # The trainer's own view of each epoch agrees.
    for s in steps:
        bs = GROW_BS[s["epoch_in_phase"]] if s["phase"] == "grow" else 64
        assert s["steps_per_epoch"] == TRAIN_ROWS // bs
    # Batches inside an epoch are distinct slices of a shuffled order (no batch repeated).
    grow0 = [s["x_sum"] for s in steps if s["phase"] == "grow" and s["epoch_in_phase"] == 0]
    assert len(set(grow0)) == len(grow0)


def test_scheduled_batch_size_phase_length_in_epochs(grow_run):
    _, trainer, summary = grow_run
    (grow_steps, clock), (after_steps, _) = trainer.phase_plan
    assert grow_steps == GROW_STEPS == 33
    assert after_steps == AFTER_SPE == 4
    assert [clock.steps_at(e) for e in range(5)] == [0, 17, 25, 29, 33]
    assert clock.steps_at(1.5) == 17 + 4                   # half of the 8-step second epoch
    assert summary["steps"] == trainer.total_steps == GROW_STEPS + AFTER_SPE
    assert summary["epochs"] == pytest.approx(5.0)


def test_scheduled_batch_size_epoch_in_metrics(grow_run):
    run_dir, _, _ = grow_run
    entries = read_metrics(run_dir)
    # Validation after every epoch: epoch exactly 1, 2, 3, ... at the step that ends the epoch.
    ends = [sum(GROW_SPE[:k + 1]) for k in range(4)] + [GROW_STEPS + AFTER_SPE]
    evals = eval_entries(entries)
    assert [(e["step"], e["epoch"]) for e in evals] == [(s, float(k + 1)) for k, s in enumerate(ends)]
    # Train entries (logged every step): completed epochs plus the fraction of the current one, where
    # the fraction counts in that epoch's own steps (17, 8, 4, 4, then 4).
    spe = GROW_SPE + [AFTER_SPE]
    expected, step = {}, 0
    for k, n in enumerate(spe):
        for b in range(1, n + 1):
            step += 1
            expected[step] = k + b / n
    train = train_entries(entries)
    assert [e["step"] for e in train] == list(range(1, step + 1))
    for e in train:
        assert e["epoch"] == pytest.approx(expected[e["step"]], abs=1e-4), e["step"]
    epochs = [e["epoch"] for e in train]
    assert all(b > a for a, b in zip(epochs, epochs[1:]))
    # The epoch increases by exactly 1 over each epoch, whatever its number of steps.
    by_step = {e["step"]: e["epoch"] for e in train}
    for k in range(1, len(ends)):
        assert by_step[ends[k]] - by_step[ends[k - 1]] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("step", [10, 20])
def test_resume_mid_epoch_inside_batch_size_schedule_is_bit_identical(step, grow_run, tmp_path):
    src, ref_trainer, ref_summary = grow_run
    # The checkpoint is mid-epoch: step 10 is batch 10 of the 16-row epoch, step 20 batch 3 of the
    # 32-row epoch.
    state = checkpoint_state(src, step)
    assert state["phase_index"] == 0
    assert (state["epoch_in_phase"], state["batch_in_epoch"]) == {10: (0, 10), 20: (1, 3)}[step]
    trainer, summary = resume_copy(src, tmp_path / "run", step)
    # Every batch after the checkpoint is exactly that of the uninterrupted run (size and content).
    ref_steps = [{k: v for k, v in s.items() if k not in ("optimizer",)} for s in probe_of(ref_trainer).steps]
    got_steps = [{k: v for k, v in s.items() if k not in ("optimizer",)} for s in probe_of(trainer).steps]
    assert got_steps == ref_steps[step:]
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(src))
    assert summary["metrics"] == ref_summary["metrics"]
    assert summary["steps"] == ref_summary["steps"] and summary["epochs"] == ref_summary["epochs"]
    assert comparable(read_metrics(tmp_path / "run")) == comparable(read_metrics(src))


# -- lr_scaling ----------------------------------------------------------------------------------------

def scaling_recipe(mode: str) -> dict:
    r = make_tiny_recipe()
    r["phases"] = [
        # ref batch size 16 (the phase's first epoch): scale 1, 2, 4 over its epochs
        {"name": "grow", "epochs": 3, "batch_size": dict(GROW), "lr_scaling": mode,
         "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
         "schedule": [{"name": "warmup", "steps": 4}]},
        # carried-over optimizer (set up for 16), larger batch: scale 128 / 16
        {"name": "big", "steps": 5, "batch_size": 128, "lr_scaling": mode},
        # the same batch without lr_scaling: the optimizer's own LR
        {"name": "plain", "steps": 3},
        # a new optimizer started at batch 32 is the new reference
        {"name": "new_opt", "steps": 3, "batch_size": 32, "lr_scaling": mode,
         "optimizer": {"name": "adamw", "lr": 0.01}},
        {"name": "new_big", "steps": 3, "batch_size": 64, "lr_scaling": mode},
    ]
    r["methods"] = [{"name": PROBE}]
    return r


@pytest.mark.parametrize("mode", ["linear", "sqrt"])
def test_lr_scaling_with_batch_size(mode, tmp_path):
    trainer, summary = fit(scaling_recipe(mode), tmp_path / "run")
    steps = probe_of(trainer).steps
    base = {"grow": 0.1, "big": 0.1, "plain": 0.1, "new_opt": 0.01, "new_big": 0.01}
    ref = {"grow": 16, "big": 16, "plain": None, "new_opt": 32, "new_big": 32}
    spe = [TRAIN_ROWS // bs for bs in (16, 32, 64)]
    assert [s["batch_size"] for s in steps] == ([16] * spe[0] + [32] * spe[1] + [64] * spe[2]
                                                + [128] * 8 + [32] * 3 + [64] * 3)

    def expected(s: dict) -> float:
        phase = s["phase"]
        factor = 1.0
        if ref[phase] is not None:
            ratio = s["batch_size"] / ref[phase]
            factor = ratio if mode == "linear" else math.sqrt(ratio)
        warm = (s["step_in_phase"] + 1) / 4 if phase == "grow" and s["step_in_phase"] < 4 else 1.0
        return base[phase] * factor * warm

    logged = {e["step"]: e for e in train_entries(read_metrics(tmp_path / "run"))}
    assert sorted(logged) == [s["step"] for s in steps]
    for s in steps:
        want = expected(s)
        for g in range(len(s["lrs"])):
            assert s["lrs"][g] == pytest.approx(want, rel=1e-12), (s["step"], s["phase"], g)
            assert logged[s["step"]][f"lr/group{g}"] == pytest.approx(want, rel=1e-12), (s["step"], g)
    # Spot values: the scale really differs between the modes.
    big = next(s for s in steps if s["phase"] == "big")
    assert big["lrs"][0] == pytest.approx(0.1 * (8.0 if mode == "linear" else math.sqrt(8.0)))
    last_grow = [s for s in steps if s["phase"] == "grow"][-1]
    assert last_grow["lrs"][0] == pytest.approx(0.1 * (4.0 if mode == "linear" else 2.0))
    assert next(s for s in steps if s["phase"] == "new_big")["lrs"][0] == \
        pytest.approx(0.01 * (2.0 if mode == "linear" else math.sqrt(2.0)))


# -- optimizer_state: carry -------------------------------------------------------------------------

def carry_recipe(carry: bool) -> dict:
    r = make_tiny_recipe()
    second = {"name": "second", "steps": 4, "batch_size": 32,
              "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.8}}
    if carry:
        second["optimizer_state"] = "carry"
    r["phases"] = [
        {"name": "first", "steps": 6, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
        {"name": "middle", "steps": 3},          # keeps the first phase's optimizer
        second,
    ]
    r["methods"] = [{"name": PROBE, "record_weights": True}]
    return r


@pytest.mark.parametrize("carry", [True, False])
def test_optimizer_state_carry_and_fresh(carry):
    trainer, summary = fit(carry_recipe(carry), None)
    probe = probe_of(trainer)
    starts = {s["phase"]: s for s in probe.phase_starts}
    ends = {s["phase"]: s for s in probe.phase_ends}
    assert summary["steps"] == 13
    # A new optimizer object of the same class, with the new phase's hyperparameters.
    assert starts["second"]["type"] is torch.optim.SGD
    assert starts["second"]["optimizer"] is not starts["middle"]["optimizer"]
    assert starts["middle"]["optimizer"] is starts["first"]["optimizer"]
    assert starts["second"]["momentum"] == 0.8
    assert all(lr == pytest.approx(0.01) for lr in starts["second"]["initial_lrs"])
    previous = ends["middle"]["opt_state"]
    assert all("momentum_buffer" in st and st["momentum_buffer"].abs().sum() > 0 for st in previous)
    if carry:
        # The carried state is exactly the previous optimizer's state at the end of "middle".
        assert_same_opt_state(starts["second"]["opt_state"], previous)
    else:
        assert all(st == {} for st in starts["second"]["opt_state"])
    first = next(s for s in probe.steps if s["phase"] == "second")
    assert all(lr == pytest.approx(0.01, rel=1e-12) for lr in first["lrs"])
    # The first update of "second" follows SGD with the new momentum and lr and the carried buffer:
    # buf = 0.8 * buf_prev + grad (fresh: buf = grad); param -= 0.01 * buf.
    for i, grad in enumerate(first["grads"]):
        prev_buf = previous[i]["momentum_buffer"]
        want_buf = 0.8 * prev_buf + grad if carry else grad
        got_buf = first["opt_state_after"][i]["momentum_buffer"]
        torch.testing.assert_close(got_buf, want_buf, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(first["params_after"][i], first["params_before"][i] - 0.01 * want_buf,
                                   rtol=1e-6, atol=1e-7)
    # Carrying does change the training: the buffer differs from a fresh start's.
    if carry:
        assert any(not torch.allclose(first["opt_state_after"][i]["momentum_buffer"], g)
                   for i, g in enumerate(first["grads"]))


@pytest.mark.parametrize("phases, path", [
    # carry into an optimizer of another name
    ([{"steps": 2, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
      {"steps": 2, "optimizer": {"name": "adamw", "lr": 0.01}, "optimizer_state": "carry"}], "phases.1.optimizer_state"),
    # another name, through a phase that keeps the optimizer
    ([{"steps": 2, "optimizer": {"name": "adamw", "lr": 0.01}}, {"steps": 2},
      {"steps": 2, "optimizer": {"name": "sgd", "lr": 0.1}, "optimizer_state": "carry"}], "phases.2.optimizer_state"),
    # carry without naming an optimizer
    ([{"steps": 2, "optimizer": {"name": "sgd", "lr": 0.1}},
      {"steps": 2, "optimizer_state": "carry"}], "phases.1.optimizer_state"),
    # carry in the first phase: nothing to carry from
    ([{"steps": 2, "optimizer": {"name": "sgd", "lr": 0.1}, "optimizer_state": "carry"}], "phases.0.optimizer_state"),
])
def test_optimizer_state_carry_config_errors(phases, path):
    r = make_tiny_recipe()
    r["phases"] = phases
    with pytest.raises(ConfigError) as info:
        load_recipe(r)
    assert info.value.path == path
    assert "same optimizer" in str(info.value)


def test_optimizer_state_carry_with_same_name_validates():
    r = make_tiny_recipe()
    r["phases"] = [{"steps": 2, "optimizer": {"name": "adamw", "lr": 0.01}}, {"steps": 2},
                   {"steps": 2, "optimizer": {"name": "adamw", "lr": 0.001}, "optimizer_state": "carry"}]
    assert load_recipe(r).phases[2].optimizer_state == "carry"


# -- plateau driven by validation -------------------------------------------------------------------

PLATEAU_SPE = TRAIN_ROWS // 64           # 4 steps per epoch: one validation every 4 steps
PLATEAU_EPOCHS = 14
PLATEAU_BASE, PLATEAU_MIN_LR, WARMUP = 0.1, 0.03, 4
# The scripted val/accuracy of the validation after each epoch: stalls, improvements, a worse value.
SCRIPT = [0.50, 0.50, 0.40, 0.60, 0.60, 0.60, 0.61, 0.55, 0.55, 0.70, 0.70, 0.70, 0.70, 0.70]
PLATEAU_SCHEDULE = [{"name": "warmup", "steps": WARMUP},
                    {"name": "plateau", "monitor": "val/accuracy", "mode": "max", "patience": 2,
                     "factor": 0.5, "min_lr": PLATEAU_MIN_LR}]


def plateau_recipe(scripted: bool = True) -> dict:
    r = make_tiny_recipe()
    r["phases"] = [{"name": "p", "epochs": PLATEAU_EPOCHS, "batch_size": 64,
                    "optimizer": {"name": "sgd", "lr": PLATEAU_BASE, "momentum": 0.9},
                    "schedule": [dict(s) for s in PLATEAU_SCHEDULE]}]
    script = {PLATEAU_SPE * (k + 1): v for k, v in enumerate(SCRIPT)} if scripted else {}
    r["methods"] = [{"name": PROBE, "val_script": script}]
    r["eval"] = {"every_epochs": 1}
    r["checkpoint"] = {"every_epochs": 1, "every_steps": 11, "keep_last": 100}
    return r


def expected_plateau_lrs(evals: list[tuple[int, float]], total_steps: int) -> dict[int, float]:
    """The LR of every step, recomputed from the logged (step, val/accuracy) of each validation:
    warmup, then base * 0.5**reductions (never below min_lr), a reduction after 2 evaluations in a row
    that do not beat the best by the relative threshold 1e-4; it applies from the next step on."""
    best, bad, scale = None, 0, 1.0
    scale_after: dict[int, float] = {}
    for step, value in evals:
        if best is None or value > best + abs(best) * 1e-4:
            best, bad = value, 0
        else:
            bad += 1
        if bad >= 2:
            scale, bad = scale * 0.5, 0
        scale_after[step] = scale
    lrs, scale = {}, 1.0
    for step in range(1, total_steps + 1):
        t = step - 1
        earlier = [s for s in scale_after if s < step]
        scale = scale_after[max(earlier)] if earlier else 1.0
        if t < WARMUP:
            lrs[step] = PLATEAU_BASE * (t + 1) / WARMUP          # no floor outside the plateau segment
        else:
            lrs[step] = max(PLATEAU_BASE * scale, PLATEAU_MIN_LR)
    return lrs


@pytest.fixture(scope="module")
def plateau_run(tmp_path_factory, stages_probe_registered):
    run_dir = tmp_path_factory.mktemp("plateau") / "run"
    trainer, summary = fit(plateau_recipe(), run_dir)
    return run_dir, trainer, summary


def _logged_evals(run_dir: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["val/accuracy"]) for e in eval_entries(read_metrics(run_dir))]


def test_plateau_reduces_lr_after_two_non_improving_evaluations(plateau_run):
    run_dir, trainer, summary = plateau_run
    total = PLATEAU_SPE * PLATEAU_EPOCHS
    assert summary["steps"] == total
    evals = _logged_evals(run_dir)
    assert evals == [(PLATEAU_SPE * (k + 1), v) for k, v in enumerate(SCRIPT)]
    want = expected_plateau_lrs(evals, total)
    train = train_entries(read_metrics(run_dir))
    assert [e["step"] for e in train] == list(range(1, total + 1))
    for e in train:
        assert e["lr/group0"] == pytest.approx(want[e["step"]], rel=1e-12), e["step"]
    lr = {e["step"]: e["lr/group0"] for e in train}
    # By hand for this script: reductions at the 3rd, 6th, 9th, 12th and 14th validation.
    assert lr[1] == pytest.approx(0.025)                 # warmup below min_lr: the floor is not applied
    assert lr[12] == pytest.approx(0.1) and lr[13] == pytest.approx(0.05)
    assert lr[24] == pytest.approx(0.05) and lr[25] == pytest.approx(PLATEAU_MIN_LR)   # 0.025 < min_lr
    assert lr[28] == lr[29] == lr[37] == lr[total] == pytest.approx(PLATEAU_MIN_LR)
    assert min(lr[s] for s in range(WARMUP + 1, total + 1)) == pytest.approx(PLATEAU_MIN_LR)
    plateau = trainer.state.schedule.segments[1].plateau
    assert plateau.reductions == 5 and plateau.scale == pytest.approx(0.5 ** 5)


def test_plateau_sees_real_validation_metrics(tmp_path):
    """Without the script, the plateau follows the real val/accuracy logged in metrics.jsonl."""
    r = plateau_recipe(scripted=False)
    r["phases"][0]["optimizer"]["lr"] = PLATEAU_BASE        # same base; real accuracy stalls on 40 rows
    r["checkpoint"] = {"every_epochs": None}
    trainer, summary = fit(r, tmp_path / "run")
    evals = _logged_evals(tmp_path / "run")
    assert len(evals) == PLATEAU_EPOCHS
    want = expected_plateau_lrs(evals, summary["steps"])
    train = train_entries(read_metrics(tmp_path / "run"))
    for e in train:
        assert e["lr/group0"] == pytest.approx(want[e["step"]], rel=1e-12), e["step"]
    assert trainer.state.schedule.segments[1].plateau.reductions >= 1, "the real accuracy never stalled"
    assert want[summary["steps"]] < PLATEAU_BASE


@pytest.mark.parametrize("step", [12, 22])
def test_plateau_resume_after_a_reduction_is_bit_identical(step, plateau_run, tmp_path):
    src, _, ref_summary = plateau_run
    state = checkpoint_state(src, step)
    saved = state["schedule"]["plateaus"][1]
    # 12: right after the first reduction; 22: mid-epoch with one bad evaluation pending.
    assert saved["reductions"] == 1 and saved["scale"] == 0.5
    assert saved["bad"] == {12: 0, 22: 1}[step]
    trainer, summary = resume_copy(src, tmp_path / "run", step)
    assert trainer.state.schedule.segments[1].plateau.reductions == 5
    ref, got = read_metrics(src), read_metrics(tmp_path / "run")
    assert comparable(got) == comparable(ref)
    lr = {e["step"]: e["lr/group0"] for e in train_entries(got)}
    assert lr[step + 1] == pytest.approx(0.05)               # resumes at the reduced LR
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(src))
    assert summary["metrics"] == ref_summary["metrics"]


def test_plateau_unknown_monitor_is_a_config_error():
    r = plateau_recipe(scripted=False)
    r["phases"][0]["epochs"] = 2
    r["phases"][0]["schedule"][1]["monitor"] = "val/acc"
    r["checkpoint"] = {"every_epochs": None}
    with pytest.raises(ConfigError) as info:
        fit(r, None)
    assert info.value.path == "phases.0.schedule"
    assert "val/acc" in info.value.message and "val/accuracy" in info.value.message
