"""The trainer: phases, freezing, schedules, reproducibility, exact resume, signals, hooks."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from torchdojo import Trainer, load_recipe
from torchdojo.methods import HOOKS, Method
from torchdojo.registry import METHODS
from torchdojo.trainer import Interrupted

from conftest import make_tiny_recipe
from helpers import assert_same_opt_state, assert_same_weights, comparable, fit, read_metrics, train_entries

DOJO = str(Path(sys.executable).with_name("dojo"))


# -- a probe method that records what the trainer does ----------------------------------------------

def _clone_sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _opt_state(opt: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's per-parameter state in parameter order (tensors cloned)."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            out.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()})
    return out


def _fingerprint(opt: torch.optim.Optimizer) -> list[float]:
    return [float(v.double().sum()) for st in _opt_state(opt) for v in st.values() if torch.is_tensor(v)]


class TrainerProbe(Method):
    """Records phase starts/ends, every batch and (optionally) the weights after each step.
    With `signal_at_step`, sends itself `signal_name` after that optimizer step."""

    def __init__(self, signal_at_step: int = 0, signal_name: str = "SIGTERM", record_weights: bool = False):
        self.signal_at_step, self.record_weights = signal_at_step, record_weights
        self.signal = getattr(signal, signal_name)
        self.phase_starts: list[dict] = []
        self.phase_ends: list[dict] = []
        self.batches: list[dict] = []
        self.weights: list[dict] = []

    def _modes(self, state) -> dict[str, bool]:
        return {n: m.training for n, m in state.model.named_modules() if n}

    def on_phase_start(self, state) -> None:
        opt = state.optimizer
        self.phase_starts.append({"phase": state.phase_name, "optimizer": opt, "type": type(opt),
                                  "opt_state": _opt_state(opt), "model": _clone_sd(state.model),
                                  "step": state.step})

    def on_batch(self, state, batch):
        self.batches.append({
            "step": state.step, "phase": state.phase_name, "step_in_phase": state.step_in_phase,
            "batch_size": len(batch["x"]), "x_sum": float(batch["x"].double().sum()),
            "y_sum": int(batch["y"].sum()), "lr": state.optimizer.param_groups[0]["lr"],
            "opt": _fingerprint(state.optimizer), "modes": self._modes(state)})
        return batch

    def on_step_end(self, state) -> None:
        if self.record_weights:
            self.weights.append(_clone_sd(state.model))
        if state.step == self.signal_at_step:
            signal.raise_signal(self.signal)

    def on_phase_end(self, state) -> None:
        self.phase_ends.append({"phase": state.phase_name, "opt_state": _opt_state(state.optimizer),
                                "model": _clone_sd(state.model), "step": state.step})


PROBE = "trainer_probe"
if PROBE not in METHODS:
    METHODS.register(PROBE, TrainerProbe)


def probe_of(trainer: Trainer) -> TrainerProbe:
    return next(m for m in trainer.methods if isinstance(m, TrainerProbe))


# -- helpers --------------------------------------------------------------------------------------

def entry_kind(e: dict) -> str:
    if "train/loss" in e:
        return "train"
    if any(k.startswith("test/") for k in e):
        return "final"
    return "eval"


# -- phases ---------------------------------------------------------------------------------------

def phased_recipe() -> dict:
    r = make_tiny_recipe()
    r["phases"] = [
        {"name": "adam_stage", "steps": 6, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01}},
        {"name": "sgd_stage", "steps": 6, "batch_size": 64,
         "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
         "schedule": [{"name": "cosine"}],
         "losses": [{"name": "cross_entropy", "weight": 0.25}, {"name": "cross_entropy", "weight": 0.75}]},
        # No optimizer and no batch size: both carry over; no schedule: constant base LR.
        {"name": "carry", "steps": 4, "losses": [{"name": "cross_entropy"}]},
    ]
    r["methods"] = [{"name": PROBE}]
    return r


PHASE_OF_STEP = {**{s: "adam_stage" for s in range(1, 7)}, **{s: "sgd_stage" for s in range(7, 13)},
                 **{s: "carry" for s in range(13, 17)}}


@pytest.fixture(scope="module")
def phased_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("phased") / "run"
    trainer, summary = fit(phased_recipe(), run_dir)
    return trainer, summary, read_metrics(run_dir)


def test_optimizer_class_switches_at_phase_boundary(phased_run):
    trainer, summary, _ = phased_run
    starts = probe_of(trainer).phase_starts
    assert [s["phase"] for s in starts] == ["adam_stage", "sgd_stage", "carry"]
    assert starts[0]["type"] is torch.optim.AdamW
    assert starts[1]["type"] is torch.optim.SGD
    assert starts[1]["optimizer"] is not starts[0]["optimizer"]
    assert starts[1]["optimizer"].param_groups[0]["momentum"] == 0.9
    # A phase naming an optimizer starts it fresh: no state carried over from AdamW.
    assert all(st == {} for st in starts[1]["opt_state"])
    assert summary["steps"] == 16


def test_phase_without_optimizer_keeps_optimizer_object_and_state(phased_run):
    trainer, _, _ = phased_run
    probe = probe_of(trainer)
    starts, ends = probe.phase_starts, probe.phase_ends
    assert starts[2]["optimizer"] is starts[1]["optimizer"]
    assert starts[2]["type"] is torch.optim.SGD
    # The momentum buffers at the start of "carry" are exactly those at the end of "sgd_stage".
    assert any("momentum_buffer" in st for st in ends[1]["opt_state"])
    assert_same_opt_state(starts[2]["opt_state"], ends[1]["opt_state"])


def test_phase_without_optimizer_uses_the_optimizer_base_lr(phased_run):
    """'carry' has no schedule, so it runs at the SGD optimizer's own lr (0.05), not at the value the
    previous phase's cosine schedule had decayed it to."""
    _, _, metrics = phased_run
    carry = [e for e in train_entries(metrics) if e["phase"] == "carry"]
    assert len(carry) == 4
    for e in carry:
        assert e["lr/group0"] == pytest.approx(0.05, rel=1e-12), e


def test_batch_size_changes_per_phase(phased_run):
    trainer, _, metrics = phased_run
    probe = probe_of(trainer)
    assert [b["batch_size"] for b in probe.batches] == [32] * 6 + [64] * 6 + [64] * 4
    # metrics.jsonl's epoch counts samples: each step adds 1 / (train rows // batch size) epochs.
    n_train = len(trainer.state.data.train)
    assert n_train > 128
    per_epoch = {"adam_stage": n_train // 32, "sgd_stage": n_train // 64, "carry": n_train // 64}
    assert [clock.steps_at(1) for _, clock in trainer.phase_plan] == list(per_epoch.values())
    expected, epoch = {}, 0.0
    for step in range(1, 17):
        epoch += 1 / per_epoch[PHASE_OF_STEP[step]]
        expected[step] = epoch
    steps = [e["step"] for e in train_entries(metrics)]
    assert steps == list(range(1, 17))
    for e in train_entries(metrics):
        assert e["epoch"] == pytest.approx(expected[e["step"]], abs=1e-4)


def test_loss_terms_change_per_phase(phased_run):
    _, _, metrics = phased_run
    for e in train_entries(metrics):
        parts = sorted(k for k in e if k.startswith("train/loss/"))
        if e["phase"] == "sgd_stage":
            assert parts == ["train/loss/cross_entropy", "train/loss/cross_entropy2"]
            a, b = e["train/loss/cross_entropy"], e["train/loss/cross_entropy2"]
            # Same loss function with weights 0.25 and 0.75; log every step -> loss is their sum.
            assert a / b == pytest.approx(1 / 3, rel=1e-5)
            assert e["train/loss"] == pytest.approx(a + b, rel=1e-5)
        else:
            assert parts == [], e


def test_phase_name_in_every_metrics_entry(phased_run):
    _, _, metrics = phased_run
    assert metrics
    for e in metrics:
        assert {"step", "epoch", "phase"} <= e.keys()
        assert e["phase"] == PHASE_OF_STEP[e["step"]], e
    kinds = {entry_kind(e) for e in metrics}
    assert kinds == {"train", "eval", "final"}
    # Each phase ends with a validation entry carrying that phase's name.
    evals = {(e["step"], e["phase"]) for e in metrics if entry_kind(e) == "eval"}
    assert {(6, "adam_stage"), (12, "sgd_stage"), (16, "carry")} <= evals


# -- freezing -------------------------------------------------------------------------------------

def test_freeze_keeps_params_and_batchnorm_stats_and_eval_mode(tmp_path):
    r = make_tiny_recipe()
    r["model"] = {"name": "mlp", "hidden": [16, 16], "batch_norm": True}
    # body: 0 Flatten, 1 (Linear, BatchNorm1d, ReLU), 2 (Linear, BatchNorm1d, ReLU); then head.
    r["phases"] = [
        {"name": "frozen", "steps": 6, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.05},
         "freeze": ["body.1"]},
        {"name": "thawed", "steps": 4},
    ]
    r["methods"] = [{"name": PROBE}]
    trainer, _ = fit(r, tmp_path / "run")
    probe = probe_of(trainer)
    before, after = probe.phase_starts[0]["model"], probe.phase_ends[0]["model"]
    frozen = [k for k in before if k.startswith(("body.1.0.", "body.1.1."))]
    assert {"body.1.1.running_mean", "body.1.1.running_var", "body.1.1.num_batches_tracked", "body.1.0.weight"} <= set(frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    for k in ("body.2.0.weight", "body.2.1.weight", "body.2.1.running_mean", "body.2.1.running_var", "head.weight"):
        assert not torch.equal(before[k], after[k]), f"trainable {k} did not change"
    for b in probe.batches:
        if b["phase"] == "frozen":
            assert not b["modes"]["body.1.0"] and not b["modes"]["body.1.1"]
            assert b["modes"]["body.2.1"] and b["modes"]["head"]
        else:
            assert all(b["modes"].values()), b["modes"]
    # Unfrozen in the next phase: the same parameters and statistics now train.
    start2, end2 = probe.phase_starts[1]["model"], probe.phase_ends[1]["model"]
    assert_same_weights(start2, after)
    for k in ("body.1.0.weight", "body.1.1.weight", "body.1.1.running_mean"):
        assert not torch.equal(start2[k], end2[k]), k


# -- schedule -------------------------------------------------------------------------------------

def test_lr_in_metrics_follows_warmup_cosine_and_epoch_step_schedule(tmp_path):
    r = make_tiny_recipe()
    r["phases"] = [
        {"name": "a", "steps": 20, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.02},
         "schedule": [{"name": "warmup", "steps": 4}, {"name": "cosine", "min_factor": 0.1}]},
        {"name": "b", "epochs": 2, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.1},
         "schedule": [{"name": "warmup", "epochs": 0.34}, {"name": "step", "every_epochs": 1, "gamma": 0.5}]},
    ]
    trainer, summary = fit(r, tmp_path / "run")
    spe = len(trainer.state.data.train) // 32
    assert summary["steps"] == 20 + 2 * spe

    def expected(step: int) -> float:
        t = step - 1                            # the LR of step s was set before its update
        if t < 20:
            if t < 4:
                return 0.02 * (t + 1) / 4
            return 0.02 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 4) / 16)))
        t -= 20
        warm = max(1, round(0.34 * spe))       # 3 steps
        if t < warm:
            return 0.1 * (t + 1) / warm
        return 0.1 * 0.5 ** ((t - warm) // spe)

    entries = train_entries(read_metrics(tmp_path / "run"))
    assert [e["step"] for e in entries] == list(range(1, 21 + 2 * spe))
    for e in entries:
        assert e["lr/group0"] == pytest.approx(expected(e["step"]), rel=1e-12, abs=1e-15), e["step"]
    assert entries[3]["lr/group0"] == pytest.approx(0.02)       # warmup reaches the base LR
    assert entries[-1]["lr/group0"] == pytest.approx(0.1 * 0.5)  # one gamma step in phase b


# -- reproducibility ------------------------------------------------------------------------------

def test_same_seed_same_results_other_seed_differs(tmp_path):
    r = make_tiny_recipe()
    r["model"]["dropout"] = 0.2                      # training randomness beyond init and shuffling
    r["methods"] = [{"name": "ema", "decay": 0.9}]
    _, s1 = fit(r, tmp_path / "a")
    _, s2 = fit(r, tmp_path / "b")
    assert s1["metrics"] == s2["metrics"]
    assert_same_weights(load_file(str(tmp_path / "a/checkpoints/final/model.safetensors")),
                        load_file(str(tmp_path / "b/checkpoints/final/model.safetensors")))
    assert comparable(read_metrics(tmp_path / "a")) == comparable(read_metrics(tmp_path / "b"))
    r["seed"] = 1
    _, s3 = fit(r, tmp_path / "c")
    assert s3["metrics"]["val/loss"] != s1["metrics"]["val/loss"]
    assert s3["metrics"]["test/loss"] != s1["metrics"]["test/loss"]


# -- exact resume ---------------------------------------------------------------------------------

def resume_recipe(signal_at_step: int = 0, signal_name: str = "SIGTERM") -> dict:
    r = make_tiny_recipe()
    r["model"]["dropout"] = 0.2
    r["phases"] = [
        {"name": "a", "steps": 12, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01},
         "schedule": [{"name": "warmup", "steps": 3}, {"name": "cosine"}]},
        {"name": "b", "steps": 8, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
         "losses": [{"name": "cross_entropy", "weight": 0.5},
                    {"name": "cross_entropy", "label_smoothing": 0.1, "weight": 0.5}]},
        {"name": "c", "steps": 6, "batch_size": 32},
    ]
    r["methods"] = [{"name": "grad_clip", "max_norm": 1.0}, {"name": "ema", "decay": 0.9},
                    {"name": PROBE, "signal_at_step": signal_at_step, "signal_name": signal_name}]
    r["checkpoint"] = {"every_steps": 4, "every_epochs": 1, "keep_last": 100}
    return r


RESUME_TOTAL = 26
# checkpoint step -> (phase index it resumes in, phase of the first step it trains)
# (4: mid-epoch during the cosine; 8: end of an epoch; 12: end of phase "a"; 16: inside "b";
# 24: inside "c", which carries over the SGD optimizer of "b")
RESUME_POINTS = {4: (0, "a"), 8: (0, "a"), 12: (0, "b"), 16: (1, "b"), 24: (2, "c")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    trainer, summary = fit(resume_recipe(), run_dir)
    return run_dir, trainer, summary


@pytest.fixture(scope="module")
def resumed_runs(uninterrupted, tmp_path_factory):
    """For each checkpoint step: a copy of the finished run resumed from that checkpoint."""
    src, _, _ = uninterrupted
    cache = {}

    def get(step: int):
        if step not in cache:
            run_dir = tmp_path_factory.mktemp(f"resume{step}") / "run"
            shutil.copytree(src, run_dir)
            trainer = Trainer.from_run_dir(run_dir, quiet=True,
                                           checkpoint=run_dir / "checkpoints" / f"step-{step:08d}")
            loaded = (trainer.state.step, trainer.state.phase_index)
            summary = trainer.fit()
            cache[step] = (run_dir, trainer, summary, loaded)
        return cache[step]
    return get


def test_uninterrupted_run_writes_expected_checkpoints(uninterrupted):
    run_dir, _, summary = uninterrupted
    assert summary["steps"] == RESUME_TOTAL
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    # every_steps=4 plus epoch ends and phase ends; keep_last=100 keeps them all.
    assert {f"step-{s:08d}" for s in (4, 8, 12, 16, 20, 24, 26)} <= set(names)
    assert names[-1] == f"step-{RESUME_TOTAL:08d}"
    assert (run_dir / "checkpoints/final/model.safetensors").is_file()
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["name"] == "tiny"


@pytest.mark.parametrize("step", sorted(RESUME_POINTS))
def test_resume_equals_uninterrupted_run(step, uninterrupted, resumed_runs):
    src, ref_trainer, ref_summary = uninterrupted
    run_dir, trainer, summary, loaded = resumed_runs(step)
    assert loaded == (step, RESUME_POINTS[step][0])
    # It continues at the right step, phase, schedule position, data order and optimizer state:
    # every batch after the checkpoint looks exactly as in the uninterrupted run.
    ref_batches = probe_of(ref_trainer).batches
    batches = probe_of(trainer).batches
    assert batches[0]["step"] == step and batches[0]["phase"] == RESUME_POINTS[step][1]
    assert batches == ref_batches[step:]
    # Same final weights (EMA average), metrics, and final optimizer/method state, bit for bit.
    assert_same_weights(load_file(str(run_dir / "checkpoints/final/model.safetensors")),
                        load_file(str(src / "checkpoints/final/model.safetensors")))
    assert summary["metrics"] == ref_summary["metrics"]
    assert summary["steps"] == ref_summary["steps"]
    last = f"checkpoints/step-{RESUME_TOTAL:08d}/state.pt"
    a = torch.load(src / last, weights_only=True)
    b = torch.load(run_dir / last, weights_only=True)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i in a["optimizer"]["state"]:
        for k, v in a["optimizer"]["state"][i].items():
            assert torch.equal(v, b["optimizer"]["state"][i][k])
    assert_same_weights(a["methods"][1]["average"], b["methods"][1]["average"])


@pytest.mark.parametrize("step", sorted(RESUME_POINTS))
def test_resume_rewrites_metrics_without_duplicates(step, uninterrupted, resumed_runs):
    src, _, _ = uninterrupted
    run_dir, _, _, _ = resumed_runs(step)
    entries = read_metrics(run_dir)
    keys = [(e["step"], entry_kind(e)) for e in entries]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicates, f"duplicated metrics entries (step, kind) after resuming at {step}: {duplicates}"
    assert comparable(entries) == comparable(read_metrics(src))


def test_interrupt_writes_checkpoint_and_resume_finishes_identically(uninterrupted, tmp_path):
    src, _, ref_summary = uninterrupted
    run_dir = tmp_path / "run"
    trainer = Trainer(load_recipe(resume_recipe(signal_at_step=14)), run_dir, quiet=True)
    with pytest.raises(Interrupted) as info:
        trainer.fit()
    assert info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # handlers restored after fit
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 14
    assert (run_dir / "checkpoints/step-00000014/state.pt").is_file()
    assert max(e["step"] for e in read_metrics(run_dir)) == 14

    resumed = Trainer.from_run_dir(run_dir, quiet=True)
    assert resumed.state.step == 14 and resumed.state.phase_index == 1
    final = resumed.fit()
    assert final["status"] == "finished"
    assert final["metrics"] == ref_summary["metrics"]
    assert_same_weights(load_file(str(run_dir / "checkpoints/final/model.safetensors")),
                        load_file(str(src / "checkpoints/final/model.safetensors")))
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(src))


def test_sigint_interrupt_exit_code_130(tmp_path):
    trainer = Trainer(load_recipe(resume_recipe(signal_at_step=3, signal_name="SIGINT")), tmp_path / "run",
                      quiet=True)
    with pytest.raises(Interrupted) as info:
        trainer.fit()
    assert info.value.exit_code == 130
    assert (tmp_path / "run/checkpoints/step-00000003/state.pt").is_file()
    assert json.loads((tmp_path / "run/summary.json").read_text())["status"] == "interrupted"


def test_resume_between_log_points_logs_the_same_train_loss(tmp_path):
    """With log.every_steps=5, train/loss is the mean over the last 5 steps. A run interrupted at step 7
    and resumed must log the same mean at step 10 as the uninterrupted run (steps 6..10, not 8..10)."""
    ref = resume_recipe()
    ref["log"] = {"every_steps": 5}
    fit(ref, tmp_path / "ref")
    r = resume_recipe(signal_at_step=7)
    r["log"] = {"every_steps": 5}
    with pytest.raises(Interrupted):
        fit(r, tmp_path / "run")
    Trainer.from_run_dir(tmp_path / "run", quiet=True).fit()
    got = {e["step"]: e["train/loss"] for e in train_entries(read_metrics(tmp_path / "run"))}
    want = {e["step"]: e["train/loss"] for e in train_entries(read_metrics(tmp_path / "ref"))}
    # every 5 steps, plus the last steps of each phase (the first phase ends at step 12)
    assert list(got) == list(want) == [5, 10, 12, 15, 20, 25, 26]
    assert got == want


# -- SIGTERM through the CLI ----------------------------------------------------------------------

def _cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_sigterm_checkpoints_and_cli_resume_finishes(tmp_path):
    r = make_tiny_recipe()
    r["phases"][0]["steps"] = 600
    r["checkpoint"] = {"every_steps": 20, "every_epochs": None, "keep_last": 2}
    r["log"] = {"every_steps": 10}
    recipe_path = tmp_path / "long.yaml"
    recipe_path.write_text(yaml.safe_dump(r))
    total = 600 + 4
    run_dir = tmp_path / "run"

    proc = subprocess.Popen([DOJO, "train", str(recipe_path), "--run-dir", str(run_dir), "-q"],
                            env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / "checkpoints").glob("step-*/state.pt")):
            assert proc.poll() is None, f"training ended before its first checkpoint: {proc.communicate()}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "dojo resume" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert 0 < summary["steps"] < total
    assert (run_dir / f"checkpoints/step-{summary['steps']:08d}/state.pt").is_file()
    logged = [e["step"] for e in train_entries(read_metrics(run_dir))]
    assert logged == list(range(10, summary["steps"] + 1, 10))

    res = subprocess.run([DOJO, "resume", str(run_dir), "-q"], env=_cli_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    final = json.loads((run_dir / "summary.json").read_text())
    assert final["status"] == "finished" and final["steps"] == total
    # The same final metrics as an uninterrupted run (in process, without a run directory).
    _, reference = fit(r, None)
    assert final["metrics"] == reference["metrics"]
    logged = [e["step"] for e in train_entries(read_metrics(run_dir))]
    # no step logged twice, none missing: every 10 steps, plus the last steps of the last phase
    assert logged == list(range(10, total + 1, 10)) + [total]


# -- a complete run -------------------------------------------------------------------------------

def test_quickstart_like_run_reaches_its_accuracy(tmp_path):
    recipe = load_recipe("quickstart", ["model.channels=[8, 16]", "model.hidden=32", "phases.main.epochs=4",
                                        "phases.main.schedule.0.steps=10", "phases.settle.epochs=1",
                                        "methods.ema.decay=0.9"])
    assert [p.name for p in recipe.phases] == ["main", "settle"]
    summary = Trainer(recipe, tmp_path / "run", quiet=True).fit()
    assert summary["status"] == "finished" and summary["stop_reason"] is None
    # 10 classes: chance is 0.1; the small CNN gets above 0.9 within five epochs.
    assert summary["metrics"]["test/accuracy"] > 0.9
    assert summary["metrics"]["val/accuracy"] > 0.9
    losses = [e["train/loss"] for e in train_entries(read_metrics(tmp_path / "run"))]
    assert losses[-1] < 0.5 * losses[0]


# -- hooks ----------------------------------------------------------------------------------------

def test_hooks_are_the_method_base_class_on_methods():
    assert set(HOOKS) == {n for n in vars(Method) if n.startswith("on_")}
    assert {"on_fit_start", "on_phase_start", "on_batch", "on_loss", "on_after_backward", "on_step_end",
            "on_eval_end", "on_phase_end", "on_fit_end"} <= set(HOOKS)


def test_registered_methods_define_only_real_hooks():
    entries = METHODS.entries()
    assert {"grad_clip", "ema", "early_stopping"} <= {e.name for e in entries}
    for entry in entries:
        cls = entry.factory
        assert issubclass(cls, Method), entry.name
        defined = {n for klass in cls.__mro__ if klass not in (Method, object)
                   for n in vars(klass) if n.startswith("on_")}
        assert defined, f"method {entry.name} defines no hook"
        assert defined <= set(HOOKS), f"method {entry.name} defines unknown hooks {defined - set(HOOKS)}"


def test_trainer_calls_only_overridden_hooks(tmp_path, tiny_recipe):
    tiny_recipe["methods"] = [{"name": "grad_clip"}, {"name": "ema", "decay": 0.9}]
    trainer = Trainer(load_recipe(tiny_recipe), None, quiet=True)
    grad_clip, ema = trainer.methods
    assert trainer.hooks["on_after_backward"] == [grad_clip]
    assert trainer.hooks["on_step_end"] == [ema]
    assert trainer.hooks["on_eval_model"] == [ema]
    assert trainer.hooks["on_fit_start"] == [grad_clip, ema]
    assert trainer.hooks["on_batch"] == []
