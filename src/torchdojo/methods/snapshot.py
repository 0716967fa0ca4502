"""Snapshot ensembles: train once, keep the model at the end of every cosine cycle (Huang et al. 2017,
"Snapshot Ensembles: Train 1, get M for free", arXiv 1704.00109)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import load_file, save_file

from ..ensemble import Ensemble
from ..errors import ConfigError, DojoError
from .base import Method

SNAPSHOT_DIR = Path("checkpoints") / "snapshots"


def snapshot_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / SNAPSHOT_DIR).glob("snapshot-*.safetensors"))


def _read_snapshot(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:   # a corrupt file: say which, never fall back to another loader
        raise DojoError(f"snapshot {path} cannot be read: {exc}") from None


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
                folder = state.run_dir / SNAPSHOT_DIR
                folder.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in weights.items()},
                          str(folder / f"snapshot-{len(self.snapshots):02d}.safetensors"))

    def on_models(self, state, models: dict) -> dict:
        snapshots = self.snapshots
        if not snapshots and state.run_dir is not None:      # `dojo eval` / `predict` on a finished run
            snapshots = [_read_snapshot(p) for p in snapshot_files(state.run_dir)]
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
