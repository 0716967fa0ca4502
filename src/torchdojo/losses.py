"""Loss terms a recipe can name. Each is an nn.Module taking (model output, target).

Issue-level additions (focal loss, distillation, scheduled weights) live here too."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropy(nn.Module):
    """Softmax cross-entropy, with optional label smoothing (Szegedy et al. 2015, arXiv 1512.00567)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)


class MSE(nn.Module):
    """Mean squared error."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred.reshape(target.shape), target)


class L1(nn.Module):
    """Mean absolute error."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(pred.reshape(target.shape), target)


class Huber(nn.Module):
    """Huber loss: quadratic within `delta`, linear beyond (Huber 1964)."""

    def __init__(self, delta: float = 1.0):
        super().__init__()
        self.delta = delta

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(pred.reshape(target.shape), target, delta=self.delta)


LOSSES = {"cross_entropy": CrossEntropy, "mse": MSE, "l1": L1, "huber": Huber}
