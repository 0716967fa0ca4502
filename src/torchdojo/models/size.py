"""How large a model is before it is built: the recipe's model is first built on torch's `meta` device,
where tensors have shapes and dtypes but no storage, so a model of 10**12 parameters costs nothing to
count there (milliseconds for the small models of a recipe). A model beyond the machine's memory, or one
whose options the constructor refuses (a width of 10**30 is a TypeError inside torch), is then one
ConfigError on `model` instead of an allocator error or a traceback from the real build."""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError, DojoError

# Training holds each parameter about four times: the weights, their gradients and an optimizer's two
# moments (Adam); activations, data and the framework need the rest of the memory.
COPIES_IN_TRAINING = 4


def memory_bytes() -> int:
    """The machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(number of parameter and buffer elements, their bytes)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def check_model_size(build: Callable[[], nn.Module], name: str, copies: int = 1,
                     budget: int | None = None) -> int | None:
    """Build the model with `build()` on the meta device and refuse it when `copies` of it (an ensemble's
    members) would need more than `budget` bytes in training (default: the physical memory divided by
    COPIES_IN_TRAINING). Returns the number of elements of one model, or None for a model whose
    constructor needs real tensors (one that loads a trained run's weights, an op with no meta kernel):
    its real build is then the only check."""
    try:
        with torch.device("meta"):
            model = build()
    except DojoError:
        raise
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
        if isinstance(exc, NotImplementedError) or "meta" in str(exc):
            return None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError("model", f"cannot build model '{name}': {first}") from None
    count, size = model_bytes(model)
    count, size = count * copies, size * copies
    limit = memory_bytes() // COPIES_IN_TRAINING if budget is None else budget
    if size > limit:
        what = f"{copies} members of {count // copies:,}" if copies > 1 else f"{count:,}"
        raise ConfigError("model", f"model '{name}' has {what} parameters and buffers: {_gib(size)} of weights "
                                   f"(~4 bytes each), about {_gib(size * COPIES_IN_TRAINING)} with gradients and "
                                   f"optimizer state, more than {_gib(limit * COPIES_IN_TRAINING)} of memory; "
                                   "make it smaller")
    return count // copies


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:,.1f} GiB"
