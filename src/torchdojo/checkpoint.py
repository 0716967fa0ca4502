"""Checkpoints: weights as safetensors, the rest of the trainer state as a tensor-only torch file
loaded with `weights_only=True`. Each checkpoint is a folder written under a temporary name, fsynced
and renamed, so a crash mid-save never leaves a half-written checkpoint under a real name. A
`manifest.json` records each file's size and sha256; loading checks it first and refuses a partial or
corrupted checkpoint, naming the reason."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import DojoError

WEIGHTS, STATE, MANIFEST = "model.safetensors", "state.pt", "manifest.json"
MANIFEST_FORMAT = 1
TMP_PREFIX = ".tmp-"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, names: tuple[str, ...] = (WEIGHTS, STATE)) -> None:
    """Record each file's size and sha256 in `folder/manifest.json` (fsynced)."""
    files = {n: {"bytes": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in names}
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def validate_checkpoint(path: Path) -> str | None:
    """None if the checkpoint folder matches its manifest, else the reason it cannot be trusted."""
    path = Path(path)
    if not path.is_dir():
        return "not a checkpoint folder"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (an incomplete or pre-manifest checkpoint)"
    except (OSError, ValueError) as exc:
        return f"unreadable {MANIFEST}: {exc}"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} has an unknown format"
    files = manifest["files"]
    for name in (WEIGHTS, STATE):
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        try:
            size, digest = int(entry["bytes"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            return f"{MANIFEST} entry for {name} is malformed"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size} (truncated or partial)"
        if _sha256(f) != digest:
            return f"{name} does not match its sha256 in {MANIFEST} (corrupted)"
    return None


def save_weights(model: torch.nn.Module, path: Path) -> None:
    # safetensors needs contiguous tensors; it writes them out without keeping references.
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def save_checkpoint(folder: Path, name: str, model: torch.nn.Module, state: dict, keep_last: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final, tmp = folder / name, folder / f"{TMP_PREFIX}{name}"
    for leftover in folder.glob(f"{TMP_PREFIX}*"):    # from an earlier save that crashed
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        save_weights(model, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
        for f in (tmp / WEIGHTS, tmp / STATE):
            _fsync(f)
        write_manifest(tmp)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(folder)
    for old in list_checkpoints(folder)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Step checkpoint folders, oldest first, valid or not (temporary `.tmp-*` folders are not listed)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if p.is_dir())


def latest_valid_checkpoint(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest step checkpoint that matches its manifest, and a warning for each newer one skipped."""
    warnings = []
    for path in reversed(list_checkpoints(Path(folder))):
        reason = validate_checkpoint(path)
        if reason is None:
            return path, warnings
        warnings.append(f"skipping checkpoint {path}: {reason}")
    return None, warnings


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(weights, state) of one checkpoint folder, checked against its manifest first; never unpickles
    arbitrary objects."""
    reason = validate_checkpoint(path)
    if reason is not None:
        raise DojoError(f"checkpoint {path} is not usable: {reason}")
    try:
        weights = load_file(str(path / WEIGHTS))
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # any corruption: say which checkpoint, never fall back to unsafe loading
        raise DojoError(f"checkpoint {path} cannot be read: {exc}") from None
    return weights, state
