"""The hook interface. A hook that changes something returns the new value; the trainer calls only
the hooks a method overrides, in recipe order, so unused hooks cost nothing."""
from __future__ import annotations

from typing import Any


class Method:
    def on_fit_start(self, state) -> None:
        """Before the first step (also when resuming, before `load_state_dict`)."""

    def on_phase_start(self, state) -> None:
        """After the phase's optimizer, loader and schedule exist."""

    def on_batch(self, state, batch: dict) -> dict:
        """Return the batch to train on (augmentation, mixing, ...)."""
        return batch

    def on_loss(self, state, loss, parts: dict) -> Any:
        """Return the loss to back-propagate; `parts` holds the detached loss terms."""
        return loss

    def on_after_backward(self, state) -> None:
        """Gradients exist; the optimizer has not stepped yet."""

    def on_step_end(self, state) -> None:
        """After the optimizer step; `state.step` already counts it."""

    def on_step_skipped(self, state) -> None:
        """Instead of `on_step_end` when `nonfinite: skip` skipped the update (parameters unchanged);
        `state.step` counts the step all the same."""

    def on_eval_model(self, state, model):
        """Return the model to evaluate (e.g. averaged weights)."""
        return model

    def on_eval_end(self, state, metrics: dict) -> None:
        """After a validation pass, with metrics named `val/<name>`."""

    def on_phase_end(self, state) -> None:
        """At the end of a phase."""

    def on_fit_end(self, state, model):
        """Return the final model, which is tested and saved."""
        return model

    def on_models(self, state, models: dict) -> dict:
        """Return the named models that final evaluation, `dojo eval` and `dojo predict` report; the
        final model is named "" (metrics `test/accuracy`), others add `test/<name>/accuracy`."""
        return models

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


HOOKS = tuple(name for name in vars(Method) if name.startswith("on_"))
