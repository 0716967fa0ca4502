"""`dojo plot-schedule`: the planned LRs equal the closed forms and what training really logs; the plot
and the command."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from torchdojo import Trainer, load_recipe
from torchdojo.plot_schedule import merged_groups, planned_lrs, plot_schedule, plot_schedule_command

from conftest import make_tiny_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LR, SGD_LR = 0.01, 0.05


def staged_recipe() -> dict:
    """warm: AdamW, warmup + cosine, `body.1` frozen; thaw: the same AdamW, nothing frozen, no schedule;
    sgd: a fresh SGD with its own cosine and a batch size doubling every epoch under linear lr_scaling.
    The synthetic data has 280 training rows: 8 steps per epoch at batch 32, 4 at 64, 2 at 128."""
    r = make_tiny_recipe()
    r["model"] = {"name": "mlp", "hidden": [16, 16]}
    r["param_groups"] = {"rules": [{"match": "head", "lr_mult": 2.0}]}
    r["phases"] = [
        {"name": "warm", "steps": 12, "batch_size": 32, "freeze": ["body.1"],
         "optimizer": {"name": "adamw", "lr": LR, "weight_decay": 0.01},
         "schedule": [{"name": "warmup", "steps": 3}, {"name": "cosine"}]},
        {"name": "thaw", "steps": 6},
        {"name": "sgd", "epochs": 3, "batch_size": {"start": 32, "end": 128, "every_epochs": 1},
         "lr_scaling": "linear", "optimizer": {"name": "sgd", "lr": SGD_LR, "momentum": 0.9},
         "schedule": [{"name": "cosine", "min_factor": 0.1}]},
    ]
    r["checkpoint"] = {"every_epochs": None}
    r["log"] = {"every_steps": 1}
    return r


@pytest.fixture(scope="module")
def plan():
    return planned_lrs(load_recipe(staged_recipe()))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected(step: int, group: str) -> float:
    """The closed form of the staged recipe's LR at a 1-based global step."""
    mult = 2.0 if group.startswith("head") else 1.0
    frozen = "frozen@warm" in group
    if step <= 12:                                    # warm: 3 warmup steps, then cosine over 9
        t = step - 1
        sched = (t + 1) / 3 if t < 3 else 0.5 * (1 + math.cos(math.pi * (t - 3) / 9))
        return 0.0 if frozen else LR * mult * sched
    if step <= 18:                                    # thaw: base LR, body.1 back
        return LR * mult
    t = step - 19                                     # sgd: 14 steps = 8 + 4 + 2
    epoch = 0 if t < 8 else 1 if t < 12 else 2
    return SGD_LR * mult * 2 ** epoch * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 14)))


def test_phases_boundaries_and_groups(plan):
    assert plan["steps"] == list(range(1, 33))
    assert [(p["name"], p["start"], p["end"]) for p in plan["phases"]] == [
        ("warm", 0, 12), ("thaw", 12, 18), ("sgd", 18, 32)]
    assert [p["optimizer"] for p in plan["phases"]] == ["adamw", "adamw", "sgd"]
    assert [p["new_optimizer"] for p in plan["phases"]] == [True, False, True]
    assert plan["plateau"] == [] and plan["plateau_spans"] == []
    labels = set(plan["groups"])
    assert {"default", "default/no_decay", "head", "head/no_decay",
            "default/frozen@warm", "default/no_decay/frozen@warm"} == labels
    assert all(len(v) == 32 and None not in v for v in plan["groups"].values())
    # epochs as metrics.jsonl counts them: 12/8 in warm, 6/8 more in thaw, then 3 whole epochs
    assert plan["epochs"][11] == pytest.approx(1.5) and plan["epochs"][17] == pytest.approx(2.25)
    assert plan["epochs"][-1] == pytest.approx(5.25)


@pytest.mark.parametrize("step", [1, 2, 3, 4, 8, 12, 13, 18, 19, 26, 27, 30, 31, 32])
def test_values_equal_the_closed_forms(plan, step):
    for label, values in plan["groups"].items():
        assert values[step - 1] == pytest.approx(expected(step, label), rel=1e-12, abs=1e-15), (label, step)


def test_frozen_group_is_zero_then_comes_back(plan):
    body = plan["groups"]["default/frozen@warm"]
    assert body[:12] == [0.0] * 12
    assert body[12:18] == [LR] * 6
    assert body[18] == pytest.approx(SGD_LR)                # the SGD phase's cosine starts at 1
    # the batch doubles at the epoch boundaries of the sgd phase: the LR jumps up although cosine decays
    default = plan["groups"]["default"]
    assert default[18 + 8] > default[18 + 7] and default[18 + 12] > default[18 + 11]


def test_planned_lrs_equal_what_training_logs(tmp_path, plan):
    """The key property: at every step each `lr/group<i>` of metrics.jsonl is the planned LR of the
    group the phase's optimizer has at index i."""
    recipe = load_recipe(staged_recipe())
    Trainer(recipe, tmp_path / "run", quiet=True).fit()
    train = [e for e in read_metrics(tmp_path / "run") if "train/loss" in e]
    assert [e["step"] for e in train] == plan["steps"]
    phase_of = {k: p for p in plan["phases"] for k in range(p["start"] + 1, p["end"] + 1)}
    for e in train:
        p = phase_of[e["step"]]
        assert e["phase"] == p["name"]
        logged = sorted(k for k in e if k.startswith("lr/group"))
        assert len(logged) == len(p["groups"])
        for i, label in enumerate(p["groups"]):
            assert e[f"lr/group{i}"] == pytest.approx(plan["groups"][label][e["step"] - 1], rel=1e-12, abs=0), \
                (e["step"], i, label)
        assert e["epoch"] == pytest.approx(round(plan["epochs"][e["step"] - 1], 4), abs=1e-9)


def plateau_recipe() -> dict:
    r = make_tiny_recipe()
    r["model"] = {"name": "mlp", "hidden": [16, 16]}
    r["phases"] = [
        {"name": "a", "steps": 10, "batch_size": 32, "freeze": ["body.1"],
         "optimizer": {"name": "adamw", "lr": LR},
         "schedule": [{"name": "cosine", "steps": 4},
                      {"name": "plateau", "factor": 0.5, "patience": 100, "min_lr": 0.02}]},
    ]
    r["checkpoint"] = {"every_epochs": None}
    r["log"] = {"every_steps": 1}
    return r


def test_plateau_is_undecayed_floored_and_matches_training(tmp_path):
    recipe = load_recipe(plateau_recipe())
    plan = planned_lrs(recipe)
    assert plan["plateau"] == ["a"] and plan["plateau_spans"] == [(4, 10)]
    default, frozen = plan["groups"]["default"], plan["groups"]["default/frozen@a"]
    assert default[:4] == pytest.approx([LR * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)])
    assert default[4:] == [0.02] * 6                 # min_lr (0.02) above the undecayed base LR (0.01)
    assert frozen == [0.0] * 10                       # frozen groups stay at 0 despite the floor
    Trainer(recipe, tmp_path / "run", quiet=True).fit()
    train = [e for e in read_metrics(tmp_path / "run") if "train/loss" in e]
    labels = plan["phases"][0]["groups"]
    for e in train:
        for i, label in enumerate(labels):
            assert e[f"lr/group{i}"] == pytest.approx(plan["groups"][label][e["step"] - 1], rel=1e-12, abs=0)
    png = tmp_path / "plateau.png"
    plot_schedule(recipe, png, plan)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_merged_groups_share_a_legend_line():
    merged = merged_groups({"default": [1.0, 0.5], "default/no_decay": [1.0, 0.5], "head": [2.0, 1.0],
                            "x/frozen@a": [None, 0.5], "x/no_decay/frozen@a": [None, 0.5], "y": [None, 0.5],
                            "head/no_decay": [2.0, 1.0]})
    assert merged == {"default (+no_decay)": [1.0, 0.5], "head (+no_decay)": [2.0, 1.0],
                      "x/frozen@a (+no_decay, +y)": [None, 0.5]}


def test_png_is_written_and_nothing_else(tmp_path, plan):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        out = tmp_path / "plots" / "lr.png"
        returned = plot_schedule(load_recipe(staged_recipe()), out)
    finally:
        os.chdir(cwd)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")} == {"plots", "plots/lr.png"}
    assert returned["groups"] == plan["groups"]


def test_command_writes_the_plot_and_prints_the_phases(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(staged_recipe()))
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path) as cwd:
        res = runner.invoke(plot_schedule_command, [str(recipe_file), "phases.sgd.optimizer.lr=0.1"])
        assert res.exit_code == 0, res.output
        assert sorted(os.listdir(cwd)) == ["lr.png"]                      # the default --out
        assert Path(cwd, "lr.png").read_bytes()[:8] == PNG_MAGIC
    lines = res.output.strip().splitlines()
    assert lines[0] == "wrote lr.png"
    assert lines[1].startswith("warm: steps 1-12 (12), adamw, lr 0.00333 -> ")
    assert lines[2].startswith("thaw: steps 13-18 (6), adamw, lr 0.01 -> 0.01")
    assert lines[3].startswith("sgd: steps 19-32 (14), sgd, lr 0.1 -> ")        # the override applied
    res = runner.invoke(plot_schedule_command, [str(recipe_file), "--out", str(tmp_path / "o" / "x.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "x.png").is_file()


@pytest.mark.parametrize("override, message", [
    ("phases.0.optimizer.name=nope", "phases.0.optimizer"),
    ("phases.0.schedule.0.name=nope", "phases.0.schedule.0"),
    ("no_equals_sign", "key.path=value"),
])
def test_bad_override_exits_2(tmp_path, override, message):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(staged_recipe()))
    res = CliRunner().invoke(plot_schedule_command, [str(recipe_file), override, "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], res.output
    assert not (tmp_path / "x.png").exists()
