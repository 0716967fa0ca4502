"""Optimizers. torch's own are registered through small factories with PyTorch's hyperparameter names;
torchdojo's additions (LARS, LAMB, Lookahead) are torch.optim.Optimizer subclasses in this package,
usable in any loop with torch's LR schedulers."""
from __future__ import annotations

import torch

from .lamb import LAMB
from .lars import LARS
from .lookahead import Lookahead
from .param_groups import param_groups


def sgd(params, lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False) -> torch.optim.Optimizer:
    """SGD with optional momentum or Nesterov momentum (Sutskever et al. 2013)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                           nesterov=nesterov)


def adam(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba 2014, arXiv 1412.6980); weight_decay here is L2 added to the gradient."""
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


def adamw(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.01, amsgrad: bool = False) -> torch.optim.Optimizer:
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2017, arXiv 1711.05101)."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


def radam(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0, decoupled_weight_decay: bool = False) -> torch.optim.Optimizer:
    """RAdam: Adam with a rectified adaptive LR early on (Liu et al. 2019, arXiv 1908.03265)."""
    return torch.optim.RAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             decoupled_weight_decay=decoupled_weight_decay)


def lamb(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
         weight_decay: float = 0.01, bias_correction: bool = True, max_trust: float | None = None,
         foreach: bool | None = None) -> torch.optim.Optimizer:
    """LAMB: Adam direction with a layer-wise trust ratio, for large batches (You et al. 2019, arXiv 1904.00962)."""
    return LAMB(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                max_trust=max_trust, foreach=foreach)


def lars(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
         eps: float = 1e-8, nesterov: bool = False, foreach: bool | None = None) -> torch.optim.Optimizer:
    """LARS: SGD momentum with a layer-wise trust ratio, for large batches (You et al. 2017, arXiv 1708.03888)."""
    return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, nesterov=nesterov,
                foreach=foreach)


def ranger(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
           weight_decay: float = 0.0, k: int = 6, alpha: float = 0.5) -> torch.optim.Optimizer:
    """Ranger: Lookahead over RAdam (Wright 2019; arXiv 1907.08610 + 1908.03265)."""
    return Lookahead(radam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), k=k, alpha=alpha)


TORCH_OPTIMIZERS = {"sgd": sgd, "adam": adam, "adamw": adamw, "radam": radam}
# Registered for recipes in torchdojo.registry; `lookahead` (which wraps a registered optimizer) too.
DOJO_OPTIMIZERS = {"lamb": lamb, "lars": lars, "ranger": ranger}

__all__ = ["LAMB", "LARS", "Lookahead", "param_groups", "sgd", "adam", "adamw", "radam", "lamb", "lars", "ranger"]
