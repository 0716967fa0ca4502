"""Synchronized BatchNorm: in data-parallel training, normalize with the statistics of the whole global
batch instead of each process's slice (Ioffe & Szegedy 2015, arXiv 1502.03167, for BatchNorm; the
cross-device statistics as in Peng et al. 2018, MegDet, arXiv 1711.07240).

torch.nn.SyncBatchNorm only runs on accelerators (it raises for CPU tensors), so on the CPU, with the
gloo backend, torchdojo uses `SyncBatchNorm` below: two all-reduces per layer in the forward pass (the
per-channel sums and counts, then the sums of squared deviations from the global mean: the two-pass
variance, which does not cancel catastrophically the way E[x²] - E[x]² can) and their transposes in the
backward pass, so gradients flow to every process's inputs. Under DistributedDataParallel with a mean
loss, parameters then follow the single-process run on the whole batch with plain BatchNorm.
`convert_sync_batchnorm` picks torch's module on CUDA and this one otherwise."""
from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn


class _SumOverProcesses(torch.autograd.Function):
    """all_reduce(SUM) that autograd can differentiate: every process's output is the same sum, so the
    gradient for one process's input is the sum of all processes' output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        return grad


def _syncing() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over inputs of shape (N, C, ...) whose training statistics are those of the global batch
    of all processes. It behaves exactly like BatchNorm1d/2d/3d in eval mode, without a process group, or
    with one process; its parameters and buffers have BatchNorm's names, so checkpoints are
    interchangeable. Every process must call it the same number of times (each call is a collective)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, ...), got {input.dim()} dimension(s)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _syncing()):
            return super().forward(x)
        self._check_input_dim(x)
        if x.dtype in (torch.float16, torch.bfloat16):     # statistics in float32, as BatchNorm under autocast
            x = x.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        # One collective for the sums and the row count (processes may hold different numbers of rows).
        local = torch.cat([x.sum(dims), x.new_full((1,), x.numel() // x.shape[1])])
        total = _SumOverProcesses.apply(local)
        count = total[-1]
        mean = total[:-1] / count
        centered = x - mean.view(shape)
        var = _SumOverProcesses.apply((centered * centered).sum(dims)) / count
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), float(count.detach()))
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """As BatchNorm does: an exponential (or, with momentum None, cumulative) average of the batch
        mean and the unbiased batch variance."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with every BatchNorm layer synchronized across processes (in place; returned for
    convenience): torch.nn.SyncBatchNorm when the model is on CUDA, `SyncBatchNorm` otherwise. Weights,
    running statistics, requires_grad and train/eval mode carry over; call it before building the
    optimizer, as the BatchNorm parameters are new tensors."""
    on_cuda = any(t.is_cuda for t in [*model.parameters(), *model.buffers()])
    if on_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        like = module.weight if module.affine else module.running_mean
        if like is not None:
            sync.to(device=like.device, dtype=like.dtype)
        sync.load_state_dict(module.state_dict())
        for new, old in zip(sync.parameters(), module.parameters()):
            new.requires_grad_(old.requires_grad)
        sync.train(module.training)
        return sync
    for name, child in list(module.named_children()):
        setattr(module, name, _convert(child))
    return module
