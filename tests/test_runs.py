"""`dojo runs`: every kind of run directory gets the right status, metrics and order."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from torchdojo import Trainer, load_recipe
from torchdojo.errors import DojoError
from torchdojo.runs import fmt_seconds, list_runs, runs_command

from conftest import make_tiny_recipe
from helpers import read_metrics


def invoke(*args):
    return CliRunner().invoke(runs_command, [str(a) for a in args], env={"COLUMNS": "200"},
                              catch_exceptions=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A runs/ folder with a finished run, an interrupted one, a failed one, an incomplete one, one with a
    damaged summary.json, a compare folder (two levels deeper) and a folder that is no run."""
    root = tmp_path_factory.mktemp("runs") / "runs"
    finished = root / "tiny-20240101-120000"
    Trainer(load_recipe(make_tiny_recipe()), finished, quiet=True).fit()

    failing = make_tiny_recipe()
    failing["phases"][0]["optimizer"]["lr"] = 1.0e30         # non-finite loss at step 2: the run fails
    with pytest.raises(DojoError, match="non-finite"):
        Trainer(load_recipe(failing), root / "tiny-20240103-090000", quiet=True).fit()

    interrupted = root / "tiny-20240102-080000"
    shutil.copytree(finished, interrupted)
    summary = json.loads((interrupted / "summary.json").read_text())
    (interrupted / "summary.json").write_text(json.dumps(
        {"recipe": "tiny", "status": "interrupted", "steps": 18, "metrics": {}, "wall_seconds": 75.5}))

    incomplete = root / "tiny-20240104-070000"             # killed before any summary: only a checkpoint
    (incomplete / "checkpoints" / "step-00000008").mkdir(parents=True)
    shutil.copy(finished / "recipe.yaml", incomplete / "recipe.yaml")

    broken = root / "tiny-20240105-060000"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")

    seed_run = root / "compare-20240106-050000" / "phases.0.optimizer.lr=0.01" / "seed0"
    shutil.copytree(finished, seed_run)
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run")
    return root, summary


def test_runs_json_rows(root):
    root, summary = root
    res = invoke(root, "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [(r["name"], r["status"]) for r in rows] == [
        ("tiny-20240101-120000", "finished"), ("tiny-20240102-080000", "interrupted"),
        ("tiny-20240103-090000", "failed"), ("tiny-20240104-070000", "incomplete"),
        ("tiny-20240105-060000", "unknown"), ("compare-20240106-050000/phases.0.optimizer.lr=0.01/seed0", "finished")]
    assert rows == list_runs(root)
    fin = rows[0]
    entries = read_metrics(root / fin["name"])
    best = max(e["val/accuracy"] for e in entries if "val/accuracy" in e)
    assert fin["best_val"]["metric"] == "val/accuracy" and fin["best_val"]["value"] == best
    assert fin["test"] == {"metric": "test/accuracy", "value": summary["metrics"]["test/accuracy"]}
    assert fin["steps"] == 22 and fin["wall_seconds"] == summary["wall_seconds"] and fin["recipe"] == "tiny"
    assert fin["started"] == "2024-01-01T12:00:00"
    assert rows[1]["wall_seconds"] == 75.5 and rows[1]["steps"] == 18 and rows[1]["test"] is None
    assert "non-finite" in rows[2]["error"]
    assert rows[3]["steps"] == 8 and rows[3]["recipe"] == "tiny"          # from the checkpoint's name
    assert rows[4]["recipe"] is None and rows[4]["steps"] is None


def test_runs_table(root):
    root, _ = root
    res = invoke(root)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    for name, status in (("tiny-20240101-120000", "finished"), ("tiny-20240102-080000", "interrupted"),
                         ("tiny-20240103-090000", "failed"), ("tiny-20240104-070000", "incomplete"),
                         ("tiny-20240105-060000", "unknown")):
        row = next(line for line in lines if name in line)
        assert status in row, row
    assert "1m 15s" in next(line for line in lines if "tiny-20240102-080000" in line)
    assert "compare-20240106-050000/phases.0.optimizer.lr=0.01/seed0" in res.output
    assert "notes" not in res.output
    assert "non-finite" in res.output                          # the failed run's reason, under the table


def test_runs_orders_by_start_time_and_regression_metrics(tmp_path):
    """Without a timestamp in the name the files' time counts; a regression run shows val loss and
    test MSE."""
    older, newer = tmp_path / "b-run", tmp_path / "a-run"
    for d, t in ((older, 1_000_000), (newer, 2_000_000)):
        d.mkdir()
        (d / "recipe.yaml").write_text("name: reg\nseed: 0\n")
        (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in (
            {"step": 5, "train/loss": 3.0}, {"step": 10, "val/loss": 2.5, "val/mse": 2.5},
            {"step": 20, "val/loss": 1.5}, {"step": 30, "val/loss": 1.75}, {"step": 30, "val/loss": 1.75,
                                                                             "test/mse": 1.9})))
        (d / "summary.json").write_text(json.dumps({"status": "finished", "steps": 30, "wall_seconds": 4000,
                                                    "metrics": {"test/loss": 1.9, "test/mse": 1.9}}))
        for f in (d / "recipe.yaml", d):
            os.utime(f, (t, t))
    rows = list_runs(tmp_path)
    assert [r["name"] for r in rows] == ["b-run", "a-run"]
    assert rows[0]["best_val"] == {"metric": "val/loss", "value": 1.5, "step": 20}
    assert rows[0]["test"] == {"metric": "test/mse", "value": 1.9} and rows[0]["recipe"] == "reg"
    assert fmt_seconds(4000) == "1h 06m" and fmt_seconds(12.34) == "12.3 s"
    assert list_runs(older)[0]["name"] == "b-run"             # DIR itself a run directory


def test_runs_empty_and_missing(tmp_path):
    res = invoke(tmp_path)
    assert res.exit_code == 0 and "no runs in" in res.output
    assert json.loads(invoke(tmp_path, "--json").output) == []
    res = invoke(tmp_path / "nope")
    assert res.exit_code == 2 and "no directory" in res.output
    (tmp_path / "file").write_text("x")
    assert invoke(tmp_path / "file").exit_code == 2
