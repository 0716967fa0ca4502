"""torchdojo.sync_batchnorm on the CPU (gloo, 2 processes): each process holds half of a batch; outputs,
gradients (of the inputs and of the affine parameters, after averaging as DDP does) and running
statistics equal plain BatchNorm on the whole batch in one process."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

from torchdojo.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

SHAPES = {"1d": (12, 5), "1d-seq": (12, 5, 7), "2d": (12, 3, 4, 4)}


def _batch(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A large offset: the naive E[x²] - E[x]² variance would lose digits here; the two-pass one does not.
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 100
    w = torch.randn(shape, generator=g, dtype=torch.float64)       # a fixed weighting: loss = mean(w * y)
    return x, w


def _norm(kind, channels, sync: bool, momentum=0.1):
    cls = {"1d": nn.BatchNorm1d, "1d-seq": nn.BatchNorm1d, "2d": nn.BatchNorm2d}[kind]
    bn = cls(channels, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, channels))
        bn.bias.copy_(torch.linspace(-1, 1, channels))
    return convert_sync_batchnorm(bn) if sync else bn


def _worker(rank, world, port, kind, momentum, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, w = _batch(SHAPES[kind])
        rows = x.shape[0] // world
        mine = slice(rank * rows, (rank + 1) * rows)
        bn = _norm(kind, x.shape[1], sync=True, momentum=momentum)
        assert isinstance(bn, SyncBatchNorm)
        xs = x[mine].clone().requires_grad_(True)
        results = {}
        for step in range(2):       # two steps: the running statistics' average is checked too
            y = bn(xs)
            # Each process's loss is the mean over its own rows; DDP then averages the gradients.
            loss = (w[mine] * y).sum() / rows
            bn.zero_grad()
            xs.grad = None
            loss.backward()
            results[f"y{step}"] = y.detach()
            results[f"xgrad{step}"] = xs.grad.clone()
            results[f"wgrad{step}"] = bn.weight.grad.clone() / world
            results[f"bgrad{step}"] = bn.bias.grad.clone() / world
            tdist.all_reduce(results[f"wgrad{step}"])
            tdist.all_reduce(results[f"bgrad{step}"])
        results["running_mean"], results["running_var"] = bn.running_mean, bn.running_var
        results["num_batches_tracked"] = bn.num_batches_tracked
        bn.eval()
        results["eval"] = bn(xs).detach()
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind,momentum", [("1d", 0.1), ("1d-seq", 0.1), ("2d", None)])
def test_two_processes_normalize_with_the_whole_batch(kind, momentum, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), kind, momentum, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, w = _batch(SHAPES[kind])
    bn = _norm(kind, x.shape[1], sync=False, momentum=momentum)
    x = x.clone().requires_grad_(True)
    rows = x.shape[0] // 2
    for step in range(2):
        y = bn(x)
        loss = (w * y).sum() / x.shape[0]
        bn.zero_grad()
        x.grad = None
        loss.backward()
        # The rows of rank r, and the gradient of the whole-batch mean loss (rank r's gradient is that of
        # its own mean, which is W times larger per row).
        for r, res in enumerate(ranks):
            mine = slice(r * rows, (r + 1) * rows)
            torch.testing.assert_close(res[f"y{step}"], y.detach()[mine])
            torch.testing.assert_close(res[f"xgrad{step}"] / 2, x.grad[mine])
            torch.testing.assert_close(res[f"wgrad{step}"], bn.weight.grad)
            torch.testing.assert_close(res[f"bgrad{step}"], bn.bias.grad)
    for res in ranks:
        torch.testing.assert_close(res["running_mean"], bn.running_mean)
        torch.testing.assert_close(res["running_var"], bn.running_var)
        assert int(res["num_batches_tracked"]) == 2
    bn.eval()
    torch.testing.assert_close(ranks[1]["eval"], bn(x).detach()[rows:])


def test_without_a_process_group_it_is_plain_batchnorm():
    x, _ = _batch(SHAPES["2d"])
    plain = _norm("2d", 3, sync=False)
    sync = _norm("2d", 3, sync=True)
    assert isinstance(sync, SyncBatchNorm)
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, plain.running_var, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        sync(torch.ones(3, dtype=torch.float64))


def test_conversion_keeps_weights_names_modes_and_frozen_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    model[1].running_mean.fill_(0.25)
    model[3][1].weight.requires_grad_(False)
    model[3][1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_sync_batchnorm(model)
    assert isinstance(model[1], SyncBatchNorm) and isinstance(model[3][1], SyncBatchNorm)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert not model[3][1].weight.requires_grad and not model[3][1].training and model[1].training
