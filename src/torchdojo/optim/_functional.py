"""Helpers shared by torchdojo's optimizers."""
from __future__ import annotations

import torch


def run_closure(closure):
    """The loss from an optimizer closure, evaluated with gradients enabled (torch's convention)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


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
    """Whether to take the multi-tensor path: asked for (True), or by default (None) on accelerators.

    On CPU the per-tensor path is the default, as in torch's own optimizers: the foreach kernels there
    are loops anyway, and their large temporaries cost page faults on every step (measured in
    benchmarks/optim_speed.py). Either way all tensors must share one device and dtype."""
    if flag is False or not tensors:
        return False
    first = tensors[0]
    if flag is None and first.device.type == "cpu":
        return False
    return all(t.device == first.device and t.dtype == first.dtype for t in tensors)


def trust_value(num: torch.Tensor, den: torch.Tensor, scale: float = 1.0, cap: float | None = None):
    """scale*num/den where num > 0 and den > 0, else 1; capped at `cap`. A Python float for CPU tensors
    (reading a CPU scalar costs no device sync, and float factors fold into the update ops), a 0-dim
    tensor elsewhere."""
    if num.device.type == "cpu":
        n, d = num.item(), den.item()
        value = scale * n / d if n > 0 and d > 0 else 1.0
        return min(value, cap) if cap is not None else value
    value = safe_ratio(num, den, scale)
    return value.clamp(max=cap) if cap is not None else value


def safe_ratio(num: torch.Tensor, den: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * num / den where both are > 0, else 1 (the layer-wise trust ratio's convention)."""
    ok = (num > 0) & (den > 0)
    return torch.where(ok, scale * num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(num))
