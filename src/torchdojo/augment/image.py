"""Image augmentations for float batches x of shape (N, C, H, W), each sample drawn on its own.

- `HFlip`, `VFlip`: mirror left-right / top-bottom.
- `Translate`: shift by whole pixels with zero fill (zero padding, then a random crop).
- `Rotate`, `Affine`: rotation / rotation + translation + scale + shear about the image centre,
  bilinear resampling with `affine_grid` / `grid_sample`, zero fill.
- `Cutout`: square holes filled with a constant (DeVries & Taylor 2017, "Improved Regularization of
  Convolutional Neural Networks with Cutout", arXiv 1708.04552).
- `RandAugment`: n random ops per sample at one shared magnitude (Cubuk et al. 2019, "RandAugment:
  Practical automated data augmentation with a reduced search space", arXiv 1909.13719).

Pixel values are not clamped (inputs may be standardised). Label-mixing image transforms (cutmix) are
in `mix.py`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import (Augment, check_int, check_number, check_p, chosen, float_input, per_sample,
                   randint, replace, uniform, work_dtype)

_IMAGE = "(N, C, H, W)"


def _images(name: str, batch: dict) -> torch.Tensor:
    return float_input(name, batch, 4, _IMAGE)


# ---------------------------------------------------------------------------------------- helpers

def warp(x: torch.Tensor, linear: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Resample images under per-sample affine maps p -> linear @ p + shift, in pixel units about the
    image centre (x to the right, y down): content at p moves to linear @ p + shift. Bilinear, zero
    fill outside the image. linear: (N, 2, 2), shift: (N, 2)."""
    n, _, h, w = x.shape
    dt = work_dtype(x)
    linear, shift = linear.to(x.device, dt), shift.to(x.device, dt)
    inv = torch.linalg.inv(linear)                                       # output pixel -> input pixel
    s = torch.tensor([w / 2.0, h / 2.0], dtype=dt, device=x.device)      # normalised -> pixel units
    theta_lin = inv * s[None, None, :] / s[None, :, None]                # S^-1 inv S
    theta_t = -(inv @ shift.unsqueeze(-1)).squeeze(-1) / s               # -S^-1 inv shift
    theta = torch.cat([theta_lin, theta_t.unsqueeze(-1)], dim=2)
    xf = x.to(dt)
    grid = F.affine_grid(theta, list(xf.shape), align_corners=False)
    return F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(x.dtype)


def rotation(radians: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(radians), torch.sin(radians)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def box_mask(top: torch.Tensor, left: torch.Tensor, bottom: torch.Tensor, right: torch.Tensor,
             h: int, w: int) -> torch.Tensor:
    """(..., H, W) bool masks of the boxes rows [top, bottom) x columns [left, right); args (...)."""
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    in_rows = (rows >= top.unsqueeze(-1)) & (rows < bottom.unsqueeze(-1))
    in_cols = (cols >= left.unsqueeze(-1)) & (cols < right.unsqueeze(-1))
    return in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)


def centred_boxes(cy: torch.Tensor, cx: torch.Tensor, box_h, box_w, h: int, w: int):
    """Boxes of box_h x box_w pixels centred at (cy, cx), clipped to the image (as in the cutout and
    cutmix reference code): (top, left, bottom, right)."""
    top, left = cy - box_h // 2, cx - box_w // 2
    return (top.clamp(0, h), left.clamp(0, w), (top + box_h).clamp(0, h), (left + box_w).clamp(0, w))


def _where(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(per_sample(mask, old), new, old)


# ----------------------------------------------------------------------------------------- flips

class HFlip(Augment):
    """Mirror each image left-right with probability p."""

    kind = "image"

    def __init__(self, p: float = 0.5):
        self.p = check_p(p)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _images("hflip", batch)
        if self.p == 0.0:
            return dict(batch)
        return replace(batch, x=_where(chosen(len(x), self.p, generator, x.device), x.flip(-1), x))


class VFlip(Augment):
    """Mirror each image top-bottom with probability p."""

    kind = "image"

    def __init__(self, p: float = 0.5):
        self.p = check_p(p)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _images("vflip", batch)
        if self.p == 0.0:
            return dict(batch)
        return replace(batch, x=_where(chosen(len(x), self.p, generator, x.device), x.flip(-2), x))


# ------------------------------------------------------------------------------------- geometric

class Translate(Augment):
    """Shift images by whole pixels with zero fill (pad-and-crop).

    dy and dx are uniform in [-max_pixels, max_pixels] per image: the same as zero padding by
    max_pixels and a random crop (the CIFAR recipe). Applied to each image with probability p."""

    kind = "image"

    def __init__(self, max_pixels: int = 2, p: float = 1.0):
        self.max_pixels = check_int("max_pixels", max_pixels, 0)
        self.p = check_p(p)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _images("translate", batch)
        m = self.max_pixels
        if self.p == 0.0 or m == 0:
            return dict(batch)
        n, c, h, w = x.shape
        d = randint(-m, m + 1, (n, 2), generator, x.device)
        d = d * chosen(n, self.p, generator, x.device).unsqueeze(1)
        # out[i, j] = x[i - dy, j - dx], zero where that falls outside: one gather over H * W
        rows = torch.arange(h, device=x.device) - d[:, :1]                   # (N, H)
        cols = torch.arange(w, device=x.device) - d[:, 1:]                   # (N, W)
        inside = ((rows >= 0) & (rows < h)).unsqueeze(2) & ((cols >= 0) & (cols < w)).unsqueeze(1)
        index = (rows.clamp(0, h - 1).unsqueeze(2) * w + cols.clamp(0, w - 1).unsqueeze(1)).view(n, 1, h * w)
        out = x.reshape(n, c, h * w).gather(2, index.expand(n, c, h * w)).view(n, c, h, w)
        return replace(batch, x=out.masked_fill(~inside.unsqueeze(1), 0.0))


class Rotate(Augment):
    """Rotate images by a random angle about their centre (bilinear, zero fill).

    The angle is uniform in [-max_degrees, max_degrees] per image; each image with probability p."""

    kind = "image"

    def __init__(self, max_degrees: float = 15.0, p: float = 1.0):
        self.max_degrees = check_number("max_degrees", max_degrees, 0.0, 180.0)
        self.p = check_p(p)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _images("rotate", batch)
        if self.p == 0.0:
            return dict(batch)
        n = len(x)
        angle = uniform((n,), generator, x.device, -1.0, 1.0, torch.float64) * math.radians(self.max_degrees)
        apply = chosen(n, self.p, generator, x.device)
        out = warp(x, rotation(angle), torch.zeros(n, 2, dtype=torch.float64, device=x.device))
        return replace(batch, x=_where(apply, out, x))


class Affine(Augment):
    """Random rotation, scale, shear and translation about the image centre (bilinear, zero fill).

    Per image, with probability p: rotation uniform in [-max_degrees, max_degrees], scale uniform in
    [min_scale, max_scale], shear along x by an angle uniform in [-max_shear, max_shear] degrees, and a
    translation of up to max_translate times the width (x) and height (y)."""

    kind = "image"

    def __init__(self, max_degrees: float = 10.0, max_translate: float = 0.1, min_scale: float = 0.9,
                 max_scale: float = 1.1, max_shear: float = 10.0, p: float = 1.0):
        self.max_degrees = check_number("max_degrees", max_degrees, 0.0, 180.0)
        self.max_translate = check_number("max_translate", max_translate, 0.0, 1.0)
        self.min_scale = check_number("min_scale", min_scale, 0.0, None, low_open=True)
        self.max_scale = check_number("max_scale", max_scale, 0.0, None, low_open=True)
        if self.min_scale > self.max_scale:
            raise ValueError(f"min_scale ({min_scale}) must be <= max_scale ({max_scale})")
        self.max_shear = check_number("max_shear", max_shear, 0.0, 80.0)
        self.p = check_p(p)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _images("affine", batch)
        if self.p == 0.0:
            return dict(batch)
        n, _, h, w = x.shape
        u = uniform((n, 5), generator, x.device, -1.0, 1.0, torch.float64)
        angle = u[:, 0] * math.radians(self.max_degrees)
        scale = self.min_scale + (u[:, 1] + 1.0) / 2.0 * (self.max_scale - self.min_scale)
        shear = torch.tan(u[:, 2] * math.radians(self.max_shear))
        shift = torch.stack([u[:, 3] * self.max_translate * w, u[:, 4] * self.max_translate * h], dim=1)
        shear_m = torch.eye(2, dtype=torch.float64, device=x.device).repeat(n, 1, 1)
        shear_m[:, 0, 1] = shear
        linear = rotation(angle) @ shear_m * scale[:, None, None]
        apply = chosen(n, self.p, generator, x.device)
        return replace(batch, x=_where(apply, warp(x, linear, shift), x))


# ---------------------------------------------------------------------------------------- cutout

class Cutout(Augment):
    """Cutout (DeVries & Taylor 2017, arXiv 1708.04552): square holes filled with a constant.

    Each image, with probability p, gets n_holes holes set to `fill`. A hole is `size` pixels on a side, or
    when size is None `fraction` of the image's height and width; its centre is uniform over the image and
    the part outside is clipped, as in the paper."""

    kind = "image"

    def __init__(self, fraction: float = 0.5, size: int | None = None, n_holes: int = 1, fill: float = 0.0,
                 p: float = 1.0):
        self.fraction = check_number("fraction", fraction, 0.0, 1.0, low_open=True)
        self.size = None if size is None else check_int("size", size, 1)
        self.n_holes = check_int("n_holes", n_holes, 1)
        self.fill = check_number("fill", fill)
        self.p = check_p(p)

    def hole_size(self, h: int, w: int) -> tuple[int, int]:
        if self.size is not None:
            return min(self.size, h), min(self.size, w)
        return max(1, round(self.fraction * h)), max(1, round(self.fraction * w))

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _images("cutout", batch)
        if self.p == 0.0:
            return dict(batch)
        n, _, h, w = x.shape
        hh, hw = self.hole_size(h, w)
        cy = randint(0, h, (n, self.n_holes), generator, x.device)
        cx = randint(0, w, (n, self.n_holes), generator, x.device)
        holes = box_mask(*centred_boxes(cy, cx, hh, hw, h, w), h, w).any(1)      # (N, H, W)
        holes = holes & per_sample(chosen(n, self.p, generator, x.device), holes)
        return replace(batch, x=x.masked_fill(holes.unsqueeze(1), self.fill))


# ----------------------------------------------------------------------------------- randaugment

class RandAugment(Augment):
    """RandAugment (Cubuk et al. 2019, arXiv 1909.13719): n random ops per image at one magnitude.

    Each image, with probability p, gets n ops in a row, each picked uniformly (per image) from identity,
    rotate, translate, shear, brightness, contrast and cutout, all at one magnitude in [0, 10]. At magnitude
    m, with a random sign per op: rotate 3m degrees; translate 0.03m of the side along x or y; shear factor
    0.03m along x or y; brightness x * (1 +- 0.09m); contrast mean + (1 +- 0.09m)(x - mean) (mean over the
    image); cutout one hole of 0.05m of the side (zero fill). Geometric ops resample bilinearly with zero
    fill. The photometric ops of the paper that assume 8-bit pixels (posterize, solarize, equalize, ...) are
    left out: inputs here are float tensors of any range."""

    kind = "image"
    OPS = ("identity", "rotate", "translate", "shear", "brightness", "contrast", "cutout")

    def __init__(self, n: int = 2, magnitude: float = 9.0, p: float = 1.0):
        self.n = check_int("n", n, 0)
        self.magnitude = check_number("magnitude", magnitude, 0.0, 10.0)
        self.p = check_p(p)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _images("randaugment", batch)
        if self.p == 0.0 or self.n == 0:
            return dict(batch)
        n, _, h, w = x.shape
        dev, m = x.device, self.magnitude / 10.0
        apply = chosen(n, self.p, generator, dev)
        f64 = torch.float64
        for _ in range(self.n):
            op = randint(0, len(self.OPS), (n,), generator, dev)
            op = torch.where(apply, op, torch.zeros_like(op))                 # not chosen: identity
            sign = torch.where(uniform((n,), generator, dev) < 0.5, -1.0, 1.0).to(f64)
            along_x = uniform((n,), generator, dev) < 0.5
            cy, cx = randint(0, h, (n,), generator, dev), randint(0, w, (n,), generator, dev)
            is_op = {name: op == i for i, name in enumerate(self.OPS)}

            angle = torch.where(is_op["rotate"], sign * math.radians(30.0 * m), 0.0)
            step = sign * 0.3 * m
            shift = torch.stack([torch.where(is_op["translate"] & along_x, step * w, 0.0),
                                 torch.where(is_op["translate"] & ~along_x, step * h, 0.0)], dim=1)
            shear = torch.eye(2, dtype=f64, device=dev).repeat(n, 1, 1)
            shear[:, 0, 1] = torch.where(is_op["shear"] & along_x, sign * 0.3 * m, 0.0)
            shear[:, 1, 0] = torch.where(is_op["shear"] & ~along_x, sign * 0.3 * m, 0.0)
            geometric = is_op["rotate"] | is_op["translate"] | is_op["shear"]
            if bool(geometric.any()):
                x = _where(geometric, warp(x, rotation(angle) @ shear, shift), x)

            factor = per_sample((1.0 + sign * 0.9 * m).to(work_dtype(x)), x)
            x = _where(is_op["brightness"], (x * factor).to(x.dtype), x)
            mean = x.mean(dim=(1, 2, 3), keepdim=True, dtype=work_dtype(x))
            x = _where(is_op["contrast"], (mean + factor * (x - mean)).to(x.dtype), x)

            side_h, side_w = max(1, round(0.5 * m * h)), max(1, round(0.5 * m * w))
            hole = box_mask(*centred_boxes(cy, cx, side_h, side_w, h, w), h, w)
            hole = hole & per_sample(is_op["cutout"] & (m > 0), hole)
            x = x.masked_fill(hole.unsqueeze(1), 0.0)
        return replace(batch, x=x)
