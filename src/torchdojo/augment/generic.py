"""Augmentations for any float input (kind "any"): images, sequences and tables alike."""
from __future__ import annotations

import torch

from .base import Augment, check_number, check_p, chosen, float_input, normal, per_sample, replace, work_dtype


class Noise(Augment):
    """Add Gaussian noise of standard deviation `std` to every input value (any float data).

    Each sample with probability p (input noise, the corruption of denoising autoencoders: Vincent et al. 2008)."""

    kind = "any"

    def __init__(self, std: float = 0.1, p: float = 1.0):
        self.std = check_number("std", std, 0.0)
        self.p = check_p(p)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = float_input("noise", batch, None, "(N, ...)")
        if self.p == 0.0 or self.std == 0.0:
            return dict(batch)
        noise = normal(x.shape, generator, x.device, work_dtype(x)) * self.std
        noise = noise * per_sample(chosen(len(x), self.p, generator, x.device), noise)
        return replace(batch, x=(x + noise).to(x.dtype))
