"""The LR finder (LR range test, Smith 2015): the sweep, its stopping rule, suggestions, files and CLI."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from torchdojo import DojoError, Trainer, load_recipe
from torchdojo.lr_find import lr_find, lr_find_command, suggest, sweep_lrs

from conftest import make_tiny_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The default sweep (1e-7 to 10, 100 steps) of the tiny recipe, run from an empty cwd."""
    cwd = tmp_path_factory.mktemp("cwd")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        recipe = load_recipe(make_tiny_recipe())
        result = lr_find(recipe, cwd / "out", quiet=True)
    finally:
        os.chdir(before)
    return result, cwd, recipe


def test_lrs_are_geometric_from_start_lr(sweep):
    result, _, _ = sweep
    lrs = result["lrs"]
    assert lrs[0] == 1e-7
    ratio = (10.0 / 1e-7) ** (1 / 99)
    for k, lr in enumerate(lrs):
        assert lr == pytest.approx(1e-7 * ratio ** k, rel=1e-12)
    assert lrs == sweep_lrs(1e-7, 10.0, 100)[:len(lrs)]
    assert sweep_lrs(1e-3, 1.0, 10)[-1] == pytest.approx(1.0, rel=1e-12)


def test_loss_falls_then_diverges_and_the_sweep_stops_early(sweep):
    result, _, _ = sweep
    smoothed, losses = result["smoothed"], result["losses"]
    assert len(smoothed) == len(losses) == len(result["lrs"]) < 100
    assert result["stopped_early"] is True
    i_min = int(np.argmin(smoothed))
    assert smoothed[i_min] < smoothed[0] - 0.05                  # it falls ...
    assert 0 < i_min < len(smoothed) - 1
    assert smoothed[-1] > 4.0 * smoothed[i_min]                  # ... then diverges (the stopping rule)
    assert all(s <= 4.0 * min(smoothed[:k + 1]) for k, s in enumerate(smoothed[:-1]))
    assert all(math.isfinite(v) for v in losses + smoothed)
    # bias-corrected EMA: the first smoothed value is the first loss
    assert smoothed[0] == pytest.approx(losses[0])
    avg = 0.0
    for k, v in enumerate(losses):
        avg = 0.98 * avg + 0.02 * v
        assert smoothed[k] == pytest.approx(avg / (1 - 0.98 ** (k + 1)), rel=1e-9)


def test_suggestions_lie_in_the_swept_range_below_divergence(sweep):
    result, _, _ = sweep
    lrs, sug = result["lrs"], result["suggested"]
    assert set(sug) == {"steepest", "min_over_10"}
    for value in sug.values():
        assert lrs[0] <= value <= lrs[-1]
    assert sug["steepest"] < lrs[-1]                             # lrs[-1] is where it diverged
    assert sug["steepest"] <= lrs[int(np.argmin(result["smoothed"]))]
    assert sug["min_over_10"] == pytest.approx(lrs[int(np.argmin(result["smoothed"]))] / 10)
    assert result["optimizer_lr"] == sug                         # no lr_mult above 1: same numbers
    assert result["optimizer_lr_key"] == "phases.0.optimizer.lr"


def test_json_and_png_are_written_and_nothing_else(sweep):
    result, cwd, recipe = sweep
    out = cwd / "out"
    assert listing(cwd) == {"out", "out/lr_find.json", "out/lr_find.png"}     # no runs/, no weights
    assert result["json_path"] == str(out / "lr_find.json") and result["png_path"] == str(out / "lr_find.png")
    data = json.loads((out / "lr_find.json").read_text())
    for key in ("lrs", "losses", "smoothed", "suggested", "stopped_early", "recipe"):
        assert data[key] == result[key]
    assert data["recipe"] == recipe.name == "tiny"
    png = (out / "lr_find.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_suggest_on_a_known_curve():
    lrs = sweep_lrs(1e-5, 1.0, 101)
    x = np.log10(lrs)
    # falls fastest at lr 1e-3 (x = -3), minimum at lr 1e-1, rises after
    y = 2 - np.tanh(2 * (x + 3)) + np.where(x > -1, 5 * (x + 1) ** 2, 0)
    y = y + 0.05 * (x + 1) ** 2 * (x <= -1)
    sug = suggest(lrs, list(y))
    assert sug["steepest"] == pytest.approx(1e-3, rel=0.15)
    assert sug["min_over_10"] == pytest.approx(lrs[int(np.argmin(y))] / 10)
    # a curve that only rises: no descent to speak of, the first LR
    assert suggest(lrs[:20], list(range(20)))["steepest"] == lrs[0]


class RecordingOptimizer:
    """Wraps Trainer.build_optimizer so every step records the groups' LRs (and the optimizer)."""

    def __init__(self, monkeypatch):
        self.steps: list[list[float]] = []
        self.optimizers = []
        original = Trainer.build_optimizer

        def build(trainer, i):
            opt = original(trainer, i)
            step = opt.step

            def recorded_step(*args, **kwargs):
                self.steps.append([g["lr"] for g in opt.param_groups])
                return step(*args, **kwargs)
            opt.step = recorded_step
            self.optimizers.append(opt)
            return opt
        monkeypatch.setattr(Trainer, "build_optimizer", build)


def test_group_lr_ratios_are_kept_at_every_step(tmp_path, monkeypatch):
    rec = RecordingOptimizer(monkeypatch)
    r = make_tiny_recipe()
    r["param_groups"] = [{"match": "body.*", "lr_mult": 0.1}]
    result = lr_find(load_recipe(r), tmp_path, start_lr=1e-5, end_lr=1e-2, steps=20, quiet=True)
    assert len(rec.optimizers) == 1
    names = [g["name"] for g in rec.optimizers[0].param_groups]
    body = [i for i, n in enumerate(names) if n.startswith("body.*")]
    rest = [i for i in range(len(names)) if i not in body]
    assert body and rest
    assert len(rec.steps) == len(result["lrs"]) == 20
    for lrs, lr in zip(rec.steps, result["lrs"]):
        for i in rest:
            assert lrs[i] == pytest.approx(lr, rel=1e-12)           # the fastest group runs at the swept lr
        for i in body:
            assert lrs[i] == pytest.approx(0.1 * lr, rel=1e-12)     # 1:10 kept
    assert result["optimizer_lr"] == result["suggested"]


def test_lr_mult_above_one_and_frozen_groups(tmp_path, monkeypatch):
    rec = RecordingOptimizer(monkeypatch)
    r = make_tiny_recipe()
    r["model"]["hidden"] = [16, 16]
    r["param_groups"] = [{"match": "head", "lr_mult": 2.0}]
    r["phases"][0]["freeze"] = ["body.1"]
    result = lr_find(load_recipe(r), tmp_path, start_lr=1e-4, end_lr=1e-2, steps=10, quiet=True)
    opt = rec.optimizers[0]
    names = [g["name"] for g in opt.param_groups]
    frozen = [i for i, n in enumerate(names) if "frozen@" in n]
    head = [i for i, n in enumerate(names) if n.startswith("head")]
    assert frozen and head
    for lrs, lr in zip(rec.steps, result["lrs"]):
        assert all(lrs[i] == 0.0 for i in frozen)
        assert all(lrs[i] == pytest.approx(lr) for i in head)
        others = [i for i in range(len(names)) if i not in frozen + head]
        assert all(lrs[i] == pytest.approx(lr / 2) for i in others)
    for i in frozen:                                              # no gradient: frozen weights never move
        assert all(p.grad is None for p in opt.param_groups[i]["params"])
    # the sweep's lr is the head's; as the recipe's optimizer.lr it is half that
    for k, v in result["suggested"].items():
        assert result["optimizer_lr"][k] == pytest.approx(v / 2)


def test_a_fresh_model_is_trained_and_nothing_is_saved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = make_tiny_recipe()
    recipe = load_recipe(raw)
    yaml_before = recipe.to_yaml()
    user = Trainer(recipe, None, quiet=True)                     # a model the user holds
    weights = {k: v.clone() for k, v in user.state.model.state_dict().items()}
    rec = RecordingOptimizer(monkeypatch)
    lr_find(recipe, "lr", start_lr=1e-3, end_lr=1.0, steps=12, quiet=True)
    swept = rec.optimizers[0].param_groups[0]["params"][0]
    assert all(swept is not p for p in user.state.model.parameters())
    for k, v in user.state.model.state_dict().items():
        assert torch.equal(v, weights[k])                         # the user's model is untouched
    assert recipe.to_yaml() == yaml_before and raw == make_tiny_recipe()
    assert listing(tmp_path) == {"lr", "lr/lr_find.json", "lr/lr_find.png"}


@pytest.mark.parametrize("kwargs, message", [
    ({"start_lr": 1.0, "end_lr": 0.1}, "smaller than end_lr"),
    ({"start_lr": 0.1, "end_lr": 0.1}, "smaller than end_lr"),
    ({"start_lr": 0.0}, "positive"),
    ({"steps": 9}, "at least 10"),
    ({"smoothing": 1.0}, "smoothing"),
    ({"diverge_factor": 1.0}, "diverge_factor"),
])
def test_bad_arguments_raise_dojo_error_before_anything_is_built(tmp_path, kwargs, message):
    with pytest.raises(DojoError, match=message):
        lr_find(make_tiny_recipe(), tmp_path / "out", quiet=True, **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(make_tiny_recipe(), sort_keys=False))
    return path


def test_cli_runs_and_prints_the_suggestions(recipe_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cwd = tmp_path
    res = CliRunner().invoke(lr_find_command, [str(recipe_file), "phases.warm.batch_size=16",
                                               "--start-lr", "1e-4", "--steps", "40"])
    assert res.exit_code == 0, res.output
    assert listing(cwd) == {"lr_find", "lr_find/lr_find.json", "lr_find/lr_find.png"}   # default --out
    out = res.output
    assert "suggested lr (steepest descent):" in out and "suggested lr (minimum / 10):" in out
    assert "lr_find/lr_find.json" in out and "lr_find/lr_find.png" in out
    assert f"try: dojo train {recipe_file} phases.warm.batch_size=16 phases.0.optimizer.lr=" in out
    data = json.loads((Path(cwd) / "lr_find" / "lr_find.json").read_text())
    assert data["lrs"][0] == 1e-4 and len(data["lrs"]) <= 40
    assert f"{data['suggested']['steepest']:.2e}" in out


def test_cli_out_option_and_quiet(recipe_file, tmp_path):
    res = CliRunner().invoke(lr_find_command, [str(recipe_file), "--out", str(tmp_path / "o"), "-q",
                                               "--start-lr", "1e-3", "--end-lr", "1", "--steps", "10"])
    assert res.exit_code == 0, res.output
    assert not res.output.startswith("lr-find:")                   # quiet: results only
    assert (tmp_path / "o" / "lr_find.json").is_file() and (tmp_path / "o" / "lr_find.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--start-lr", "1", "--end-lr", "0.1"], "smaller than end_lr"),
    (["--steps", "5"], "at least 10"),
    (["phases.nope.steps=3"], "no list item named 'nope'"),
])
def test_cli_bad_arguments_exit_2_with_an_error_line(recipe_file, tmp_path, args, message):
    res = CliRunner().invoke(lr_find_command, [str(recipe_file), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], res.output
    assert res.output.strip().splitlines() == errors                # nothing else printed
    assert not (tmp_path / "o").exists()
