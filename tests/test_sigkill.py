"""Issue 6: a child process writing checkpoints in a loop, killed with SIGKILL at 20 moments, always
leaves the newest checkpoint it saved valid (no falling back to an older one), never a partial
checkpoint under a real name, and `dojo resume` then finishes the run with the same weights
(torch.equal) and metrics as an uninterrupted run.

The children are forked from the test process (no interpreter start, no torch import): each one
continues the run in-process through the real `dojo resume` command (the first one starts it). Every
child is instrumented (only inside the child) so that it records in shared memory which part of
`save_checkpoint` it is in; after a kill the parent reads where the kill landed. Most kills come
after a seeded random delay; a few are aimed: the child pauses at a chosen point of a save (or tears
the file being written there) and the parent kills it while it waits there, so every interesting
moment of a save is hit on every run.

Crash-safety bugs these tests found in earlier versions, and now guard against (each test named
here fails on the old code):

A. Pruning deleted an old checkpoint folder in place with shutil.rmtree, so a kill midway left it
   half deleted under its real name. Now it is renamed to `.tmp-old-<name>` (invisible, cleaned up
   by the next save) before it is deleted. Tests: the 20-kill test and
   `test_kill_while_a_save_deletes_a_pruned_checkpoint_leaves_no_partial_one`.
B. Re-saving an existing step (every epoch end, with `every_steps` and `every_epochs`) deleted the
   old folder before renaming the new one in, so with `keep_last: 1` a kill in between left no
   checkpoint at all. Now a re-save gets a name of its own (`step-N-1`, sorted after `step-N`) and
   nothing is ever replaced. Test: `test_keep_last_1_killed_at_every_point_of_a_re_save_keeps_a_checkpoint`.
C. Every fit, resume included, rewrote recipe.yaml and data_info.json in place (Path.write_text:
   truncate, then write), so a kill in between left recipe.yaml empty (resume died with a TypeError)
   or shorter but still valid (resume silently trained another recipe).
D. Resume cut metrics.jsonl back to the checkpoint's lines in place, so a kill lost lines the
   checkpoint covers. Now run files are written with `atomic_write_text` (a temporary file, fsync,
   os.replace). Test for C and D: `test_kill_while_resume_rewrites_a_run_file_leaves_it_intact`; and a
   recipe.yaml damaged anyway (outside the run's control) is one clear error naming the file:
   `test_a_damaged_recipe_yaml_is_one_clear_error`."""
from __future__ import annotations

import multiprocessing
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import torchdojo.checkpoint as ck
import torchdojo.trainer as tr
from torchdojo.checkpoint import (TMP_PREFIX, latest_valid_checkpoint, list_checkpoints, load_checkpoint,
                                  validate_checkpoint)
from torchdojo.errors import DojoError
from torchdojo.recipe import load_recipe
from torchdojo.trainer import Trainer

from conftest import make_tiny_recipe
from helpers import assert_same_weights, comparable, final_weights, read_metrics

FORK = multiprocessing.get_context("fork")
DOJO = str(Path(sys.executable).with_name("dojo"))

KILLS = 20
SEED = 6
MAX_DELAY = 0.06          # random kills: uniform in [0, MAX_DELAY] s after the child starts training
KEEP_LAST = 2
SHORT = (16, 2)           # the tests after the main one: 16 + 8 steps, epoch ends at 8, 16, 20, 24

# Where a child is, in order. A save goes from "enter save" (then "cleaning leftovers" if an earlier
# save was killed) through writing its `.tmp-` folder to "renaming" it in ("renamed"); pruning then
# renames each old checkpoint out of sight ("retiring", "retired") and deletes it ("deleting pruned");
# then back to "training". "rewriting" is a run file (recipe.yaml, ...) being replaced at startup.
STAGES = ("startup", "training", "enter save", "cleaning leftovers", "writing weights", "weights written",
          "writing state", "state written", "writing manifest", "manifest written", "renaming", "renamed",
          "retiring", "retired", "deleting pruned", "rewriting")
OUTSIDE_SAVE = {"startup", "training", "rewriting"}
# Aimed kills of the main test: each lands once per run. The torn ones write half the file.
# "manifest written": the `.tmp-` folder is complete, not renamed in yet; "renamed": just after the
# os.replace, nothing pruned yet; "retired": an old checkpoint renamed out of sight, not deleted yet;
# "deleting pruned": inside its rmtree, after the first file went.
AIMED = ("enter save", "writing weights", "writing state", "manifest written", "renamed", "retired",
         "deleting pruned")
# Test B kills a re-save (an existing step saved again) at each of these, one after the other.
RESAVE_AIMED = AIMED
RUN_FILES = ("recipe.yaml", "data_info.json", "summary.json", "metrics.jsonl")
# The slots of the shared array a child reports through. DONE_*: the newest save it completed;
# IN_*: the folder the save in progress has renamed in (-1 before that); RM_STEP: the step of the
# checkpoint being pruned; RESAVE: whether the save in progress re-saves an existing step.
(STAGE, STARTED, PAUSED, SAVES_DONE, DONE_STEP, DONE_REPEAT, IN_STEP, IN_REPEAT, RM_STEP,
 RESAVE) = range(10)


def _recipe(warm_steps: int = 24, settle_epochs: int = 80, keep_last: int = KEEP_LAST) -> dict:
    """The tiny recipe, longer (warm_steps + 4 * settle_epochs steps: the 20 kills cover about the first
    90 on this machine, 35 when it is busy, so they cross the phase change), with a checkpoint after every
    step and every epoch (so an epoch's end saves the same step again, as `step-N-1`)."""
    r = make_tiny_recipe()
    r["phases"][0]["steps"] = warm_steps                 # 8 steps per epoch
    r["phases"][1]["epochs"] = settle_epochs             # 4 steps per epoch
    r["checkpoint"] = {"every_steps": 1, "every_epochs": 1, "keep_last": keep_last}
    return r


def _order(name: str) -> tuple[int, int]:
    """(step, repeat) of `step-N` or `step-N-k` (the k-th re-save of step N): the order of
    `list_checkpoints`."""
    _, step, *repeat = name.split("-")
    return int(step), int(repeat[0]) if repeat else 0


def _step(name: str) -> int:
    return _order(name)[0]


def _name(order: tuple[int, int]) -> str:
    return f"step-{order[0]:08d}" + (f"-{order[1]}" if order[1] else "")


# -- the child ------------------------------------------------------------------------------------

class _Probe:
    def __init__(self, shared, aim: str | None, aim_save: int, resave_only: bool):
        self.shared, self.aim, self.aim_save, self.resave_only = shared, aim, aim_save, resave_only
        self.saves, self.resave, self.unlink_pause = 0, False, False

    def set(self, stage: str) -> None:
        self.shared[STAGE] = STAGES.index(stage)

    def stage(self) -> str:
        return STAGES[self.shared[STAGE]]

    def aimed(self, stage: str) -> bool:
        return self.aim == stage and self.saves >= self.aim_save and (self.resave or not self.resave_only)

    def rewrite_percent(self, name: str) -> int | None:
        """The percent of `name` to write before the kill, if this child is aimed at its rewrite."""
        aim = f"rewriting {name} to "                   # e.g. "rewriting recipe.yaml to 50%"
        return int(self.aim[len(aim):-1]) if self.aim and self.aim.startswith(aim) else None

    def pause(self) -> None:
        """Wait here to be killed."""
        self.shared[PAUSED] = 1
        while True:
            time.sleep(60)


def _tear(path, percent: int = 50) -> None:
    os.truncate(path, os.path.getsize(path) * percent // 100)


def _instrument(p: _Probe) -> None:
    """Wrap what `save_checkpoint` and the run-file writes call, in this (child) process only, to report
    where it is and to pause where it is aimed."""
    orig_save, orig_save_file, orig_torch_save = ck.save_checkpoint, ck.save_file, torch.save
    orig_manifest, orig_replace, orig_rmtree, orig_unlink = ck.write_manifest, os.replace, shutil.rmtree, os.unlink
    orig_open_run, orig_write_text = tr.Trainer._open_run, pathlib.Path.write_text

    def save_checkpoint(folder, name, *args, **kwargs):
        p.saves, p.resave = p.saves + 1, (Path(folder) / name).exists()
        p.shared[IN_STEP], p.shared[RESAVE] = -1, int(p.resave)
        p.set("enter save")
        if p.aimed("enter save"):
            p.pause()
        out = orig_save(folder, name, *args, **kwargs)
        p.set("training")
        p.shared[DONE_STEP], p.shared[DONE_REPEAT] = _order(Path(out).name if out else name)
        p.shared[SAVES_DONE] += 1
        p.shared[IN_STEP] = -1
        return out

    def save_file(tensors, filename, *args, **kwargs):
        p.set("writing weights")
        orig_save_file(tensors, filename, *args, **kwargs)
        if p.aimed("writing weights"):
            _tear(filename)
            p.pause()
        p.set("weights written")

    def torch_save(obj, f, *args, **kwargs):
        if not (isinstance(f, (str, os.PathLike)) and Path(f).name == ck.STATE):
            return orig_torch_save(obj, f, *args, **kwargs)
        p.set("writing state")
        orig_torch_save(obj, f, *args, **kwargs)
        if p.aimed("writing state"):
            _tear(f)
            p.pause()
        p.set("state written")

    def write_manifest(folder, *args, **kwargs):
        p.set("writing manifest")
        orig_manifest(folder, *args, **kwargs)
        p.set("manifest written")
        if p.aimed("manifest written"):
            p.pause()

    def replace(src, dst, *args, **kwargs):
        s, d = Path(src).name, Path(dst).name
        if s.startswith(TMP_PREFIX) and d.startswith("step-"):          # a save renamed in
            p.set("renaming")
            orig_replace(src, dst, *args, **kwargs)
            p.shared[IN_STEP], p.shared[IN_REPEAT] = _order(d)
            p.set("renamed")
            if p.aimed("renamed"):
                p.pause()
        elif s.startswith("step-") and d.startswith(TMP_PREFIX):        # a pruned one renamed away
            p.shared[RM_STEP] = _step(s)
            p.set("retiring")
            orig_replace(src, dst, *args, **kwargs)
            p.set("retired")
            if p.aimed("retired"):
                p.pause()
        elif d in RUN_FILES and s.startswith(TMP_PREFIX) and (percent := p.rewrite_percent(d)) is not None:
            p.set("rewriting")                  # the new content is in the temporary file: tear it
            _tear(src, percent)
            p.pause()
        else:
            orig_replace(src, dst, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        name, before = Path(path).name, p.stage()
        # A checkpoint deleted in place, under its real name (the old code did that, when pruning or
        # replacing one): a kill aimed at either moment of a deletion lands inside it.
        in_place = name.startswith("step-")
        if before == "retired" or in_place:
            stage = "deleting pruned"
            p.shared[RM_STEP] = _step(name.removeprefix(f"{TMP_PREFIX}old-"))
        elif before in ("enter save", "cleaning leftovers"):  # `.tmp-` folders of an earlier killed save
            stage = "cleaning leftovers"
        else:                                                   # e.g. a failed save's own `.tmp-` folder
            return orig_rmtree(path, *args, **kwargs)
        p.set(stage)
        p.unlink_pause = p.aimed(stage) or in_place and p.aimed("retired")
        orig_rmtree(path, *args, **kwargs)
        p.unlink_pause = False
        p.set(before)
        p.shared[RM_STEP] = -1

    def unlink(path, *args, **kwargs):           # what shutil.rmtree deletes files with
        orig_unlink(path, *args, **kwargs)
        if p.unlink_pause:                       # a kill after the first file of a folder went
            p.pause()

    def open_run(self, *args, **kwargs):
        out = orig_open_run(self, *args, **kwargs)
        p.set("training")
        p.shared[STARTED] = 1
        return out

    def write_text(self, data, *args, **kwargs):
        # A run file rewritten in place (how the old code did it): write part of it, then be killed.
        percent = p.rewrite_percent(self.name)
        if percent is not None and self.exists():
            p.set("rewriting")
            orig_write_text(self, data[: len(data) * percent // 100], *args, **kwargs)
            p.pause()
        return orig_write_text(self, data, *args, **kwargs)

    ck.save_checkpoint, ck.save_file, ck.write_manifest = save_checkpoint, save_file, write_manifest
    if getattr(tr, "save_checkpoint", None) is orig_save:
        tr.save_checkpoint = save_checkpoint
    torch.save, os.replace, shutil.rmtree, os.unlink = torch_save, replace, rmtree, unlink
    tr.Trainer._open_run, pathlib.Path.write_text = open_run, write_text


def _child(run_dir: Path, recipe: dict, fresh: bool, shared, aim: str | None, aim_save: int,
           resave_only: bool) -> None:
    _instrument(_Probe(shared, aim, aim_save, resave_only))
    if fresh:
        Trainer(load_recipe(recipe), run_dir, quiet=True).fit()
    else:       # what `dojo resume RUN_DIR -q` runs, without starting an interpreter
        from torchdojo.cli import main
        main.main(["resume", str(run_dir), "-q"], prog_name="dojo", standalone_mode=False)


def _kill_child(run_dir: Path, recipe: dict, *, fresh: bool, aim: str | None = None, aim_save: int = 1,
                resave_only: bool = False, delay: float = 0.0, timeout: float = 60.0) -> dict:
    """Fork a child that continues the run, SIGKILL it (`delay` seconds after it starts training, or
    once it pauses where `aim` says: at its `aim_save`-th save or later, and only in a re-save if
    `resave_only`) and return where it was."""
    shared = FORK.RawArray("q", 10)
    shared[IN_STEP] = shared[RM_STEP] = -1
    proc = FORK.Process(target=_child, args=(run_dir, recipe, fresh, shared, aim, aim_save, resave_only),
                        daemon=True)
    proc.start()
    try:
        flag, deadline = (PAUSED if aim else STARTED), time.monotonic() + timeout
        while not shared[flag]:
            if not proc.is_alive():
                pytest.fail(f"the child ended (exit code {proc.exitcode}) before it could be killed "
                            f"(aim {aim!r})")
            if time.monotonic() > deadline:
                pytest.fail(f"the child did not get to {aim or 'training'!r} in {timeout} s")
            time.sleep(0.0005)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout)
        assert proc.exitcode == -signal.SIGKILL, \
            f"the child ended on its own (exit code {proc.exitcode}) before the kill: make the run longer"
    finally:                            # a failing test leaves no child behind
        if proc.is_alive():
            proc.kill()
            proc.join()
    return {"stage": STAGES[shared[STAGE]], "saves_done": shared[SAVES_DONE],
            "done": (shared[DONE_STEP], shared[DONE_REPEAT]) if shared[SAVES_DONE] else None,
            "renamed_in": (shared[IN_STEP], shared[IN_REPEAT]) if shared[IN_STEP] >= 0 else None,
            "rm_step": shared[RM_STEP], "resave": bool(shared[RESAVE])}


def _newest(before: tuple[int, int] | None, kill: dict) -> tuple[int, int] | None:
    """(step, repeat) of the newest checkpoint saved so far: the newest before this child, the newest
    save it completed, or the one it had renamed in when it was killed."""
    return max((o for o in (before, kill["done"], kill["renamed_in"]) if o is not None), default=None)


def _bad_folders(folder: Path) -> dict[str, str]:
    """Every entry of the checkpoints folder under a real name that is not a valid checkpoint."""
    bad = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(TMP_PREFIX):          # invisible: never listed, removed by the next save
            continue
        if not (entry.name.startswith("step-") and entry.is_dir()):
            bad[entry.name] = "unexpected entry"
        elif (reason := validate_checkpoint(entry)) is not None:
            bad[entry.name] = reason
    return bad


def _check_after_kill(folder: Path, kill: dict, newest: tuple[int, int], keep_last: int, where: str) -> Path:
    """What every kill must leave: no partial checkpoint under a real name, at most keep_last + 1
    checkpoints, and the newest one saved (`newest`) is the one `dojo resume` picks, and it loads."""
    bad = _bad_folders(folder)
    path, skipped = latest_valid_checkpoint(folder)
    assert path is not None, f"{where}: no checkpoint validates (checkpoints folder: " \
                             f"{sorted(p.name for p in folder.iterdir())}; partial: {bad})"
    assert not bad, f"{where}: partial checkpoints under real names: {bad}"
    assert not skipped
    names = [p.name for p in list_checkpoints(folder)]
    assert len(names) <= keep_last + 1, f"{where}: not pruned: {names}"
    # A kill during the rename itself may land just before or just after it: both are fine.
    if kill["stage"] == "renaming":
        assert _order(path.name) >= newest, f"{where}: resumes from {path.name}, but {_name(newest)} was saved"
    else:
        assert path.name == _name(newest), f"{where}: resumes from {path.name}, the newest saved is {_name(newest)}"
    weights, state = load_checkpoint(path)
    assert state["step"] == _step(path.name) and weights
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of `_recipe(*SHORT)`, the recipe of the tests after the main one."""
    ref = tmp_path_factory.mktemp("ref") / "run"
    Trainer(load_recipe(_recipe(*SHORT)), ref, quiet=True).fit()
    return ref


# -- the requirement ------------------------------------------------------------------------------

def test_sigkill_20_times_then_dojo_resume_matches_the_uninterrupted_run(tmp_path):
    recipe = _recipe()
    ref = tmp_path / "ref"
    Trainer(load_recipe(recipe), ref, quiet=True).fit()

    run_dir, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    rng = random.Random(SEED)
    aimed = list(AIMED)
    rng.shuffle(aimed)
    aimed_at = dict(zip([0, *rng.sample(range(1, KILLS), len(aimed) - 1)], aimed))   # the first is aimed:
    newest, log, stages = None, [], []                                               # it must save first
    for i in range(KILLS):
        if i in aimed_at:
            mode = f"aimed at {aimed_at[i]!r}"
            kill = _kill_child(run_dir, recipe, fresh=i == 0, aim=aimed_at[i], aim_save=rng.randint(2, 6))
        else:
            delay = rng.uniform(0, MAX_DELAY)
            mode = f"after {delay * 1000:.1f} ms"
            kill = _kill_child(run_dir, recipe, fresh=False, delay=delay)
        where = f"kill {i} ({mode}, landed in {kill['stage']!r}, saves done {kill['saves_done']})"
        stages.append((i in aimed_at, kill["stage"]))

        # `dojo resume` finds the newest checkpoint saved (none is lost: no falling back), it validates
        # and loads; no partial checkpoint under a real name; pruning keeps up.
        newest = _newest(newest, kill)
        path = _check_after_kill(folder, kill, newest, KEEP_LAST, where)
        newest = _order(path.name)          # the same, unless a kill in "renaming" left the new one in
        assert i not in aimed_at or kill["stage"] == aimed_at[i], f"{where}: missed its aim"
        hidden = sorted(p.name for p in folder.glob(f"{TMP_PREFIX}*"))
        log.append(f"{where}: resumes from {path.name}" + (f"; out of sight: {hidden}" if hidden else ""))

    in_save = [aimed for aimed, stage in stages if stage not in OUTSIDE_SAVE]
    print("\n".join(log) + f"\n{len(in_save)} of {KILLS} kills inside a save "
          f"({in_save.count(False)} of {KILLS - len(AIMED)} random ones)")
    assert in_save.count(True) == len(AIMED) and in_save.count(False) >= 1, log

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_COLOR": "1"}
    res = subprocess.run([DOJO, "resume", str(run_dir), "-q"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr

    assert_same_weights(final_weights(run_dir), final_weights(ref))
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(ref))
    assert _bad_folders(folder) == {"final": "unexpected entry"}      # no manifest: just the final weights
    assert not list(folder.glob(f"{TMP_PREFIX}*")) and not list(run_dir.glob(f"{TMP_PREFIX}*"))
    # Both runs saved the same sequence (re-saves of a step included: `step-N-1`), so kept the same.
    assert [p.name for p in list_checkpoints(folder)] == [p.name for p in list_checkpoints(ref / "checkpoints")]


# -- the bugs these tests found (A to D in the module docstring) ------------------------------------

def test_kill_while_a_save_deletes_a_pruned_checkpoint_leaves_no_partial_one(tmp_path):
    """A: a kill inside the rmtree of a pruned checkpoint, then one inside the next save's clean-up of
    what that left: the half-deleted folder is only ever under a `.tmp-` name."""
    run_dir, folder, recipe = tmp_path / "run", tmp_path / "run" / "checkpoints", _recipe(*SHORT)
    kill = _kill_child(run_dir, recipe, fresh=True, aim="deleting pruned")
    newest = _newest(None, kill)
    _check_after_kill(folder, kill, newest, KEEP_LAST, "a kill while deleting a pruned checkpoint")
    assert kill["stage"] == "deleting pruned", kill
    pruned = f"step-{kill['rm_step']:08d}"
    assert not (folder / pruned).exists()
    hidden = sorted(folder.glob(f"{TMP_PREFIX}*"))
    assert [p.name for p in hidden] == [f"{TMP_PREFIX}old-{pruned}"]
    assert 0 < len(list(hidden[0].iterdir())) < 3                     # the kill landed midway

    kill = _kill_child(run_dir, recipe, fresh=False, aim="cleaning leftovers")
    newest = _newest(newest, kill)
    _check_after_kill(folder, kill, newest, KEEP_LAST, "a kill while cleaning up the half-deleted folder")
    assert kill["stage"] == "cleaning leftovers", kill

    Trainer.from_run_dir(run_dir, quiet=True).fit()                   # the next saves clean up the rest
    assert not list(folder.glob(f"{TMP_PREFIX}*"))
    assert _bad_folders(folder) == {"final": "unexpected entry"}


def test_keep_last_1_killed_at_every_point_of_a_re_save_keeps_a_checkpoint(tmp_path, reference):
    """B: with keep_last: 1, every epoch end saves its step again; kill one such re-save at each of its
    points in turn (each child resumes from the checkpoint the last one left): the newest checkpoint
    saved is always there and valid, and the run still ends like the uninterrupted one."""
    run_dir, folder, recipe = tmp_path / "run", tmp_path / "run" / "checkpoints", _recipe(*SHORT, keep_last=1)
    newest, seen = None, []
    for i, stage in enumerate(RESAVE_AIMED):
        kill = _kill_child(run_dir, recipe, fresh=i == 0, aim=stage, resave_only=True)
        newest = _newest(newest, kill)
        where = f"a kill aimed at {stage!r} of a re-save ({kill['saves_done']} saves done, newest {_name(newest)})"
        path = _check_after_kill(folder, kill, newest, 1, where)
        newest = _order(path.name)
        assert kill["stage"] == stage and kill["resave"], f"{where}: missed its aim: {kill}"
        seen.append(path.name)
    assert any(_order(name)[1] for name in seen), seen                # a re-save's own folder was resumed from

    Trainer.from_run_dir(run_dir, quiet=True).fit()
    assert_same_weights(final_weights(run_dir), final_weights(reference))
    assert not list(folder.glob(f"{TMP_PREFIX}*"))
    assert len(list_checkpoints(folder)) == 1


@pytest.mark.parametrize("name, percent", [("recipe.yaml", 0), ("recipe.yaml", 50), ("data_info.json", 50),
                                           ("metrics.jsonl", 50)])
def test_kill_while_resume_rewrites_a_run_file_leaves_it_intact(tmp_path, reference, name, percent):
    """C, D: `dojo resume` rewrites recipe.yaml and data_info.json, and cuts metrics.jsonl back to the
    lines its checkpoint covers; a kill once the new content is `percent` % written (before it is
    renamed over the file) leaves the old file whole, and the run resumes with the same recipe and ends
    like the uninterrupted one."""
    run_dir, recipe = tmp_path / "run", _recipe(*SHORT)
    _kill_child(run_dir, recipe, fresh=True, aim="enter save", aim_save=6)
    path, _ = latest_valid_checkpoint(run_dir / "checkpoints")
    covered = load_checkpoint(path)[1]["metrics_lines"]
    before = (run_dir / name).read_bytes()
    if name == "metrics.jsonl":                 # resume has lines to cut: the 6th step's, logged after save 5
        assert before.count(b"\n") > covered

    kill = _kill_child(run_dir, recipe, fresh=False, aim=f"rewriting {name} to {percent}%")
    assert kill["stage"] == "rewriting", kill
    assert (run_dir / name).read_bytes() == before, f"{name} was changed by a kill while it was being rewritten"

    trainer = Trainer.from_run_dir(run_dir, quiet=True)
    assert trainer.recipe.to_yaml() == load_recipe(recipe).to_yaml()
    assert trainer.checkpoint_step == _step(path.name)
    trainer.fit()
    assert_same_weights(final_weights(run_dir), final_weights(reference))
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(reference))
    assert not list(run_dir.glob(f"{TMP_PREFIX}*"))    # the torn temporary file was replaced and renamed


def _zero_tail(text: bytes) -> bytes:
    """What a power loss can leave of a file whose size reached the disk before its data: zeros."""
    return text[: len(text) // 2] + b"\0" * (len(text) - len(text) // 2)


@pytest.mark.parametrize("damage", [lambda text: b"", _zero_tail, lambda text: b"\xff" + text[1:]],
                         ids=["empty", "zero-filled tail", "not UTF-8"])
def test_a_damaged_recipe_yaml_is_one_clear_error(tmp_path, reference, damage):
    """recipe.yaml damaged after all (a disk or filesystem that loses data): `Trainer.from_run_dir` and
    `dojo resume` say so in one line naming the file, no traceback."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "summary.json").unlink()          # as if the power went before the run finished
    recipe_file = run_dir / "recipe.yaml"
    recipe_file.write_bytes(damage(recipe_file.read_bytes()))

    with pytest.raises(DojoError) as info:
        Trainer.from_run_dir(run_dir, quiet=True)
    message = str(info.value)
    assert str(recipe_file) in message and "\n" not in message, message

    from torchdojo.cli import main
    res = CliRunner().invoke(main, ["resume", str(run_dir), "-q"])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert res.output.strip().splitlines() == [f"error: {message}"]
