"""Checkpoints: weights as safetensors, the rest of the trainer state as a tensor-only torch file
loaded with `weights_only=True`. Each checkpoint is a folder written under a temporary name, fsynced
and renamed, so a crash mid-save never leaves a half-written checkpoint under a real name. A
`manifest.json` records each file's size and sha256; loading checks it first and refuses a partial or
corrupted checkpoint, naming the reason.

The same manifest guards what a finished run is evaluated with: the final weights
(`checkpoints/final/`, written like a checkpoint) and the snapshot ensemble's members
(`checkpoints/snapshots/`, whose manifest also fixes how many snapshots there are), so a flipped bit, a
deleted or an extra snapshot is refused instead of silently changing the metrics."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import fsync_dir
from .errors import DiskFull, DojoError

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


# Below this much free space, a failed write is taken to have failed for want of space.
DISK_FULL_BELOW = 16 << 20


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for want of space. An OSError says so (ENOSPC, EDQUOT); torch.save
    and safetensors do not: torch reports "iostream error" or "unexpected pos" in a RuntimeError. A write
    that fails for want of space leaves the device (nearly) full, so for other errors the free space
    left on the device decides."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(exc, Exception):      # KeyboardInterrupt, SystemExit: not a write failure
        return False
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BELOW
    except OSError:
        return False


def _fsync(path: Path) -> None:
    fsync_dir(path)         # opens read-only and fsyncs: works for files and folders alike


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_text(folder: Path, names) -> str:
    """The manifest of `names` in `folder`: each file's size and sha256."""
    files = {n: {"bytes": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in names}
    return json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=2) + "\n"


def write_manifest(folder: Path, names: tuple[str, ...] = (WEIGHTS, STATE)) -> None:
    """Record each file's size and sha256 in `folder/manifest.json` (fsynced)."""
    with open(folder / MANIFEST, "w") as f:
        f.write(manifest_text(folder, names))
        f.flush()
        os.fsync(f.fileno())


# A manifest is a few hundred bytes; anything much larger is not one (and json would spend its time on it).
MAX_MANIFEST_BYTES = 1 << 20


def validate_files(path: Path, required: tuple[str, ...], pattern: str | None = None) -> str | None:
    """None if folder `path` matches its manifest, else the reason it cannot be trusted. Every file the
    manifest lists must be there with its size and sha256, `required` names must be listed, and with
    `pattern` (a glob) the files matching it must be exactly the listed ones (no extra, none missing)."""
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    try:
        if (path / MANIFEST).stat().st_size > MAX_MANIFEST_BYTES:
            return f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes"
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete, or written before files had manifests)"
    except (OSError, ValueError, RecursionError) as exc:     # RecursionError: absurdly nested JSON
        return f"unreadable {MANIFEST}: {type(exc).__name__}: {_one_line(exc)}"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} has an unknown format"
    files = manifest["files"]
    for name in required:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    if pattern is not None:
        present = {p.name for p in path.glob(pattern)}
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        if extra:
            return f"{extra[0]} is not listed in {MANIFEST} (added after the run wrote it?)"
        if missing:
            return f"{missing[0]} is missing"
    for name, entry in files.items():
        f = path / name
        if "/" in name or name in (".", "..", MANIFEST) or not f.is_file():
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


def validate_checkpoint(path: Path) -> str | None:
    """None if the checkpoint folder matches its manifest, else the reason it cannot be trusted."""
    if not Path(path).is_dir():
        return "not a checkpoint folder"
    return validate_files(path, (WEIGHTS, STATE))


def save_weights(model: torch.nn.Module, path: Path) -> None:
    # safetensors needs contiguous tensors; it writes them out without keeping references.
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def save_final(folder: Path, model: torch.nn.Module) -> Path:
    """The final weights as `folder/final/` (weights and manifest), written under a temporary name and
    renamed like a checkpoint; a previous `final/` (a run finished again after a crash) is retired first."""
    final, tmp = folder / "final", folder / f"{TMP_PREFIX}final"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_weights(model, tmp / WEIGHTS)
        _fsync(tmp / WEIGHTS)
        write_manifest(tmp, (WEIGHTS,))
        _fsync(tmp)
    except BaseException as exc:
        full = is_disk_full(exc, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFull(f"no space left on the device of {folder} while writing the final weights") from exc
        raise
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    _fsync(folder)
    return final


def read_weights_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, any failure as one DojoError naming `what`."""
    try:
        return load_file(str(path))
    except Exception as exc:   # a corrupt file: say which, never fall back to another loader
        raise DojoError(f"{what} {path} cannot be read: {type(exc).__name__}: {_one_line(exc)}") from None


def read_final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """A finished run's final weights, checked against `checkpoints/final/manifest.json` first."""
    folder = Path(run_dir) / "checkpoints" / "final"
    reason = validate_files(folder, (WEIGHTS,))
    if reason is not None:
        raise DojoError(f"the final weights in {folder} are not usable: {reason}; "
                        f"retrain, or evaluate a checkpoint of the run")
    return read_weights_file(folder / WEIGHTS, "final weights")


def save_checkpoint(folder: Path, name: str, model: torch.nn.Module, state: dict, keep_last: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final, tmp = folder / name, folder / f"{TMP_PREFIX}{name}"
    remove_leftovers(folder)
    try:
        tmp.mkdir()
        save_weights(model, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
        for f in (tmp / WEIGHTS, tmp / STATE):
            _fsync(f)
        write_manifest(tmp)
        _fsync(tmp)
    except BaseException as exc:
        full = is_disk_full(exc, folder)      # before the partial folder is removed and frees its space
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFull(f"no space left on the device of {folder} while writing checkpoint {name}") from exc
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


def checkpoint_step(path: Path) -> int:
    """The step of a `step-N` or `step-N-k` checkpoint folder."""
    return _order(path)[0]


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
    """The gist of a loader's error on one line. torch's weights-only refusal is several lines around the
    one that matters (`Trying to load unsupported GLOBAL ...` or `WeightsUnpickler error: ...`), and its
    other lines advise re-running with weights_only=False, which would execute the file: that advice
    must never reach a user, so lines that mention weights_only are never chosen."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line.strip()) for line in str(exc).splitlines() if line.strip()]
    safe = [line for line in lines if "weights_only" not in line.lower() and "weights only" not in line.lower()]
    gist = next((line for line in safe if line.startswith("WeightsUnpickler error:")), None) \
        or (safe[0] if safe else None)
    if gist is None:
        return "the file holds objects other than tensors and plain containers (refused, not loaded)" \
            if lines else type(exc).__name__
    return gist[:300]


class CheckpointUnreadable(DojoError):
    """A checkpoint whose files match their manifest but cannot be loaded."""


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
        raise CheckpointUnreadable(f"checkpoint {path} cannot be read: {name}: {type(exc).__name__}: "
                                   f"{_one_line(exc)}") from None
    return weights, state
