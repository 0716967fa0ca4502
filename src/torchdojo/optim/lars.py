"""LARS: layer-wise adaptive rate scaling for SGD with momentum (You et al. 2017, arXiv 1708.03888).

Per tensor w with gradient g:
    d = g + weight_decay*w
    trust = eta*||w|| / (||g|| + weight_decay*||w|| + eps) if ||w|| > 0 and ||g|| > 0, else 1
    d = trust*d
    buf = d on the first step, else buf = momentum*buf + d
    w = w - lr*(d + momentum*buf if nesterov else buf)
A parameter group with `trust_ratio: False` uses trust = 1 (biases and norm weights, by default of
`torchdojo.optim.param_groups`)."""
from __future__ import annotations

import torch
from torch.optim import Optimizer

from ._functional import can_foreach, grads_of


class LARS(Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
                 eps: float = 1e-8, nesterov: bool = False, *, foreach: bool | None = None):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0 or eps < 0:
            raise ValueError("lr, momentum, weight_decay, eps must be non-negative and eta positive")
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs a positive momentum")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, nesterov=nesterov,
                        trust_ratio=True, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = grads_of(group, "LARS does not support sparse gradients")
            if not params:
                continue
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            if can_foreach(group["foreach"], params + grads + [b for b in bufs if b is not None]):
                new_bufs = _lars_foreach(params, grads, bufs, group)
            else:
                new_bufs = [_lars_single(p, g, b, group) for p, g, b in zip(params, grads, bufs)]
            if group["momentum"] != 0:
                for p, b in zip(params, new_bufs):
                    self.state[p]["momentum_buffer"] = b
        return loss


def _trust(w_norm: torch.Tensor, g_norm: torch.Tensor, group: dict) -> torch.Tensor:
    """eta*||w|| / (||g|| + weight_decay*||w|| + eps) where ||w|| > 0 and ||g|| > 0, else 1."""
    trust = group["eta"] * w_norm / (g_norm + group["weight_decay"] * w_norm + group["eps"])
    return torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))


def _lars_single(w, g, buf, group):
    """The update rule for one tensor, written as in the paper; returns the momentum buffer."""
    momentum = group["momentum"]
    d = g.add(w, alpha=group["weight_decay"]) if group["weight_decay"] != 0 else g.clone()
    if group["trust_ratio"]:
        d.mul_(_trust(torch.linalg.vector_norm(w), torch.linalg.vector_norm(g), group))
    if momentum == 0:
        w.add_(d, alpha=-group["lr"])
        return None
    if buf is None:
        buf = d.clone()
    else:
        buf.mul_(momentum).add_(d)
    w.add_(d.add(buf, alpha=momentum) if group["nesterov"] else buf, alpha=-group["lr"])
    return buf


def _lars_foreach(ws, gs, bufs, group):
    """The same rule over all tensors of a group with torch._foreach_* kernels; returns the buffers."""
    momentum, lr = group["momentum"], group["lr"]
    d = torch._foreach_add(gs, ws, alpha=group["weight_decay"]) if group["weight_decay"] != 0 else gs
    if group["trust_ratio"]:
        trust = _trust(torch.stack(torch._foreach_norm(ws)), torch.stack(torch._foreach_norm(gs)), group).unbind()
    else:
        trust = None
    if momentum == 0 or group["nesterov"] or any(b is None for b in bufs):
        # Plain, Nesterov and first steps need the scaled direction itself.
        d = torch._foreach_mul(d, trust) if trust is not None else (list(d) if d is not gs else [g.clone() for g in gs])
        if momentum == 0:
            torch._foreach_add_(ws, d, alpha=-lr)
            return [None] * len(ws)
        fresh = [i for i, b in enumerate(bufs) if b is None]
        old = [i for i, b in enumerate(bufs) if b is not None]
        bufs = list(bufs)
        for i in fresh:
            bufs[i] = d[i].clone()
        if old:
            old_bufs = [bufs[i] for i in old]
            torch._foreach_mul_(old_bufs, momentum)
            torch._foreach_add_(old_bufs, [d[i] for i in old])
        if group["nesterov"]:
            torch._foreach_add_(d, bufs, alpha=momentum)
            torch._foreach_add_(ws, d, alpha=-lr)
        else:
            torch._foreach_add_(ws, bufs, alpha=-lr)
        return bufs
    # The common case, fused: buf = momentum*buf + trust*d; w -= lr*buf.
    torch._foreach_mul_(bufs, momentum)
    if trust is not None:
        torch._foreach_addcmul_(bufs, d, trust)
    else:
        torch._foreach_add_(bufs, d)
    torch._foreach_add_(ws, bufs, alpha=-lr)
    return bufs
