"""Learning-rate schedules as pure functions of the step, returning a multiplier of the base LR.

A recipe gives a list of segments joined end to end, e.g. `[{name: warmup, steps: 50}, {name: cosine}]`.
Each segment's length is in explicit units, `steps` or `epochs` (fractions allowed); one segment may
omit its length and then fills the rest of the phase. After the last segment its final value holds.
`as_lambda_lr` plugs any of these into torch's LambdaLR for use in a plain loop."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Segment:
    """`fn(t, n, steps_per_epoch)` is the multiplier at step t (0-based) of a segment lasting n steps."""
    fn: Callable[[int, int, int], float]
    steps: int | None = None
    epochs: float | None = None

    def __post_init__(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give a schedule segment's length in `steps` or in `epochs`, not both")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise ValueError("a schedule segment's length must be positive")

    def length(self, steps_per_epoch: int) -> int | None:
        if self.epochs is not None:
            return max(1, round(self.epochs * steps_per_epoch))
        return self.steps


def constant(value: float = 1.0, steps: int | None = None, epochs: float | None = None) -> Segment:
    """A constant multiplier of the base LR."""
    return Segment(lambda t, n, spe: value, steps, epochs)


def warmup(steps: int | None = None, epochs: float | None = None, start_factor: float = 0.0) -> Segment:
    """Linear warmup from `start_factor` to 1, reaching the base LR on its last step (Goyal et al. 2017,
    arXiv 1706.02677)."""
    if steps is None and epochs is None:
        raise ValueError("warmup needs a length: `steps` or `epochs`")
    return Segment(lambda t, n, spe: start_factor + (1.0 - start_factor) * min(t + 1, n) / n, steps, epochs)


def cosine(steps: int | None = None, epochs: float | None = None, min_factor: float = 0.0) -> Segment:
    """Cosine annealing from 1 down to `min_factor` (Loshchilov & Hutter 2016, arXiv 1608.03983)."""
    return Segment(lambda t, n, spe: min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t / n)),
                   steps, epochs)


def step(every_steps: int | None = None, every_epochs: float | None = None, gamma: float = 0.1,
         steps: int | None = None, epochs: float | None = None) -> Segment:
    """Multiply by `gamma` every `every_steps` steps (or every `every_epochs` epochs)."""
    if (every_steps is None) == (every_epochs is None):
        raise ValueError("step schedule: give exactly one of `every_steps` or `every_epochs`")

    def fn(t: int, n: int, spe: int) -> float:
        every = every_steps if every_steps is not None else max(1, round(every_epochs * spe))
        return gamma ** (t // every)
    return Segment(fn, steps, epochs)


SCHEDULES = {"constant": constant, "warmup": warmup, "cosine": cosine, "step": step}


def compose(segments: list[Segment], total_steps: int, steps_per_epoch: int = 1) -> Callable[[int], float]:
    """Join segments into one `step -> multiplier` function over a phase of `total_steps` steps."""
    if not segments:
        return lambda t: 1.0
    lengths = [s.length(steps_per_epoch) for s in segments]
    open_ended = [i for i, n in enumerate(lengths) if n is None]
    if len(open_ended) > 1:
        raise ValueError("only one schedule segment may omit its length (it fills the rest of the phase)")
    if open_ended:
        lengths[open_ended[0]] = max(1, total_steps - sum(n for n in lengths if n is not None))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    last = len(segments) - 1

    def multiplier(t: int) -> float:
        i = last
        while i > 0 and t < starts[i]:
            i -= 1
        # Past the end of the last segment its final value holds.
        local = min(t - starts[i], lengths[i] - 1) if i == last else t - starts[i]
        return segments[i].fn(local, lengths[i], steps_per_epoch)

    return multiplier


def as_lambda_lr(optimizer: torch.optim.Optimizer, segments: list[Segment], total_steps: int,
                 steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """A torch LambdaLR driven by composed segments; call `.step()` after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, compose(segments, total_steps, steps_per_epoch))
