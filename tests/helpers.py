"""Helpers shared by the trainer-level tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from torchdojo import Trainer, load_recipe


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_entries(entries: list[dict]) -> list[dict]:
    return [e for e in entries if "train/loss" in e]


# Measurements of the machine, not of the training: they legitimately differ between identical runs.
MACHINE_KEYS = ("train/samples_per_sec", "diag/samples_per_sec", "diag/peak_memory_mb")


def comparable(entries: list[dict]) -> list[dict]:
    """Entries without wall-clock throughput and memory, which legitimately differ between runs."""
    return [{k: v for k, v in e.items() if k not in MACHINE_KEYS} for e in entries]


def fit(recipe: dict, run_dir: Path | None) -> tuple[Trainer, dict]:
    trainer = Trainer(load_recipe(recipe), run_dir, quiet=True)
    return trainer, trainer.fit()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "final" / "model.safetensors"))


def assert_same_opt_state(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k], k
