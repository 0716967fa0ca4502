"""LR schedules against closed forms written out here, against torch's own schedulers, and the
stateful `plateau` segment (patience, thresholds, cooldown, state_dict) in a Schedule and in LambdaLR.

Index convention: `schedule(t)` is the multiplier used by optimizer step t (0-based), evaluated
before that step. A torch scheduler is stepped after each optimizer step, so the LR torch uses at
optimizer step t is its closed form at `last_epoch == t`: reading `optimizer.param_groups[0]["lr"]`
before each `optimizer.step()` gives the sequence to compare with `[schedule(t) for t in ...]`."""
from __future__ import annotations

import copy
import io
import math
import random

import pytest
import torch

from torchdojo.schedules import (SCHEDULES, Clock, Schedule, as_lambda_lr, compose, constant, cosine,
                                 cosine_restarts, exponential, exponential_warmup, linear_warmup,
                                 one_cycle, plateau, polynomial, step, warmup)

# -- helpers -----------------------------------------------------------------------------------------

# A Clock whose epochs have 10, 5, 5, 20, 20, ... steps: epochs start at steps 0, 10, 15, 20, 40, 60, ...
EPOCH_SIZES = [10, 5, 5, 20]


def size_of_epoch(k: int) -> int:
    return EPOCH_SIZES[k] if k < len(EPOCH_SIZES) else 20


def varying_clock() -> Clock:
    return Clock(lambda k: [10, 5, 5, 20][k] if k < 4 else 20)


def epoch_of(t: int) -> float:
    """Fractional epoch at step t for the varying clock, computed independently of Clock."""
    k, start = 0, 0
    while start + size_of_epoch(k) <= t:
        start += size_of_epoch(k)
        k += 1
    return k + (t - start) / size_of_epoch(k)


def values(schedule, n: int) -> list[float]:
    return [schedule(t) for t in range(n)]


def cos_anneal(t: float, n: float, top: float = 1.0, floor: float = 0.0) -> float:
    """Cosine from `top` at t=0 down to `floor` at t=n."""
    return floor + (top - floor) * (1 + math.cos(math.pi * t / n)) / 2


def torch_lrs(make_scheduler, n: int, base: float = 0.1) -> list[float]:
    """The LR a torch scheduler gives optimizer steps 0..n-1 in the usual loop."""
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=base)
    sched = make_scheduler(opt)
    seen = []
    for _ in range(n):
        seen.append(opt.param_groups[0]["lr"])
        param.sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return seen


def max_inner_change(seq: list[float]) -> float:
    return max(abs(b - a) for a, b in zip(seq, seq[1:]))


def restarts(seq: list[float]) -> list[int]:
    """Steps where the multiplier jumps up (a cosine_restarts cycle starts)."""
    return [t + 1 for t, (a, b) in enumerate(zip(seq, seq[1:])) if b > a + 1e-12]


# -- Clock ----------------------------------------------------------------------------------------------

def test_clock_constant_and_varying():
    c = Clock(4)
    assert [c.steps_at(e) for e in (0, 1, 1.5, 2.25, 10)] == [0, 4, 6, 9, 40]
    assert [c.epoch_at(s) for s in (0, 3, 4, 6, 41)] == pytest.approx([0, 0.75, 1, 1.5, 10.25])
    v = varying_clock()
    assert [v.steps_at(e) for e in (0, 1, 2, 3, 4, 5, 1.4, 3.25, 4.5)] == [0, 10, 15, 20, 40, 60, 12, 25, 50]
    for s in (0, 3, 10, 12, 15, 19, 20, 25, 39, 40, 45, 77):
        assert v.epoch_at(s) == pytest.approx(epoch_of(s))
        assert v.steps_at(v.epoch_at(s)) == s


# -- every pure segment against its closed form ----------------------------------------------------------

N = 20
LO, END = 1 / 25, 1 / (25 * 1e4)

CLOSED_FORMS = {
    "constant": (constant(0.3), lambda t: 0.3),
    "constant_default": (constant(), lambda t: 1.0),
    "linear_warmup": (linear_warmup(steps=N), lambda t: (t + 1) / N),
    "warmup_start_factor": (warmup(steps=N, start_factor=0.2), lambda t: 0.2 + 0.8 * (t + 1) / N),
    "exponential_warmup": (exponential_warmup(steps=N, start_factor=0.01), lambda t: 0.01 ** ((N - 1 - t) / N)),
    "cosine": (cosine(), lambda t: (1 + math.cos(math.pi * t / N)) / 2),
    "cosine_min": (cosine(min_factor=0.1), lambda t: 0.1 + 0.9 * (1 + math.cos(math.pi * t / N)) / 2),
    "step": (step(every_steps=3, gamma=0.5), lambda t: 0.5 ** (t // 3)),
    "step_default_gamma": (step(every_steps=7), lambda t: 0.1 ** (t // 7)),
    "exponential_per_step": (exponential(gamma=0.9), lambda t: 0.9 ** t),
    "exponential_every_4": (exponential(gamma=0.5, every_steps=4), lambda t: 0.5 ** (t / 4)),
    "polynomial_linear": (polynomial(), lambda t: 1 - t / N),
    "polynomial_power2": (polynomial(power=2.0), lambda t: (1 - t / N) ** 2),
    "polynomial_power2_end": (polynomial(power=2.0, end_factor=0.1), lambda t: 0.1 + 0.9 * (1 - t / N) ** 2),
    # pct_start 0.25 of 20 steps: up for 5 steps, peak at step 5, down over steps 5..19.
    "one_cycle": (one_cycle(pct_start=0.25),
                  lambda t: cos_anneal(t, 5, LO, 1.0) if t < 5 else cos_anneal(t - 5, N - 1 - 5, 1.0, END)),
}


@pytest.mark.parametrize("name", list(CLOSED_FORMS))
def test_segment_matches_closed_form_and_holds_after_the_end(name):
    seg, form = CLOSED_FORMS[name]
    got = values(compose([seg], N), N + 4)
    expected = [form(t) for t in range(N)]
    assert got[:N] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert got[N:] == [got[N - 1]] * 4            # after the last segment its final value holds


def test_registry_names_cover_every_schedule():
    assert set(SCHEDULES) == {"constant", "linear_warmup", "warmup", "exponential_warmup", "cosine",
                              "cosine_restarts", "step", "exponential", "one_cycle", "polynomial", "plateau"}
    assert SCHEDULES["warmup"] is linear_warmup


# -- epoch units ----------------------------------------------------------------------------------------

def test_epoch_lengths_with_a_constant_clock():
    spe = 8
    s = compose([exponential_warmup(epochs=0.5, start_factor=0.1), one_cycle(epochs=2, pct_start=0.5),
                 polynomial(epochs=1.25, power=2)], 100, spe)
    assert s.lengths == [4, 16, 10] and s.starts == [0, 4, 20]
    got = values(s, 32)
    assert got[:4] == pytest.approx([0.1 ** ((3 - t) / 4) for t in range(4)], rel=1e-12)
    assert got[4:20] == pytest.approx([cos_anneal(t, 8, LO, 1) if t < 8 else cos_anneal(t - 8, 7, 1, END)
                                       for t in range(16)], rel=1e-12, abs=1e-15)
    assert got[20:30] == pytest.approx([(1 - t / 10) ** 2 for t in range(10)], rel=1e-12, abs=1e-15)
    assert got[30:] == [got[29]] * 2


def test_epoch_lengths_with_a_varying_clock():
    # Epoch 0 has 10 steps, epochs 1 and 2 have 5, epoch 3 has 20.
    s = compose([warmup(epochs=1), cosine(epochs=2, min_factor=0.2), constant(0.3, epochs=1)], 60, varying_clock())
    assert s.lengths == [10, 10, 20] and s.starts == [0, 10, 20]
    got = values(s, 45)
    assert got[:10] == pytest.approx([(t + 1) / 10 for t in range(10)], rel=1e-12)
    assert got[10:20] == pytest.approx([cos_anneal(t, 10, 1, 0.2) for t in range(10)], rel=1e-12)
    assert got[20:] == [0.3] * 25
    # Fractional epochs count within their own epoch: 1.4 epochs = 10 + 0.4 * 5 steps; one more epoch
    # from epoch 1.4 ends at epoch 2.4 = step 15 + 0.4 * 5.
    s = compose([warmup(epochs=1.4), polynomial(epochs=1)], 30, varying_clock())
    assert s.lengths == [12, 5]
    assert values(s, 17)[12:] == pytest.approx([1 - t / 5 for t in range(5)], rel=1e-12)


def test_every_epochs_with_a_constant_clock():
    spe = 4
    got = values(compose([step(every_epochs=1.5, gamma=0.5)], 30, spe), 30)
    assert got == pytest.approx([0.5 ** (t // 6) for t in range(30)], rel=1e-12)
    got = values(compose([exponential(gamma=0.5, every_epochs=2)], 30, spe), 30)
    assert got == pytest.approx([0.5 ** (t / 8) for t in range(30)], rel=1e-12)
    # Inside a later segment the epochs count from the segment's start (here 6 steps = 1.5 epochs in).
    got = values(compose([warmup(steps=6), step(every_epochs=1, gamma=0.5)], 30, spe), 30)
    assert got[6:] == pytest.approx([0.5 ** ((t - 6) // 4) for t in range(6, 30)], rel=1e-12)


def test_every_epochs_with_a_varying_clock():
    got = values(compose([step(every_epochs=1, gamma=0.5)], 80, varying_clock()), 80)
    assert got == pytest.approx([0.5 ** math.floor(epoch_of(t)) for t in range(80)], rel=1e-12)
    assert got[9] == 1 and got[10] == 0.5 and got[14] == 0.5 and got[15] == 0.25 and got[20] == 0.125
    got = values(compose([step(every_epochs=2, gamma=0.1)], 80, varying_clock()), 80)
    assert got == pytest.approx([0.1 ** math.floor(epoch_of(t) / 2) for t in range(80)], rel=1e-12)
    got = values(compose([exponential(gamma=0.5, every_epochs=1)], 80, varying_clock()), 80)
    assert got == pytest.approx([0.5 ** epoch_of(t) for t in range(80)], rel=1e-12)
    # A segment starting at step 10 (epoch 1) counts epochs since then.
    got = values(compose([warmup(steps=10), step(every_epochs=1, gamma=0.5)], 80, varying_clock()), 80)
    assert got[10:] == pytest.approx([0.5 ** math.floor(epoch_of(t) - 1) for t in range(10, 80)], rel=1e-12)
    assert got[14] == 1 and got[15] == 0.5 and got[20] == 0.25 and got[40] == 0.125


def test_epoch_segment_after_the_open_ended_one_spans_its_epochs_where_it_lies():
    # `constant(epochs=1)` after an open-ended cosine: it runs at the end of the phase, so it must span one
    # epoch there. The phase's last epoch (epoch 3, steps 20..39) has 20 steps, so the cosine gets 18.
    s = compose([warmup(steps=2), cosine(), constant(0.1, epochs=1)], 40, varying_clock())
    start, n = s.starts[2], s.lengths[2]
    assert sum(s.lengths) == 40
    assert epoch_of(start + n) - epoch_of(start) == pytest.approx(1.0), (s.lengths, s.starts)
    assert s.lengths == [2, 18, 20]


# -- cosine_restarts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,cycles", [(40, 4), (42, 4), (30, 1), (31, 3)])
def test_cosine_restarts_equal_cycles(n, cycles):
    s = compose([cosine_restarts(cycles=cycles, min_factor=0.05)], n)
    got = values(s, n)
    starts = [0] + restarts(got)
    assert len(starts) == cycles
    lengths = [b - a for a, b in zip(starts, starts[1:] + [n])]
    assert sum(lengths) == n and max(lengths) - min(lengths) <= 1
    for a, length in zip(starts, lengths):
        assert got[a] == 1.0                                                  # back to the peak
        assert got[a:a + length] == pytest.approx([cos_anneal(t, length, 1, 0.05) for t in range(length)],
                                                  rel=1e-12)
    if n % cycles == 0:
        assert set(lengths) == {n // cycles}


def test_cosine_restarts_exact_values():
    got = values(compose([cosine_restarts(cycles=4)], 40), 40)
    assert got == pytest.approx([cos_anneal(t % 10, 10) for t in range(40)], rel=1e-12, abs=1e-15)
    got = values(compose([cosine_restarts(cycle_steps=8, min_factor=0.1)], 32), 32)
    assert got == pytest.approx([cos_anneal(t % 8, 8, 1, 0.1) for t in range(32)], rel=1e-12)


def test_cosine_restarts_cycle_mult_grows_geometrically():
    got = values(compose([cosine_restarts(cycles=3, cycle_mult=2)], 70), 70)      # 10, 20, 40
    assert restarts(got) == [10, 30]
    expected = [cos_anneal(t, 10) for t in range(10)] + [cos_anneal(t, 20) for t in range(20)] + \
               [cos_anneal(t, 40) for t in range(40)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    got = values(compose([cosine_restarts(cycle_steps=5, cycle_mult=2)], 35), 35)  # 5, 10, 20
    assert restarts(got) == [5, 15]
    expected = [cos_anneal(t, 5) for t in range(5)] + [cos_anneal(t, 10) for t in range(10)] + \
               [cos_anneal(t, 20) for t in range(20)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    got = values(compose([cosine_restarts(cycle_steps=4, cycle_mult=3)], 52), 52)  # 4, 12, 36
    assert restarts(got) == [4, 16]


def test_cosine_restarts_peak_decay():
    got = values(compose([cosine_restarts(cycles=3, peak_decay=0.5, min_factor=0.1)], 30), 30)
    assert [got[0], got[10], got[20]] == [1.0, 0.5, 0.25]
    expected = [cos_anneal(t % 10, 10, 0.5 ** (t // 10), 0.1) for t in range(30)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert all(got[t] >= 0.1 for t in range(30))


def test_cosine_restarts_cycle_epochs_with_clocks():
    # Constant clock: 5 steps per epoch, cycles of 1, 2, 4 epochs = 5, 10, 20 steps.
    got = values(compose([cosine_restarts(cycle_epochs=1, cycle_mult=2)], 35, 5), 35)
    assert restarts(got) == [5, 15]
    # Varying clock: one cycle per epoch = 10, 5, 5, 20 steps.
    s = compose([cosine_restarts(cycle_epochs=1)], 40, varying_clock())
    got = values(s, 40)
    assert restarts(got) == [10, 15, 20]
    expected = [cos_anneal(t, 10) for t in range(10)] + [cos_anneal(t, 5) for t in range(5)] * 2 + \
               [cos_anneal(t, 20) for t in range(20)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # Two epochs per cycle: epochs 0-1 (15 steps), epochs 2-3 (25 steps).
    got = values(compose([cosine_restarts(cycle_epochs=2)], 40, varying_clock()), 40)
    assert restarts(got) == [15]


def test_cycle_ends_count_the_steps_done_when_each_cycle_has_ended():
    # cycle_ends() is compared with the trainer's step_in_phase after a step: cycle k's last step has
    # index end - 1 and the next cycle restarts at index end.
    s = compose([cosine_restarts(cycles=4)], 40)
    assert s.cycle_ends() == [10, 20, 30, 40]
    # Offset by a preceding warmup; the last one equals the phase length.
    s = compose([warmup(steps=5), cosine_restarts(cycles=4)], 45)
    ends = s.cycle_ends()
    assert ends == [15, 25, 35, 45]
    got = values(s, 45)
    for e in ends[:-1]:
        assert got[e] == 1.0 and got[e - 1] < got[e]                         # the next step restarts
    assert ends[-1] == 45


def test_cycle_ends_with_cycle_mult_and_epochs():
    s = compose([warmup(steps=3), cosine_restarts(cycle_steps=5, cycle_mult=2)], 38)
    got = values(s, 38)
    assert [3 + r for r in restarts(got[3:])] == [8, 18]
    # Whatever convention cycle_ends uses, it has one entry per cycle, offset by the warmup, evenly
    # matching the restarts seen in the values.
    ends = s.cycle_ends()
    assert len(ends) == 3
    assert [e - ends[0] for e in ends] == [0, 10, 30]
    s = compose([cosine_restarts(cycle_epochs=1)], 40, varying_clock())
    ends = s.cycle_ends()
    assert [e - ends[0] for e in ends] == [0, 5, 10, 30]


# torch's CosineAnnealingWarmRestarts stepped once per optimizer step, with T_0 = cycle_steps, T_mult =
# cycle_mult and eta_min = min_factor * lr. All but the first case end the phase inside a cycle, which
# torch cuts off there: (10, 1, 35) ends half-way through cycle 4, (7, 2, 31) 10 steps into the 28-step
# cycle 3, (50, 1, 20) inside the first cycle, (5, 2, 6) one step into the second.
@pytest.mark.parametrize("t0,mult,n", [(10, 1, 40), (10, 1, 35), (7, 2, 31), (4, 3, 30), (50, 1, 20), (5, 2, 6)])
def test_cosine_restarts_matches_torch_warm_restarts_also_when_the_phase_ends_mid_cycle(t0, mult, n):
    base, floor = 0.1, 0.05
    expected = torch_lrs(lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=t0, T_mult=mult, eta_min=base * floor), n, base)
    got = values(compose([cosine_restarts(cycle_steps=t0, cycle_mult=mult, min_factor=floor)], n), n)
    assert [base * m for m in got] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # The same in epochs with a constant clock of 2 steps per epoch.
    got = values(compose([cosine_restarts(cycle_epochs=t0 / 2, cycle_mult=mult, min_factor=floor)], n, 2), n)
    assert [base * m for m in got] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_a_cut_off_cycle_keeps_its_length_and_has_no_cycle_end():
    s = compose([warmup(steps=3), cosine_restarts(cycle_steps=7, cycle_mult=2, min_factor=0.1)], 34)
    got = values(s, 36)
    # Cycles of 7 and 14 steps end within the phase; the third (28 steps) is cut off after 10.
    expected = [cos_anneal(t, 7, 1, 0.1) for t in range(7)] + [cos_anneal(t, 14, 1, 0.1) for t in range(14)] + \
               [cos_anneal(t, 28, 1, 0.1) for t in range(10)]
    assert got[3:34] == pytest.approx(expected, rel=1e-12)
    assert got[33] > 0.75 and got[34:] == [got[33]] * 2          # never squeezed to the floor; then held
    assert s.cycle_ends() == [10, 24]                            # no entry at 34, where the phase cuts it
    # A phase shorter than the first cycle: no cycle ends at all.
    assert compose([cosine_restarts(cycle_steps=50)], 20).cycle_ends() == []
    # `cycles` splits the segment exactly: its last cycle ends with the phase.
    assert compose([cosine_restarts(cycles=3)], 31).cycle_ends()[-1] == 31


def test_a_cut_off_cycle_in_epochs_is_measured_in_epochs():
    # Varying clock (10, 5, 5, 20, ... steps): 3-epoch cycles; the first spans steps 0-19, the second
    # starts at step 20 and the phase ends after its first epoch (20 steps), a third of the way in.
    s = compose([cosine_restarts(cycle_epochs=3)], 40, varying_clock())
    got = values(s, 40)
    expected = [cos_anneal(t, 20) for t in range(20)] + [cos_anneal(epoch_of(t) - 3, 3) for t in range(20, 40)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert s.cycle_ends() == [20]


def test_cosine_restarts_errors():
    for kwargs in ({}, {"cycles": 2, "cycle_steps": 3}, {"cycles": 0}, {"cycles": 2, "cycle_mult": 0.5},
                   {"cycles": 2, "peak_decay": 0.0}, {"cycles": 2, "peak_decay": 1.5}):
        with pytest.raises(ValueError):
            cosine_restarts(**kwargs)


# -- one_cycle, exponential_warmup, polynomial, exponential ------------------------------------------------

@pytest.mark.parametrize("n,pct,div,fdiv", [(100, 0.3, 25.0, 1e4), (50, 0.4, 10.0, 100.0), (11, 0.5, 4.0, 2.0)])
def test_one_cycle_endpoints(n, pct, div, fdiv):
    got = values(compose([one_cycle(pct_start=pct, div_factor=div, final_div_factor=fdiv)], n), n + 2)
    up = round(pct * n)
    assert got[0] == pytest.approx(1 / div, rel=1e-12)
    assert got[up] == 1.0 and max(got) == 1.0
    assert got[n - 1] == pytest.approx(1 / (div * fdiv), rel=1e-9)
    assert got[n:] == [got[n - 1]] * 2
    assert all(b > a for a, b in zip(got[:up], got[1:up + 1]))               # cosine up
    assert all(b < a for a, b in zip(got[up:n - 1], got[up + 1:n]))          # cosine down
    mid_up = cos_anneal(up / 2, up, 1 / div, 1.0)
    if up % 2 == 0:
        assert got[up // 2] == pytest.approx(mid_up, rel=1e-12)


def test_one_cycle_bad_pct():
    for pct in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            one_cycle(pct_start=pct)


@pytest.mark.parametrize("n,start", [(10, 0.01), (7, 0.5), (1, 0.1)])
def test_exponential_warmup_constant_ratio_and_ends_at_one(n, start):
    got = values(compose([exponential_warmup(steps=n, start_factor=start)], n), n + 3)
    ratio = start ** (-1 / n)
    for a, b in zip(got[:n], got[1:n]):
        assert b / a == pytest.approx(ratio, rel=1e-12)
    assert got[0] == pytest.approx(start * ratio, rel=1e-12)
    assert got[n - 1] == 1.0 and got[n:] == [1.0] * 3
    with pytest.raises(ValueError):
        exponential_warmup(steps=3, start_factor=0.0)
    with pytest.raises(ValueError):
        exponential_warmup(steps=3, start_factor=1.5)


def test_polynomial_power_two_and_epochs():
    n = 16
    got = values(compose([polynomial(power=2, end_factor=0.25)], n), n)
    assert got == pytest.approx([0.25 + 0.75 * (1 - t / n) ** 2 for t in range(n)], rel=1e-12)
    s = compose([polynomial(power=2, epochs=2)], 100, varying_clock())          # epochs 0-1 = 15 steps
    assert s.lengths == [15]
    assert values(s, 15) == pytest.approx([(1 - t / 15) ** 2 for t in range(15)], rel=1e-12)


def test_exponential_gamma_per_step_and_per_epoch():
    got = values(compose([exponential(gamma=0.95)], 50), 50)
    assert got == pytest.approx([0.95 ** t for t in range(50)], rel=1e-12)
    assert all(b / a == pytest.approx(0.95) for a, b in zip(got, got[1:]))
    got = values(compose([exponential(gamma=0.5, every_epochs=1)], 50, 10), 50)
    assert got[::10] == pytest.approx([1, 0.5, 0.25, 0.125, 0.0625], rel=1e-12)
    assert got == pytest.approx([0.5 ** (t / 10) for t in range(50)], rel=1e-12)
    with pytest.raises(ValueError):
        exponential(every_steps=2, every_epochs=1)


# -- joins --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first", [warmup(steps=10), exponential_warmup(steps=10, start_factor=0.05),
                                   warmup(epochs=1, start_factor=0.1)])
@pytest.mark.parametrize("second", ["cosine", "cosine_restarts", "polynomial"])
def test_warmup_then_decay_is_continuous(first, second):
    # (one_cycle starts at 1/div_factor, not at 1, so a warmup before it is not meant to join it.)
    decay = {"cosine": cosine(min_factor=0.1), "cosine_restarts": cosine_restarts(cycles=2),
             "polynomial": polynomial(power=2)}[second]
    s = compose([copy.deepcopy(first), decay], 60, 10)
    got = values(s, 60)
    b = s.starts[1]
    assert b == 10 and got[b - 1] == 1.0 and got[b] == 1.0
    inner = max(max_inner_change(got[:b]), max_inner_change(got[b:]))
    assert abs(got[b] - got[b - 1]) <= inner


def test_warmup_then_plateau_is_continuous_at_one():
    s = compose([warmup(steps=4), plateau(patience=2, factor=0.5)], 20)
    got = values(s, 20)
    assert got == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 17)
    assert got[3] == got[4] == 1.0


def test_open_ended_segment_fills_the_rest_and_two_are_refused():
    s = compose([warmup(steps=3), polynomial(power=2), constant(0.2, steps=4)], 30)
    assert s.lengths == [3, 23, 4] and s.starts == [0, 3, 26]
    got = values(s, 35)
    assert got[3:26] == pytest.approx([(1 - t / 23) ** 2 for t in range(23)], rel=1e-12, abs=1e-15)
    assert got[26:] == [0.2] * 9
    # Epoch-based open-ended total: the first segment in epochs, the rest filled.
    s = compose([warmup(epochs=1), cosine()], 40, varying_clock())
    assert s.lengths == [10, 30]
    for segs in ([cosine(), polynomial()], [warmup(steps=2), cosine(), plateau()],
                 [cosine_restarts(cycles=2), one_cycle()]):
        with pytest.raises(ValueError, match="only one"):
            compose(segs, 20)


# -- plateau ------------------------------------------------------------------------------------------

def feed(s: Schedule, metrics: list[float], key: str = "val/loss", t: int = 0) -> list[bool]:
    return [s.observe(t, {key: v, "train/loss": 0.0}) for v in metrics]


@pytest.mark.parametrize("patience", [1, 2, 4])
def test_plateau_reduces_after_exactly_patience_bad_evaluations(patience):
    s = compose([plateau(patience=patience, factor=0.5)], 100)
    got = feed(s, [1.0] + [1.0] * (patience - 1))
    assert not any(got) and s(0) == 1.0
    assert feed(s, [1.0]) == [True]
    assert s(0) == 0.5 and s(99) == 0.5 and s(500) == 0.5


def test_plateau_modes_and_thresholds():
    # min, rel: an improvement must beat best by 10 % of best.
    s = compose([plateau(mode="min", patience=2, factor=0.5, threshold=0.1)], 10)
    assert feed(s, [1.0, 0.95, 0.91]) == [False, False, True]                   # neither beats 0.9
    s = compose([plateau(mode="min", patience=2, factor=0.5, threshold=0.1)], 10)
    assert feed(s, [1.0, 0.95, 0.89, 0.85, 0.82]) == [False, False, False, False, True]
    # min, abs: by 0.05.
    s = compose([plateau(mode="min", patience=2, threshold=0.05, threshold_mode="abs")], 10)
    assert feed(s, [1.0, 0.96, 0.94, 0.9, 0.895]) == [False, False, False, False, True]
    assert s(0) == pytest.approx(0.1)
    # max (accuracy), rel and abs.
    s = compose([plateau(monitor="val/acc", mode="max", patience=2, factor=0.5, threshold=0.1)], 10)
    assert feed(s, [0.5, 0.54, 0.545, 0.56, 0.6], key="val/acc") == [False, False, True, False, False]
    assert s(0) == 0.5                                                         # 0.56 beat 0.5 by > 10 %
    s = compose([plateau(monitor="val/acc", mode="max", patience=2, threshold=0.02, threshold_mode="abs")], 10)
    assert feed(s, [0.5, 0.53, 0.54, 0.545, 0.5], key="val/acc") == [False, False, False, True, False]
    # A drop is never an improvement in max mode, a rise never one in min mode.
    s = compose([plateau(mode="max", patience=1, threshold=0.0, monitor="m")], 10)
    assert feed(s, [1.0, 0.5], key="m") == [False, True]
    s = compose([plateau(mode="min", patience=1, threshold=0.0)], 10)
    assert feed(s, [1.0, 2.0]) == [False, True]


def test_plateau_multiplier_is_factor_to_the_number_of_reductions():
    s = compose([plateau(patience=1, factor=0.3)], 10)
    feed(s, [1.0])
    for k in range(1, 6):
        assert feed(s, [1.0]) == [True]
        assert s(5) == pytest.approx(0.3 ** k, rel=1e-12)
        assert s.state_dict()["plateaus"][0]["reductions"] == k


def test_plateau_cooldown_does_not_count():
    s = compose([plateau(patience=2, cooldown=3, factor=0.5)], 10)
    # best, bad, bad -> reduce; 3 cooldown evaluations (not counted); 2 bad -> reduce again.
    got = feed(s, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert got == [False, False, True, False, False, False, False, True]
    assert s(0) == 0.25
    # Without cooldown, the second reduction comes right after patience more bad evaluations.
    s = compose([plateau(patience=2, cooldown=0, factor=0.5)], 10)
    assert feed(s, [1.0] * 5) == [False, False, True, False, True]


def test_plateau_improvement_resets_the_count_and_nan_is_ignored():
    s = compose([plateau(patience=3)], 10)
    assert not any(feed(s, [1.0, 1.0, 1.0, 0.5, 0.6, 0.6]))            # the improvement restarts the count
    assert feed(s, [0.6]) == [True]
    s = compose([plateau(patience=3)], 10)
    got = feed(s, [1.0, 1.0, 1.0])
    before = copy.deepcopy(s.state_dict())
    got += feed(s, [math.nan, math.nan])                                  # neither counts nor resets
    assert s.state_dict() == before
    got += feed(s, [1.0])
    assert got == [False, False, False, False, False, True]
    # A NaN first evaluation does not become the best.
    s = compose([plateau(patience=1)], 10)
    assert feed(s, [math.nan, 1.0, 0.5]) == [False, False, False]


def test_plateau_min_lr_only_while_active():
    s = compose([warmup(steps=5), plateau(min_lr=0.01, steps=10), constant(0.1)], 30)
    assert [s.min_lr(t) for t in range(30)] == [0.0] * 5 + [0.01] * 10 + [0.0] * 15
    s = compose([warmup(steps=5), plateau(min_lr=0.02)], 30)
    assert [s.min_lr(t) for t in (0, 4, 5, 29, 100)] == [0.0, 0.0, 0.02, 0.02, 0.02]
    assert compose([cosine()], 10).min_lr(3) == 0.0 and compose([], 10).min_lr(3) == 0.0


def test_plateau_unknown_monitor_names_the_available_metrics():
    s = compose([plateau(monitor="val/loss")], 10)
    with pytest.raises(ValueError) as exc:
        s.observe(0, {"val/acc": 0.5, "train/loss": 1.0})
    msg = str(exc.value)
    assert "val/loss" in msg and "val/acc" in msg and "train/loss" in msg


def test_plateau_observe_before_it_starts_does_nothing():
    s = compose([warmup(steps=10), plateau(patience=1, factor=0.5)], 40)
    assert feed(s, [1.0, 2.0, 3.0, 4.0], t=9) == [False] * 4
    state = s.state_dict()["plateaus"][1]
    assert math.isnan(state.pop("best"))
    assert state == {"scale": 1.0, "bad": 0, "cooldown_left": 0, "reductions": 0}
    assert values(s, 12)[9:] == [1.0, 1.0, 1.0]
    # Once active, the first evaluation sets the best; the next bad one reduces.
    assert feed(s, [5.0, 5.0], t=10) == [False, True]
    assert s(10) == 0.5 and s(9) == 1.0


def test_plateau_after_it_ends_ignores_observations():
    s = compose([plateau(patience=1, steps=5), constant(0.3)], 20)
    assert feed(s, [1.0, 1.0], t=2) == [False, True]
    assert s(4) == pytest.approx(0.1) and s(5) == 0.3
    assert feed(s, [1.0, 1.0], t=6) == [False, False]
    assert s(4) == pytest.approx(0.1)


def test_plateau_state_dict_round_trip_continues_identically():
    def make():
        return compose([warmup(steps=3), plateau(patience=2, cooldown=1, factor=0.5, threshold=0.01)], 200)

    rng = random.Random(0)
    metrics, v = [], 1.0
    for _ in range(60):
        v = max(0.01, v + rng.uniform(-0.05, 0.06))
        metrics.append(v)
    a = make()
    first = [a.observe(10 + i, {"val/loss": m}) for i, m in enumerate(metrics[:25])]
    assert any(first)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make()
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b(50) == a(50)
    rest_a = [(a.observe(35 + i, {"val/loss": m}), a(35 + i)) for i, m in enumerate(metrics[25:])]
    rest_b = [(b.observe(35 + i, {"val/loss": m}), b(35 + i)) for i, m in enumerate(metrics[25:])]
    assert rest_a == rest_b
    assert any(r for r, _ in rest_a)                                           # future reductions happen
    # A fresh schedule without the state would have gone differently.
    c = make()
    assert [(c.observe(35 + i, {"val/loss": m}), c(35 + i)) for i, m in enumerate(metrics[25:])] != rest_a


def test_plateau_matches_torch_reduce_on_plateau_with_patience_shifted():
    # Our patience p reduces on the p-th bad evaluation; torch reduces when bad > patience: torch p - 1.
    rng = random.Random(1)
    metrics, v = [], 1.0
    for _ in range(150):
        v = max(0.05, v + rng.uniform(-0.04, 0.05))
        metrics.append(v)
    for patience, cooldown, thr, mode in [(3, 0, 1e-4, "rel"), (2, 2, 0.02, "rel"), (4, 1, 0.01, "abs")]:
        s = compose([plateau(patience=patience, cooldown=cooldown, factor=0.5, threshold=thr,
                             threshold_mode=mode)], 10)
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=1.0)
        ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=patience - 1, cooldown=cooldown,
                                                         threshold=thr, threshold_mode=mode, eps=0.0)
        ours, theirs = [], []
        for m in metrics:
            s.observe(0, {"val/loss": m})
            ref.step(m)
            ours.append(s(0))
            theirs.append(opt.param_groups[0]["lr"])
        assert ours == pytest.approx(theirs, rel=1e-12)
        assert ours[-1] < 1.0


def test_plateau_errors():
    for kwargs in ({"factor": 1.0}, {"factor": 0.0}, {"patience": 0}, {"cooldown": -1}):
        with pytest.raises(ValueError):
            plateau(**kwargs)


# -- as_lambda_lr with plateau ----------------------------------------------------------------------------

def test_as_lambda_lr_with_plateau_in_a_plain_loop():
    base, total = 0.1, 30
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([param], lr=base)
    sched = as_lambda_lr(opt, [warmup(steps=4), plateau(patience=2, factor=0.5)], total)
    schedule = sched.lr_lambdas[0]
    seen, reductions = [], []
    for t in range(total):
        seen.append(opt.param_groups[0]["lr"])
        param.sum().backward()
        opt.step()
        opt.zero_grad()
        if t % 5 == 4:                                   # an evaluation every 5 steps, never improving
            if schedule.observe(t, {"val/loss": 1.0}):
                reductions.append(t)
        sched.step()
    # Evaluations at steps 4 (sets best), 9, 14 (reduce), 19, 24 (reduce), 29.
    assert reductions == [14, 24]
    expected = [base * (t + 1) / 4 for t in range(4)] + [base] * 11 + [base / 2] * 10 + [base / 4] * 5
    assert seen == pytest.approx(expected, rel=1e-12)


def test_as_lambda_lr_respects_the_plateau_min_lr():
    # The plateau promises the LR never goes below `min_lr`; in a plain loop through LambdaLR too.
    base, floor = 0.1, 0.004
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base)
    sched = as_lambda_lr(opt, [plateau(patience=1, factor=0.1, min_lr=floor)], 20)
    for t in range(20):
        opt.step()
        sched.lr_lambdas[0].observe(t, {"val/loss": 1.0})
        sched.step()
        assert opt.param_groups[0]["lr"] >= floor - 1e-15, (t, opt.param_groups[0]["lr"])


def test_as_lambda_lr_state_dict_saves_and_resumes_the_plateau():
    def make(opt):
        return as_lambda_lr(opt, [warmup(steps=2), plateau(patience=1, factor=0.5)], 20)

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = make(opt)
    for t in range(6):
        opt.step()
        sched.lr_lambdas[0].observe(t, {"val/loss": 1.0})
        sched.step()
    lr_before = opt.param_groups[0]["lr"]
    assert lr_before < 1.0
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)      # a plain-loop checkpoint
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    param2 = torch.nn.Parameter(torch.zeros(1))
    opt2 = torch.optim.SGD([param2], lr=1.0)
    sched2 = make(opt2)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert sched2.lr_lambdas[0].state_dict() == sched.lr_lambdas[0].state_dict()
    for t in range(6, 10):
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.lr_lambdas[0].observe(t, {"val/loss": 1.0})
            s.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


# -- torch references ------------------------------------------------------------------------------------

@pytest.mark.parametrize("min_factor", [0.0, 0.1])
def test_cosine_equals_cosine_annealing_lr(min_factor):
    # Same index: ours at t is torch's LR after t scheduler steps (T_max = n, eta_min = base * min_factor).
    n, base = 25, 0.1
    ours = [base * v for v in values(compose([cosine(min_factor=min_factor)], n), n)]
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=n, eta_min=base * min_factor),
                    n, base)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_exponential_equals_exponential_lr():
    n, base = 30, 0.1
    ours = [base * v for v in values(compose([exponential(gamma=0.9)], n), n)]
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9), n, base)
    assert ours == pytest.approx(ref, rel=1e-9)


def test_step_equals_step_lr():
    n, base = 30, 0.1
    ours = [base * v for v in values(compose([step(every_steps=4, gamma=0.5)], n), n)]
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5), n, base)
    assert ours == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_polynomial_equals_polynomial_lr(power):
    # Torch reaches 0 at t = total_iters and stays there; ours stops at t = n - 1 (1/n above the end for
    # power 1) and holds: compare the segment's n steps.
    n, base = 20, 0.1
    ours = [base * v for v in values(compose([polynomial(power=power)], n), n)]
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=n, power=power), n, base)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_linear_warmup_is_linear_lr_one_step_ahead():
    # Ours reaches 1 on its last step (t = n - 1); torch's LinearLR(start_factor=s, total_iters=n) reaches
    # it after n scheduler steps: ours at t equals torch's at t + 1.
    n, base, s = 8, 0.1, 0.2
    ours = [base * v for v in values(compose([warmup(steps=n, start_factor=s)], n), n)]
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=s, end_factor=1.0, total_iters=n),
                    n + 1, base)
    assert ours == pytest.approx(ref[1:], rel=1e-9)
    assert ref[0] == pytest.approx(base * s)
