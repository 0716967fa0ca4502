"""Issue 21: one writer per run directory (torchdojo.run_lock). Real processes and real flock: forked
children for the lock itself, `dojo` subprocesses for the commands that take it."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from torchdojo import train
from torchdojo.cli import main
from torchdojo.errors import DojoError
from torchdojo.run_lock import LOCK_NAME, RunDirBusy, acquire_run_dir, check_run_dir_free

from conftest import make_tiny_recipe
from helpers import assert_same_weights, final_weights, fit

FORK = multiprocessing.get_context("fork")
DOJO = str(Path(sys.executable).with_name("dojo"))


def _try_in_child(run_dir: Path, conn, check_only: bool) -> None:
    try:
        if check_only:
            check_run_dir_free(run_dir)
        else:
            acquire_run_dir(run_dir).release()
        conn.send(("free", None))
    except RunDirBusy as exc:
        conn.send(("busy", (exc.pid, str(exc))))


def other_process_sees(run_dir: Path, check_only: bool = False) -> tuple[str, object]:
    """("free", None) if another process can lock `run_dir` (or check_run_dir_free passes there), else
    ("busy", (pid named, message))."""
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_try_in_child, args=(run_dir, child, check_only))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    return parent.recv()


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    run_dir = tmp_path / "new" / "run"
    with acquire_run_dir(run_dir):
        assert (run_dir / LOCK_NAME).read_text().strip() == str(os.getpid())
        for check_only in (False, True):
            state, (pid, message) = other_process_sees(run_dir, check_only)
            assert state == "busy" and pid == os.getpid()
            assert f"process {os.getpid()}" in message and str(run_dir) in message
    assert other_process_sees(run_dir) == ("free", None)
    assert (run_dir / LOCK_NAME).is_file()      # never unlinked (that would make flock racy)


def test_reentrant_within_a_process_until_the_last_release(tmp_path):
    outer = acquire_run_dir(tmp_path)
    inner = acquire_run_dir(tmp_path / ".")       # another spelling of the same directory
    inner.release()
    inner.release()                                 # a second release of one handle does nothing
    assert other_process_sees(tmp_path)[0] == "busy"
    outer.release()
    assert other_process_sees(tmp_path) == ("free", None)


def test_check_run_dir_free_takes_and_creates_nothing(tmp_path):
    check_run_dir_free(tmp_path / "missing")
    check_run_dir_free(tmp_path)
    assert not (tmp_path / "missing").exists() and list(tmp_path.iterdir()) == []
    with acquire_run_dir(tmp_path):
        check_run_dir_free(tmp_path)      # this process is the holder: free for it
    assert other_process_sees(tmp_path) == ("free", None)


def _hold_until_killed(run_dir: Path, conn) -> None:
    acquire_run_dir(run_dir)
    conn.send("locked")
    time.sleep(60)


def test_sigkill_of_the_holder_leaves_no_stale_lock(tmp_path):
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_hold_until_killed, args=(tmp_path, child))
    p.start()
    try:
        assert parent.poll(30) and parent.recv() == "locked"
        with pytest.raises(RunDirBusy, match=f"process {p.pid}"):
            acquire_run_dir(tmp_path)
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    finally:
        p.kill()
    with acquire_run_dir(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_a_run_dir_that_cannot_be_created_is_one_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DojoError, match="cannot lock run directory"):
        acquire_run_dir(tmp_path / "file" / "run")


def test_a_sequential_ensemble_locks_its_run_dir(tmp_path):
    """Its members are runs of their own (each locked by its Trainer); the top folder, which gets the
    ensemble's recipe and summary, is locked by train_ensemble."""
    recipe = make_tiny_recipe()
    recipe["ensemble"] = {"members": 2, "vary": ["seed", {"model.hidden": [[16], [8]]}]}
    parent, child = FORK.Pipe()
    holder = FORK.Process(target=_hold_until_killed, args=(tmp_path, child))
    holder.start()
    try:
        assert parent.poll(30) and parent.recv() == "locked"
        with pytest.raises(RunDirBusy, match=f"process {holder.pid}"):
            train(recipe, tmp_path)
    finally:
        holder.kill()
        holder.join(30)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]     # nothing written


# -- the commands ----------------------------------------------------------------------------------

def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "160", "NO_COLOR": "1"}


def dojo(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([DOJO, *map(str, args)], env=_env(), capture_output=True, text=True, timeout=timeout)


def slow_recipe(tmp_path: Path) -> tuple[dict, Path]:
    """The tiny recipe with 40 + 4 steps and a checkpoint after every step: a few seconds of training."""
    r = make_tiny_recipe()
    r["phases"][0]["steps"] = 40
    r["checkpoint"] = {"every_steps": 1, "every_epochs": None, "keep_last": 2}
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return r, path


def start_training(recipe_path: Path, run_dir: Path) -> subprocess.Popen:
    """`dojo train` in the background, returned once it has written its first checkpoint."""
    proc = subprocess.Popen([DOJO, "train", str(recipe_path), "--run-dir", str(run_dir), "-q"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("step-*")):
        assert proc.poll() is None, f"training ended before its first checkpoint: {proc.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.005)
    return proc


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: ")
    return res.stderr


def test_second_writers_are_refused_while_readers_work_and_the_run_finishes_undisturbed(tmp_path):
    recipe, recipe_path = slow_recipe(tmp_path)
    run_dir = tmp_path / "run"
    proc = start_training(recipe_path, run_dir)
    try:
        # Stopped, it holds the lock for as long as the checks take, however slow the machine.
        proc.send_signal(signal.SIGSTOP)
        writers = {name: subprocess.Popen([DOJO, *map(str, args)], env=_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
                   for name, args in (("train", ["train", recipe_path, "--run-dir", run_dir, "-q"]),
                                      ("resume", ["resume", run_dir, "-q"]))}
        # The readers run in this process (no interpreter start): one that locked would be refused too.
        readers = {name: CliRunner().invoke(main, list(map(str, args)))
                   for name, args in (("eval", ["eval", run_dir, "-q"]), ("runs", ["runs", tmp_path, "--json"]),
                                      ("report", ["report", run_dir, "-q"]))}
        results = {name: subprocess.CompletedProcess(p.args, p.wait(300), *p.communicate())
                   for name, p in writers.items()}
    finally:
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err

    for writer in ("train", "resume"):
        message = one_line_error(results[writer])
        assert f"in use by process {proc.pid}" in message and str(run_dir) in message
    for name, res in readers.items():
        assert res.exit_code == 0, (name, res.output)
    assert re.search(r"\baccuracy\b", readers["eval"].output)
    row, = json.loads(readers["runs"].output)
    assert row["path"] == str(run_dir) and row["status"] == "incomplete"
    assert (run_dir / "report.html").is_file()

    # The refused writers changed nothing: the run equals an undisturbed one.
    assert len(list((run_dir / "tb").iterdir())) == 1          # one writer's TensorBoard events
    _, reference = fit(recipe, tmp_path / "reference")
    assert_same_weights(final_weights(run_dir), final_weights(tmp_path / "reference"))
    assert json.loads((run_dir / "summary.json").read_text())["metrics"] == reference["metrics"]


def test_a_sigkilled_training_leaves_no_stale_lock(tmp_path):
    _, recipe_path = slow_recipe(tmp_path)
    run_dir = tmp_path / "run"
    proc = start_training(recipe_path, run_dir)
    proc.kill()
    proc.communicate(timeout=60)
    assert (run_dir / LOCK_NAME).read_text().strip() == str(proc.pid)     # the file stays, the lock does not
    res = CliRunner().invoke(main, ["resume", str(run_dir), "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_nproc_launcher_refuses_a_busy_run_dir_in_one_line(tmp_path):
    """`dojo train/resume --nproc 2` check the lock before starting torchrun (whose rank 0 takes it)."""
    _, recipe_path = slow_recipe(tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(recipe_path.read_text())
    parent, child = FORK.Pipe()
    holder = FORK.Process(target=_hold_until_killed, args=(run_dir, child))
    holder.start()
    try:
        assert parent.poll(30) and parent.recv() == "locked"
        for args in (["train", recipe_path, "--run-dir", run_dir, "--nproc", "2", "--overwrite"],
                     ["resume", run_dir, "--nproc", "2"]):
            message = one_line_error(dojo(*args))
            assert f"in use by process {holder.pid}" in message
    finally:
        holder.kill()
        holder.join(30)
