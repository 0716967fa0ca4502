"""The `dojo` command end to end, as a user runs it (subprocesses of .venv/bin/dojo)."""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from torchdojo import Trainer, load_recipe
from torchdojo.cli import main
from torchdojo.cli_errors import handle_errors
from torchdojo.data.builtin import synthetic_tabular
from torchdojo.log import fmt

from conftest import make_tiny_recipe

DOJO = str(Path(sys.executable).with_name("dojo"))


def dojo(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "160",
           "NO_COLOR": "1"}
    return subprocess.run([DOJO, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def cli_recipe() -> dict:
    r = make_tiny_recipe()
    r["methods"] = [{"name": "ema", "decay": 0.9}]
    return r


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(cli_recipe(), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def trained(recipe_file, tmp_path_factory):
    """A finished run trained through the CLI (with a dotted override), shared by the read-only tests."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    res = dojo("train", recipe_file, "phases.warm.steps=12", "--run-dir", run_dir, "-q")
    assert res.returncode == 0, res.stderr
    return run_dir, res


def raw_features(n: int = 30) -> tuple[np.ndarray, list[str]]:
    """Rows in the units of the original data (before the run's standardisation)."""
    spec = cli_recipe()["data"]
    raw = synthetic_tabular(**{k: v for k, v in spec.items() if k != "name"})
    return raw.x[:n], raw.feature_names


def expected_probabilities(run_dir: Path, x: np.ndarray) -> np.ndarray:
    trainer = Trainer.from_run_dir(run_dir, quiet=True)
    model = trainer.state.model
    model.load_state_dict(load_file(str(run_dir / "checkpoints/final/model.safetensors")))
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(trainer.state.data.info.prepare(x)).float(), 1).numpy()


def read_predictions(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


# -- listing --------------------------------------------------------------------------------------

def test_recipes_lists_quickstart():
    res = dojo("recipes")
    assert res.returncode == 0, res.stderr
    assert re.search(r"\bquickstart\b", res.stdout)
    assert "Small CNN" in res.stdout          # its description


def test_datasets_lists_digits():
    res = dojo("datasets")
    assert res.returncode == 0, res.stderr
    line = next(l for l in res.stdout.splitlines() if re.search(r"\bdigits\b", l))
    assert "classification" in line and "1x8x8" in line and re.search(r"\b10\b", line)
    for name in ("iris", "wine", "breast_cancer", "synthetic_tabular", "csv", "npz"):
        assert re.search(rf"\b{name}\b", res.stdout), name


# -- train ----------------------------------------------------------------------------------------

def test_train_writes_the_run_contract(trained):
    run_dir, res = trained
    assert res.stdout == ""                    # --quiet
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json", "checkpoints/final/model.safetensors"):
        assert (run_dir / name).is_file(), name
    steps = sorted((run_dir / "checkpoints").glob("step-*"))
    assert steps and all((p / "model.safetensors").is_file() and (p / "state.pt").is_file() for p in steps)
    # The resolved recipe carries the override and filled-in defaults.
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["phases"][0]["steps"] == 12
    assert recipe["eval"]["batch_size"] >= 1 and "val_fraction" in recipe["data"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["steps"] == 12 + 4
    assert summary["wall_seconds"] > 0
    for key in ("test/accuracy", "val/accuracy", "test/loss", "val/loss"):
        assert key in summary["metrics"], key
    assert 0.6 < summary["metrics"]["test/accuracy"] <= 1.0      # 3 classes: chance is 1/3
    entries = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "epoch", "phase"} <= e.keys() for e in entries)
    assert [e["step"] for e in entries if "train/loss" in e] == list(range(1, 17))
    assert all("lr/group0" in e for e in entries if "train/loss" in e)


def test_eval_prints_the_summary_test_accuracy(trained):
    run_dir, _ = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    res = dojo("eval", run_dir, "--split", "test")
    assert res.returncode == 0, res.stderr
    row = next(l for l in res.stdout.splitlines() if re.search(r"\baccuracy\b", l))
    assert re.findall(r"\d[\d.eE+-]*", row) == [fmt(summary["metrics"]["test/accuracy"])]
    row = next(l for l in res.stdout.splitlines() if re.search(r"\bloss\b", l))
    assert re.findall(r"\d[\d.eE+-]*", row) == [fmt(summary["metrics"]["test/loss"])]


def test_predict_csv_by_feature_name(trained, tmp_path):
    run_dir, _ = trained
    x, names = raw_features(30)
    order = names[::-1] + ["comment"]           # columns matched by name; extra columns ignored
    inp = tmp_path / "X.csv"
    with inp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(order)
        for row in x:
            values = dict(zip(names, row.tolist()))
            w.writerow([repr(values[n]) for n in names[::-1]] + ["ignored"])
    out = tmp_path / "P.csv"
    res = dojo("predict", run_dir, "--input", inp, "--output", out)
    assert res.returncode == 0, res.stderr
    header, rows = read_predictions(out)
    assert header == ["prediction", "prob_0", "prob_1", "prob_2"]
    assert len(rows) == 30
    probs = np.array([[float(v) for v in r[1:]] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [r[0] for r in rows] == [str(i) for i in probs.argmax(1)]
    # The probabilities are the final (EMA) model's on the standardised inputs.
    np.testing.assert_allclose(probs, expected_probabilities(run_dir, x), atol=2e-6)


def test_predict_npz_matches_csv(trained, tmp_path):
    run_dir, _ = trained
    x, names = raw_features(12)
    np.savez(tmp_path / "X.npz", x=x)
    with (tmp_path / "X.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(names)
        w.writerows([[repr(v) for v in row.tolist()] for row in x])
    res = dojo("predict", run_dir, "--input", tmp_path / "X.npz", "--output", tmp_path / "P.csv")
    assert res.returncode == 0, res.stderr
    header, rows = read_predictions(tmp_path / "P.csv")
    assert header[0] == "prediction" and len(rows) == 12
    probs = np.array([[float(v) for v in r[1:]] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, expected_probabilities(run_dir, x), atol=2e-6)


def test_train_without_run_dir_uses_runs_name_timestamp(recipe_file, tmp_path):
    res = dojo("train", recipe_file, "phases.warm.steps=4", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    assert re.fullmatch(r"tiny-\d{8}-\d{6}", runs[0].name)
    assert (runs[0] / "summary.json").is_file() and (runs[0] / "recipe.yaml").is_file()
    assert f"runs/{runs[0].name}" in res.stdout
    # Without -q, one line per epoch and a final table.
    assert re.search(r"warm \| epoch", res.stdout) and "accuracy" in res.stdout


# -- help -----------------------------------------------------------------------------------------

def test_help_explains_the_verbs():
    res = dojo("--help")
    assert res.returncode == 0
    for verb in ("train", "resume", "eval", "predict", "recipes", "datasets"):
        assert re.search(rf"^\s+{verb}\s+\S", res.stdout, re.M), verb
    res = dojo("train", "--help")
    assert res.returncode == 0
    assert "RECIPE" in res.stdout and "--run-dir" in res.stdout and "--quiet" in res.stdout
    assert "key.path=value" in res.stdout and "dojo train quickstart" in res.stdout


# -- refusals -------------------------------------------------------------------------------------

def test_resume_a_finished_run_is_refused(trained, tmp_path):
    run_dir = tmp_path / "finished"
    shutil.copytree(trained[0], run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    res = dojo("resume", run_dir, "-q")
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert res.stderr.startswith("error:") and "Traceback" not in res.stderr
    assert re.search(r"finish|complete|nothing to resume", res.stderr, re.I)
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_resume_a_directory_that_is_not_a_run(tmp_path):
    res = dojo("resume", tmp_path)
    assert res.returncode == 2
    assert "not a run directory" in res.stderr and "Traceback" not in res.stderr
    assert sorted(tmp_path.iterdir()) == []          # nothing written into it


def test_train_into_a_non_empty_run_dir_is_refused(recipe_file, tmp_path):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    res = dojo("train", recipe_file, "--run-dir", run_dir, "-q")
    assert res.returncode == 2
    assert "not empty" in res.stderr and "dojo resume" in res.stderr and "Traceback" not in res.stderr
    assert "--overwrite" in res.stderr
    # --overwrite deletes runs only, not a folder a mistyped --run-dir points at.
    res = dojo("train", recipe_file, "--run-dir", run_dir, "--overwrite", "-q")
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "does not look like a run directory" in res.stderr
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".lock") == ["notes.txt"]
    assert (run_dir / "notes.txt").read_text() == "keep me"


# -- a run killed before its first checkpoint (issue 21) ------------------------------------------

def _train_until_killed(recipe: dict, run_dir: Path) -> None:
    Trainer(load_recipe(recipe), run_dir, quiet=True).fit()


def run_killed_before_its_first_checkpoint(recipe: dict, run_dir: Path) -> None:
    """SIGKILL a training (in a forked child) once it has logged a line, long before any checkpoint."""
    child = multiprocessing.get_context("fork").Process(target=_train_until_killed, args=(recipe, run_dir))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert child.is_alive() and time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        child.kill()
        child.join(30)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "summary.json").exists()


def test_a_run_killed_before_its_first_checkpoint_says_how_to_start_it_again(tmp_path):
    long = cli_recipe()
    long["phases"][0]["steps"] = 5000
    long["checkpoint"] = {"every_epochs": None, "every_steps": None}
    run_dir = tmp_path / "run"
    run_killed_before_its_first_checkpoint(long, run_dir)

    res = dojo("resume", run_dir, "-q")
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "stopped before its first checkpoint" in res.stderr and "warnings above" not in res.stderr
    suggested = re.search(r"`dojo (train .* --overwrite)`", res.stderr).group(1).split()
    assert suggested == ["train", str(run_dir / "recipe.yaml"), "--run-dir", str(run_dir), "--overwrite"]

    # The suggested command (shortened by an override) starts the run afresh: nothing of the killed one stays.
    res = dojo(*suggested, "phases.warm.steps=12", "-q")
    assert res.returncode == 0, res.stderr
    reference = cli_recipe()
    reference["phases"][0]["steps"] = 12
    reference["checkpoint"] = long["checkpoint"]
    trainer = Trainer(load_recipe(reference), tmp_path / "reference", quiet=True)
    trainer.fit()
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == \
        (tmp_path / "reference" / "metrics.jsonl").read_text().count("\n")
    for name, tensor in load_file(str(tmp_path / "reference" / "checkpoints" / "final" / "model.safetensors")).items():
        assert torch.equal(load_file(str(run_dir / "checkpoints" / "final" / "model.safetensors"))[name], tensor)


def test_resume_with_only_damaged_checkpoints_points_at_the_warnings(tmp_path):
    run_dir = tmp_path / "run"
    Trainer(load_recipe(cli_recipe()), run_dir, quiet=True).fit()
    (run_dir / "summary.json").unlink()
    for state in (run_dir / "checkpoints").glob("step-*/state.pt"):
        state.write_bytes(b"damaged")
    res = dojo("resume", run_dir, "-q")
    assert res.returncode == 2, res.stderr
    warnings_, error = res.stderr.splitlines()[:-1], res.stderr.splitlines()[-1]
    assert warnings_ and all(w.startswith("warning: skipping checkpoint") for w in warnings_)
    assert error.startswith("error:") and "see the warnings above" in error and "--overwrite" in error


def test_train_help_says_overwrite_deletes_the_run():
    res = CliRunner().invoke(main, ["train", "--help"])
    assert res.exit_code == 0
    assert re.search(r"--overwrite\s+Delete everything in --run-dir", res.output)


# -- SIGINT / SIGTERM before training starts (issue 21) ---------------------------------------------

@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
def test_interrupt_before_training_starts_is_one_line(tmp_path, sig, code):
    r = cli_recipe()
    r["data"]["n_samples"] = 1_000_000       # about 2 s of data set-up to interrupt
    recipe_path = tmp_path / "big.yaml"
    recipe_path.write_text(yaml.safe_dump(r))
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([DOJO, "train", str(recipe_path), "--run-dir", str(run_dir), "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The lock file names the process once the command has started (right before the data loads).
        deadline = time.monotonic() + 60
        while not (run_dir / ".lock").is_file() or not (run_dir / ".lock").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert err.strip() == "interrupted before training started; nothing was lost"
    assert not run_dir.exists(), list(run_dir.iterdir())     # left as it was: the same command can run again


def test_ctrl_c_in_a_command_without_its_own_handler_is_exit_130_in_one_line(capsys):
    """eval, report, ... install no signal handler: Ctrl-C is a KeyboardInterrupt, which click would
    turn into "Aborted!" and exit code 1."""
    @handle_errors
    def command():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as stop:
        command()
    assert stop.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"
