"""The schema of a checkpoint's trainer state (`state.pt`), checked before any of it is used.

A checkpoint's manifest proves that its files are the ones the run wrote, not that what they hold makes
sense: a state written by another version, or crafted and given a recomputed manifest, could hold a
string where a step count belongs, a phase that does not exist or a negative line count. Used as is,
such values give tracebacks deep in the loop or, worse, a run that says it finished at step 51 of 194,
or a metrics.jsonl cut back to nothing. `check_state` refuses them with one line naming the key.

The RNG states are tried on throwaway generators, so a malformed one is refused here rather than when
the run's own generators are already half restored. The optimizer state's shape depends on the optimizer
(Lookahead nests its inner one): the trainer tries it on a throwaway optimizer of the same phase."""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from .errors import DojoError

_INT_KEYS = ("step", "phase_index", "step_in_phase", "epoch_in_phase", "batch_in_epoch", "optimizer_phase",
             "last_eval_step", "metrics_lines")
_DICT_KEYS = ("optimizer", "rng", "loss_meter", "schedule")


class StateError(DojoError):
    """A checkpoint's state.pt holds something a run of this recipe cannot have written."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def check_rng(rng, where: str) -> None:
    """The torch, Python and numpy generator states of `_rng_state`, each loaded into a fresh generator."""
    if not isinstance(rng, dict) or not {"torch", "python", "numpy"} <= rng.keys():
        raise StateError(f"{where}: needs the torch, python and numpy generator states")
    try:
        if not isinstance(rng["torch"], torch.Tensor) or rng["torch"].dtype != torch.uint8:
            raise TypeError("the torch state is not a byte tensor")
        torch.Generator().set_state(rng["torch"])
        python = rng["python"]
        random.Random().setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in python))
        kind, keys, *rest = rng["numpy"]
        if not isinstance(keys, torch.Tensor):
            raise TypeError("the numpy keys are not a tensor")
        np.random.RandomState().set_state((kind, keys.numpy().astype(np.uint32), *rest))
    except (TypeError, ValueError, RuntimeError, OverflowError, IndexError) as exc:
        raise StateError(f"{where}: not a generator state ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") \
            from None


def check_state(state, *, phase_steps: list[int], methods: int, where: str) -> None:
    """Refuse a trainer state that this recipe's run cannot have written: missing keys, wrong types, or
    counters outside what the recipe's phases allow (`phase_steps`: optimizer steps of each phase;
    `methods`: how many methods the recipe has)."""
    def bad(key: str, what: str):
        return StateError(f"{where}: state.pt `{key}` {what}; the file was not written by this run "
                          f"(damaged or crafted)")

    if not isinstance(state, dict):
        raise StateError(f"{where}: state.pt does not hold a mapping")
    for key in (*_INT_KEYS, *_DICT_KEYS, "recipe", "methods", "epochs_done", "wall_seconds"):
        if key not in state:
            raise bad(key, "is missing")
    for key in _INT_KEYS:
        if not _is_int(state[key]):
            raise bad(key, f"is {type(state[key]).__name__}, not an integer")
    for key in _DICT_KEYS:
        if not isinstance(state[key], dict):
            raise bad(key, f"is {type(state[key]).__name__}, not a mapping")
    if not isinstance(state["recipe"], str):
        raise bad("recipe", "is not text")
    if not isinstance(state.get("stop_reason"), (str, type(None))):
        raise bad("stop_reason", "is neither text nor null")
    for key in ("epochs_done", "wall_seconds"):
        if not _is_number(state[key]) or state[key] < 0:
            raise bad(key, f"is {state[key]!r}, not a finite number >= 0")

    n = len(phase_steps)
    phase, step, in_phase = state["phase_index"], state["step"], state["step_in_phase"]
    if not 0 <= phase < n:
        raise bad("phase_index", f"is {phase}; the recipe has phases 0..{n - 1}")
    if not 0 <= in_phase <= phase_steps[phase]:
        raise bad("step_in_phase", f"is {in_phase}; phase {phase} has {phase_steps[phase]} steps")
    # Every phase before the current one ran to its end (a run that stops early finishes, never resumes).
    expected = sum(phase_steps[:phase]) + in_phase
    if step != expected:
        raise bad("step", f"is {step}, but {expected} steps lead to step {in_phase} of phase {phase}")
    if not 0 <= state["batch_in_epoch"] <= in_phase or not 0 <= state["epoch_in_phase"] <= in_phase:
        raise bad("batch_in_epoch", f"({state['batch_in_epoch']}) or epoch_in_phase ({state['epoch_in_phase']}) "
                                    f"is outside 0..{in_phase}")
    if not 0 <= state["optimizer_phase"] <= phase:
        raise bad("optimizer_phase", f"is {state['optimizer_phase']}, not a phase up to {phase}")
    if not -1 <= state["last_eval_step"] <= step:
        raise bad("last_eval_step", f"is {state['last_eval_step']}, not between -1 and the step {step}")
    if state["metrics_lines"] < 0:
        raise bad("metrics_lines", f"is {state['metrics_lines']}, a negative line count")
    if not isinstance(state["methods"], list) or len(state["methods"]) != methods \
            or not all(isinstance(m, dict) for m in state["methods"]):
        raise bad("methods", f"does not hold one state per method ({methods})")
    meter = state["loss_meter"]
    if not _is_int(meter.get("count")) or meter["count"] < 0 \
            or not (meter.get("total") is None or isinstance(meter.get("total"), torch.Tensor)):
        raise bad("loss_meter", "is not a loss meter's state")
    nonfinite = state.get("nonfinite", [0, 0])
    if not isinstance(nonfinite, (list, tuple)) or len(nonfinite) != 2 \
            or not all(_is_int(v) and v >= 0 for v in nonfinite):
        raise bad("nonfinite", "is not two counts")
    rollback = state.get("rollback", {"lr_factor": 1.0, "to_steps": []})
    if not isinstance(rollback, dict) or not _is_number(rollback.get("lr_factor")) \
            or not 0 < rollback["lr_factor"] <= 1 or not isinstance(rollback.get("to_steps"), list) \
            or not all(_is_int(v) and 0 <= v <= step for v in rollback["to_steps"]):
        raise bad("rollback", "is not an LR factor in (0, 1] and a list of earlier steps")
    check_rng(state["rng"], f"{where}: state.pt `rng`")
    ranks = state.get("ranks")
    if ranks is not None:
        if not isinstance(ranks, list) or not all(isinstance(r, dict) and isinstance(r.get("loss_meter"), dict)
                                                  for r in ranks):
            raise bad("ranks", "is not one state per process")
        for i, r in enumerate(ranks):
            check_rng(r.get("rng"), f"{where}: state.pt `ranks.{i}.rng`")
