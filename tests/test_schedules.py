"""Learning-rate schedules: pure step -> multiplier functions, their composition and LambdaLR use."""
from __future__ import annotations

import math

import pytest
import torch

from torchdojo.registry import SCHEDULES
from torchdojo.schedules import Segment, as_lambda_lr, compose, constant, cosine, step, warmup


def values(segments, total, steps_per_epoch=1, n=None):
    f = compose(segments, total, steps_per_epoch)
    return [f(t) for t in range(total if n is None else n)]


def test_no_segments_is_constant_one():
    assert values([], 5) == [1.0] * 5


def test_constant():
    assert values([constant(0.3)], 7) == [0.3] * 7
    assert values([constant()], 3) == [1.0] * 3


def test_warmup_is_linear_and_reaches_one_on_its_last_step():
    got = values([warmup(steps=4)], 8)
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0], abs=1e-15)
    got = values([warmup(steps=5, start_factor=0.5)], 5)
    assert got == pytest.approx([0.5 + 0.5 * (t + 1) / 5 for t in range(5)], abs=1e-15)
    assert got[-1] == 1.0
    # Strictly increasing during warmup.
    assert all(b > a for a, b in zip(got, got[1:]))


@pytest.mark.parametrize("min_factor", [0.0, 0.1])
def test_cosine_formula(min_factor):
    n = 10
    got = values([cosine(min_factor=min_factor)], n, n=n + 3)
    expected = [min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t / n)) for t in range(n)]
    assert got[:n] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert got[0] == 1.0
    assert all(b < a for a, b in zip(got[:n], got[1:n]))
    assert min(got) >= min_factor
    # Past the end of the last segment, its final value holds.
    assert got[n:] == [got[n - 1]] * 3


def test_step_every_steps_and_every_epochs():
    assert values([step(every_steps=3, gamma=0.5)], 9) == pytest.approx(
        [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25])
    # every_epochs counts in steps per epoch: 2 epochs of 4 steps = every 8 steps.
    got = values([step(every_epochs=2, gamma=0.1)], 20, steps_per_epoch=4)
    assert got == pytest.approx([0.1 ** (t // 8) for t in range(20)], rel=1e-12)
    got = values([step(every_epochs=0.5, gamma=0.5)], 8, steps_per_epoch=4)
    assert got == pytest.approx([0.5 ** (t // 2) for t in range(8)], rel=1e-12)


def test_composition_with_open_ended_segment_filling_the_rest():
    total = 20
    segs = [warmup(steps=4), cosine(min_factor=0.2), constant(0.05, steps=3)]
    got = values(segs, total, n=total + 2)
    n_cos = total - 4 - 3
    expected = [(t + 1) / 4 for t in range(4)]
    expected += [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * t / n_cos)) for t in range(n_cos)]
    expected += [0.05] * 3 + [0.05] * 2
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # The last segment does not have to fill the phase: after it, its last value holds.
    got = values([warmup(steps=2), constant(0.5, steps=2)], 6)
    assert got == pytest.approx([0.5, 1.0, 0.5, 0.5, 0.5, 0.5])


def test_segment_lengths_in_epochs():
    spe = 10
    segs = [warmup(epochs=0.5), cosine(epochs=2)]        # 5 steps, then 20 steps
    got = values(segs, 30, steps_per_epoch=spe)
    assert got[:5] == pytest.approx([(t + 1) / 5 for t in range(5)])
    assert got[5:25] == pytest.approx([0.5 * (1 + math.cos(math.pi * t / 20)) for t in range(20)], rel=1e-12)
    assert got[25:] == [got[24]] * 5
    short = compose([Segment(lambda t, n, e: 1.0, epochs=0.01), constant(0.5)], 10, steps_per_epoch=10)
    assert short.lengths[0] == 1                                         # never shorter than one step
    assert compose([Segment(lambda t, n, e: 1.0, epochs=1.5), constant()], 20, steps_per_epoch=4).lengths[0] == 6


def test_errors():
    with pytest.raises(ValueError, match="only one"):
        compose([cosine(), constant()], 10)
    with pytest.raises(ValueError, match="length"):
        warmup()
    with pytest.raises(ValueError):
        warmup(steps=3, epochs=1.0)
    with pytest.raises(ValueError):
        cosine(steps=0)
    with pytest.raises(ValueError):
        step(gamma=0.5)
    with pytest.raises(ValueError):
        step(every_steps=2, every_epochs=1)


def test_registered_schedules_build_from_recipe_specs():
    assert {"constant", "warmup", "cosine", "step"} <= set(SCHEDULES.names())
    seg = SCHEDULES.build({"name": "warmup", "steps": 4})
    assert values([seg], 4) == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_as_lambda_lr_gives_the_same_lrs_in_a_plain_loop():
    total, spe, base = 25, 5, 0.1
    segs = [warmup(steps=5), cosine(min_factor=0.1)]
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([param], lr=base, momentum=0.9)
    sched = as_lambda_lr(opt, segs, total, spe)
    f = compose(segs, total, spe)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        param.sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert seen == pytest.approx([base * f(t) for t in range(total)], rel=1e-12)
    assert seen[4] == pytest.approx(base)
    assert seen[-1] == pytest.approx(base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 19 / 20))))
