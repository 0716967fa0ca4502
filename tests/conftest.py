"""Shared fixtures for the torchdojo test suite."""
from __future__ import annotations

import copy

import pytest
import torch

# The test models are tiny: one intra-op thread is several times faster than two threads competing
# on a 2-core machine, and it makes in-process runs comparable with the CLI subprocesses (which the
# CLI tests start with OMP_NUM_THREADS=1).
torch.set_num_threads(1)

TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    # 400 rows: about 280 train, 40 val, 80 test (8 steps per epoch at batch size 32).
    "data": {"name": "synthetic_tabular", "n_samples": 400, "n_features": 8, "n_informative": 5,
             "n_classes": 3, "class_sep": 1.5},
    "model": {"name": "mlp", "hidden": [16]},
    "task": {"name": "classify"},
    "phases": [
        {"name": "warm", "steps": 18, "batch_size": 32,
         "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
         "schedule": [{"name": "warmup", "steps": 3}, {"name": "cosine"}]},
        {"name": "settle", "epochs": 1, "batch_size": 64,        # 4 steps
         "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}},
    ],
    "log": {"every_steps": 1},
}


def make_tiny_recipe() -> dict:
    """A fresh copy of the tiny recipe (a plain dict, ready for `torchdojo.load_recipe`)."""
    return copy.deepcopy(TINY_RECIPE)


@pytest.fixture
def tiny_recipe() -> dict:
    """A small two-phase recipe (synthetic_tabular + 1-hidden-layer MLP, 22 steps) that trains in
    about a second. Each test gets its own copy and may modify it."""
    return make_tiny_recipe()
