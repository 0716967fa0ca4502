"""Augmentations for signals and sequences x of shape (N, C, L) (MNIST-1D is (N, 1, 40)), each
sample drawn on its own and applied with probability p. The jittering, scaling and time-warping
families are those of Um et al. 2017, "Data Augmentation of Wearable Sensor Data for Parkinson's
Disease Monitoring using Convolutional Neural Networks", arXiv 1706.00527.

- `Shift`: move along time by whole steps, circularly or with zero fill.
- `Scale`: multiply the amplitude by a random factor.
- `Jitter`: add Gaussian noise at every time step.
- `TimeWarp`: resample the time axis along a smooth random monotone curve.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .base import (Augment, check_int, check_number, check_p, chosen, float_input, normal, per_sample,
                   randint, replace, uniform, work_dtype)

_SEQ = "(N, C, L)"


def _signals(name: str, batch: dict) -> torch.Tensor:
    return float_input(name, batch, 3, _SEQ)


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[n, c, index[n, l]] for an (N, L) index."""
    return x.gather(2, index.unsqueeze(1).expand(-1, x.shape[1], -1))


class Shift(Augment):
    """Shift sequences in time by whole steps, circularly or with zero fill.

    The shift is uniform in [-max_steps, max_steps] per sequence, with probability p: mode "circular" wraps
    around (a roll), mode "zero" fills the vacated steps with zeros."""

    kind = "sequence"

    def __init__(self, max_steps: int = 4, mode: Literal["circular", "zero"] = "circular", p: float = 1.0):
        self.max_steps = check_int("max_steps", max_steps, 0)
        if mode not in ("circular", "zero"):
            raise ValueError(f"mode must be 'circular' or 'zero' (got {mode!r})")
        self.mode = mode
        self.p = check_p(p)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _signals("shift", batch)
        if self.p == 0.0 or self.max_steps == 0:
            return dict(batch)
        n, _, length = x.shape
        s = randint(-self.max_steps, self.max_steps + 1, (n, 1), generator, x.device)
        s = s * chosen(n, self.p, generator, x.device).unsqueeze(1)
        source = torch.arange(length, device=x.device) - s                  # out[t] = x[t - s]
        if self.mode == "circular":
            return replace(batch, x=_gather_time(x, source % length))
        inside = (source >= 0) & (source < length)
        out = _gather_time(x, source.clamp(0, length - 1))
        return replace(batch, x=out.masked_fill(~inside.unsqueeze(1), 0.0))


class Scale(Augment):
    """Multiply each sequence (all channels) by a factor uniform in [min_scale, max_scale].

    Magnitude scaling of Um et al. 2017 (arXiv 1706.00527); each sequence with probability p."""

    kind = "sequence"

    def __init__(self, min_scale: float = 0.8, max_scale: float = 1.2, p: float = 1.0):
        self.min_scale = check_number("min_scale", min_scale)
        self.max_scale = check_number("max_scale", max_scale)
        if self.min_scale > self.max_scale:
            raise ValueError(f"min_scale ({min_scale}) must be <= max_scale ({max_scale})")
        self.p = check_p(p)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _signals("scale", batch)
        if self.p == 0.0:
            return dict(batch)
        n = len(x)
        factor = uniform((n,), generator, x.device, self.min_scale, self.max_scale, work_dtype(x))
        factor = torch.where(chosen(n, self.p, generator, x.device), factor, torch.ones_like(factor))
        return replace(batch, x=(x * per_sample(factor, x)).to(x.dtype))


class Jitter(Augment):
    """Add independent Gaussian noise of standard deviation `std` at every time step and channel.

    Jittering of Um et al. 2017 (arXiv 1706.00527); each sequence with probability p."""

    kind = "sequence"

    def __init__(self, std: float = 0.03, p: float = 1.0):
        self.std = check_number("std", std, 0.0)
        self.p = check_p(p)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _signals("jitter", batch)
        if self.p == 0.0 or self.std == 0.0:
            return dict(batch)
        noise = normal(x.shape, generator, x.device, work_dtype(x)) * self.std
        noise = noise * per_sample(chosen(len(x), self.p, generator, x.device), noise)
        return replace(batch, x=(x + noise).to(x.dtype))


class TimeWarp(Augment):
    """Time warping (Um et al. 2017, arXiv 1706.00527): play each sequence at a smoothly varying speed.

    Each sequence with probability p. The speed is 1 + max_warp * u at `knots` + 2 evenly spaced points
    (u uniform in [-1, 1]), linearly interpolated over the L steps; its running sum, rescaled to end at
    L - 1, is a monotone map from output step to input time, and the output is x linearly interpolated
    there. The first and last steps stay in place; max_warp < 1 keeps the speed positive."""

    kind = "sequence"

    def __init__(self, max_warp: float = 0.2, knots: int = 4, p: float = 1.0):
        self.max_warp = check_number("max_warp", max_warp, 0.0, 1.0, high_open=True)
        self.knots = check_int("knots", knots, 0)
        self.p = check_p(p)

    def positions(self, n: int, length: int, generator: torch.Generator, device) -> torch.Tensor:
        """(N, L) input times (float64, 0 .. L - 1, increasing) that output steps read from."""
        u = uniform((n, 1, self.knots + 2), generator, device, -1.0, 1.0, torch.float64)
        speed = F.interpolate(1.0 + self.max_warp * u, size=length, mode="linear", align_corners=True)[:, 0]
        pos = torch.cat([torch.zeros(n, 1, dtype=torch.float64, device=device),
                         torch.cumsum(speed[:, 1:], dim=1)], dim=1)
        return (pos * ((length - 1) / pos[:, -1:])).clamp(0, length - 1) if length > 1 else pos

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _signals("time_warp", batch)
        if self.p == 0.0 or self.max_warp == 0.0:
            return dict(batch)
        n, _, length = x.shape
        pos = self.positions(n, length, generator, x.device)
        apply = chosen(n, self.p, generator, x.device)
        if length < 2:
            return dict(batch)
        left = pos.floor().long().clamp(0, length - 2)
        frac = (pos - left).to(work_dtype(x)).unsqueeze(1)                      # (N, 1, L)
        out = _gather_time(x, left) * (1.0 - frac) + _gather_time(x, left + 1) * frac
        return replace(batch, x=torch.where(per_sample(apply, x), out.to(x.dtype), x))
