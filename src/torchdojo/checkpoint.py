"""Checkpoints: weights as safetensors, the rest of the trainer state as a tensor-only torch file
loaded with `weights_only=True`. Each checkpoint is a folder written under a temporary name, fsynced
and renamed, so a crash mid-save never leaves a half-written checkpoint under a real name."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import DojoError

WEIGHTS, STATE = "model.safetensors", "state.pt"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    # safetensors needs contiguous tensors; it writes them out without keeping references.
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def save_checkpoint(folder: Path, name: str, model: torch.nn.Module, state: dict, keep_last: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final, tmp = folder / name, folder / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(model, tmp / WEIGHTS)
    torch.save(state, tmp / STATE)
    for f in (tmp / WEIGHTS, tmp / STATE, tmp):
        _fsync(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(folder)
    for old in list_checkpoints(folder)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Step checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if p.is_dir() and (p / STATE).is_file())


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(weights, state) of one checkpoint folder; never unpickles arbitrary objects."""
    try:
        weights = load_file(str(path / WEIGHTS))
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # any corruption: say which checkpoint, never fall back to unsafe loading
        raise DojoError(f"checkpoint {path} cannot be read: {exc}") from None
    return weights, state
