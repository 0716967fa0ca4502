"""Checkpoint integrity: manifest with sizes and sha256, atomic saves, validation on load, and
fallback to the newest good checkpoint when resuming."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import torchdojo.checkpoint as ckpt
from torchdojo.checkpoint import (MANIFEST, STATE, WEIGHTS, latest_valid_checkpoint, list_checkpoints,
                                  load_checkpoint, save_checkpoint, validate_checkpoint)
from torchdojo.cli import main
from torchdojo.errors import DojoError
from torchdojo.recipe import load_recipe
from torchdojo.trainer import Trainer

from conftest import make_tiny_recipe


def _recipe() -> dict:
    r = make_tiny_recipe()
    r["checkpoint"] = {"every_steps": 4, "keep_last": 3}
    return r


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    Trainer(load_recipe(_recipe()), run_dir, quiet=True).fit()
    return run_dir


@pytest.fixture
def interrupted_run(finished_run, tmp_path) -> Path:
    """A copy of the finished run that looks unfinished: no summary, no final weights."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "final")
    return run_dir


def _steps(run_dir: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run_dir / "checkpoints")]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_records_sizes_and_hashes(finished_run):
    steps = list_checkpoints(finished_run / "checkpoints")
    assert [p.name for p in steps] == ["step-00000018", "step-00000020", "step-00000022"]
    for path in steps:
        manifest = json.loads((path / MANIFEST).read_text())
        assert manifest["format"] == 1 and set(manifest["files"]) == {WEIGHTS, STATE}
        for name, entry in manifest["files"].items():
            data = (path / name).read_bytes()
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert validate_checkpoint(path) is None
    assert not list((finished_run / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("target", ["safetensors", "torch"])
def test_failed_save_keeps_previous_checkpoint_and_leaves_no_partial_folder(tmp_path, monkeypatch, target):
    folder = tmp_path / "checkpoints"
    model = torch.nn.Linear(3, 2)
    good = save_checkpoint(folder, "step-00000001", model, {"step": 1}, keep_last=3)
    before = {n: (good / n).read_bytes() for n in (WEIGHTS, STATE, MANIFEST)}

    def boom(*args, **kwargs):
        raise OSError("disk full")
    if target == "safetensors":
        monkeypatch.setattr(ckpt, "save_file", boom)
    else:
        monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(folder, "step-00000002", model, {"step": 2}, keep_last=3)
    monkeypatch.undo()

    assert sorted(p.name for p in folder.iterdir()) == ["step-00000001"]
    assert {n: (good / n).read_bytes() for n in before} == before
    assert validate_checkpoint(good) is None
    path, warnings = latest_valid_checkpoint(folder)
    assert path == good and warnings == []


def test_leftover_tmp_folder_is_ignored_and_removed_on_next_save(tmp_path):
    folder = tmp_path / "checkpoints"
    model = torch.nn.Linear(3, 2)
    good = save_checkpoint(folder, "step-00000001", model, {"step": 1}, keep_last=3)
    (folder / ".tmp-step-00000002").mkdir()
    (folder / ".tmp-step-00000002" / WEIGHTS).write_bytes(b"partial")
    assert list_checkpoints(folder) == [good]
    assert latest_valid_checkpoint(folder) == (good, [])
    save_checkpoint(folder, "step-00000003", model, {"step": 3}, keep_last=3)
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000001", "step-00000003"]


@pytest.mark.parametrize("name", [WEIGHTS, STATE])
@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_corrupt_newest_checkpoint_falls_back_to_previous(interrupted_run, name, damage):
    newest = interrupted_run / "checkpoints" / "step-00000022"
    damage(newest / name)
    reason = validate_checkpoint(newest)
    assert reason is not None and name in reason
    with pytest.raises(DojoError, match="step-00000022.*" + name.replace(".", r"\.")):
        load_checkpoint(newest)

    with pytest.warns(UserWarning, match="skipping checkpoint .*step-00000022"):
        trainer = Trainer.from_run_dir(interrupted_run, quiet=True)
    assert trainer.checkpoint_step == 20


def test_cli_resume_after_corruption_finishes(interrupted_run):
    _flip(interrupted_run / "checkpoints" / "step-00000022" / WEIGHTS)
    _truncate(interrupted_run / "checkpoints" / "step-00000020" / STATE)
    with pytest.warns(UserWarning) as record:
        res = CliRunner().invoke(main, ["resume", str(interrupted_run), "-q"])
    assert res.exit_code == 0, res.output
    texts = [str(w.message) for w in record]
    assert any("step-00000022" in t for t in texts) and any("step-00000020" in t for t in texts)
    summary = json.loads((interrupted_run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 22
    assert validate_checkpoint(interrupted_run / "checkpoints" / "step-00000022") is None


def test_cli_resume_when_all_checkpoints_corrupt_exits_2(interrupted_run):
    for path in list_checkpoints(interrupted_run / "checkpoints"):
        _flip(path / STATE)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        res = CliRunner().invoke(main, ["resume", str(interrupted_run), "-q"])
    assert res.exit_code == 2
    assert "no checkpoint to resume from" in res.output


def test_explicit_invalid_checkpoint_is_refused(interrupted_run):
    newest = interrupted_run / "checkpoints" / "step-00000022"
    _truncate(newest / WEIGHTS)
    with pytest.raises(DojoError, match="step-00000022.*truncated"):
        Trainer.from_run_dir(interrupted_run, quiet=True, checkpoint=newest)


def test_checkpoint_without_manifest_is_refused(interrupted_run):
    newest = interrupted_run / "checkpoints" / "step-00000022"
    (newest / MANIFEST).unlink()
    assert "manifest.json" in validate_checkpoint(newest)
    with pytest.raises(DojoError, match="step-00000022.*no manifest.json"):
        load_checkpoint(newest)
    with pytest.raises(DojoError, match="no manifest.json"):
        Trainer.from_run_dir(interrupted_run, quiet=True, checkpoint=newest)
    with pytest.warns(UserWarning, match="no manifest.json"):
        assert Trainer.from_run_dir(interrupted_run, quiet=True).checkpoint_step == 20


def test_resaves_of_a_step_never_replace_a_checkpoint_and_the_newest_survives_pruning(tmp_path):
    """A step saved again (after the epoch's validation) goes under `step-N-k`, one past the highest
    repeat, so with keep_last: 1 the newest save is always the one kept."""
    folder, model = tmp_path / "checkpoints", torch.nn.Linear(3, 2)
    names = [save_checkpoint(folder, "step-00000016", model, {"lines": k}, keep_last=1).name for k in range(4)]
    assert names == ["step-00000016", "step-00000016-1", "step-00000016-2", "step-00000016-3"]
    latest, _ = latest_valid_checkpoint(folder)
    assert latest.name == "step-00000016-3" and load_checkpoint(latest)[1] == {"lines": 3}
    assert [p.name for p in folder.iterdir()] == ["step-00000016-3"]
    # Steps still order numerically around their repeats.
    save_checkpoint(folder, "step-00000017", model, {"lines": 9}, keep_last=2)
    assert _steps(tmp_path) == ["step-00000016-3", "step-00000017"]


def test_a_damaged_checkpoint_under_the_name_is_replaced(tmp_path):
    folder, model = tmp_path / "checkpoints", torch.nn.Linear(3, 2)
    first = save_checkpoint(folder, "step-00000004", model, {"v": 1}, keep_last=3)
    _truncate(first / STATE)
    again = save_checkpoint(folder, "step-00000004", model, {"v": 2}, keep_last=3)
    assert again.name == "step-00000004" and load_checkpoint(again)[1] == {"v": 2}


def test_finishing_a_run_removes_leftovers_of_crashed_saves(interrupted_run):
    (interrupted_run / "checkpoints" / ".tmp-old-step-00000008").mkdir()
    res = CliRunner().invoke(main, ["resume", str(interrupted_run), "-q"])
    assert res.exit_code == 0, res.output
    assert not list((interrupted_run / "checkpoints").glob(".tmp-*"))


def test_resume_refuses_a_recipe_yaml_that_differs_from_the_checkpoint(interrupted_run):
    path = interrupted_run / "recipe.yaml"
    path.write_text(path.read_text().replace("steps: 18", "steps: 9"))
    before = sorted(p.name for p in (interrupted_run / "checkpoints").iterdir())
    res = CliRunner().invoke(main, ["resume", str(interrupted_run), "-q"])
    assert res.exit_code == 2
    assert "recipe.yaml differs from the recipe saved in checkpoint" in res.stderr and "Traceback" not in res.output
    assert sorted(p.name for p in (interrupted_run / "checkpoints").iterdir()) == before
