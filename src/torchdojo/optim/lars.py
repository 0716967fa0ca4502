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

from ._functional import can_foreach, grads_of, run_closure


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
        loss = run_closure(closure)
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
    """eta*||w|| / (||g|| + weight_decay*||w|| + eps) where ||w|| > 0 and ||g|| > 0, else 1 (tensors)."""
    trust = group["eta"] * w_norm / (g_norm + group["weight_decay"] * w_norm + group["eps"])
    return torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))


def _trust_one(w: torch.Tensor, g: torch.Tensor, group: dict):
    """The trust ratio of one tensor: a Python float on CPU, a 0-dim tensor elsewhere."""
    w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
    if w.device.type != "cpu":
        return _trust(w_norm, g_norm, group)
    wn, gn = w_norm.item(), g_norm.item()
    if wn > 0 and gn > 0:
        return group["eta"] * wn / (gn + group["weight_decay"] * wn + group["eps"])
    return 1.0


def _add_scaled(out: torch.Tensor, x: torch.Tensor, factor) -> None:
    """out += factor * x, for a float or a 0-dim tensor factor."""
    if isinstance(factor, float):
        out.add_(x, alpha=factor)
    else:
        out.addcmul_(x, factor)


def _lars_single(w, g, buf, group):
    """The update rule for one tensor; returns the momentum buffer."""
    momentum, wd, lr = group["momentum"], group["weight_decay"], group["lr"]
    trust = _trust_one(w, g, group) if group["trust_ratio"] else 1.0
    if momentum != 0 and buf is not None and not group["nesterov"]:
        # The common case without temporaries: buf = momentum*buf + trust*g + trust*wd*w.
        buf.mul_(momentum)
        _add_scaled(buf, g, trust)
        if wd != 0:
            _add_scaled(buf, w, trust * wd)
        w.add_(buf, alpha=-lr)
        return buf
    d = g.add(w, alpha=wd) if wd != 0 else g.clone()
    d.mul_(trust)
    if momentum == 0:
        w.add_(d, alpha=-lr)
        return None
    if buf is None:
        buf = d.clone()
    else:
        buf.mul_(momentum).add_(d)
    w.add_(d.add_(buf, alpha=momentum) if group["nesterov"] else buf, alpha=-lr)
    return buf


def _lars_foreach(ws, gs, bufs, group):
    """The same rule over all tensors of a group with torch._foreach_* kernels; returns the buffers."""
    momentum, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
    trust = None
    if group["trust_ratio"]:
        trust = _trust(torch.stack(torch._foreach_norm(ws)), torch.stack(torch._foreach_norm(gs)), group)
    if momentum != 0 and not group["nesterov"] and all(b is not None for b in bufs):
        # The common case without temporaries: buf = momentum*buf + trust*g + trust*wd*w; w -= lr*buf.
        torch._foreach_mul_(bufs, momentum)
        if trust is not None:
            torch._foreach_addcmul_(bufs, gs, trust.unbind())
            if wd != 0:
                torch._foreach_addcmul_(bufs, ws, (trust * wd).unbind())
        else:
            torch._foreach_add_(bufs, gs)
            if wd != 0:
                torch._foreach_add_(bufs, ws, alpha=wd)
        torch._foreach_add_(ws, bufs, alpha=-lr)
        return bufs
    # Plain SGD, Nesterov and first steps need the scaled direction d itself.
    d = torch._foreach_add(gs, ws, alpha=wd) if wd != 0 else [g.clone() for g in gs]
    if trust is not None:
        torch._foreach_mul_(d, trust.unbind())
    if momentum == 0:
        torch._foreach_add_(ws, d, alpha=-lr)
        return [None] * len(ws)
    bufs = list(bufs)
    old = [i for i, b in enumerate(bufs) if b is not None]
    if old:
        old_bufs = [bufs[i] for i in old]
        torch._foreach_mul_(old_bufs, momentum)
        torch._foreach_add_(old_bufs, [d[i] for i in old])
    for i, b in enumerate(bufs):
        if b is None:
            bufs[i] = d[i].clone()
    if group["nesterov"]:
        torch._foreach_add_(d, bufs, alpha=momentum)
        torch._foreach_add_(ws, d, alpha=-lr)
    else:
        torch._foreach_add_(ws, bufs, alpha=-lr)
    return bufs
