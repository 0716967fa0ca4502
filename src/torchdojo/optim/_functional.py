"""Helpers shared by torchdojo's optimizers."""
from __future__ import annotations

import torch


def grads_of(group: dict, sparse_error: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The group's parameters that have a gradient, and those gradients."""
    params, grads = [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(sparse_error)
        params.append(p)
        grads.append(p.grad)
    return params, grads


def can_foreach(flag: bool | None, tensors: list[torch.Tensor]) -> bool:
    """Use the multi-tensor path unless switched off, when all tensors share one device and dtype."""
    if flag is False or not tensors:
        return False
    first = tensors[0]
    return all(t.device == first.device and t.dtype == first.dtype for t in tensors)


def safe_ratio(num: torch.Tensor, den: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * num / den where both are > 0, else 1 (the layer-wise trust ratio's convention)."""
    ok = (num > 0) & (den > 0)
    return torch.where(ok, scale * num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(num))
