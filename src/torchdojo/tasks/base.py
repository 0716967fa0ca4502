"""Pieces shared by the tasks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LossTerm:
    """One weighted loss term of a phase; logged as `train/loss/<name>`."""
    name: str
    weight: float
    fn: nn.Module


def weighted_loss(out: torch.Tensor, target: torch.Tensor, terms: list[LossTerm]):
    """Sum of weighted terms, and each weighted term detached for logging."""
    if len(terms) == 1 and terms[0].weight == 1.0:   # the common case, without extra ops
        loss = terms[0].fn(out, target)
        return loss, {terms[0].name: loss.detach()}
    parts = {}
    total = None
    for term in terms:
        if term.weight == 0.0:         # a term not switched on yet costs nothing and adds exactly 0
            parts[term.name] = out.new_zeros(())
            continue
        value = term.weight * term.fn(out, target)
        parts[term.name] = value.detach()
        total = value if total is None else total + value
    if total is None:
        raise ValueError("every loss term has weight 0 at this step; give one term a non-zero weight")
    return total, parts


def random_view(transform, batch: dict) -> dict:
    """`transform(batch, generator)` (an augmentation Compose) with a fresh generator seeded from torch's
    global one, which checkpoints hold: a resumed run draws the same views. None: the batch itself."""
    if transform is None:
        return batch
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    return transform(batch, torch.Generator(device=batch["x"].device).manual_seed(seed))


@torch.no_grad()
def collect_outputs(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    outs, ys = [], []
    for batch in loader:
        outs.append(model(batch["x"]))
        ys.append(batch["y"])
    return torch.cat(outs), torch.cat(ys)
