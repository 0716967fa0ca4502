"""Exponential moving average of the weights, evaluated instead of the raw weights (Polyak & Juditsky
1992; as used in Tan & Le 2019, arXiv 1905.11946)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .base import Method


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model, for parameters and float buffers (BatchNorm
    statistics); integer buffers are copied."""
    avg_p = [p for p in average.parameters()]
    new_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(avg_p, new_p, 1.0 - decay)
    for a, b in zip(average.buffers(), model.buffers()):
        if a.dtype.is_floating_point:
            a.lerp_(b, 1.0 - decay)
        else:
            a.copy_(b)


def warmed_up_decay(decay: float, updates: int) -> float:
    """min(decay, (1 + n) / (10 + n)) after n earlier updates, as TensorFlow's ExponentialMovingAverage
    does with num_updates: early averages forget the random initialisation quickly."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class EMA(Method):
    """Keep an averaged copy of the model, updated every `every_steps` optimizer steps from
    `start_step` on, and evaluate, test and save the averaged copy. With `warmup` (default) the decay
    grows from 0.1 towards `decay` over the first updates (`warmed_up_decay`)."""

    def __init__(self, decay: float = 0.999, every_steps: int = 1, start_step: int = 0, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError("decay must be in (0, 1)")
        self.decay, self.every_steps, self.start_step, self.warmup = decay, every_steps, start_step, warmup
        self.updates = 0
        self.average: nn.Module | None = None

    def on_fit_start(self, state) -> None:
        self.average = copy.deepcopy(state.model).eval().requires_grad_(False)

    def on_step_end(self, state) -> None:
        if state.step < self.start_step:
            self.average.load_state_dict(state.model.state_dict())
        elif state.step % self.every_steps == 0:
            decay = warmed_up_decay(self.decay, self.updates) if self.warmup else self.decay
            ema_update(self.average, state.model, decay)
            self.updates += 1

    def on_eval_model(self, state, model):
        return self.average

    def state_dict(self) -> dict:
        return {"average": self.average.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state["average"])
        self.updates = state["updates"]
