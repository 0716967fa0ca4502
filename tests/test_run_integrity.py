"""Issue 21: what a finished or stopped run is evaluated and resumed with is verified, never trusted.

- Final weights and snapshots carry a manifest (sizes, sha256, the snapshot count) checked on every
  load: before, one flipped sign bit in the final weights made `dojo eval` print another accuracy with
  exit 0, and a deleted or an extra snapshot silently changed the ensemble's metrics.
- A checkpoint whose files match their manifest but whose state.pt holds nonsense (a recomputed
  manifest over a crafted file) is refused with one line naming the key, and `dojo resume` falls back
  to the older good checkpoint instead of giving a traceback or a wrong run.
- A full disk during a checkpoint save ends with one line naming the last good checkpoint and the
  resume command, a summary with status `failed`, and exit code 75; nothing saved is lost."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from torchdojo.checkpoint import MANIFEST, STATE, WEIGHTS, list_checkpoints, write_manifest
from torchdojo.checkpoint_state import StateError
from torchdojo.cli import main
from torchdojo.recipe import load_recipe
from torchdojo.trainer import Trainer

from conftest import make_tiny_recipe
from helpers import assert_same_weights, final_weights

DOJO = str(Path(sys.executable).with_name("dojo"))


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *needles: str) -> str:
    """The command failed with exit 2 and printed one `error:` line holding every needle."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _snapshot_recipe() -> dict:
    r = make_tiny_recipe()
    r["phases"][1] = {"name": "cyc", "steps": 12, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05},
                      "schedule": [{"name": "cosine_restarts", "cycles": 3}]}
    r["methods"] = [{"name": "snapshot_ensemble"}]
    r["checkpoint"] = {"every_steps": 6, "keep_last": 100}
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("integrity")
    out = {}
    for name, recipe in (("plain", make_tiny_recipe()), ("snapshots", _snapshot_recipe())):
        recipe["checkpoint"] = {**recipe.get("checkpoint", {}), "keep_last": 100}
        Trainer(load_recipe(recipe), root / name, quiet=True).fit()
        out[name] = root / name
    return out


@pytest.fixture
def plain(runs, tmp_path) -> Path:
    shutil.copytree(runs["plain"], tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def snapshots(runs, tmp_path) -> Path:
    shutil.copytree(runs["snapshots"], tmp_path / "run")
    return tmp_path / "run"


def _flip_sign_of_a_bias(path: Path) -> None:
    """Flip the sign bit of the first value of the last bias tensor, in place (a valid safetensors file
    that evaluates to other metrics)."""
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}     # not views of the mapped file
    name = sorted(k for k in tensors if k.endswith("bias"))[-1]
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    start = 8 + header_len + header[name]["data_offsets"][0]
    data = bytearray(path.read_bytes())
    data[start + 3] ^= 0x80            # float32 little-endian: the sign is the top bit of byte 3
    path.write_bytes(bytes(data))
    assert not torch.equal(load_file(str(path))[name], tensors[name])


def test_a_flipped_bit_in_the_final_weights_is_refused_by_eval_and_predict(plain, tmp_path):
    assert _invoke("eval", plain, "-q").exit_code == 0
    _flip_sign_of_a_bias(plain / "checkpoints" / "final" / WEIGHTS)
    _one_line_error(_invoke("eval", plain, "-q"), "final weights", "sha256")
    import numpy as np
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 8), dtype=np.float32))
    _one_line_error(_invoke("predict", plain, "--input", tmp_path / "x.npz"), "final weights")
    # and as pretrained weights for another run
    r = make_tiny_recipe()
    r["init"] = {"run": str(plain)}
    with pytest.raises(Exception, match="sha256"):
        Trainer(load_recipe(r), None, quiet=True).fit()


def test_a_flipped_header_byte_and_a_missing_manifest_are_refused(plain):
    weights = plain / "checkpoints" / "final" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[10] ^= 0x01
    weights.write_bytes(bytes(data))
    _one_line_error(_invoke("eval", plain, "-q"), "final weights")
    (plain / "checkpoints" / "final" / MANIFEST).unlink()
    _one_line_error(_invoke("eval", plain, "-q"), "no manifest.json")


def test_final_weights_without_tensors_under_a_recomputed_manifest_are_one_line(plain):
    final = plain / "checkpoints" / "final"
    save_file({"unrelated": torch.zeros(1)}, str(final / WEIGHTS))
    write_manifest(final, (WEIGHTS,))
    _one_line_error(_invoke("eval", plain, "-q"), "do not fit the run's model")


def test_a_deleted_or_an_added_snapshot_is_refused(snapshots, tmp_path):
    folder = snapshots / "checkpoints" / "snapshots"
    names = sorted(p.name for p in folder.glob("snapshot-*.safetensors"))
    assert names == ["snapshot-01.safetensors", "snapshot-02.safetensors", "snapshot-03.safetensors"]
    assert json.loads((folder / MANIFEST).read_text())["files"].keys() == set(names)
    ok = _invoke("eval", snapshots, "-q")
    assert ok.exit_code == 0 and "ensemble" in ok.output, ok.output

    extra = tmp_path / "extra"
    shutil.copytree(snapshots, extra)
    shutil.copy(extra / "checkpoints/snapshots/snapshot-01.safetensors", extra / "checkpoints/snapshots/snapshot-04.safetensors")
    _one_line_error(_invoke("eval", extra, "-q"), "snapshot-04.safetensors is not listed")

    (folder / "snapshot-02.safetensors").unlink()
    _one_line_error(_invoke("eval", snapshots, "-q"), "snapshot-02.safetensors is missing")


def test_a_snapshot_written_before_a_crash_past_the_checkpoint_is_replaced_on_resume(snapshots, runs):
    """Resuming from the step-6 checkpoint (one snapshot taken) with all three snapshot files on disk:
    the run rewrites snapshots 2 and 3 and the manifest agrees with the folder."""
    for path in list_checkpoints(snapshots / "checkpoints"):
        if path.name > "step-00000024":
            shutil.rmtree(path)
    (snapshots / "summary.json").unlink()
    shutil.rmtree(snapshots / "checkpoints" / "final")
    assert _invoke("resume", snapshots, "-q").exit_code == 0
    ok = _invoke("eval", snapshots, "-q")
    assert ok.exit_code == 0, ok.output
    assert_same_weights(final_weights(snapshots), final_weights(runs["snapshots"]))


# -- crafted trainer state under a recomputed manifest ----------------------------------------------

def _craft(checkpoint: Path, change) -> None:
    state = torch.load(checkpoint / STATE, weights_only=True)
    change(state)
    torch.save(state, checkpoint / STATE)
    write_manifest(checkpoint)          # the manifest now vouches for the crafted file


CRAFTED = {
    "missing key": (lambda s: s.pop("optimizer"), "`optimizer` is missing"),
    "string step": (lambda s: s.update(step="21"), "`step` is str"),
    "bad torch RNG state": (lambda s: s["rng"].update(torch=s["rng"]["torch"][:100]), "`rng`"),
    "bad python RNG state": (lambda s: s["rng"].update(python=[3, [1, 2], None]), "`rng`"),
    "phase 99": (lambda s: s.update(phase_index=99), "`phase_index` is 99"),
    "negative metrics lines": (lambda s: s.update(metrics_lines=-5), "`metrics_lines` is -5"),
    "inconsistent step": (lambda s: s.update(step=3), "`step` is 3"),
    "optimizer of another shape": (lambda s: s["optimizer"]["param_groups"].append(s["optimizer"]["param_groups"][0]),
                                   "does not fit"),
}


def _unfinish(run: Path) -> None:
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "final")


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_state_is_refused_naming_the_key(plain, case):
    change, needle = CRAFTED[case]
    _unfinish(plain)
    newest = list_checkpoints(plain / "checkpoints")[-1]
    _craft(newest, change)
    trainer = Trainer(load_recipe(make_tiny_recipe() | {"checkpoint": {"keep_last": 100}}), plain, quiet=True)
    with pytest.raises(StateError) as info:
        trainer.load_checkpoint(newest)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["phase 99", "negative metrics lines", "bad torch RNG state", "optimizer of another shape"])
def test_resume_falls_back_past_a_crafted_checkpoint_and_finishes_like_the_uninterrupted_run(plain, runs, case):
    change, needle = CRAFTED[case]
    _unfinish(plain)
    _craft(list_checkpoints(plain / "checkpoints")[-1], change)
    with pytest.warns(UserWarning, match="skipping checkpoint") as caught:
        result = _invoke("resume", plain, "-q")
    assert result.exit_code == 0, result.output
    assert needle in str(caught[0].message)
    assert_same_weights(final_weights(plain), final_weights(runs["plain"]))
    assert json.loads((plain / "summary.json").read_text())["steps"] == 22


def test_a_malicious_state_never_suggests_weights_only_false(plain, tmp_path):
    import os as _os

    class Evil:
        def __reduce__(self):
            return (_os.system, (f"touch {tmp_path / 'PWNED'}",))
    _unfinish(plain)
    for checkpoint in list_checkpoints(plain / "checkpoints"):
        torch.save({"x": Evil()}, checkpoint / STATE)
        write_manifest(checkpoint)
    with pytest.warns(UserWarning, match="skipping checkpoint") as caught:
        result = _invoke("resume", plain, "-q")
    assert result.exit_code == 2 and not (tmp_path / "PWNED").exists()
    said = result.output + "".join(str(w.message) for w in caught)
    assert "unsupported GLOBAL" in said and "weights_only" not in said.lower()


# -- a full disk -----------------------------------------------------------------------------------

def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_full_disk_during_a_checkpoint_is_one_line_exit_75_and_resumes_after(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2m"):
        pytest.skip("mounting a 2 MB tmpfs needs root")
    try:
        r = make_tiny_recipe()
        r["model"] = {"name": "mlp", "hidden": [256, 256]}     # ~0.8 MB per checkpoint (weights + AdamW)
        r["checkpoint"] = {"every_steps": 4, "keep_last": 100}
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(r))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([DOJO, "train", str(recipe), "--run-dir", str(disk / "run"), "-q"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 75, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "no space left" in lines[0] and f"dojo resume {disk / 'run'}" in lines[0]
        assert "the last good checkpoint is step-0000000" in lines[0]
        summary = json.loads((disk / "run" / "summary.json").read_text())
        assert summary["status"] == "failed" and "no space left" in summary["error"]
        # Space freed (the run moved to a roomy disk): resume finishes exactly like an undisturbed run.
        shutil.copytree(disk / "run", tmp_path / "moved")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    result = _invoke("resume", tmp_path / "moved", "-q")
    assert result.exit_code == 0, result.output
    Trainer(load_recipe(r), tmp_path / "reference", quiet=True).fit()
    assert_same_weights(final_weights(tmp_path / "moved"), final_weights(tmp_path / "reference"))


def test_a_manifest_nested_100k_levels_deep_is_one_line_not_a_recursion_error(plain):
    deep = "[" * 100_000 + "]" * 100_000
    (plain / "checkpoints" / "final" / MANIFEST).write_text(deep)
    _one_line_error(_invoke("eval", plain, "-q"), "unreadable manifest.json")
    _unfinish(plain)
    newest = list_checkpoints(plain / "checkpoints")[-1]
    (newest / MANIFEST).write_text(deep)
    with pytest.warns(UserWarning, match=f"skipping checkpoint {newest}: unreadable manifest.json"):
        result = _invoke("resume", plain, "-q")
    assert result.exit_code == 0, result.output
