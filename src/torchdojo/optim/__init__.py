"""Optimizers. torch's own are registered through small factories with PyTorch's hyperparameter names;
torchdojo's additions (LARS, LAMB, Lookahead) are torch.optim.Optimizer subclasses in this package."""
from __future__ import annotations

import torch


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


TORCH_OPTIMIZERS = {"sgd": sgd, "adam": adam, "adamw": adamw, "radam": radam}
