"""Batches from in-memory tensors, with a shuffle order that is a pure function of (seed, epoch).

Small datasets live on the device whole, so a batch is one index_select: far cheaper than a
DataLoader with collation. Because each epoch's permutation is derived from (seed, epoch), resuming
needs only the epoch and the position inside it. With per-row `weights`, each epoch instead draws
len(split) rows with replacement, with probabilities proportional to the weights (a class-balanced
sampler, for example), from the same (seed, epoch) generator."""
from __future__ import annotations

import torch

from .bundle import Split


class TensorLoader:
    def __init__(self, split: Split, batch_size: int, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, weights: torch.Tensor | None = None):
        if len(split) == 0:
            raise ValueError("cannot batch an empty split")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64).cpu()
            if weights.shape != (len(split),):
                raise ValueError(f"weights must have one entry per row ({len(split)}), got shape {tuple(weights.shape)}")
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not bool((weights > 0).any()):
                raise ValueError("weights must be finite, >= 0 and not all 0")
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.weights = weights
        # Dropping a ragged last batch keeps BatchNorm away from 1-sample batches; with fewer rows
        # than one batch, the epoch is one batch of everything.
        self.drop_last = drop_last and len(split) >= batch_size

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor | None:
        """Row indices of epoch `epoch` (None: in order): a permutation, or with `weights` a weighted
        sample with replacement; either way a pure function of (seed, epoch)."""
        if self.weights is None and not self.shuffle:
            return None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.weights is not None:
            idx = torch.multinomial(self.weights, len(self.split), replacement=True, generator=g)
        else:
            idx = torch.randperm(len(self.split), generator=g)
        return idx.to(self.split.x.device)

    def epoch(self, epoch: int = 0, start: int = 0):
        """Yield batch dicts {'x', 'y'} of epoch `epoch`, starting at batch number `start`."""
        order = self.order(epoch)
        x, y, bs = self.split.x, self.split.y, self.batch_size
        for b in range(start, len(self)):
            if order is None:
                yield {"x": x[b * bs:(b + 1) * bs], "y": y[b * bs:(b + 1) * bs]}
            else:
                idx = order[b * bs:(b + 1) * bs]
                yield {"x": x.index_select(0, idx), "y": y.index_select(0, idx)}

    def __iter__(self):
        return self.epoch(0)
