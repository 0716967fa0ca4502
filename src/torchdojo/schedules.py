"""Learning-rate schedules: functions of the step that return a multiplier of each group's base LR.

A recipe joins segments end to end, e.g. `[{name: warmup, steps: 50}, {name: cosine}]`. Every length
is in explicit units, `steps` or `epochs` (fractions allowed); one segment may leave its length out and
then fills the rest of the phase; after the last segment its final value holds. All segments are pure
functions of the step except `plateau`, which reduces on a monitored metric (call
`Schedule.observe`) and keeps that state in `state_dict`. `as_lambda_lr` plugs a schedule into torch's
LambdaLR for plain loops.

Epoch units go through a `Clock`, which knows how many steps each epoch of the phase has (it varies
when the batch size is scheduled)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch


# The most epochs a clock counts: it walks epoch by epoch (steps per epoch may change with a scheduled
# batch size), so a phase, or a schedule segment, lasting 1e30 epochs would otherwise take forever.
MAX_EPOCHS = 10 ** 6


class Clock:
    """Step <-> epoch conversion inside a phase whose epoch k has `steps_in_epoch(k)` steps."""

    def __init__(self, steps_in_epoch: Callable[[int], int] | int):
        self._spe = steps_in_epoch if callable(steps_in_epoch) else (lambda k, n=steps_in_epoch: n)
        self._starts = [0]                      # first step of each epoch, grown lazily

    def _epoch_start(self, k: int) -> int:
        if k > MAX_EPOCHS + 1:      # + 1: epoch_at looks one epoch past the one it returns
            raise ValueError(f"reaches past epoch {MAX_EPOCHS} of the phase; a phase spans at most {MAX_EPOCHS} epochs")
        while len(self._starts) <= k:
            self._starts.append(self._starts[-1] + self._spe(len(self._starts) - 1))
        return self._starts[k]

    def steps_at(self, epoch: float) -> int:
        """The step reached after `epoch` epochs (fractions count within their epoch)."""
        k = int(math.floor(epoch))
        return self._epoch_start(k) + round((epoch - k) * self._spe(k))

    def epoch_at(self, step: int) -> float:
        k = 0
        while self._epoch_start(k + 1) <= step:
            k += 1
        return k + (step - self._epoch_start(k)) / self._spe(k)


@dataclass
class Segment:
    """`fn(t, n, epochs)` is the multiplier at step t (0-based) of a segment lasting n steps; `epochs(t)`
    converts t into epochs since the segment started."""
    fn: Callable[[int, int, Callable[[int], float]], float]
    steps: int | None = None
    epochs: float | None = None
    # Steps (from the segment's start) where a cycle ends: cosine_restarts' restarts, for snapshots.
    cycle_ends: Callable[[int, Callable[[int], float]], list[int]] | None = None
    plateau: "Plateau | None" = None

    def __post_init__(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give a schedule segment's length in `steps` or in `epochs`, not both")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise ValueError("a schedule segment's length must be positive")


def _need_one(what: str, **options) -> None:
    given = [k for k, v in options.items() if v is not None]
    if len(given) != 1:
        raise ValueError(f"{what}: give exactly one of {', '.join('`' + k + '`' for k in options)}")


def _every(every_steps, every_epochs, epochs_since: Callable[[int], float], t: int) -> float:
    """How many periods of `every_steps` steps or `every_epochs` epochs have passed at step t."""
    return t / every_steps if every_steps is not None else epochs_since(t) / every_epochs


# -- the pure segments ---------------------------------------------------------------------------

def constant(value: float = 1.0, steps: int | None = None, epochs: float | None = None) -> Segment:
    """A constant multiplier of the base LR."""
    return Segment(lambda t, n, e: value, steps, epochs)


def linear_warmup(steps: int | None = None, epochs: float | None = None, start_factor: float = 0.0) -> Segment:
    """Linear warmup from `start_factor` to 1, reaching the base LR on its last step (Goyal et al. 2017,
    arXiv 1706.02677)."""
    _need_one("linear_warmup needs a length", steps=steps, epochs=epochs)
    return Segment(lambda t, n, e: start_factor + (1.0 - start_factor) * min(t + 1, n) / n, steps, epochs)


def exponential_warmup(steps: int | None = None, epochs: float | None = None, start_factor: float = 0.01) -> Segment:
    """Geometric warmup from `start_factor` to 1: the multiplier grows by the same ratio every step."""
    _need_one("exponential_warmup needs a length", steps=steps, epochs=epochs)
    if not 0.0 < start_factor <= 1.0:
        raise ValueError("exponential_warmup: start_factor must be in (0, 1]")
    return Segment(lambda t, n, e: start_factor ** (1.0 - min(t + 1, n) / n), steps, epochs)


def _cosine(t: float, n: float, top: float, floor: float) -> float:
    return floor + (top - floor) * 0.5 * (1.0 + math.cos(math.pi * min(t, n) / n))


def cosine(steps: int | None = None, epochs: float | None = None, min_factor: float = 0.0) -> Segment:
    """Cosine annealing from 1 down to `min_factor` (Loshchilov & Hutter 2016, arXiv 1608.03983)."""
    return Segment(lambda t, n, e: _cosine(t, n, 1.0, min_factor), steps, epochs)


def cosine_restarts(cycles: int | None = None, cycle_steps: int | None = None, cycle_epochs: float | None = None,
                    cycle_mult: float = 1.0, peak_decay: float = 1.0, min_factor: float = 0.0,
                    steps: int | None = None, epochs: float | None = None) -> Segment:
    """SGDR: cosine cycles restarting at the peak (Loshchilov & Hutter 2016, arXiv 1608.03983).

    The first cycle lasts `cycle_steps` or `cycle_epochs`, or the segment is split into `cycles` cycles;
    each cycle is `cycle_mult` times longer than the one before and its peak `peak_decay` times lower.
    With `cycles` and cycle_mult 1 the cycles are equal: the schedule of snapshot ensembles (Huang et
    al. 2017, arXiv 1704.00109).

    With `cycle_steps` or `cycle_epochs` the segment may end inside a cycle. That cycle keeps its full
    length and stops where the segment ends, short of `min_factor`, as in torch's
    CosineAnnealingWarmRestarts; squeezing it into the steps left would change the length asked for.
    Only cycles that end within the segment are in `cycle_ends`, so a cut-off cycle gets no snapshot.
    A cut-off cycle in epochs is measured in epochs, because the segment has no steps past its end to
    count; with a constant number of steps per epoch that is the same position."""
    _need_one("cosine_restarts", cycles=cycles, cycle_steps=cycle_steps, cycle_epochs=cycle_epochs)
    if cycle_mult < 1.0 or not 0.0 < peak_decay <= 1.0 or (cycles is not None and cycles < 1):
        raise ValueError("cosine_restarts: cycles >= 1, cycle_mult >= 1, 0 < peak_decay <= 1")
    if cycles is not None and cycles * math.log(cycle_mult) > 700:      # cycle_mult ** cycles: past 1e304
        raise ValueError("cosine_restarts: cycle_mult ** cycles is too large to compute (the first cycle would "
                         "be shorter than a step)")

    def layout(n: int, epochs_since) -> tuple[list[int], tuple[int, float] | None]:
        """The end steps (from the segment start) of the cycles that end within the segment's n steps, and,
        when the segment ends inside a cycle, that cycle's (start step, full length in steps or epochs)."""
        if cycles is not None:
            count = min(cycles, n)      # n steps hold at most n cycles: never a list longer than the segment
            unit = n * (cycle_mult - 1) / (cycle_mult ** count - 1) if cycle_mult > 1 else n / count
            return [max(1, round(unit * ((cycle_mult ** (i + 1) - 1) / (cycle_mult - 1) if cycle_mult > 1 else i + 1)))
                    for i in range(count - 1)] + [n], None
        ends, length, start = [], cycle_steps, 0
        while start < n:
            if cycle_steps is not None:
                full = max(1, round(length))
                end = start + full
                length *= cycle_mult
            else:
                # Lengths in epochs: cycle i spans cycle_epochs * cycle_mult**i epochs.
                full = cycle_epochs * cycle_mult ** len(ends)
                end = _steps_after(epochs_since, start, full, n)
            if end is None or end > n:
                return ends, (start, full)
            ends.append(end)
            start = end
        return ends, None

    cache: dict = {}

    def cached_layout(n: int, epochs_since):
        key = (n, id(epochs_since))
        if key not in cache:
            cache[key] = layout(n, epochs_since)
        return cache[key]

    def cycle_ends(n: int, epochs_since) -> list[int]:
        return cached_layout(n, epochs_since)[0]

    def fn(t: int, n: int, epochs_since) -> float:
        ends, cut = cached_layout(n, epochs_since)
        start = 0
        for i, end in enumerate(ends):
            if t < end or (cut is None and i == len(ends) - 1):
                return _cosine(t - start, end - start, peak_decay ** i, min_factor)
            start = end
        cut_start, full = cut
        done = t - cut_start if cycle_steps is not None else epochs_since(t) - epochs_since(cut_start)
        return _cosine(done, full, peak_decay ** len(ends), min_factor)

    return Segment(fn, steps, epochs, cycle_ends=cycle_ends)


def _steps_after(epochs_since: Callable[[int], float], start: int, span: float, limit: int) -> int | None:
    """The first step s in (start, limit] at which `span` more epochs have passed, None if there is none."""
    target = epochs_since(start) + span
    s = start + 1
    while s < limit and epochs_since(s) < target - 1e-9:
        s += 1
    return s if epochs_since(s) >= target - 1e-9 else None


def step(every_steps: int | None = None, every_epochs: float | None = None, gamma: float = 0.1,
         steps: int | None = None, epochs: float | None = None) -> Segment:
    """Multiply by `gamma` every `every_steps` steps (or every `every_epochs` epochs)."""
    _need_one("step schedule", every_steps=every_steps, every_epochs=every_epochs)
    return Segment(lambda t, n, e: gamma ** math.floor(_every(every_steps, every_epochs, e, t) + 1e-9),
                   steps, epochs)


def exponential(gamma: float = 0.99, every_steps: int | None = None, every_epochs: float | None = None,
                steps: int | None = None, epochs: float | None = None) -> Segment:
    """Smooth exponential decay: gamma ** (steps / every_steps) or gamma ** (epochs / every_epochs);
    by default gamma per step."""
    if every_steps is None and every_epochs is None:
        every_steps = 1
    _need_one("exponential schedule", every_steps=every_steps, every_epochs=every_epochs)
    return Segment(lambda t, n, e: gamma ** _every(every_steps, every_epochs, e, t), steps, epochs)


def one_cycle(pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4,
              steps: int | None = None, epochs: float | None = None) -> Segment:
    """The 1cycle policy (Smith & Topin 2017, arXiv 1708.07120): cosine up from 1/div_factor to 1 over
    `pct_start` of the segment, then cosine down to 1/(div_factor*final_div_factor)."""
    if not 0.0 < pct_start < 1.0:
        raise ValueError("one_cycle: pct_start must be in (0, 1)")
    start, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)

    def fn(t: int, n: int, e) -> float:
        up = max(1, round(pct_start * n))
        if t < up:
            return _cosine(t, up, start, 1.0)
        return _cosine(t - up, max(1, n - 1 - up), 1.0, end)
    return Segment(fn, steps, epochs)


def polynomial(power: float = 1.0, end_factor: float = 0.0, steps: int | None = None,
               epochs: float | None = None) -> Segment:
    """Polynomial decay from 1 to `end_factor`: end + (1 - end) * (1 - t/n) ** power."""
    return Segment(lambda t, n, e: end_factor + (1.0 - end_factor) * (1.0 - min(t, n) / n) ** power, steps, epochs)


# -- plateau: the one segment with state ------------------------------------------------------------

@dataclass
class Plateau:
    """Reduce-on-plateau state: the multiplier starts at 1 and is multiplied by `factor` after
    `patience` evaluations in a row without improvement, then waits `cooldown` evaluations."""
    monitor: str
    mode: str
    factor: float
    patience: int
    threshold: float
    threshold_mode: str
    cooldown: int
    min_lr: float
    scale: float = 1.0
    best: float = field(default=math.nan)
    bad: int = 0
    cooldown_left: int = 0
    reductions: int = 0

    def is_better(self, value: float) -> bool:
        if math.isnan(self.best):
            return True
        if self.threshold_mode == "rel":
            margin = abs(self.best) * self.threshold
        else:
            margin = self.threshold
        return value < self.best - margin if self.mode == "min" else value > self.best + margin

    def observe(self, value: float) -> bool:
        """Take one evaluation; True if it reduced the LR."""
        if math.isnan(value):
            return False
        if self.is_better(value):
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad = 0
        if self.bad >= self.patience:
            self.scale *= self.factor
            self.bad, self.cooldown_left, self.reductions = 0, self.cooldown, self.reductions + 1
            return True
        return False

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("scale", "best", "bad", "cooldown_left", "reductions")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def plateau(monitor: str = "val/loss", mode: Literal["min", "max"] = "min", factor: float = 0.1,
            patience: int = 10, threshold: float = 1e-4, threshold_mode: Literal["rel", "abs"] = "rel",
            cooldown: int = 0, min_lr: float = 0.0, steps: int | None = None,
            epochs: float | None = None) -> Segment:
    """Reduce on plateau: multiply the LR by `factor` once `monitor` has not improved (by more than
    `threshold`, relative or absolute) for `patience` evaluations in a row, then wait `cooldown`
    evaluations; never below `min_lr`. Unlike torch's ReduceLROnPlateau, it reduces on the
    `patience`-th bad evaluation (torch's patience p equals ours p + 1)."""
    if not 0.0 < factor < 1.0 or patience < 1 or cooldown < 0:
        raise ValueError("plateau: 0 < factor < 1, patience >= 1, cooldown >= 0")
    if mode not in ("min", "max") or threshold_mode not in ("rel", "abs"):
        raise ValueError("plateau: mode is 'min' or 'max', threshold_mode 'rel' or 'abs'")
    state = Plateau(monitor, mode, factor, patience, threshold, threshold_mode, cooldown, min_lr)
    return Segment(lambda t, n, e: state.scale, steps, epochs, plateau=state)


warmup = linear_warmup   # the short name recipes use

SCHEDULES = {"constant": constant, "linear_warmup": linear_warmup, "warmup": linear_warmup,
             "exponential_warmup": exponential_warmup, "cosine": cosine, "cosine_restarts": cosine_restarts,
             "step": step, "exponential": exponential, "one_cycle": one_cycle, "polynomial": polynomial,
             "plateau": plateau}


# -- joining segments ------------------------------------------------------------------------------

class Schedule:
    """Segments joined over a phase of `total_steps` steps: `schedule(t)` is the multiplier at step t."""

    def __init__(self, segments: list[Segment], total_steps: int, clock: Clock | int = 1):
        self.segments = list(segments)
        self.clock = clock if isinstance(clock, Clock) else Clock(clock)
        open_ended = [i for i, seg in enumerate(self.segments) if seg.steps is None and seg.epochs is None]
        if len(open_ended) > 1:
            raise ValueError("only one schedule segment may omit its length (it fills the rest of the phase)")
        fill = open_ended[0] if open_ended else len(self.segments)
        lengths: list[int] = [0] * len(self.segments)
        # Segments before the open-ended one are laid out from the phase start, those after it back
        # from the phase end, so an epoch-long segment spans the epochs where it really lies. A segment
        # that starts after the phase's end is never reached: the clock is not walked past the end for it
        # (a 10**9-step warmup in a short phase costs nothing).
        start = 0
        for i in range(fill):
            lengths[i] = self._length(self.segments[i], min(start, total_steps), forward=True)
            start += lengths[i]
        if open_ended:
            end = total_steps
            for i in reversed(range(fill + 1, len(self.segments))):
                lengths[i] = self._length(self.segments[i], end, forward=False)
                end -= lengths[i]
            lengths[fill] = max(1, end - start)
        self.lengths = lengths
        self.starts = [sum(lengths[:i]) for i in range(len(lengths))]
        self._since = [self._epochs_since(min(s, total_steps)) for s in self.starts]

    def _length(self, seg: Segment, at: int, forward: bool) -> int:
        """Steps of a segment starting (forward) or ending (not forward) at step `at`."""
        if seg.epochs is None:
            return seg.steps
        e = self.clock.epoch_at(at)
        if forward:
            return max(1, self.clock.steps_at(e + seg.epochs) - at)
        return max(1, at - self.clock.steps_at(max(0.0, e - seg.epochs)))

    def _epochs_since(self, start: int) -> Callable[[int], float]:
        e0 = self.clock.epoch_at(start)
        return lambda t: self.clock.epoch_at(start + t) - e0

    def segment_at(self, t: int) -> int:
        i = len(self.segments) - 1
        while i > 0 and t < self.starts[i]:
            i -= 1
        return i

    def __call__(self, t: int) -> float:
        if not self.segments:
            return 1.0
        i = self.segment_at(t)
        local = t - self.starts[i]
        if i == len(self.segments) - 1:
            local = min(local, self.lengths[i] - 1)     # past the end, the final value holds
        return self.segments[i].fn(local, self.lengths[i], self._since[i])

    def min_lr(self, t: int) -> float:
        """The absolute LR floor at step t (a plateau segment's `min_lr`), else 0."""
        if not self.segments:
            return 0.0
        seg = self.segments[self.segment_at(t)]
        return seg.plateau.min_lr if seg.plateau is not None else 0.0

    def observe(self, t: int, metrics: dict[str, float]) -> bool:
        """Give an evaluation's metrics to the plateau segment active at step t; True if it reduced."""
        if not self.segments:
            return False
        seg = self.segments[self.segment_at(t)]
        if seg.plateau is None or t < self.starts[self.segment_at(t)]:
            return False
        if seg.plateau.monitor not in metrics:
            raise ValueError(f"plateau monitors '{seg.plateau.monitor}', which is not among the metrics: "
                             f"{', '.join(sorted(metrics))}")
        return seg.plateau.observe(float(metrics[seg.plateau.monitor]))

    def cycle_ends(self) -> list[int]:
        """For each cosine_restarts cycle that ends within its segment, the number of phase steps done when
        it has ended (so its last step is at index end - 1): compare with the trainer's `step_in_phase`
        after a step. A last cycle that its segment cuts off has no entry."""
        ends = []
        for seg, start, n, since in zip(self.segments, self.starts, self.lengths, self._since):
            if seg.cycle_ends is not None:
                ends += [start + e for e in seg.cycle_ends(n, since)]
        return ends

    def state_dict(self) -> dict:
        return {"plateaus": [s.plateau.state_dict() if s.plateau else None for s in self.segments]}

    def load_state_dict(self, state: dict) -> None:
        for seg, saved in zip(self.segments, state["plateaus"]):
            if seg.plateau is not None and saved is not None:
                seg.plateau.load_state_dict(saved)


def compose(segments: list[Segment], total_steps: int, steps_per_epoch: int | Clock = 1) -> Schedule:
    """Join segments into one schedule over a phase of `total_steps` steps."""
    return Schedule(segments, total_steps, steps_per_epoch)


class ScheduleLR(torch.optim.lr_scheduler.LambdaLR):
    """torch's LambdaLR over a Schedule, honouring a plateau's `min_lr` and saving the plateau state."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule):
        self.schedule = schedule
        super().__init__(optimizer, schedule)

    def get_lr(self) -> list[float]:
        t = self.last_epoch
        mult, floor = self.schedule(t), self.schedule.min_lr(t)
        return [max(base * mult, floor) if base > 0 else 0.0 for base in self.base_lrs]

    def state_dict(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas", "schedule")}
        state["schedule"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        self.schedule.load_state_dict(state.pop("schedule"))
        self.__dict__.update(state)


def as_lambda_lr(optimizer: torch.optim.Optimizer, segments: list[Segment], total_steps: int,
                 steps_per_epoch: int = 1) -> ScheduleLR:
    """A torch LR scheduler (a LambdaLR) driven by joined segments; call `.step()` after each optimizer
    step. With a plateau segment, also call `scheduler.schedule.observe(step, {"val/loss": value})`
    (or `scheduler.lr_lambdas[0].observe(...)`) after each evaluation."""
    return ScheduleLR(optimizer, compose(segments, total_steps, steps_per_epoch))
