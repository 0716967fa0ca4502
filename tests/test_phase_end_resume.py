"""Issue 21: a stop at the end of a phase resumes bit-identically, metrics.jsonl included.

A phase's last step is where most save points meet: a periodic checkpoint at that step (or the one
SIGTERM writes), the end-of-epoch validation and checkpoint, the train line of the steps since the
last log point, the phase-end checkpoint, and at the run's end the final weights, the final metrics
line and summary.json. Before the fix, a run resumed from a checkpoint taken at the last step wrote
the pending train line before the validation line instead of after it, without the loss terms and
`train/grad_norm` and with `train/samples_per_sec: 0.0`; a kill right after summary.json was renamed
lost the final metrics line for good while the run said "finished".

Two tests: every checkpoint a phase end writes is resumed from (in-process, newer ones deleted); and a
fault injector kills a forked child with SIGKILL at every file-system call from the start of the
phase's last step to the end of the run, after which `dojo resume` (if the run did not say finished)
must give the uninterrupted run's metrics.jsonl (machine timings aside), summary metrics and weights."""
from __future__ import annotations

import builtins
import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

import torchdojo.log as log
import torchdojo.trainer as tr
from torchdojo.checkpoint import list_checkpoints
from torchdojo.cli import main
from torchdojo.recipe import load_recipe
from torchdojo.trainer import Trainer

from conftest import make_tiny_recipe
from helpers import assert_same_weights, comparable, final_weights, read_metrics

FORK = multiprocessing.get_context("fork")
PHASE_END = 8           # the warm phase's last step: also its epoch's last batch (8 steps per epoch)


def _recipe() -> dict:
    """Two phases; the first ends with its epoch. Train lines every 3 steps, so a phase end always has
    a pending train line; a checkpoint every 4 steps and every epoch, so the phase's last step is saved
    twice before the phase-end logic (at the step, and at the epoch's end), and loss terms with two
    parts (so the train lines carry `train/loss/<term>` values)."""
    r = make_tiny_recipe()
    r["phases"][0]["steps"] = PHASE_END
    r["phases"][0]["losses"] = [{"name": "cross_entropy"}, {"name": "cross_entropy", "label_smoothing": 0.1,
                                                             "weight": 0.5}]
    r["log"] = {"every_steps": 3, "tensorboard": False}
    r["checkpoint"] = {"every_steps": 4, "every_epochs": 1, "keep_last": 100}
    return r


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("phase-end") / "ref"
    Trainer(load_recipe(_recipe()), run, quiet=True).fit()
    return run


def _cut_back_to(run: Path, checkpoint: str) -> None:
    """The run as a stop right after `checkpoint` leaves it: newer checkpoints, summary and final gone."""
    for path in list_checkpoints(run / "checkpoints"):
        if path.name > checkpoint:
            shutil.rmtree(path)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "final")


def _assert_same_run(run: Path, reference: Path) -> None:
    assert comparable(read_metrics(run)) == comparable(read_metrics(reference))
    assert_same_weights(final_weights(run), final_weights(reference))
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (run, reference))
    assert summary["status"] == "finished"
    assert summary["metrics"] == expected["metrics"] and summary["steps"] == expected["steps"]


def test_the_reference_run_has_the_save_points_this_test_is_about(reference):
    names = [p.name for p in list_checkpoints(reference / "checkpoints")]
    # The periodic save at the phase's last step, then the same step again at its epoch's end.
    assert f"step-{PHASE_END:08d}" in names and f"step-{PHASE_END:08d}-1" in names
    lines = read_metrics(reference)
    at_end = [sorted(k for k in e if k.startswith(("train/", "val/"))) for e in lines if e["step"] == PHASE_END]
    # validation of the epoch, then the pending train line with its loss terms and grad norm
    assert any(k.startswith("val/") for k in at_end[0])
    assert "train/loss/cross_entropy2" in at_end[1] and "train/grad_norm" in at_end[1]


@pytest.mark.parametrize("checkpoint", [f"step-{PHASE_END:08d}", f"step-{PHASE_END:08d}-1", "step-00000012"])
def test_resume_from_every_phase_end_checkpoint_is_identical(reference, tmp_path, checkpoint):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _cut_back_to(run, checkpoint)
    result = CliRunner().invoke(main, ["resume", str(run), "-q"])
    assert result.exit_code == 0, result.output
    _assert_same_run(run, reference)
    first = [e for e in read_metrics(run) if e["step"] == PHASE_END and "train/samples_per_sec" in e]
    assert first and first[0]["train/samples_per_sec"] > 0          # not 0.0: the meter's time survives


# -- the fault injector ----------------------------------------------------------------------------

FS_CALLS = ("replace", "rename", "fsync", "open", "mkdir", "unlink", "rmdir")


def _inject(kill_at: int, counter) -> None:
    """In the child: count file-system calls once the phase's last step starts; SIGKILL at call `kill_at`
    (0: never, just count them into `counter`)."""
    armed = [False]

    def tick():
        if armed[0]:
            counter.value += 1
            if counter.value == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name):
        real = getattr(owner, name)

        def call(*args, **kwargs):
            tick()
            return real(*args, **kwargs)
        setattr(owner, name, call)

    for name in FS_CALLS:
        wrap(os, name)
    wrap(builtins, "open")
    wrap(log.MetricsFile, "write")          # each metrics line is a write of its own
    real_step = tr.Trainer._train_step

    def train_step(self, batch):
        if self.state.step == PHASE_END - 1:
            armed[0] = True
        return real_step(self, batch)
    tr.Trainer._train_step = train_step


def _child(run: str, kill_at: int, counter) -> None:
    _inject(kill_at, counter)
    try:
        Trainer.from_run_dir(run, quiet=True).fit()
    finally:
        os._exit(0)


def _run_child(base: Path, run: Path, kill_at: int) -> tuple[int, int]:
    """(exit code, file-system calls counted) of a child resuming a copy of `base` at `run`."""
    shutil.copytree(base, run)
    counter = FORK.Value("i", 0)
    proc = FORK.Process(target=_child, args=(str(run), kill_at, counter))
    proc.start()
    proc.join(60)
    assert proc.exitcode is not None, "child hung"
    return proc.exitcode, counter.value


@pytest.mark.slow      # ~15-20 s: run by `make test-slow` and CI, not `make test`
def test_sigkill_at_every_file_system_call_of_a_phase_end_and_the_finish(reference, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(reference, base)
    _cut_back_to(base, "step-00000004")          # the child trains steps 5..12 from there
    code, total = _run_child(base, tmp_path / "count", 0)
    assert code == 0 and total > 20
    _assert_same_run(tmp_path / "count", reference)         # the instrumented run itself is faithful
    for kill_at in range(1, total + 1):
        run = tmp_path / f"kill{kill_at}"
        code, _ = _run_child(base, run, kill_at)
        assert code == -signal.SIGKILL, f"call {kill_at}: the child was not killed"
        status = json.loads((run / "summary.json").read_text())["status"] if (run / "summary.json").exists() \
            else None
        if status != "finished":
            result = CliRunner().invoke(main, ["resume", str(run), "-q"])
            assert result.exit_code == 0, f"call {kill_at}: {result.output}"
        try:
            _assert_same_run(run, reference)
        except AssertionError as exc:
            raise AssertionError(f"killed at file-system call {kill_at} of {total}: {exc}") from None
        shutil.rmtree(run)


def test_a_checkpoint_written_after_early_stopping_decided_resumes_to_the_same_stop(tmp_path):
    """The epoch's checkpoint follows its validation, so it can be written after early stopping decided
    to stop; a resume from it must stop too, not train the rest of the phases."""
    r = make_tiny_recipe()
    r["methods"] = [{"name": "early_stopping", "patience": 1, "min_delta": 100.0}]    # stops at the 2nd eval
    r["checkpoint"] = {"every_epochs": 1, "keep_last": 100}
    ref = tmp_path / "ref"
    summary = Trainer(load_recipe(r), ref, quiet=True).fit()
    assert summary["stop_reason"] and summary["steps"] == 16
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    _cut_back_to(run, "step-00000016")
    result = CliRunner().invoke(main, ["resume", str(run), "-q"])
    assert result.exit_code == 0, result.output
    _assert_same_run(run, ref)
    assert json.loads((run / "summary.json").read_text())["stop_reason"] == summary["stop_reason"]
