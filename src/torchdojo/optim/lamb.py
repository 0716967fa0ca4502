"""LAMB: layer-wise adaptive large-batch optimisation (You et al. 2019, arXiv 1904.00962).

Per tensor w with gradient g, step t from 1:
    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
    m_hat = m/(1-b1^t), v_hat = v/(1-b2^t)      (with bias_correction; else m, v)
    r = m_hat/(sqrt(v_hat)+eps) + weight_decay*w
    trust = ||w||/||r|| if both > 0 else 1, capped at max_trust when set
    w = w - lr*trust*r
A parameter group with `trust_ratio: False` uses trust = 1 (biases and norm weights, by default of
`torchdojo.optim.param_groups`).

A complex tensor is updated as the pair of real numbers it is, through its real view (as torch.optim.Adam
does): v then holds the square of each real and imaginary part, never the complex square g*g, and ||w||,
||r|| are the norms of those real numbers."""
from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from ._functional import can_foreach, grads_of, run_closure, safe_ratio, trust_value


class LAMB(Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, bias_correction: bool = True, max_trust: float | None = None,
                 *, foreach: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be non-negative")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if max_trust is not None and max_trust <= 0:
            raise ValueError("max_trust must be positive")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_trust=max_trust, trust_ratio=True, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            params, grads = grads_of(group, "LAMB does not support sparse gradients")
            if not params:
                continue
            ms, vs, steps = [], [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            # The state stays complex (its dtype is the parameter's); the rule runs on real views of it.
            params, grads, ms, vs = ([_real(t) for t in ts] for ts in (params, grads, ms, vs))
            if can_foreach(group["foreach"], params + grads + ms + vs):
                _lamb_foreach(params, grads, ms, vs, steps, group)
            else:
                for p, g, m, v, t in zip(params, grads, ms, vs, steps):
                    _lamb_single(p, g, m, v, t, group)
        return loss


def _real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor's real view (sharing its storage, so in-place updates reach it); others as they are."""
    return torch.view_as_real(t) if t.is_complex() else t


def _lamb_single(w, g, m, v, t, group) -> None:
    """The update rule for one tensor, with a single temporary (r)."""
    b1, b2 = group["betas"]
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    bc1, bc2_sqrt = (1 - b1 ** t, math.sqrt(1 - b2 ** t)) if group["bias_correction"] else (1.0, 1.0)
    # m_hat / (sqrt(v_hat) + eps) = m / (bc1 * (sqrt(v)/sqrt(bc2) + eps)), built in place in r.
    r = v.sqrt().mul_(bc1 / bc2_sqrt).add_(group["eps"] * bc1)
    torch.div(m, r, out=r)
    if group["weight_decay"] != 0:
        r.add_(w, alpha=group["weight_decay"])
    if not group["trust_ratio"]:
        w.add_(r, alpha=-group["lr"])
        return
    trust = trust_value(torch.linalg.vector_norm(w), torch.linalg.vector_norm(r), cap=group["max_trust"])
    if isinstance(trust, float):
        w.add_(r, alpha=-group["lr"] * trust)
    else:
        w.addcmul_(r, trust, value=-group["lr"])


def _lamb_foreach(ws, gs, ms, vs, steps, group) -> None:
    """The same rule over all tensors of a group at once with torch._foreach_* kernels."""
    b1, b2 = group["betas"]
    torch._foreach_lerp_(ms, gs, 1 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
    # r = 1 / (bc1 * (sqrt(v)/sqrt(bc2) + eps)) * m: one temporary list, as in _lamb_single.
    r = torch._foreach_sqrt(vs)
    if group["bias_correction"]:
        bc1 = [1 - b1 ** t for t in steps]
        torch._foreach_mul_(r, [c / math.sqrt(1 - b2 ** t) for c, t in zip(bc1, steps)])
        torch._foreach_add_(r, [group["eps"] * c for c in bc1])
    else:
        torch._foreach_add_(r, group["eps"])
    torch._foreach_reciprocal_(r)
    torch._foreach_mul_(r, ms)
    if group["weight_decay"] != 0:
        torch._foreach_add_(r, ws, alpha=group["weight_decay"])
    if group["trust_ratio"]:
        trust = safe_ratio(torch.stack(torch._foreach_norm(ws)), torch.stack(torch._foreach_norm(r)))
        if group["max_trust"] is not None:
            trust = trust.clamp(max=group["max_trust"])
        torch._foreach_addcmul_(ws, r, (trust * -group["lr"]).unbind())
    else:
        torch._foreach_add_(ws, r, alpha=-group["lr"])
