"""Training diagnostics: what happens inside a run, cheap enough to leave on.

Every `every_steps` steps the method measures, per parameter tensor, the gradient norm, the weight norm
and the update-to-weight ratio ||w_after - w_before|| / ||w_before|| (Karpathy's rule of thumb: about
1e-3 per step is healthy; much larger diverges, much smaller barely learns), plus each optimizer group's
LR, each loss term, activation statistics of the nonlinearity modules (the share of dead ReLU units,
i.e. units that output 0 for every sample of the batch, and the share of saturated tanh/sigmoid outputs),
training throughput and peak memory. On the other steps it only counts samples.

Written as one `metrics.jsonl` line per measured step (and to TensorBoard):
`diag/grad_norm/<param>`, `diag/weight_norm/<param>`, `diag/update_ratio/<param>`,
`diag/dead_relu/<module>`, `diag/saturation/<module>`, `diag/lr/group<i>`, `diag/loss/<term>`,
`diag/samples_per_sec`, `diag/peak_memory_mb`.

Gradient norms are read in `on_after_backward`, in recipe order: list `diagnostics` before `grad_clip` to
see the norms before clipping (`grad_clip` logs the total norm before clipping as `train/grad_norm` anyway).
Activations are seen through forward hooks on nn.ReLU/LeakyReLU/GELU/SiLU/ELU/Tanh/Sigmoid modules
registered only for the measured step's forward; functional calls such as `F.relu` are not seen.
"""
from __future__ import annotations

import resource
import sys
import time

import torch
from torch import nn

from .base import Method

RECTIFIERS = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU)
SQUASHERS = (nn.Tanh, nn.Sigmoid, nn.Hardtanh)
SATURATED = 0.97          # |tanh| or distance of sigmoid from 0.5 (scaled to [0, 1]) above this counts


def dead_fraction(out: torch.Tensor) -> torch.Tensor:
    """Share of units (all dims but the batch) that are <= 0 for every sample of the batch."""
    flat = out.detach().reshape(out.shape[0], -1)
    return (flat <= 0).all(dim=0).float().mean()


def saturated_fraction(out: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Share of outputs in the flat tails of a squashing nonlinearity."""
    out = out.detach()
    scaled = (out - 0.5).abs() * 2 if isinstance(module, nn.Sigmoid) else out.abs()
    return (scaled > SATURATED).float().mean()


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last call (then reset), or the process's peak resident set
    size on the CPU (which only grows)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss        # KiB on Linux, bytes on macOS
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


class Diagnostics(Method):
    """Per-layer gradient/weight norms, update ratios, activation health, LRs, loss terms, throughput and
    memory every `every_steps` steps (see the module docstring for the metric names)."""

    def __init__(self, every_steps: int = 50, activations: bool = True):
        if every_steps < 1:
            raise ValueError("every_steps must be at least 1")
        self.every_steps, self.activations = every_steps, activations
        self.last: dict[str, float] = {}          # the latest measurement, for use without a run dir
        self._active = False
        self._hooks: list = []

    def on_fit_start(self, state) -> None:
        self._params = [(n, p) for n, p in state.model.named_parameters()]
        self._act_modules = [(n, m) for n, m in state.model.named_modules() if isinstance(m, RECTIFIERS + SQUASHERS)]
        self._samples, self._since = 0, time.perf_counter()

    # -- a measured step: on_batch -> on_loss -> on_after_backward -> on_step_end ------------------

    def on_batch(self, state, batch: dict) -> dict:
        self._samples += len(batch["y"])
        self._active = (state.step + 1) % self.every_steps == 0
        if self._active:
            for h in self._hooks:               # left over if a rollback interrupted a measured step
                h.remove()
            self._entry: dict[str, float] = {}
            self._act: dict[str, list[torch.Tensor]] = {}
            self._losses: dict[str, list[torch.Tensor]] = {}
            if self.activations:
                self._hooks = [m.register_forward_hook(self._activation_hook(name)) for name, m in self._act_modules]
        return batch

    def _activation_hook(self, name: str):
        def hook(module, inputs, out):
            if isinstance(out, torch.Tensor) and out.ndim >= 1 and out.shape[0] > 0:
                value = dead_fraction(out) if isinstance(module, RECTIFIERS) else saturated_fraction(out, module)
                self._act.setdefault(name, []).append(value)
        return hook

    def on_loss(self, state, loss, parts: dict):
        if self._active:
            for term, value in parts.items():      # one entry per micro-batch with gradient accumulation
                self._losses.setdefault(term, []).append(value.detach())
        return loss

    def on_after_backward(self, state) -> None:
        if not self._active:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        with torch.no_grad():
            named_grads = [(n, p.grad) for n, p in self._params if p.grad is not None]
            grad_norms = torch._foreach_norm([g for _, g in named_grads]) if named_grads else []
            weights = [p.detach() for _, p in self._params]
            weight_norms = torch._foreach_norm(weights)
            self._before = [w.clone() for w in weights]
        e = self._entry
        for (name, _), norm in zip(named_grads, grad_norms):
            e[f"diag/grad_norm/{name}"] = norm.item()
        for (name, _), norm in zip(self._params, weight_norms):
            e[f"diag/weight_norm/{name}"] = norm.item()
        for name, values in self._act.items():
            module = dict(self._act_modules)[name]
            kind = "dead_relu" if isinstance(module, RECTIFIERS) else "saturation"
            e[f"diag/{kind}/{name}"] = torch.stack(values).mean().item()
        for term, values in self._losses.items():
            e[f"diag/loss/{term}"] = torch.stack(values).mean().item()

    def on_step_end(self, state) -> None:
        if not self._active:
            return
        self._active = False
        with torch.no_grad():
            after = [p.detach() for _, p in self._params]
            changes = torch._foreach_norm(torch._foreach_sub(after, self._before))
            norms = torch._foreach_norm(self._before)
        e = self._entry
        for (name, _), change, norm in zip(self._params, changes, norms):
            e[f"diag/update_ratio/{name}"] = change.item() / max(norm.item(), 1e-12)
        for i, group in enumerate(state.optimizer.param_groups):
            e[f"diag/lr/group{i}"] = float(group["lr"])
        now = time.perf_counter()
        e["diag/samples_per_sec"] = self._samples / max(now - self._since, 1e-9)
        e["diag/peak_memory_mb"] = peak_memory_mb(state.device)
        self._samples, self._since = 0, now
        self._before = []
        self.last = dict(e)
        state.emit(e)

    def on_step_skipped(self, state) -> None:
        # A skipped (non-finite) step has no update to measure: drop the measurement.
        for h in self._hooks:
            h.remove()
        self._hooks, self._active, self._before = [], False, []
