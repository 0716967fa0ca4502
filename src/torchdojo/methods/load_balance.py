"""The load-balancing loss of mixture-of-experts layers (Fedus, Zoph & Shazeer 2021, Switch Transformers,
arXiv 2101.03961): add `weight` · Σ over the model's `SwitchFFN` layers of experts · Σ_i f_i · P_i to the
training loss, so that the router spreads rows over its experts instead of collapsing onto a few. The
paper's weight is 0.01."""
from __future__ import annotations

import torch

from ..models.switch import SwitchFFN
from .base import Method


def load_balancing_loss(model: torch.nn.Module) -> torch.Tensor | None:
    """Σ of the `aux_loss` of every SwitchFFN of `model` from its last forward pass (None: no such layer)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, SwitchFFN) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


class LoadBalance(Method):
    """Add `weight` times the load-balancing loss to every training step's loss; logs it as
    `train/moe_balance` (1.0 per layer when perfectly balanced) and the largest share of rows any expert
    got as `train/moe_max_share`."""

    def __init__(self, weight: float = 0.01):
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.weight = weight

    def on_fit_start(self, state) -> None:
        if not any(isinstance(m, SwitchFFN) for m in state.model.modules()):
            from ..errors import ConfigError
            raise ConfigError("methods", "load_balance needs a model with mixture-of-experts layers (moe_mlp)")

    def on_loss(self, state, loss, parts):
        aux = load_balancing_loss(state.model)
        if aux is None:
            return loss
        state.step_logs["train/moe_balance"] = aux.detach()
        state.step_logs["train/moe_max_share"] = max(float(m.usage.max()) for m in state.model.modules()
                                                     if isinstance(m, SwitchFFN) and m.usage is not None)
        return loss + self.weight * aux
