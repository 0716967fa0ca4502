"""Augmentations for tables x of shape (N, F) (one row per sample, one column per feature).

- `SwapNoise`: each cell, with probability p, takes the same column's value from another random row
  of the batch, so noisy values keep each feature's own distribution (Jahrer 2018, the denoising
  autoencoder of the winning solution of Kaggle's Porto Seguro Safe Driver Prediction).
- `ColumnGaussian`: Gaussian noise scaled per column by the batch's standard deviation of that column.
"""
from __future__ import annotations

import torch

from .base import Augment, check_number, check_p, chosen, float_input, normal, per_sample, randint, \
    replace, uniform, work_dtype


def _table(name: str, batch: dict) -> torch.Tensor:
    return float_input(name, batch, 2, "(N, F)")


class SwapNoise(Augment):
    """Swap noise (Jahrer 2018, Porto Seguro winning solution): cells take values from other rows.

    Each cell is replaced, with probability p, by the same column's value in another row of the batch,
    chosen uniformly among the other N - 1 rows (a batch of one row is left as it is)."""

    kind = "table"

    def __init__(self, p: float = 0.15):
        self.p = check_p(p)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _table("swap_noise", batch)
        n, f = x.shape
        if self.p == 0.0 or n < 2:
            return dict(batch)
        hit = uniform((n, f), generator, x.device) < self.p
        other = (torch.arange(n, device=x.device).unsqueeze(1) + randint(1, n, (n, f), generator, x.device)) % n
        return replace(batch, x=torch.where(hit, x.gather(0, other), x))


class ColumnGaussian(Augment):
    """Gaussian noise scaled per column by the batch's standard deviation of that column.

    Each row with probability p gets std times the column's standard deviation
    in this batch (population std; 0 for a one-row batch) times a standard normal per cell, so every
    feature is perturbed on its own scale."""

    kind = "table"

    def __init__(self, std: float = 0.1, p: float = 1.0):
        self.std = check_number("std", std, 0.0)
        self.p = check_p(p)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _table("gaussian", batch)
        if self.p == 0.0 or self.std == 0.0 or len(x) == 0:
            return dict(batch)
        dt = work_dtype(x)
        scale = x.to(dt).std(dim=0, correction=0, keepdim=True) * self.std
        noise = normal(x.shape, generator, x.device, dt) * scale
        noise = noise * per_sample(chosen(len(x), self.p, generator, x.device), noise)
        return replace(batch, x=(x + noise).to(x.dtype))
