"""Checkpoints: weights as safetensors, the rest of the trainer state as a tensor-only torch file
loaded with `weights_only=True`. Each checkpoint is a folder written under a temporary name, fsynced
and renamed, so a crash mid-save never leaves a half-written checkpoint under a real name. A
`manifest.json` records each file's size and sha256; loading checks it first and refuses a partial or
corrupted checkpoint, naming the reason."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import fsync_dir
from .errors import DojoError

WEIGHTS, STATE, MANIFEST = "model.safetensors", "state.pt", "manifest.json"
MANIFEST_FORMAT = 1
TMP_PREFIX = ".tmp-"
# torch.load(weights_only=True) before 2.6 can be made to run code by a crafted file (CVE-2025-32434).
MIN_TORCH_FOR_LOADING = (2, 6)


def _torch_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of a torch version string such as '2.5.1+cpu' or '2.6.0a0+git1234'."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(text))
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_torch_can_load(what: str) -> None:
    """Refuse to unpickle checkpoint state with a torch whose `weights_only=True` is not safe."""
    version = _torch_version(torch.__version__)
    if version is None or version < MIN_TORCH_FOR_LOADING:
        need = ".".join(map(str, MIN_TORCH_FOR_LOADING))
        raise DojoError(f"{what}: loading checkpoints needs torch >= {need}, this is torch {torch.__version__} "
                        f"(older torch.load(weights_only=True) can run code from a crafted file, "
                        f"CVE-2025-32434); upgrade torch")


def _fsync(path: Path) -> None:
    fsync_dir(path)         # opens read-only and fsyncs: works for files and folders alike


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
    remove_leftovers(folder)
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
    # A second save of the same step (the epoch's end after a step save) gets its own name, so no
    # valid folder is ever replaced: at every moment the previous checkpoint is still there under its
    # name. A damaged one under the name (a resume fell back past it) holds nothing worth keeping.
    if final.exists() and validate_checkpoint(final) is not None:
        _remove(final)
    step = _order(final)[0]
    repeats = [_order(p)[1] for p in folder.glob(f"{name}*") if p.is_dir() and _order(p)[0] == step]
    if repeats:                 # after the highest repeat, so it also sorts last when older ones are gone
        final = folder / f"{name}-{max(repeats) + 1}"
    os.replace(tmp, final)
    _fsync(folder)
    for old in list_checkpoints(folder)[:-keep_last]:
        _remove(old)
    return final


def remove_leftovers(folder: Path) -> None:
    """Delete `.tmp-*` folders: saves or deletions that a crash interrupted (never listed as checkpoints)."""
    for leftover in Path(folder).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint folder invisibly: rename it to a temporary name first, so a crash midway
    leaves a `.tmp-` folder (cleaned up by the next save), never a half-deleted one under a real name."""
    doomed = checkpoint.with_name(f"{TMP_PREFIX}old-{checkpoint.name}")
    try:
        os.replace(checkpoint, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _order(path: Path) -> tuple[int, int]:
    """(step, repeat) of `step-N` or `step-N-k` (k-th re-save of step N)."""
    parts = path.name.split("-")
    try:
        return int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
    except (IndexError, ValueError):
        return -1, 0


def list_checkpoints(folder: Path) -> list[Path]:
    """Step checkpoint folders, oldest first, valid or not (temporary `.tmp-*` folders are not listed)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("step-*") if p.is_dir()), key=lambda p: (_order(p), p.name))


def latest_valid_checkpoint(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest step checkpoint that matches its manifest, and a warning for each newer one skipped."""
    warnings = []
    for path in reversed(list_checkpoints(Path(folder))):
        reason = validate_checkpoint(path)
        if reason is None:
            return path, warnings
        warnings.append(f"skipping checkpoint {path}: {reason}")
    return None, warnings


def _one_line(exc: BaseException) -> str:
    """The gist of a loader's error on one line: torch's weights-only refusal is several lines of advice
    (including how to load unsafely) around one `WeightsUnpickler error: ...` line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    gist = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0])
    return re.sub(r"\x1b\[[0-9;]*m", "", gist)


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(weights, state) of one checkpoint folder, checked against its manifest first; never unpickles
    arbitrary objects, and refuses to load at all with a torch older than 2.6."""
    check_torch_can_load(f"checkpoint {path}")
    reason = validate_checkpoint(path)
    if reason is not None:
        raise DojoError(f"checkpoint {path} is not usable: {reason}")
    name = WEIGHTS
    try:
        weights = load_file(str(path / WEIGHTS))
        name = STATE
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # any corruption: say which checkpoint, never fall back to unsafe loading
        raise DojoError(f"checkpoint {path} cannot be read: {name}: {type(exc).__name__}: {_one_line(exc)}") from None
    return weights, state
