"""Label-mixing augmentations: each sample is blended with a partner from the same batch (a random
permutation), and its target becomes the matching mixture of the two targets.

- `Mixup` (Zhang et al. 2017, "mixup: Beyond Empirical Risk Minimization", arXiv 1710.09412):
  x = lam x_i + (1 - lam) x_j, lam ~ Beta(alpha, alpha). Works on any float input (kind "any").
- `CutMix` (Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers with
  Localizable Features", arXiv 1905.04899): a box of x_j pasted into x_i, the label weight of x_i
  being the fraction of x_i's pixels left after clipping the box to the image.

Targets: class ids (N,) long become soft targets (N, num_classes) (num_classes is needed then; the
trainer injects it); float targets (soft targets (N, K), or regression targets) are mixed as they are.
The output "y" is float whenever the input was class ids, also for samples left unmixed, so every
batch has one target type. The returned batch also holds "mix_lambda" (N,): the weight of each
sample's own target (1 for unmixed samples), and "mix_index" (N,): its partner's row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Augment, check_int, check_number, check_p, float_input, per_sample, randint, randperm, \
    replace, uniform, work_dtype
from .image import box_mask, centred_boxes
from .sampling import sample_beta


def _targets(name: str, batch: dict, num_classes: int | None, dtype: torch.dtype) -> torch.Tensor:
    if "y" not in batch:
        raise ValueError(f"{name} mixes labels and needs a 'y' in the batch")
    y, n = batch["y"], len(batch["x"])
    if not torch.is_tensor(y) or len(y) != n:
        raise ValueError(f"{name}: y must be a tensor with one row per sample ({n})")
    if y.is_floating_point():
        if num_classes is not None and y.dim() == 2 and y.shape[1] != num_classes:
            raise ValueError(f"{name}: soft targets have {y.shape[1]} columns but num_classes is {num_classes}")
        return y
    if y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name}: y must be class ids (integers) or float targets, got {y.dtype}")
    if num_classes is None:
        raise ValueError(f"{name} needs num_classes to turn class ids into soft targets")
    if y.dim() != 1:
        raise ValueError(f"{name}: class ids must have shape (N,), got {tuple(y.shape)}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name}: class ids must lie in [0, {num_classes}) (got {int(y.min())}..{int(y.max())})")
    return F.one_hot(y, num_classes).to(dtype)


def _mix_targets(y: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    w = per_sample(lam.to(y.device, work_dtype(y)), y)
    return (w * y + (1.0 - w) * y[perm]).to(y.dtype)


def _check_num_classes(num_classes):
    return None if num_classes is None else check_int("num_classes", num_classes, 1)


def _lambdas(alpha: float, p: float, per_sample_: bool, n: int, g: torch.Generator, device) -> torch.Tensor:
    """(N,) float64 mixing weights: Beta(alpha, alpha), one per batch or one per sample, and 1 where the
    batch (per_sample False) or the sample (per_sample True) is left unmixed (probability 1 - p)."""
    if per_sample_:
        lam = sample_beta(alpha, alpha, (n,), g).to(device)
        keep = uniform((n,), g, device, dtype=torch.float64) >= p
    else:
        lam = sample_beta(alpha, alpha, (1,), g).to(device).expand(n)
        keep = (uniform((1,), g, device, dtype=torch.float64) >= p).expand(n)
    return torch.where(keep, torch.ones_like(lam), lam)


class _LabelMixer(Augment):
    """The options mixup and cutmix share (each keeps its own default alpha in its signature, which is
    what the recipe schema reads)."""

    mixes_labels = True

    def __init__(self, alpha: float, p: float, per_sample: bool, num_classes: int | None):
        self.alpha = check_number("alpha", alpha, 0.0, None, low_open=True)
        self.p = check_p(p)
        self.per_sample = bool(per_sample)
        self.num_classes = _check_num_classes(num_classes)


class Mixup(_LabelMixer):
    """mixup (Zhang et al. 2017, arXiv 1710.09412): blend samples and their targets in pairs.

    x_i <- lam x_i + (1 - lam) x_j and the same for the targets, with j a random permutation of the batch
    and lam ~ Beta(alpha, alpha). One lam per batch, applied with probability p (the paper's form), or with
    per_sample one lam per sample, each sample mixed with probability p. Larger alpha mixes more (alpha 1:
    lam uniform)."""

    kind = "any"

    def __init__(self, alpha: float = 0.2, p: float = 1.0, per_sample: bool = False, *,
                 num_classes: int | None = None):
        super().__init__(alpha, p, per_sample, num_classes)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = float_input("mixup", batch, None, "(N, ...)")
        y = _targets("mixup", batch, self.num_classes, work_dtype(x))
        n = len(x)
        if self.p == 0.0:
            return replace(batch, y=y, mix_lambda=torch.ones(n, dtype=work_dtype(x), device=x.device),
                           mix_index=torch.arange(n, device=x.device))
        perm = randperm(n, generator, x.device)
        lam = _lambdas(self.alpha, self.p, self.per_sample, n, generator, x.device)
        w = per_sample(lam.to(work_dtype(x)), x)
        mixed = (w * x + (1.0 - w) * x[perm]).to(x.dtype)
        return replace(batch, x=mixed, y=_mix_targets(y, perm, lam),
                       mix_lambda=lam.to(work_dtype(x)), mix_index=perm)


class CutMix(_LabelMixer):
    """CutMix (Yun et al. 2019, arXiv 1905.04899): paste a box of another image, mix targets by area.

    For images (N, C, H, W): a box of a partner image (random permutation) is pasted into each image.
    lam ~ Beta(alpha, alpha); the box has sides H sqrt(1 - lam) and W sqrt(1 - lam) (rounded down), a
    centre uniform over the image, and is clipped to it; the targets are mixed by the area actually
    kept, 1 - box area / (H W). One lam per batch, applied with probability p (the paper's form; each
    image still gets its own box position), or with per_sample one lam per image, each mixed with
    probability p."""

    kind = "image"

    def __init__(self, alpha: float = 1.0, p: float = 1.0, per_sample: bool = False, *,
                 num_classes: int | None = None):
        super().__init__(alpha, p, per_sample, num_classes)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = float_input("cutmix", batch, 4, "(N, C, H, W)")
        y = _targets("cutmix", batch, self.num_classes, work_dtype(x))
        n, _, h, w = x.shape
        if self.p == 0.0:
            return replace(batch, y=y, mix_lambda=torch.ones(n, dtype=work_dtype(x), device=x.device),
                           mix_index=torch.arange(n, device=x.device))
        perm = randperm(n, generator, x.device)
        lam = _lambdas(self.alpha, self.p, self.per_sample, n, generator, x.device)
        cut = torch.sqrt(1.0 - lam)
        box_h, box_w = (cut * h).floor().long(), (cut * w).floor().long()
        cy, cx = randint(0, h, (n,), generator, x.device), randint(0, w, (n,), generator, x.device)
        top, left, bottom, right = centred_boxes(cy, cx, box_h, box_w, h, w)
        area = ((bottom - top) * (right - left)).to(torch.float64)
        kept = 1.0 - area / (h * w)
        box = box_mask(top, left, bottom, right, h, w).unsqueeze(1)          # (N, 1, H, W)
        return replace(batch, x=torch.where(box, x[perm], x), y=_mix_targets(y, perm, kept),
                       mix_lambda=kept.to(work_dtype(x)), mix_index=perm)
