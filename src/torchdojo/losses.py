"""Loss terms a recipe can name, and loss functions for any plain PyTorch loop.

Each registered loss is an nn.Module taking (model output, target); its keyword options are its recipe keys.

- `CrossEntropy` — softmax cross-entropy with label smoothing (Szegedy et al. 2015, arXiv 1512.00567), soft
  targets, a temperature, class weights and `ignore_index`. Registered as `cross_entropy`.
- `FocalLoss` — multi-class focal loss (Lin et al. 2017, arXiv 1708.02002). Registered as `focal`.
- `BinaryFocalLoss` — the sigmoid focal loss of RetinaNet (Lin et al. 2017, arXiv 1708.02002) for binary and
  multi-label targets. Registered as `binary_focal`.
- `DistillationLoss` — knowledge distillation (Hinton et al. 2015, arXiv 1503.02531). Not a recipe loss: it
  needs the teacher's logits as a third argument.
- `MSE`, `L1`, `Huber` (Huber 1964) for regression.
- `softmax_with_temperature(logits, T)` — temperature-scaled probabilities for prediction.

The plain functions `focal_loss`, `binary_focal_loss` and `distillation_loss` compute the same values as
the modules without building one.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Reduction = Literal["mean", "sum", "none"]


# --------------------------------------------------------------------------------------------- checks

def _check_gamma(gamma: float) -> None:
    if not (math.isfinite(gamma) and gamma >= 0.0):
        raise ValueError(f"gamma must be >= 0 (got {gamma})")


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be > 0 (got {temperature})")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1) (got {label_smoothing})")


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of mean, sum, none (got {reduction!r})")


def _class_weight_tensor(values, what: str) -> torch.Tensor:
    w = torch.as_tensor(values, dtype=torch.float64)   # cast to the logits' dtype in forward
    if w.dim() != 1 or w.numel() == 0:
        raise ValueError(f"{what} must be a non-empty list with one number per class (got {values!r})")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{what} must be finite and >= 0 (got {values!r})")
    return w


def _check_num_classes(weights: torch.Tensor | None, num_classes: int, what: str) -> None:
    if weights is not None and weights.numel() != num_classes:
        raise ValueError(f"{what} has {weights.numel()} entries but the logits have {num_classes} classes")


def _rows(logits: torch.Tensor, target: torch.Tensor | None):
    """(N, K, d1, ...) logits and matching targets as (M, K) rows; class dimension 1, as in F.cross_entropy."""
    if logits.dim() < 2:
        raise ValueError(f"expected logits of shape (N, K) or (N, K, d1, ...), got {tuple(logits.shape)}")
    k = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(-1, k) if logits.dim() > 2 else logits
    if target is None:
        return rows, None
    soft = target.is_floating_point()
    if soft:
        if target.shape != logits.shape:
            raise ValueError(f"soft (probability) targets must have the logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(target.shape)}")
        target = target.movedim(1, -1).reshape(-1, k) if logits.dim() > 2 else target
    else:
        expected = logits.shape[:1] + logits.shape[2:]
        if target.shape != expected:
            raise ValueError(f"class-index targets must have shape {tuple(expected)} for logits of shape "
                             f"{tuple(logits.shape)}, got {tuple(target.shape)}")
        target = target.reshape(-1)
    return rows, target


def _reduce(loss: torch.Tensor, reduction: str, count) -> torch.Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / count
    return loss


# ------------------------------------------------------------------------------------- plain functions

def softmax_with_temperature(logits: torch.Tensor, T: float = 1.0, dim: int = 1) -> torch.Tensor:
    """softmax(logits / T) over the class dimension: T > 1 flattens the distribution, T < 1 sharpens it.

    For prediction with a temperature fitted on held-out data (Guo et al. 2017, arXiv 1706.04599) or to
    look at a teacher's soft targets (Hinton et al. 2015, arXiv 1503.02531)."""
    _check_temperature(T)
    return torch.softmax(logits / T, dim=dim)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float | list[float] | torch.Tensor | None = None, reduction: Reduction = "mean",
               label_smoothing: float = 0.0, ignore_index: int = -100, temperature: float = 1.0) -> torch.Tensor:
    """Multi-class focal loss (Lin et al. 2017, arXiv 1708.02002); see `FocalLoss`."""
    _check_gamma(gamma)
    _check_temperature(temperature)
    _check_label_smoothing(label_smoothing)
    _check_reduction(reduction)
    scale, weights = 1.0, None
    if isinstance(alpha, torch.Tensor) and alpha.dim() > 0 or isinstance(alpha, (list, tuple)):
        weights = alpha if isinstance(alpha, torch.Tensor) else _class_weight_tensor(alpha, "alpha")
    elif alpha is not None:
        scale = float(alpha)
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"alpha must be >= 0 (got {alpha})")
    return _focal(logits, target, gamma, scale, weights, reduction, label_smoothing, ignore_index, temperature)


def _focal(logits, target, gamma, scale, weights, reduction, label_smoothing, ignore_index, temperature):
    shape = logits.shape
    rows, target = _rows(logits, target)
    k = rows.shape[1]
    _check_num_classes(weights, k, "alpha")
    logp = F.log_softmax(rows / temperature if temperature != 1.0 else rows, dim=1)
    # 1 - p from expm1 keeps precision when p is close to 1; the clamp keeps the gradient of (1 - p)^gamma
    # finite for 0 < gamma < 1 when p rounds to exactly 1 (the term is ~0 there anyway).
    elem = -logp                                                         # (M, K): per-class focal terms
    if gamma != 0:
        elem = (-torch.expm1(logp)).clamp(min=torch.finfo(logp.dtype).tiny).pow(gamma) * elem
    if weights is not None:
        elem = elem * weights.to(device=elem.device, dtype=elem.dtype)
    if scale != 1.0:
        elem = elem * scale
    if target.is_floating_point():                                       # soft targets q: sum_k q_k * term_k
        q = target.to(elem.dtype)
        if label_smoothing > 0:
            q = (1.0 - label_smoothing) * q + label_smoothing / k
        loss = (q * elem).sum(1)
        count = loss.shape[0]
    else:                                                                # class indices
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        loss = elem.gather(1, safe.unsqueeze(1)).squeeze(1)
        if label_smoothing > 0:                                          # q = (1 - e) onehot + e / K
            loss = (1.0 - label_smoothing) * loss + (label_smoothing / k) * elem.sum(1)
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        count = valid.sum().clamp(min=1)                                 # all rows ignored: mean is 0
    if reduction == "none":
        return loss.reshape(shape[:1] + shape[2:])
    return _reduce(loss, reduction, count)


def binary_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
                      alpha: float | None = 0.25, reduction: Reduction = "mean") -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017, arXiv 1708.02002); see `BinaryFocalLoss`."""
    _check_gamma(gamma)
    _check_reduction(reduction)
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] or None (got {alpha})")
    if not target.is_floating_point():
        if (logits.dim() >= 2 and logits.shape[1] > 1 and target.shape == logits.shape[:1] + logits.shape[2:]):
            target = F.one_hot(target, logits.shape[1]).movedim(-1, 1)   # class indices: one sigmoid per class
    if target.shape != logits.shape:
        if target.numel() != logits.numel():
            raise ValueError(f"targets of shape {tuple(target.shape)} do not match logits of shape "
                             f"{tuple(logits.shape)}")
        target = target.reshape(logits.shape)                            # (N,) targets for (N, 1) logits
    target = target.to(logits.dtype)
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)         # log p and log(1 - p), stably
    ce = -(target * log_p + (1.0 - target) * log_1mp)                    # = -log p_t for targets in {0, 1}
    if gamma != 0:
        p = torch.sigmoid(logits)
        one_minus_pt = p * (1.0 - target) + (1.0 - p) * target
        ce = ce * one_minus_pt.clamp(min=torch.finfo(p.dtype).tiny).pow(gamma)
    if alpha is not None:
        ce = ce * (alpha * target + (1.0 - alpha) * (1.0 - target))
    return _reduce(ce, reduction, ce.numel())


def distillation_loss(student_logits: torch.Tensor, target: torch.Tensor | None, teacher_logits: torch.Tensor,
                      temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015, arXiv 1503.02531); see `DistillationLoss`."""
    _check_temperature(temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (got {alpha})")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} must have the same shape")
    s, _ = _rows(student_logits, None)
    t, _ = _rows(teacher_logits.detach(), None)
    loss = None
    if alpha > 0:
        log_q = F.log_softmax(s / temperature, dim=1)
        log_p = F.log_softmax(t.to(s.dtype) / temperature, dim=1)
        kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)   # KL(teacher || student)
        loss = alpha * temperature ** 2 * kl
    if alpha < 1:
        if target is None:
            raise ValueError("distillation with alpha < 1 needs the hard targets")
        ce = (1.0 - alpha) * F.cross_entropy(student_logits, target)
        loss = ce if loss is None else loss + ce
    return loss


# ------------------------------------------------------------------------------------------- modules

class CrossEntropy(nn.Module):
    """Softmax cross-entropy, with optional label smoothing (Szegedy et al. 2015, arXiv 1512.00567).

    Targets are class indices (N,) or probabilities (N, K), e.g. after mixup. `temperature` divides the
    logits; `class_weights` is torch's per-class `weight`; rows whose index target equals `ignore_index`
    are left out. With index targets this is exactly `F.cross_entropy(logits / T, target, ...)`."""

    def __init__(self, label_smoothing: float = 0.0, temperature: float = 1.0, ignore_index: int = -100,
                 class_weights: list[float] | None = None):
        super().__init__()
        _check_label_smoothing(label_smoothing)
        _check_temperature(temperature)
        self.label_smoothing = label_smoothing
        self.temperature = temperature
        self.ignore_index = ignore_index
        weights = None if class_weights is None else _class_weight_tensor(class_weights, "class_weights")
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            logits = logits / self.temperature
        weight = self.class_weights
        if weight is not None:
            _check_num_classes(weight, logits.shape[1], "class_weights")
            weight = weight.to(dtype=logits.dtype)
        return F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index,
                               label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017, arXiv 1708.02002): -alpha_y (1 - p_y)^gamma log p_y.

    `gamma` down-weights well-classified rows (gamma 0 is cross-entropy). `alpha` is None, one number
    that scales every class, or a list with one weight per class. Targets are class indices (N,) or
    probabilities q (N, K) such as mixup targets, for which the loss is
    sum_k q_k alpha_k (1 - p_k)^gamma (-log p_k). `label_smoothing` e turns targets into
    (1 - e) q + e / K first (as torch does for soft targets too); rows whose index target equals
    `ignore_index` count nowhere, and "mean" averages over the other rows (not weighted by alpha, unlike
    torch's weighted cross-entropy). p = softmax(logits / temperature), computed from log_softmax."""

    def __init__(self, gamma: float = 2.0, alpha: float | list[float] | None = None, reduction: Reduction = "mean",
                 label_smoothing: float = 0.0, ignore_index: int = -100, temperature: float = 1.0):
        super().__init__()
        _check_gamma(gamma)
        _check_temperature(temperature)
        _check_label_smoothing(label_smoothing)
        _check_reduction(reduction)
        self.gamma = float(gamma)
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.scale, weights = 1.0, None
        if isinstance(alpha, (list, tuple)):
            weights = _class_weight_tensor(alpha, "alpha")
        elif alpha is not None:
            if not (math.isfinite(alpha) and alpha >= 0):
                raise ValueError(f"alpha must be >= 0 (got {alpha})")
            self.scale = float(alpha)
        self.register_buffer("alpha", weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _focal(logits, target, self.gamma, self.scale, self.alpha, self.reduction, self.label_smoothing,
                      self.ignore_index, self.temperature)

    def extra_repr(self) -> str:
        alpha = self.alpha.tolist() if self.alpha is not None else (self.scale if self.scale != 1.0 else None)
        return f"gamma={self.gamma}, alpha={alpha}, reduction={self.reduction!r}"


class BinaryFocalLoss(nn.Module):
    """Sigmoid focal loss of RetinaNet (Lin et al. 2017, arXiv 1708.02002): -alpha_t (1 - p_t)^gamma log p_t.

    For binary or multi-label targets in {0, 1}, or soft targets in [0, 1], of the logits' shape; p is
    sigmoid(logit), p_t = p t + (1 - p)(1 - t), alpha_t = alpha t + (1 - alpha)(1 - t) (alpha None: no
    weighting). For soft targets -log p_t becomes the binary cross-entropy, as in torchvision's
    `sigmoid_focal_loss`. Class-index targets (N,) for (N, K) logits, K > 1, are one-hot encoded (one
    sigmoid per class, as in RetinaNet). "mean" averages over all elements."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25, reduction: Reduction = "mean"):
        super().__init__()
        _check_gamma(gamma)
        _check_reduction(reduction)
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or None (got {alpha})")
        self.gamma = float(gamma)
        self.alpha = alpha
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return binary_focal_loss(logits, target, self.gamma, self.alpha, self.reduction)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}, reduction={self.reduction!r}"


class DistillationLoss(nn.Module):
    """Knowledge distillation (Hinton et al. 2015, arXiv 1503.02531).

    forward(student_logits, target, teacher_logits) =
    alpha T^2 KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) CE(student, target),
    the KL averaged over rows ("batchmean"). T^2 keeps the soft term's gradient about the same size for
    any T. The teacher's logits are detached; with alpha 1 the target may be None."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        _check_temperature(temperature)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (got {alpha})")
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, student_logits: torch.Tensor, target: torch.Tensor | None,
                teacher_logits: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student_logits, target, teacher_logits, self.temperature, self.alpha)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


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


# Recipe losses. DistillationLoss is not one: it needs the teacher's logits (the `distill` task uses it).
LOSSES = {"cross_entropy": CrossEntropy, "focal": FocalLoss, "binary_focal": BinaryFocalLoss,
          "mse": MSE, "l1": L1, "huber": Huber}
