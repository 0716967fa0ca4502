"""Stochastic weight averaging (Izmailov et al. 2018, arXiv 1803.05407): average the weights visited
late in training, then recompute BatchNorm statistics for the averaged weights."""
from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
from torch import nn

from ..data import TensorLoader
from .base import Method


@torch.no_grad()
def swa_update(average: nn.Module, model: nn.Module, n_averaged: int) -> None:
    """average <- average + (model - average) / (n_averaged + 1): the running mean of the parameters.
    Buffers are copied (BatchNorm statistics are recomputed at the end instead)."""
    for a, p in zip(average.parameters(), model.parameters()):
        a.lerp_(p.detach(), 1.0 / (n_averaged + 1))
    for a, b in zip(average.buffers(), model.buffers()):
        a.copy_(b)


@torch.no_grad()
def recompute_bn(model: nn.Module, inputs: Iterable[torch.Tensor]) -> None:
    """Set every BatchNorm layer's running mean and (unbiased) variance to those of its inputs over one
    pass through `inputs` in train mode, exact over all batches (not an average of per-batch statistics,
    which is off when batches differ in size).

    Each batch's mean and sum of squared deviations (two passes over the batch, in float64) are merged
    into the running totals with Chan, Golub & LeVeque's (1979) pairwise update. The one-pass
    sum(x^2) - n*mean^2 cancels catastrophically when |mean| >> std (1.8 % off at mean 1e5, std 1e-2)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    totals: dict[nn.Module, tuple] = {m: (0, 0.0, 0.0) for m in norms}     # rows, mean, sum of squared deviations

    def accumulate(module, args):
        x = args[0].detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        rows = x.numel() // x.shape[1]
        if rows == 0:
            return
        mean = x.mean(dims, keepdim=True)
        m2 = (x - mean).square_().sum(dims)
        mean = mean.flatten()
        n, total_mean, total_m2 = totals[module]
        delta = mean - total_mean
        merged = n + rows
        totals[module] = (merged, total_mean + delta * (rows / merged),
                          total_m2 + m2 + delta.square() * (n * rows / merged))

    handles = [m.register_forward_pre_hook(accumulate) for m in norms]
    was_training = model.training
    model.train()
    try:
        for x in inputs:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for m in norms:
        n, mean, m2 = totals[m]
        if n < 2:
            continue
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_((m2 / (n - 1)).to(m.running_var.dtype))


class SWA(Method):
    """Average the weights in `phase` (default: the last phase) at the end of every epoch, or every
    `every_steps` steps, and at the phase's last step; the final model is the average, with BatchNorm
    statistics recomputed on the training data (`bn_update`)."""

    def __init__(self, phase: Optional[str] = None, every_steps: Optional[int] = None, bn_update: bool = True):
        if every_steps is not None and every_steps < 1:
            raise ValueError("every_steps must be at least 1")
        self.phase, self.every_steps, self.bn_update = phase, every_steps, bn_update
        self.average: nn.Module | None = None
        self.n_averaged = 0

    def on_fit_start(self, state) -> None:
        names = [state.recipe.phase_name(i) for i in range(len(state.recipe.phases))]
        if self.phase is None:
            self.phase = names[-1]
        elif self.phase not in names:
            from ..errors import ConfigError, did_you_mean
            raise ConfigError("methods", f"swa: no phase '{self.phase}'{did_you_mean(self.phase, names)}")
        self.average = copy.deepcopy(state.model).requires_grad_(False)
        self.n_averaged = 0

    def on_step_end(self, state) -> None:
        if state.phase_name != self.phase:
            return
        if self.every_steps is not None:
            due = state.step_in_phase % self.every_steps == 0
        else:
            due = state.batch_in_epoch == state.steps_per_epoch
        if due or state.step_in_phase == state.phase_steps:
            swa_update(self.average, state.model, self.n_averaged)
            self.n_averaged += 1

    def on_fit_end(self, state, model):
        if self.n_averaged == 0:
            return model
        if self.bn_update:
            loader = TensorLoader(state.data.train, batch_size=256)
            recompute_bn(self.average, (batch["x"] for batch in loader))
        return self.average.eval()

    def state_dict(self) -> dict:
        return {"average": self.average.state_dict(), "n_averaged": self.n_averaged}

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state["average"])
        self.n_averaged = state["n_averaged"]
