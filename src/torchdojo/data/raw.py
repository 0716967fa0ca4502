"""The common shape every dataset factory returns before splitting."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass
class RawDataset:
    x: np.ndarray                      # (N, *input_shape), float
    y: np.ndarray                      # (N,) int64 class ids, or (N,) / (N, T) float targets
    task_type: Literal["classification", "regression"]
    kind: Literal["image", "sequence", "tabular"]
    class_names: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)
    # Some datasets come with their own test set (MNIST-1D); then only val is split off train.
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
