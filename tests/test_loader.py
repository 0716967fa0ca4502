"""TensorLoader: batch randomness (order and transforms) is a pure function of (seed, epoch, batch), so
worker processes and a mid-epoch start give exactly the batches of a plain single-process pass."""
from __future__ import annotations

import pytest
import torch

from torchdojo.data.bundle import Split
from torchdojo.data.loader import TensorLoader


def noisy(batch: dict, generator: torch.Generator) -> dict:
    """A random transform that uses only the generator it is given."""
    return {**batch, "x": batch["x"] + torch.randn(batch["x"].shape, generator=generator)}


def split(n=103) -> Split:
    return Split(torch.arange(n * 3, dtype=torch.float32).reshape(n, 3), torch.arange(n) % 4)


def batches(loader: TensorLoader, epoch: int, start: int = 0) -> list[dict]:
    return list(loader.epoch(epoch, start=start))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["x"], y["x"]) and torch.equal(x["y"], y["y"])


@pytest.mark.parametrize("weights", [None, "balanced"])
def test_workers_and_mid_epoch_start_give_the_same_batches(weights):
    data = split()
    w = None if weights is None else torch.where(data.y == 0, 5.0, 1.0)
    plain = TensorLoader(data, 16, shuffle=True, seed=7, drop_last=True, weights=w, transform=noisy)
    workers = TensorLoader(data, 16, shuffle=True, seed=7, drop_last=True, weights=w, transform=noisy, num_workers=2)
    for epoch in (0, 3):
        expected = batches(plain, epoch)
        assert_same_batches(batches(workers, epoch), expected)
        assert_same_batches(batches(plain, epoch, start=4), expected[4:])
        assert_same_batches(batches(workers, epoch, start=4), expected[4:])


def test_transform_noise_differs_between_batches_and_epochs():
    loader = TensorLoader(split(), 16, seed=1, transform=noisy)
    clean = TensorLoader(split(), 16, seed=1)
    noise = [b["x"] - c["x"] for b, c in zip(batches(loader, 0), batches(clean, 0))]
    assert not torch.equal(noise[0], noise[1])
    again = [b["x"] - c["x"] for b, c in zip(batches(loader, 1), batches(clean, 1))]
    assert not torch.equal(noise[0], again[0])
    assert 0.8 < torch.cat(noise).std().item() < 1.2


def test_workers_leave_the_global_rng_alone():
    loader = TensorLoader(split(), 16, shuffle=True, seed=2, num_workers=2)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    batches(loader, 0, start=2)
    assert torch.equal(torch.rand(3), expected)


def test_workers_need_the_split_on_the_cpu():
    meta = Split(torch.zeros(8, 2, device="meta"), torch.zeros(8, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="worker processes need the split on the CPU"):
        TensorLoader(meta, 4, num_workers=2)
