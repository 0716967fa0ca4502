"""Batches from in-memory tensors, with a shuffle order that is a pure function of (seed, epoch).

Small datasets live on the device whole, so a batch is one index_select: far cheaper than a
DataLoader with collation. Because each epoch's permutation is derived from (seed, epoch), resuming
needs only the epoch and the position inside it. With per-row `weights`, each epoch instead draws
len(split) rows with replacement, with probabilities proportional to the weights (a class-balanced
sampler, for example), from the same (seed, epoch) generator.

An optional batch `transform(batch, generator)` (augmentation) gets a generator seeded from
(seed, epoch, batch number), so its randomness, too, depends only on where the batch is. That is what
makes `num_workers` safe: with worker processes (a torch DataLoader over batch numbers) each batch
comes out bit-identical to the single-process one, whichever worker built it, and resuming at batch
k needs no worker RNG state at all."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .bundle import Split

BatchTransform = Callable[[dict, torch.Generator], dict]


class _EpochBatches(torch.utils.data.Dataset):
    """Batch number -> batch of one epoch, for DataLoader workers (the order is computed once, in the
    main process, and travels to the workers with this object)."""

    def __init__(self, loader: "TensorLoader", order: torch.Tensor | None, epoch: int):
        self.loader, self.order, self.epoch = loader, order, epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __getitem__(self, b: int) -> dict:
        return self.loader.batch(self.order, self.epoch, b)


def _one_thread_per_worker(_worker_id: int) -> None:
    # Workers share the machine's cores with the training process: intra-op threads would oversubscribe.
    torch.set_num_threads(1)


class TensorLoader:
    def __init__(self, split: Split, batch_size: int, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, weights: torch.Tensor | None = None,
                 transform: Optional[BatchTransform] = None, num_workers: int = 0,
                 device: torch.device | str | None = None):
        if len(split) == 0:
            raise ValueError("cannot batch an empty split")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64).cpu()
            if weights.shape != (len(split),):
                raise ValueError(f"weights must have one entry per row ({len(split)}), got shape {tuple(weights.shape)}")
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not bool((weights > 0).any()):
                raise ValueError("weights must be finite, >= 0 and not all 0")
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.weights, self.transform, self.num_workers = weights, transform, num_workers
        self.device = torch.device(device) if device is not None else None
        if num_workers and split.x.device.type != "cpu":
            raise ValueError("worker processes need the split on the CPU (batches move to `device` later)")
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

    def batch_generator(self, epoch: int, b: int) -> torch.Generator:
        """The generator a transform gets for batch b of an epoch: a pure function of (seed, epoch, b)."""
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + b) % 2 ** 63)

    def batch(self, order: torch.Tensor | None, epoch: int, b: int) -> dict:
        """Batch number b of an epoch whose row order is `order` (None: in order), transformed."""
        x, y, bs = self.split.x, self.split.y, self.batch_size
        if order is None:
            out = {"x": x[b * bs:(b + 1) * bs], "y": y[b * bs:(b + 1) * bs]}
        else:
            idx = order[b * bs:(b + 1) * bs]
            out = {"x": x.index_select(0, idx), "y": y.index_select(0, idx)}
        if self.transform is not None:
            out = self.transform(out, self.batch_generator(epoch, b))
        return out

    def epoch(self, epoch: int = 0, start: int = 0):
        """Yield batch dicts {'x', 'y'} of epoch `epoch`, starting at batch number `start`."""
        order = self.order(epoch)
        if self.num_workers == 0:
            batches = (self.batch(order, epoch, b) for b in range(start, len(self)))
        else:
            # Its own generator: a DataLoader otherwise draws its workers' base seed from the global
            # torch RNG, which would shift dropout's random numbers whenever an epoch (re)starts.
            batches = torch.utils.data.DataLoader(
                _EpochBatches(self, order, epoch), batch_size=None, sampler=range(start, len(self)),
                num_workers=self.num_workers, worker_init_fn=_one_thread_per_worker,
                generator=self.batch_generator(epoch, -1),
                pin_memory=self.device is not None and self.device.type == "cuda")
        for batch in batches:
            if self.device is not None:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            yield batch

    def __iter__(self):
        return self.epoch(0)
