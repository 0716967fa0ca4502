"""Exact resume (issue 6, promise 1): a run stopped at any step and resumed gives bit-for-bit the run
that never stopped: per-step losses and LRs, final parameters, optimizer, method and RNG state, with
dropout, shuffling, augmentation, gradient accumulation, EMA and a plateau schedule active.

The stop is a checkpoint written at step k (what SIGTERM and the periodic saves write alike); the
resume runs in a new process through `dojo resume`, or in-process for the parametrised list of every
task and method. A task or method registered without an entry in `RESUME_CASES` fails
`test_every_task_and_method_has_a_resume_parity_case`."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchdojo import Trainer, load_recipe
from torchdojo.checkpoint import list_checkpoints, load_checkpoint
from torchdojo.methods import Method
from torchdojo.registry import METHODS, TASKS

from conftest import make_tiny_recipe
from helpers import assert_same_weights, comparable, final_weights, read_metrics

# 280 training rows: 8 steps per epoch at batch size 32, 4 at 64.
PARITY = {
    "name": "parity",
    "seed": 3,
    "data": {"name": "synthetic_tabular", "n_samples": 400, "n_features": 8, "n_informative": 5,
             "n_classes": 3, "class_sep": 1.5},
    "model": {"name": "mlp", "hidden": [32], "dropout": 0.2},
    "phases": [
        {"name": "main", "steps": 12, "batch_size": 32, "accumulate": 2,
         "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
         "schedule": [{"name": "warmup", "steps": 3}, {"name": "cosine"}],
         "augment": [{"name": "swap_noise", "p": 0.1}, {"name": "gaussian", "std": 0.1}]},
    ],
    "methods": [{"name": "ema", "decay": 0.9}],
    "checkpoint": {"every_steps": 1, "every_epochs": None, "keep_last": 100},
    "log": {"every_steps": 1},
}

# Across a phase boundary (step 6), with an optimizer switch and a plateau schedule that halves the
# LR at its second evaluation (phase step 8: global step 14), as nothing improves by 1000%.
TWO_PHASES = copy.deepcopy(PARITY)
TWO_PHASES["phases"] = [
    {**PARITY["phases"][0], "steps": 6},
    {"name": "calm", "steps": 10, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
     "schedule": [{"name": "plateau", "patience": 1, "factor": 0.5, "threshold": 10.0}]},
]

WORKERS = copy.deepcopy(PARITY)
WORKERS["data"]["num_workers"] = 2


def same_tree(a, b, path="state") -> None:
    """Recursive torch.equal over nested dicts/lists/tuples of tensors and plain values."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def last_checkpoint_state(run_dir: Path, ignore: tuple[str, ...]) -> dict:
    weights, state = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    # Times are measurements of the machine: the run's wall time, and how long the loss meter had run.
    state = {k: v for k, v in state.items() if k not in ("wall_seconds", "meter_seconds", *ignore)}
    return {"weights": weights, **state}


def assert_same_run(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> None:
    assert_same_weights(final_weights(a), final_weights(b))
    assert comparable(read_metrics(a)) == comparable(read_metrics(b))      # per-step losses and LRs
    # Optimizer moments and step counts, EMA weights, loss meter, schedule, torch/numpy/python RNG.
    same_tree(last_checkpoint_state(a, ignore), last_checkpoint_state(b, ignore))


def stopped_copy(run_dir: Path, dest: Path, step: int) -> Path:
    """The run directory as a run stopped right after `step` leaves it: checkpoints up to that step
    (later lines in metrics.jsonl are cut by the resume, as after a real stop)."""
    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "checkpoints" / "final")
    (dest / "summary.json").unlink()
    for ck in list_checkpoints(dest / "checkpoints"):
        if int(ck.name.split("-")[1]) > step:
            shutil.rmtree(ck)
    # At a phase end the step is saved again after validation, as `step-N-1`.
    assert list_checkpoints(dest / "checkpoints")[-1].name.startswith(f"step-{step:08d}")
    return dest


def dojo_resume(run_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torchdojo", "resume", str(run_dir), "-q"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("recipe, stop", [(PARITY, 5), (TWO_PHASES, 5), (TWO_PHASES, 6), (TWO_PHASES, 15),
                                          (WORKERS, 5)],
                         ids=["mid-epoch", "before-phase-boundary", "at-phase-boundary", "after-plateau-cut",
                              "num_workers-2"])
def test_resume_in_a_new_process_is_bit_identical(recipe, stop, tmp_path):
    Trainer(load_recipe(copy.deepcopy(recipe)), tmp_path / "full", quiet=True).fit()
    resumed = stopped_copy(tmp_path / "full", tmp_path / "resumed", stop)
    dojo_resume(resumed)
    assert_same_run(tmp_path / "full", resumed)


def test_the_plateau_reduced_in_the_two_phase_run(tmp_path):
    """Guard for the case above: the plateau schedule really changes the LR after the stop."""
    Trainer(load_recipe(copy.deepcopy(TWO_PHASES)), tmp_path / "run", quiet=True).fit()
    lrs = {e["step"]: e["lr/group0"] for e in read_metrics(tmp_path / "run") if "lr/group0" in e}
    assert lrs[14] == pytest.approx(0.05) and lrs[15] == pytest.approx(0.025)


def test_worker_processes_do_not_change_the_run(tmp_path):
    Trainer(load_recipe(copy.deepcopy(PARITY)), tmp_path / "w0", quiet=True).fit()
    Trainer(load_recipe(copy.deepcopy(WORKERS)), tmp_path / "w2", quiet=True).fit()
    assert_same_run(tmp_path / "w0", tmp_path / "w2", ignore=("recipe",))   # which says num_workers


# -- the resumed run sees exactly the remaining samples, in the same order --------------------------

class RecordBatches(Method):
    """Logs a fingerprint of every training batch (rows and labels), so metrics.jsonl shows the order."""

    def on_batch(self, state, batch):
        x, y = batch["x"].double(), batch["y"].double()
        weights = torch.arange(1, len(x) + 1, dtype=torch.float64)
        state.step_logs["batch/fingerprint"] = float((weights[:, None] * x).sum() + (weights * y).sum())
        state.step_logs["batch/rows"] = len(x)
        return batch


@pytest.fixture
def record_batches():
    METHODS.register("record_batches", RecordBatches)
    yield
    METHODS.unregister("record_batches")


def test_resumed_run_sees_the_remaining_batches_in_order(record_batches, tmp_path):
    r = copy.deepcopy(TWO_PHASES)
    r["methods"].append({"name": "record_batches"})
    Trainer(load_recipe(copy.deepcopy(r)), tmp_path / "full", quiet=True).fit()
    order = [(e["step"], e["batch/fingerprint"]) for e in read_metrics(tmp_path / "full") if "batch/rows" in e]
    assert [s for s, _ in order] == list(range(1, 17)) and len({f for _, f in order}) == 16
    resumed = stopped_copy(tmp_path / "full", tmp_path / "resumed", 5)
    trainer = Trainer.from_run_dir(resumed, quiet=True)
    trainer.fit()
    after = [(e["step"], e["batch/fingerprint"]) for e in read_metrics(resumed) if "batch/rows" in e]
    assert after == order         # steps 1-5 kept from before the stop, 6-16 seen again identically


# -- every task and every method --------------------------------------------------------------------

def _with_methods(*methods):
    def change(r):
        r["methods"] = list(methods)
    return change


def _regress(r):
    r["data"] = {"name": "diabetes"}
    r["task"] = {"name": "regress"}


def _distill(r, tmp_path):
    teacher = make_tiny_recipe()
    teacher["phases"] = teacher["phases"][:1]
    Trainer(load_recipe(teacher), tmp_path / "teacher", quiet=True).fit()
    r["task"] = {"name": "distill", "teacher": str(tmp_path / "teacher"), "temperature": 2.0}


def _snapshot(r):
    r["phases"][0]["schedule"] = [{"name": "cosine_restarts", "cycles": 3}]
    r["methods"] = [{"name": "snapshot_ensemble"}]


def _swa(r):
    r["model"]["batch_norm"] = True
    r["methods"] = [{"name": "swa", "phase": "settle", "every_steps": 1}]


def _early_stopping(r):
    r["methods"] = [{"name": "early_stopping", "patience": 1, "min_delta": 10.0}]   # stops after 2 evals
    r["eval"] = {"every_epochs": 1}


def _autoencoder(task: dict):
    """The tiny recipe's table reconstructed by an autoencoder (with dropout and the task's own noise,
    both drawn from the checkpointed generators), labels unused."""
    def change(r):
        r["model"] = {"name": "autoencoder", "encoder": {"name": "mlp", "hidden": [16], "dropout": 0.2}, "latent": 4,
                      "decoder": [16], "variational": task["name"] == "vae"}
        r["task"] = task
    return change


def _semisup(r):
    """60 labelled rows, the other training rows unlabelled; weak and strong views drawn every step."""
    r["data"].update(train_size=60, unlabeled=True)
    r["task"] = {"name": "semisup", "threshold": 0.5, "unlabeled_ratio": 2,
                 "weak": [{"name": "gaussian", "std": 0.05}], "strong": [{"name": "swap_noise", "p": 0.3}]}


def _moe(r):
    r["model"] = {"name": "moe_mlp", "width": 16, "blocks": 2, "experts": 3, "expert_hidden": 16, "dropout": 0.2}
    r["methods"] = [{"name": "load_balance", "weight": 0.05}]


# name -> how the tiny recipe changes to use it. Add an entry for every new task and method.
RESUME_CASES = {
    "task:classify": lambda r, tmp: None,
    "task:regress": lambda r, tmp: _regress(r),
    "task:distill": _distill,
    "method:grad_clip": lambda r, tmp: _with_methods({"name": "grad_clip", "max_norm": 0.5})(r),
    "method:ema": lambda r, tmp: _with_methods({"name": "ema", "decay": 0.8})(r),
    "method:early_stopping": lambda r, tmp: _early_stopping(r),
    "method:swa": lambda r, tmp: _swa(r),
    "method:snapshot_ensemble": lambda r, tmp: _snapshot(r),
    "method:diagnostics": lambda r, tmp: _with_methods({"name": "diagnostics", "every_steps": 3})(r),
    "ensemble:joint": lambda r, tmp: r.update(ensemble={"members": 3, "ncl": 0.3, "weight_distance": 0.01}),
    "task:autoencode": lambda r, tmp: _autoencoder({"name": "autoencode", "noise": [{"name": "swap_noise", "p": 0.2},
                                                                            {"name": "noise", "std": 0.3}]})(r),
    "task:vae": lambda r, tmp: _autoencoder({"name": "vae", "beta": 0.5})(r),
    "task:semisup": lambda r, tmp: _semisup(r),
    "method:load_balance": lambda r, tmp: _moe(r),
}


def _shipped(registry) -> set[str]:
    """Names registered by torchdojo itself (test modules register probes of their own)."""
    return {n for n in registry.names() if registry.get(n).factory.__module__.startswith("torchdojo.")}


def test_every_task_and_method_has_a_resume_parity_case():
    listed = set(RESUME_CASES)
    registered = {f"task:{n}" for n in _shipped(TASKS)} | {f"method:{n}" for n in _shipped(METHODS)}
    assert len(registered) >= 8
    assert registered <= listed, f"add resume-parity cases for: {sorted(registered - listed)}"


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_parity_for_every_task_and_method(case, tmp_path):
    r = make_tiny_recipe()
    r["model"]["dropout"] = 0.1
    r["phases"][0]["accumulate"] = 2
    r["checkpoint"] = {"every_steps": 1, "every_epochs": None, "keep_last": 100}
    RESUME_CASES[case](r, tmp_path)
    summary = Trainer(load_recipe(copy.deepcopy(r)), tmp_path / "full", quiet=True).fit()
    # Stop mid-epoch in the first phase (step 5 of 8 per epoch), before the run ends early.
    resumed = stopped_copy(tmp_path / "full", tmp_path / "resumed", min(5, summary["steps"] - 1))
    Trainer.from_run_dir(resumed, quiet=True).fit()
    assert_same_run(tmp_path / "full", resumed)
