"""What every augmentation shares: the `Augment` base (flags and repr), `Compose`, `identity`, option
checks, and random draws that come only from the caller's torch.Generator.

A transform is `transform(batch, generator) -> batch`: it returns a new dict, never writes into the
input tensors, keeps every key it does not know about, and takes all of its randomness from
`generator` (never the global torch RNG, numpy or `random`). Random numbers are drawn on the
generator's device and then moved to the batch's, so a CPU generator (what `TensorLoader` hands out)
also drives a batch that lives on a GPU, with the same numbers.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

import torch


class Augment:
    """Base of the built-in transforms: two class flags and a readable repr; nothing else.

    `kind` is the data a transform fits: "image" (N, C, H, W), "sequence" (N, C, L), "text" (token
    ids (N, L)), "table" (N, F), or "any" (every float input). `mixes_labels` is True for transforms
    that turn class ids into mixed soft targets (mixup, cutmix); test-time augmentation skips those."""

    kind: str = "any"
    mixes_labels: bool = False

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        names = [n for n in inspect.signature(type(self)).parameters if hasattr(self, n)]
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"


class Compose:
    """Apply transforms in order, all drawing from the one generator they are called with."""

    def __init__(self, transforms: Sequence[Callable[[dict, torch.Generator], dict]]):
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise ValueError(f"Compose takes callables transform(batch, generator); got {t!r}")

    @property
    def mixes_labels(self) -> bool:
        return any(getattr(t, "mixes_labels", False) for t in self.transforms)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        batch = dict(batch)
        for t in self.transforms:
            batch = t(batch, generator)
        return batch

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def identity(batch: dict, generator: torch.Generator) -> dict:
    """The transform that changes nothing (a new dict holding the same tensors)."""
    return dict(batch)


# ------------------------------------------------------------------------------------------ checks

def check_number(key: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float, or a ValueError naming `key` and the allowed range."""
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    span = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number in {span} (got {value!r})")
    v = float(value)
    if (low is not None and (v < low or (low_open and v == low))) or \
            (high is not None and (v > high or (high_open and v == high))):
        raise ValueError(f"{key} must be in {span} (got {value!r})")
    return v


def check_int(key: str, value, low: int = 0, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be a whole number (got {value!r})")
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{key} must be {span} (got {value!r})")
    return value


def check_p(value) -> float:
    return check_number("p", value, 0.0, 1.0)


def float_input(name: str, batch: dict, dims: int | None, shape_text: str) -> torch.Tensor:
    """batch["x"], checked to be floating point with `dims` dimensions (None: any, at least 1)."""
    if not isinstance(batch, dict) or "x" not in batch:
        raise ValueError(f"{name} expects a batch dict with an 'x' tensor")
    x = batch["x"]
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"{name} expects floating-point inputs {shape_text}; got x of dtype "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if (dims is not None and x.dim() != dims) or x.dim() < 1:
        raise ValueError(f"{name} expects inputs of shape {shape_text}; got x of shape {tuple(x.shape)}")
    return x


def replace(batch: dict, **items) -> dict:
    out = dict(batch)
    out.update(items)
    return out


# ------------------------------------------------------------------- random draws from the generator

def work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are worked on in float32."""
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def uniform(shape, g: torch.Generator, device, low: float = 0.0, high: float = 1.0,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    u = torch.rand(shape, generator=g, device=g.device, dtype=dtype)
    if low != 0.0 or high != 1.0:
        u = low + (high - low) * u
    return u.to(device)


def normal(shape, g: torch.Generator, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=g.device, dtype=dtype).to(device)


def randint(low: int, high: int, shape, g: torch.Generator, device) -> torch.Tensor:
    """Integers in [low, high)."""
    return torch.randint(low, high, shape, generator=g, device=g.device).to(device)


def randperm(n: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.randperm(n, generator=g, device=g.device).to(device)


def chosen(n: int, p: float, g: torch.Generator, device) -> torch.Tensor:
    """Which of n samples a transform applies to: each with probability p (p = 1: all)."""
    return uniform((n,), g, device) < p


def per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (N,) mask or value broadcastable against `like` (N, ...)."""
    return mask.reshape(mask.shape + (1,) * (like.dim() - 1))
