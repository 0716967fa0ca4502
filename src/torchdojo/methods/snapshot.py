"""Snapshot ensembles: train once, keep the model at the end of every cosine cycle (Huang et al. 2017,
"Snapshot Ensembles: Train 1, get M for free", arXiv 1704.00109)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import save_file

from ..atomic import atomic_write_text, fsync_dir
from ..checkpoint import MANIFEST, MANIFEST_FORMAT, manifest_text, read_weights_file, validate_files
from ..ensemble import Ensemble
from ..errors import ConfigError, DojoError
from .base import Method

SNAPSHOT_DIR = Path("checkpoints") / "snapshots"
SNAPSHOT_GLOB = "snapshot-*.safetensors"


def snapshot_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / SNAPSHOT_DIR).glob(SNAPSHOT_GLOB))


def read_snapshots(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    """A finished run's snapshots, after checking the folder against its manifest: each file's size and
    sha256, and exactly the files it lists (a deleted or an added snapshot would change the ensemble)."""
    folder = run_dir / SNAPSHOT_DIR
    reason = validate_files(folder, (), pattern=SNAPSHOT_GLOB)
    if reason is not None:
        raise DojoError(f"the snapshots in {folder} are not usable: {reason}")
    return [read_weights_file(p, "snapshot") for p in snapshot_files(run_dir)]


def _name(index: int) -> str:
    return f"snapshot-{index:02d}.safetensors"


def _listed(folder: Path) -> dict:
    """The entries of the folder's manifest, {} when there is none or it cannot be read."""
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, RecursionError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def write_snapshots(folder: Path, snapshots: list[dict[str, torch.Tensor]]) -> None:
    """The newest snapshot as `snapshot-NN.safetensors` (N = len(snapshots)), then the folder's manifest
    listing snapshots 1..N. Earlier snapshots keep the manifest entries they were written with; one that
    is not listed (a resumed run whose folder lost it) is written again from memory, and files beyond N
    (written before a crash, past the checkpoint a run resumed from) are deleted, so the manifest and the
    folder always agree with the run."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [_name(k) for k in range(1, len(snapshots) + 1)]
    for path in folder.glob(SNAPSHOT_GLOB):
        if path.name not in names:
            path.unlink()
    listed = _listed(folder)
    entries = {}
    for name, weights in zip(names, snapshots):
        path = folder / name
        if name != names[-1] and name in listed and path.is_file():
            entries[name] = listed[name]
            continue
        tmp = folder / f".tmp-{name}"
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
        fsync_dir(tmp)          # opens read-only and fsyncs: a file here
        tmp.replace(path)
        entries[name] = json.loads(manifest_text(folder, [name]))["files"][name]
    atomic_write_text(folder / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=2) + "\n")


class SnapshotEnsemble(Method):
    """Save the weights at the end of each `cosine_restarts` cycle (of `phase`, default every phase that
    has one) into `checkpoints/snapshots/`; evaluation and prediction then also report the ensemble of
    the snapshots (mean of softmax probabilities by default) as `<split>/<label>/<metric>`."""

    def __init__(self, phase: Optional[str] = None, how: Literal["mean_prob", "mean_logprob", "mean"] = "mean_prob",
                 label: str = "ensemble"):
        self.phase, self.how, self.label = phase, how, label
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self._ends: set[int] = set()

    def on_fit_start(self, state) -> None:
        phases = [p for i, p in enumerate(state.recipe.phases)
                  if self.phase in (None, state.recipe.phase_name(i))
                  and any(s["name"] == "cosine_restarts" for s in p.schedule)]
        if not phases:
            where = f"phase '{self.phase}'" if self.phase else "any phase"
            raise ConfigError("methods", f"snapshot_ensemble needs a cosine_restarts schedule in {where}: "
                                         "snapshots are taken at the end of each cycle")
        self.snapshots = []

    def on_phase_start(self, state) -> None:
        wanted = self.phase in (None, state.phase_name)
        self._ends = set(state.schedule.cycle_ends()) if wanted else set()

    def on_step_skipped(self, state) -> None:
        # A skipped cycle end still ends the cycle: the unchanged weights are its snapshot.
        self.on_step_end(state)

    def on_step_end(self, state) -> None:
        if state.step_in_phase in self._ends:
            weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
            self.snapshots.append(weights)
            if state.run_dir is not None:
                write_snapshots(state.run_dir / SNAPSHOT_DIR, self.snapshots)

    def on_models(self, state, models: dict) -> dict:
        snapshots = self.snapshots
        if not snapshots and state.run_dir is not None:      # `dojo eval` / `predict` on a finished run
            snapshots = read_snapshots(state.run_dir) if (state.run_dir / SNAPSHOT_DIR).is_dir() else []
        if not snapshots:
            return models
        members = []
        for weights in snapshots:
            member = copy.deepcopy(state.model)
            member.load_state_dict(weights)
            members.append(member.eval())
        return {**models, self.label: Ensemble(members, self.how)}

    def state_dict(self) -> dict:
        return {"snapshots": self.snapshots}

    def load_state_dict(self, state: dict) -> None:
        self.snapshots = list(state["snapshots"])
