"""Data-parallel training through torchrun (gloo, 2 CPU processes): with the recipe's batch size as the
global batch, 2 processes train the same model as 1 (up to float rounding of the gradient all-reduce),
write one run directory, log the same metrics, and resume exactly."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torchdojo.checkpoint import list_checkpoints, load_checkpoint
from torchdojo.distributed import Dist, torchrun_command
from torchdojo.recipe import load_recipe

from conftest import make_tiny_recipe
from helpers import MACHINE_KEYS, assert_same_weights, final_weights, fit, read_metrics

OPTIMIZERS = {
    "sgd": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
    "lamb": {"name": "lamb", "lr": 0.01, "weight_decay": 0.01},
}


def ddp_recipe(optimizer: dict) -> dict:
    """16 steps (2 epochs) at global batch 32, no dropout, logged every 2 steps, checkpoints every 5 steps
    and every epoch: the run ends on an epoch's checkpoint, so the phase end saves nothing more (the
    ranks must agree on that: each save is a collective)."""
    r = make_tiny_recipe()
    r["phases"] = [{"name": "main", "steps": 16, "batch_size": 32, "optimizer": dict(optimizer),
                    "schedule": [{"name": "warmup", "steps": 3}, {"name": "cosine"}]}]
    r["log"] = {"every_steps": 2}
    r["checkpoint"] = {"every_steps": 5, "every_epochs": 1}
    return r


def write_recipe(r: dict, path: Path) -> Path:
    path.write_text(load_recipe(copy.deepcopy(r)).to_yaml())
    return path


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants. torchrun starts each worker in a session of its own, so
    killing the launcher's process group would leave hung workers behind."""
    children: dict[int, list[int]] = {}
    for line in subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    todo, found = [pid], []
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_dojo(args: list[str], cwd: Path, env: dict, timeout: float, hung: str) -> subprocess.CompletedProcess:
    """`python -m torchdojo ARGS`; past `timeout` seconds every process it started is killed and the test
    fails with `hung`."""
    proc = subprocess.Popen([sys.executable, "-m", "torchdojo", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        pytest.fail(hung)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def dojo(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    trace = cwd.parent / f"{cwd.name}-trace"
    shutil.rmtree(trace, ignore_errors=True)
    trace.mkdir()
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1", "TORCHDOJO_DIST_TRACE": str(trace)}
    out = run_dojo(list(args), cwd, env, 60, f"`dojo {' '.join(args)}` hung (did the ranks call different collectives?)")
    # Every rank called the same collectives in the same order (mismatches can pass or hang by chance).
    traces = [p.read_text() for p in sorted(trace.glob("rank*.txt"))]
    assert len(set(traces)) <= 1, "ranks called different collectives"
    return out


def assert_close_metrics(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        ea = {k: v for k, v in ea.items() if k not in MACHINE_KEYS}
        eb = {k: v for k, v in eb.items() if k not in MACHINE_KEYS}
        assert ea.keys() == eb.keys()
        for k in ea:
            if isinstance(ea[k], float):
                assert ea[k] == pytest.approx(eb[k], abs=1e-5), (ea["step"], k)
            else:
                assert ea[k] == eb[k], (ea["step"], k)


def test_dist_defaults_to_one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    d = Dist.from_env()
    assert (d.rank, d.world, d.is_main, d.enabled) == (0, 1, True, False)
    t = torch.tensor([1.0, 3.0])
    assert d.all_reduce_mean(t) is t and d.gather_objects("x") == ["x"]
    cmd = torchrun_command(2, ["train", "r.yaml"], 3)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[-4:] == ["-m", "torchdojo", "train", "r.yaml"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and cmd[cmd.index("--max-restarts") + 1] == "3"


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_two_processes_train_like_one_with_the_global_batch(optimizer, tmp_path):
    r = ddp_recipe(OPTIMIZERS[optimizer])
    _, _ = fit(copy.deepcopy(r), tmp_path / "one")
    work = tmp_path / "work"
    work.mkdir()
    recipe = write_recipe(r, work / "recipe.yaml")
    out = dojo("train", str(recipe), "--run-dir", "two", "--nproc", "2", "-q", cwd=work)
    assert out.returncode == 0, out.stderr
    two = work / "two"
    # One run directory (rank 0's), nothing else written next to it, the same checkpoints.
    assert sorted(p.name for p in work.iterdir()) == ["recipe.yaml", "two"]
    assert [p.name for p in list_checkpoints(two / "checkpoints")] == \
        [p.name for p in list_checkpoints(tmp_path / "one" / "checkpoints")]
    a, b = final_weights(tmp_path / "one"), final_weights(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
    # train/loss (mean over the ranks) at each log step, LRs, grad norms and val metrics.
    assert_close_metrics(read_metrics(tmp_path / "one"), read_metrics(two))


def test_batch_size_that_does_not_divide_is_a_clean_error(tmp_path):
    r = ddp_recipe(OPTIMIZERS["sgd"])
    r["phases"][0]["batch_size"] = 33
    recipe = write_recipe(r, tmp_path / "recipe.yaml")
    out = dojo("train", str(recipe), "--run-dir", "two", "--nproc", "2", "-q", cwd=tmp_path)
    assert out.returncode == 2
    assert "phases.0.batch_size" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "two").exists()


def test_nproc_needs_a_run_dir(tmp_path):
    recipe = write_recipe(ddp_recipe(OPTIMIZERS["sgd"]), tmp_path / "recipe.yaml")
    out = dojo("train", str(recipe), "--nproc", "2", "-q", cwd=tmp_path)
    assert out.returncode == 2 and "--run-dir" in out.stderr


def test_two_process_run_resumes_exactly(tmp_path):
    """Stopped at step 5 (checkpoint) and resumed with 2 processes: the run that never stopped, bit for bit,
    with dropout and gradient accumulation (no_sync) active."""
    r = ddp_recipe(OPTIMIZERS["adamw"])
    r["model"]["dropout"] = 0.2
    r["phases"][0]["accumulate"] = 2
    r["phases"][0]["steps"] = 10
    r["checkpoint"] = {"every_steps": 1, "every_epochs": None, "keep_last": 100}
    recipe = write_recipe(r, tmp_path / "recipe.yaml")
    out = dojo("train", str(recipe), "--run-dir", "full", "--nproc", "2", "-q", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _, state = load_checkpoint(list_checkpoints(full / "checkpoints")[4])
    assert len(state["ranks"]) == 2       # each rank's own RNG and loss meter
    # ...and its own dropout masks: the ranks' random streams differ.
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "final")
    (resumed / "summary.json").unlink()
    for ck in list_checkpoints(resumed / "checkpoints"):
        if int(ck.name.split("-")[1]) > 5:
            shutil.rmtree(ck)
    out = dojo("resume", "resumed", "--nproc", "2", "-q", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert_same_weights(final_weights(full), final_weights(resumed))
    strip = lambda es: [{k: v for k, v in e.items() if k not in MACHINE_KEYS} for e in es]  # noqa: E731
    assert strip(read_metrics(full)) == strip(read_metrics(resumed))


def test_sigterm_stops_every_process_at_one_step_with_a_checkpoint(tmp_path):
    """SIGTERM to `dojo train --nproc 2` reaches both processes through torchrun; they agree on the step,
    rank 0 writes the checkpoint (with both ranks' RNG states) and the run exits 143."""
    r = ddp_recipe(OPTIMIZERS["sgd"])
    r["phases"][0]["steps"] = 100_000
    r["log"] = {"every_steps": 1}
    recipe = write_recipe(r, tmp_path / "recipe.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torchdojo", "train", str(recipe), "--run-dir", "run",
                             "--nproc", "2", "-q"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        for _ in range(600):          # until training runs (the first logged step)
            if metrics.exists() and metrics.read_text().strip():
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 143, stderr
    assert "dojo resume run --nproc 2" in stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    _, state = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    assert state["step"] == summary["steps"] and len(state["ranks"]) == 2


# -- elastic restarts: a rank that raises at step k -----------------------------------------------------

CRASH_PLUGIN = '''
import os
from pathlib import Path

from torchdojo.methods import Method


class CrashOnce(Method):
    """Rank 1 raises at step `at` unless the marker file exists (it creates it first): the restarted
    workers run past that step."""

    def __init__(self, at: int, marker: str):
        self.at, self.marker = at, Path(marker)

    def on_batch(self, state, batch):
        if os.environ.get("RANK") == "0":        # the steps rank 0 trains, across restarts
            with open(str(self.marker) + ".steps", "a") as f:
                f.write(f"{state.step + 1}" + chr(10))
        if state.step + 1 == self.at and os.environ.get("RANK") == "1" and not self.marker.exists():
            self.marker.write_text("crashed")
            raise RuntimeError(f"injected crash at step {self.at}")
        return batch


def register(registry):
    registry.METHODS.register("crash_once", CrashOnce)
'''


def crash_plugin(root: Path) -> dict:
    """A `torchdojo.plugins` entry point on PYTHONPATH that registers the `crash_once` method in the
    worker processes (how users add their own components)."""
    (root / "crashplugin.py").write_text(CRASH_PLUGIN)
    info = root / "crashplugin-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crashplugin\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[torchdojo.plugins]\ncrash = crashplugin:register\n")
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH", "")]))}


def _crash_run(tmp_path: Path, name: str, restarts: int, marker: Path, env: dict) -> subprocess.CompletedProcess:
    r = ddp_recipe(OPTIMIZERS["adamw"])
    r["checkpoint"] = {"every_steps": 2, "every_epochs": None, "keep_last": 3}
    r["methods"] = [{"name": "crash_once", "at": 7, "marker": str(marker)}]
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(json.dumps(r))
    return run_dojo(["train", str(recipe), "--run-dir", name, "--nproc", "2", "--max-restarts", str(restarts), "-q"],
                    tmp_path, env, 90, "the crashed job did not end in 90 s")


def _left_over(run_dir: Path) -> list[str]:
    """Processes still running whose command line names the run directory."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if str(run_dir.name) in line and "torchdojo" in line and "ps -eo" not in line]


@pytest.mark.slow      # ~15-20 s: run by `make test-slow` and CI, not `make test`
def test_a_crashed_rank_restarts_from_the_checkpoint_and_finishes_like_an_uninterrupted_run(tmp_path):
    env = crash_plugin(tmp_path)
    never = tmp_path / "never-crash"
    never.write_text("the uninterrupted run: the marker exists, so nothing crashes")
    out = _crash_run(tmp_path, "clean", 0, never, env)
    assert out.returncode == 0, out.stderr
    marker = tmp_path / "crash-marker"
    out = _crash_run(tmp_path, "restarted", 1, marker, env)
    assert out.returncode == 0, out.stderr
    assert marker.read_text() == "crashed"                  # it did crash once, at step 7
    steps = [int(x) for x in Path(str(marker) + ".steps").read_text().split()]
    # The restart resumed from the checkpoint at step 6: steps 1-6 ran once, 7 (the crash) ran again.
    assert steps.count(1) == 1 and steps.count(6) == 1 and steps.count(7) == 2 and max(steps) == 16, steps
    assert_same_weights(final_weights(tmp_path / "clean"), final_weights(tmp_path / "restarted"))
    strip = lambda es: [{k: v for k, v in e.items() if k not in MACHINE_KEYS} for e in es]  # noqa: E731
    assert strip(read_metrics(tmp_path / "clean")) == strip(read_metrics(tmp_path / "restarted"))


def test_without_restarts_a_crash_ends_the_job_quickly_and_leaves_no_process(tmp_path):
    env = crash_plugin(tmp_path)
    t0 = time.perf_counter()
    out = _crash_run(tmp_path, "norestart", 0, tmp_path / "crash-marker", env)
    assert out.returncode != 0
    assert time.perf_counter() - t0 < 60
    assert "injected crash at step 7" in out.stderr
    time.sleep(0.5)
    assert _left_over(tmp_path / "norestart") == []


def test_two_nodes_on_this_machine_train_like_one_process(tmp_path):
    """Two torchrun invocations, one process each, `--nnodes 2` with a loopback c10d rendezvous (what two
    machines would run), give the single-process result."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = ddp_recipe(OPTIMIZERS["adamw"])
    recipe = write_recipe(r, tmp_path / "recipe.yaml")
    single = fit(r, tmp_path / "single")[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-id", "twonodes",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "torchdojo", "train", str(recipe),
                               "--run-dir", "nodes", "-q"], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
             for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=90) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                kill_tree(p.pid)
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    for name, a in final_weights(tmp_path / "single").items():
        torch.testing.assert_close(final_weights(tmp_path / "nodes")[name], a, rtol=1e-5, atol=1e-6)
    assert single["steps"] == json.loads((tmp_path / "nodes" / "summary.json").read_text())["steps"]


# -- synchronized BatchNorm, joint ensembles, non-finite steps -------------------------------------------

def _two_like_one(r: dict, tmp_path: Path, env: dict | None = None, name: str = "two") -> tuple[dict, dict]:
    """Final weights of `r` trained in 1 process (in this one) and in 2 (`dojo train --nproc 2`)."""
    single = tmp_path / f"{name}-one"
    fit(copy.deepcopy(r), single)
    recipe = write_recipe(r, tmp_path / f"{name}.yaml")
    out = dojo("train", str(recipe), "--run-dir", name, "--nproc", "2", "-q", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert_close_metrics(read_metrics(single), read_metrics(tmp_path / name))
    return final_weights(single), final_weights(tmp_path / name)


@pytest.mark.slow      # ~15-20 s: run by `make test-slow` and CI, not `make test`
def test_sync_batchnorm_makes_two_processes_train_like_one(tmp_path):
    """With BatchNorm, each process normalizes its half of the batch unless `sync_batchnorm` is on; with
    it, the parameters and running statistics equal the single-process run's."""
    r = ddp_recipe(OPTIMIZERS["sgd"])
    r["model"]["batch_norm"] = True
    r["sync_batchnorm"] = True
    one, two = _two_like_one(r, tmp_path)
    assert any(k.endswith("running_var") for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-5, msg=k)
    # Without it the running statistics are those of half-batches: measurably different.
    r["sync_batchnorm"] = False
    out = dojo("train", str(write_recipe(r, tmp_path / "plain.yaml")), "--run-dir", "plain", "--nproc", "2",
               "-q", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    plain = final_weights(tmp_path / "plain")
    assert max(float((plain[k] - one[k]).abs().max()) for k in one if k.endswith("running_var")) > 1e-3


def test_joint_ensemble_with_two_processes_trains_like_one(tmp_path):
    """A joint (vmap) ensemble with NCL: the members' loss runs inside the DDP wrapper's forward, so every
    member's gradients are synchronized."""
    r = ddp_recipe(OPTIMIZERS["adamw"])
    r["ensemble"] = {"members": 3, "ncl": 0.5}
    one, two = _two_like_one(r, tmp_path)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-5, msg=k)


INF_PLUGIN = '''
import os
from pathlib import Path

import torch

from torchdojo.methods import Method


class InfLossOnce(Method):
    """Adds +inf to the loss of process `rank` at step `at`, once (a marker file): the loss is not finite,
    the gradients are. Only that process sees it, so the others must learn of it to act together."""

    def __init__(self, at: int, rank: int, marker: str):
        self.at, self.rank, self.marker = at, rank, Path(marker)

    def on_loss(self, state, loss, parts):
        if (state.step + 1 == self.at and os.environ.get("RANK", "0") == str(self.rank)
                and not self.marker.exists()):
            self.marker.write_text("done")
            return loss + torch.tensor(float("inf"))
        return loss


def register(registry):
    registry.METHODS.register("inf_loss_once", InfLossOnce)
'''


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_a_non_finite_loss_on_one_process_makes_all_skip_or_roll_back_together(policy, tmp_path):
    """An infinite loss on rank 1 only, at step 7: both processes skip the step (or roll back to the step-6
    checkpoint with half the LR) and end like one process with the same event."""
    (tmp_path / "infplugin.py").write_text(INF_PLUGIN)
    info = tmp_path / "infplugin-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: infplugin\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[torchdojo.plugins]\ninf = infplugin:register\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH", "")]))}
    runs = {}
    for nproc, rank in ((1, 0), (2, 1)):
        r = ddp_recipe(OPTIMIZERS["adamw"])
        r["nonfinite"] = {"policy": policy}
        r["checkpoint"] = {"every_steps": 2, "every_epochs": None, "keep_last": 3}
        r["methods"] = [{"name": "inf_loss_once", "at": 7, "rank": rank, "marker": str(tmp_path / f"marker{nproc}")}]
        recipe = tmp_path / f"p{nproc}.yaml"
        recipe.write_text(json.dumps(r))
        out = dojo("train", str(recipe), "--run-dir", f"p{nproc}", "--nproc", str(nproc), "-q", cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / f"marker{nproc}").exists()
        runs[nproc] = tmp_path / f"p{nproc}"
    metrics = read_metrics(runs[2])
    if policy == "skip":
        assert [e["train/nonfinite_skips"] for e in metrics if "train/nonfinite_skips" in e][-1] == 1
    else:
        events = [e for e in metrics if e.get("event") == "rollback"]
        assert len(events) == 1 and events[0]["step"] == 6 and events[0]["lr_factor"] == 0.5
    assert_close_metrics(read_metrics(runs[1]), metrics)
    for k, a in final_weights(runs[1]).items():
        torch.testing.assert_close(final_weights(runs[2])[k], a, atol=1e-5, rtol=1e-5, msg=k)


def test_mixture_of_experts_trains_with_two_processes(tmp_path):
    """32 experts for 16 rows per process: most experts get no row in a step. Their weights are slices
    of one stacked parameter per layer, so every parameter still gets a gradient (zero for idle experts)
    and plain DDP works. (Not equal to one process: capacity and the balance loss are per process's
    rows, as in the paper.)"""
    r = ddp_recipe(OPTIMIZERS["adamw"])
    r["model"] = {"name": "moe_mlp", "width": 8, "blocks": 1, "experts": 32, "expert_hidden": 8,
                  "capacity_factor": 0.5}
    r["methods"] = [{"name": "load_balance", "weight": 0.01}]
    out = dojo("train", str(write_recipe(r, tmp_path / "moe.yaml")), "--run-dir", "moe", "--nproc", "2", "-q",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert any("train/moe_balance" in e for e in read_metrics(tmp_path / "moe"))
