"""Gradient clipping by global norm (Pascanu et al. 2012, arXiv 1211.5063)."""
from __future__ import annotations

import torch

from .base import Method


class GradClip(Method):
    """Rescale gradients so their global `norm_type`-norm is at most `max_norm`; logs the norm before
    clipping as `train/grad_norm`. Plain-loop equivalent: `torch.nn.utils.clip_grad_norm_`."""

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0):
        if max_norm <= 0:
            raise ValueError("max_norm must be positive")
        self.max_norm, self.norm_type = max_norm, norm_type
        self._params: list[torch.Tensor] = []

    def on_fit_start(self, state) -> None:
        self._params = [p for p in state.model.parameters()]

    def on_after_backward(self, state) -> None:
        norm = torch.nn.utils.clip_grad_norm_(self._params, self.max_norm, self.norm_type)
        state.step_logs["train/grad_norm"] = norm
