"""Early stopping on a validation metric, restoring the best weights (Prechelt 1998)."""
from __future__ import annotations

import math
from typing import Literal

from .base import Method

HIGHER_IS_BETTER = ("accuracy", "f1", "r2", "auc")


def improved(value: float, best: float, mode: str, min_delta: float) -> bool:
    """Whether `value` beats `best` by more than `min_delta` in direction `mode` ('min' or 'max')."""
    if math.isnan(value):
        return False
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping(Method):
    """Stop when `monitor` has not improved for `patience` evaluations; with `restore_best`, the final
    model gets the weights of the best evaluation. `mode: auto` maximises accuracy/F1/R2, else minimises."""

    def __init__(self, monitor: str = "val/loss", mode: Literal["auto", "min", "max"] = "auto",
                 patience: int = 5, min_delta: float = 0.0, restore_best: bool = True):
        if patience < 1:
            raise ValueError("patience must be at least 1")
        if mode == "auto":
            mode = "max" if any(k in monitor for k in HIGHER_IS_BETTER) else "min"
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.restore_best = min_delta, restore_best
        self.best = math.inf if mode == "min" else -math.inf
        self.best_step = -1
        self.bad_evals = 0
        self.best_weights: dict | None = None

    def on_eval_end(self, state, metrics: dict) -> None:
        if self.monitor not in metrics:
            raise ValueError(f"early_stopping monitors '{self.monitor}', which is not among the "
                             f"metrics: {', '.join(sorted(metrics))}")
        value = metrics[self.monitor]
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.bad_evals = value, state.step, 0
            if self.restore_best:
                self.best_weights = {k: v.detach().clone() for k, v in state.eval_model.state_dict().items()}
        else:
            self.bad_evals += 1
            if self.bad_evals >= self.patience:
                state.stop_reason = (f"early stopping: {self.monitor} did not improve for {self.patience} "
                                     f"evaluations (best {self.best:.4g} at step {self.best_step})")

    def on_fit_end(self, state, model):
        if self.restore_best and self.best_weights is not None:
            model.load_state_dict(self.best_weights)
        return model

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "best_weights": self.best_weights}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]
        self.best_weights = state["best_weights"]
