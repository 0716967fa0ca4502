"""Token-level augmentations for token ids x of shape (N, L) (integer dtype, kept as it is).

`p` is the rate per token. Special tokens (`special_ids`: padding, [CLS], [SEP], [MASK], ...; the
trainer passes the tokenizer's) are never dropped, replaced, swapped or masked, and a replacement is
never one of them; `pad_id` and `mask_id` count as special too. Every transform keeps the length L.
These are the token edits of "EDA" (Wei & Zou 2019, arXiv 1901.11196: random deletion, swap,
replacement) and the word dropout / masking noise of denoising pretraining (BERT, Devlin et al. 2018,
arXiv 1810.04805; Lewis et al. 2019, BART, arXiv 1910.13461).

Padding masks (attention masks) should be computed from `pad_id` after augmentation: `TokenDropout`
moves the padding.
"""
from __future__ import annotations

import torch

from .base import Augment, check_int, check_p, randint, replace, uniform


def _tokens(name: str, batch: dict) -> torch.Tensor:
    if not isinstance(batch, dict) or "x" not in batch:
        raise ValueError(f"{name} expects a batch dict with an 'x' tensor")
    x = batch["x"]
    if not torch.is_tensor(x) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} expects token ids (an integer tensor (N, L)); got x of dtype "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 2:
        raise ValueError(f"{name} expects token ids of shape (N, L); got x of shape {tuple(x.shape)}")
    return x


def _specials(special_ids, *extra) -> tuple[int, ...]:
    ids = [] if special_ids is None else list(special_ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"special_ids must be whole numbers (got {special_ids!r})")
    return tuple(sorted(set(ids) | {e for e in extra if e is not None}))


class _TokenAugment(Augment):
    kind = "text"
    special: tuple[int, ...] = ()

    def editable(self, x: torch.Tensor) -> torch.Tensor:
        """Positions holding ordinary (non-special) tokens."""
        if not self.special:
            return torch.ones_like(x, dtype=torch.bool)
        return ~torch.isin(x, torch.tensor(self.special, dtype=x.dtype, device=x.device))


class TokenDropout(_TokenAugment):
    """Delete ordinary tokens with probability p each, shifting the rest left and padding the end.

    The row keeps its length: it is filled up at the end with pad_id (random deletion)."""

    def __init__(self, p: float = 0.1, pad_id: int = 0, *, special_ids: list[int] | None = None):
        self.p = check_p(p)
        self.pad_id = check_int("pad_id", pad_id, 0)
        self.special_ids = special_ids
        self.special = _specials(special_ids, self.pad_id)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _tokens("token_dropout", batch)
        if self.p == 0.0:
            return dict(batch)
        drop = (uniform(x.shape, generator, x.device) < self.p) & self.editable(x)
        order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)      # kept tokens first, in order
        kept = x.gather(1, order)
        count = (~drop).sum(1, keepdim=True)
        tail = torch.arange(x.shape[1], device=x.device) >= count
        return replace(batch, x=kept.masked_fill(tail, self.pad_id))


class TokenReplace(_TokenAugment):
    """Replace ordinary tokens with probability p each by random ordinary token ids.

    Replacements are uniform over [0, vocab_size) without the special ids."""

    def __init__(self, p: float = 0.1, vocab_size: int | None = None, *, special_ids: list[int] | None = None):
        self.p = check_p(p)
        if vocab_size is None:
            raise ValueError("token_replace needs vocab_size (the number of token ids)")
        self.vocab_size = check_int("vocab_size", vocab_size, 1)
        self.special_ids = special_ids
        self.special = _specials(special_ids)
        allowed = torch.ones(self.vocab_size, dtype=torch.bool)
        allowed[[i for i in self.special if 0 <= i < self.vocab_size]] = False
        self._allowed = allowed.nonzero().squeeze(1)
        if self._allowed.numel() == 0:
            raise ValueError("token_replace: every id below vocab_size is special; nothing to replace with")

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _tokens("token_replace", batch)
        if self.p == 0.0:
            return dict(batch)
        hit = (uniform(x.shape, generator, x.device) < self.p) & self.editable(x)
        pick = randint(0, self._allowed.numel(), x.shape, generator, x.device)
        new = self._allowed.to(x.device)[pick].to(x.dtype)
        return replace(batch, x=torch.where(hit, new, x))


class TokenSwap(_TokenAugment):
    """Swap neighbouring ordinary tokens.

    Each position starts a swap with its right neighbour with
    probability p, and a start right after another start is dropped so that swaps never overlap (the
    realised rate is about p (1 - p))."""

    def __init__(self, p: float = 0.1, *, special_ids: list[int] | None = None):
        self.p = check_p(p)
        self.special_ids = special_ids
        self.special = _specials(special_ids)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _tokens("token_swap", batch)
        n, length = x.shape
        if self.p == 0.0 or length < 2:
            return dict(batch)
        ok = self.editable(x)
        start = (uniform((n, length - 1), generator, x.device) < self.p) & ok[:, :-1] & ok[:, 1:]
        start = start & ~torch.nn.functional.pad(start[:, :-1], (1, 0))    # no two starts side by side
        right = torch.nn.functional.pad(start, (0, 1)).long()              # position i swaps with i + 1
        left = torch.nn.functional.pad(start, (1, 0)).long()               # position i swaps with i - 1
        index = torch.arange(length, device=x.device) + right - left
        return replace(batch, x=x.gather(1, index))


class TokenMask(_TokenAugment):
    """Replace each ordinary token with mask_id with probability p."""

    def __init__(self, p: float = 0.15, mask_id: int | None = None, *, special_ids: list[int] | None = None):
        self.p = check_p(p)
        if mask_id is None:
            raise ValueError("token_mask needs mask_id (the id of the [MASK] token)")
        self.mask_id = check_int("mask_id", mask_id, 0)
        self.special_ids = special_ids
        self.special = _specials(special_ids, self.mask_id)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        x = _tokens("token_mask", batch)
        if self.p == 0.0:
            return dict(batch)
        hit = (uniform(x.shape, generator, x.device) < self.p) & self.editable(x)
        return replace(batch, x=x.masked_fill(hit, self.mask_id))
