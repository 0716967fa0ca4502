"""Gamma and Beta samples driven by a torch.Generator.

`torch.distributions` and `torch._standard_gamma` draw from the global RNG, which would make an
augmented batch depend on everything else the process did. These samplers use only
`torch.rand/randn(generator=...)`:

- Gamma(a, 1) for a >= 1 by Marsaglia & Tsang (2000), "A simple method for generating gamma
  variables", ACM TOMS 26(3): a squeeze-accepted transformed normal, vectorised with a rejection loop
  (acceptance is above 95% for every a, so one or two rounds).
- Gamma(a) for a < 1 as Gamma(a + 1) * U^(1/a) (the same paper's boost), kept in log space so that tiny a
  (U^(1/a) underflowing to 0) cannot turn a Beta sample into 0/0.
- Beta(a, b) = X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b), computed as sigmoid(log X - log Y).

Samples are float64, drawn on the generator's device; the number of draws depends on the rejections,
but all of them come from the generator, so a seeded generator gives identical samples.
"""
from __future__ import annotations

import torch


def _as_params(value, shape) -> torch.Tensor:
    a = torch.as_tensor(value, dtype=torch.float64)
    if not bool(torch.isfinite(a).all()) or bool((a <= 0).any()):
        raise ValueError(f"Gamma/Beta parameters must be finite and > 0 (got {value!r})")
    return torch.broadcast_to(a, shape).reshape(-1)


def log_gamma_sample(concentration, shape, generator: torch.Generator) -> torch.Tensor:
    """log of Gamma(concentration, 1) samples of the given shape (float64, on the generator's device)."""
    shape = tuple(torch.Size(shape))
    dev = generator.device
    a = _as_params(concentration, shape).to(dev)
    boost = a < 1.0
    d = torch.where(boost, a + 1.0, a) - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(a)
    todo = torch.arange(a.numel(), device=dev)
    while todo.numel():
        z = torch.randn(todo.numel(), generator=generator, device=dev, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=generator, device=dev, dtype=torch.float64)
        dd, cc = d[todo], c[todo]
        v = (1.0 + cc * z) ** 3
        positive = v > 0
        log_v = torch.log(torch.where(positive, v, torch.ones_like(v)))
        ok = positive & (torch.log(u) < 0.5 * z * z + dd - dd * v + dd * log_v)
        out[todo[ok]] = torch.log(dd[ok]) + log_v[ok]
        todo = todo[~ok]
    if bool(boost.any()):
        # Gamma(a) = Gamma(a + 1) * U^(1/a); 1 - rand lies in (0, 1], so log U is finite.
        u = 1.0 - torch.rand(a.shape, generator=generator, device=dev, dtype=torch.float64)
        out = torch.where(boost, out + torch.log(u) / a, out)
    return out.reshape(shape)


def sample_gamma(concentration, shape, generator: torch.Generator) -> torch.Tensor:
    """Gamma(concentration, rate 1) samples (float64, on the generator's device)."""
    return torch.exp(log_gamma_sample(concentration, shape, generator))


def sample_beta(a, b, shape, generator: torch.Generator) -> torch.Tensor:
    """Beta(a, b) samples in [0, 1] (float64, on the generator's device); a and b are numbers or
    tensors broadcastable to `shape`."""
    log_x = log_gamma_sample(a, shape, generator)
    log_y = log_gamma_sample(b, shape, generator)
    return torch.sigmoid(log_x - log_y)
