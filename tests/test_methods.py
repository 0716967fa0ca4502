"""Methods: gradient clipping, EMA of the weights, early stopping (in the trainer and standalone)."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from torchdojo import Trainer, load_recipe
from torchdojo.methods import EMA, EarlyStopping, GradClip, Method, ema_update
from torchdojo.registry import METHODS

from conftest import make_tiny_recipe
from helpers import read_metrics


class MethodsProbe(Method):
    """Records the gradients it sees after backward and the weights after each optimizer step."""

    def __init__(self, grads: bool = False, weights: bool = False):
        self.grads, self.weights = grads, weights
        self.grad_log: list[list[torch.Tensor]] = []
        self.weight_log: list[dict[str, torch.Tensor]] = []
        self.initial: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, state) -> None:
        self.initial = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    def on_after_backward(self, state) -> None:
        if self.grads:
            self.grad_log.append([p.grad.detach().clone() for p in state.model.parameters()])

    def on_step_end(self, state) -> None:
        if self.weights:
            self.weight_log.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})


PROBE = "methods_probe"
if PROBE not in METHODS:
    METHODS.register(PROBE, MethodsProbe)


def fit(recipe: dict, run_dir: Path | None):
    trainer = Trainer(load_recipe(recipe), run_dir, quiet=True)
    return trainer, trainer.fit()


# -- gradient clipping ----------------------------------------------------------------------------

def test_grad_clip_matches_torch_clip_grad_norm_and_logs_the_norm(tmp_path):
    r = make_tiny_recipe()
    r["phases"] = [{"name": "only", "steps": 8, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.5}}]
    max_norm = 0.2
    r["methods"] = [{"name": PROBE, "grads": True}, {"name": "grad_clip", "max_norm": max_norm},
                    {"name": PROBE, "grads": True}]
    trainer, _ = fit(r, tmp_path / "run")
    before, clip, after = trainer.methods
    assert isinstance(clip, GradClip)
    entries = [e for e in read_metrics(tmp_path / "run") if "train/loss" in e]
    assert len(before.grad_log) == len(after.grad_log) == len(entries) == 8
    clipped_steps = 0
    for raw, got, entry in zip(before.grad_log, after.grad_log, entries):
        expected = [nn.Parameter(g.clone()) for g in raw]
        for p, g in zip(expected, raw):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(expected, max_norm)
        for p, g in zip(expected, got):
            torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-9)
        total = torch.sqrt(sum((g.double() ** 2).sum() for g in raw)).item()
        assert entry["train/grad_norm"] == pytest.approx(total, rel=1e-5)
        assert entry["train/grad_norm"] == pytest.approx(norm.item(), rel=1e-6)
        after_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in got)).item()
        if total > max_norm:
            clipped_steps += 1
            assert after_norm == pytest.approx(max_norm, rel=1e-4)
        else:
            assert after_norm == pytest.approx(total, rel=1e-6)
    assert clipped_steps > 0, "max_norm too large: clipping never happened"


def test_grad_clip_other_norm_type():
    model = nn.Linear(4, 3)
    model(torch.randn(8, 4)).pow(2).sum().backward()
    raw = [p.grad.clone() for p in model.parameters()]
    method = GradClip(max_norm=0.1, norm_type=1.0)
    state = SimpleNamespace(model=model, step_logs={})
    method.on_fit_start(state)
    method.on_after_backward(state)
    l1 = sum(g.abs().sum() for g in raw)
    assert state.step_logs["train/grad_norm"].item() == pytest.approx(l1.item(), rel=1e-6)
    got_l1 = sum(p.grad.abs().sum() for p in model.parameters())
    assert got_l1.item() == pytest.approx(0.1, rel=1e-4)
    with pytest.raises(ValueError):
        GradClip(max_norm=0.0)


# -- EMA ------------------------------------------------------------------------------------------

def test_ema_update_formula_on_parameters_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    average = copy.deepcopy(model)
    expected = {k: v.clone() for k, v in average.state_dict().items()}
    decay = 0.7
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(16, 5, dtype=torch.double))      # moves BN running stats, counts batches
        ema_update(average, model, decay)
        for k, w in model.state_dict().items():
            if w.dtype.is_floating_point:
                expected[k] = decay * expected[k] + (1 - decay) * w
            else:
                expected[k] = w.clone()
    got = average.state_dict()
    assert got["1.num_batches_tracked"].item() == 5
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-12, msg=k)
    # The average really lags the model (not a copy).
    assert not torch.allclose(got["0.weight"], model.state_dict()["0.weight"])


def _expected_average(initial: dict, weights: list[dict], decay: float, every: int, start: int) -> dict:
    avg = {k: v.double().clone() if v.dtype.is_floating_point else v.clone() for k, v in initial.items()}
    for step, w in enumerate(weights, start=1):
        if step < start:
            avg = {k: v.double().clone() if v.dtype.is_floating_point else v.clone() for k, v in w.items()}
        elif step % every == 0:
            avg = {k: decay * avg[k] + (1 - decay) * w[k].double() if w[k].dtype.is_floating_point else w[k].clone()
                   for k in w}
    return avg


@pytest.mark.parametrize("decay, every_steps, start_step", [(0.8, 1, 0), (0.7, 3, 5)])
def test_ema_method_final_model_is_the_average(tmp_path, decay, every_steps, start_step):
    r = make_tiny_recipe()
    r["model"] = {"name": "mlp", "hidden": [16], "batch_norm": True}
    r["methods"] = [{"name": "ema", "decay": decay, "every_steps": every_steps, "start_step": start_step,
                     "warmup": False}, {"name": PROBE, "weights": True}]
    trainer, summary = fit(r, tmp_path / "run")
    ema, probe = trainer.methods
    assert isinstance(ema, EMA)
    assert len(probe.weight_log) == summary["steps"] == trainer.total_steps == 22
    final = load_file(str(tmp_path / "run/checkpoints/final/model.safetensors"))
    expected = _expected_average(probe.initial, probe.weight_log, decay, every_steps, start_step)
    assert final.keys() == expected.keys()
    for k in final:
        if final[k].dtype.is_floating_point:
            torch.testing.assert_close(final[k].double(), expected[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(final[k], expected[k]), k
    raw = probe.weight_log[-1]
    assert not torch.allclose(final["head.weight"], raw["head.weight"], atol=1e-4)
    assert "body.1.1.running_mean" in final                  # BatchNorm statistics are averaged too

    # Val and test metrics in the summary are those of the averaged weights, not the raw ones.
    averaged_model = copy.deepcopy(trainer.state.model)
    averaged_model.load_state_dict(final)
    metrics = {**trainer.evaluate("val", averaged_model), **trainer.evaluate("test", averaged_model)}
    assert metrics == pytest.approx(summary["metrics"], rel=1e-6)
    raw_model = copy.deepcopy(trainer.state.model)
    raw_model.load_state_dict(raw)
    assert trainer.evaluate("test", raw_model)["test/loss"] != pytest.approx(summary["metrics"]["test/loss"],
                                                                              rel=1e-6)


def test_ema_validation_uses_averaged_weights(tmp_path):
    r = make_tiny_recipe()
    r["methods"] = [{"name": "ema", "decay": 0.9}]
    trainer, summary = fit(r, tmp_path / "run")
    ema = trainer.methods[0]
    # The last validation entry (end of training) equals evaluating the average.
    entries = read_metrics(tmp_path / "run")
    last_val = [e for e in entries if "val/loss" in e and not any(k.startswith("test/") for k in e)][-1]
    assert last_val["val/loss"] == pytest.approx(trainer.evaluate("val", ema.average)["val/loss"], rel=1e-6)
    assert last_val["val/loss"] != pytest.approx(trainer.evaluate("val", trainer.state.model)["val/loss"],
                                                 rel=1e-6)
    with pytest.raises(ValueError):
        EMA(decay=1.0)


# -- early stopping -------------------------------------------------------------------------------

def early_stopping_recipe(restore_best: bool = True, monitor: str = "val/loss") -> dict:
    r = make_tiny_recipe()
    # Few rows, heavy label noise, a wide net and a high LR: val loss bottoms out early and then rises.
    r["data"] = {"name": "synthetic_tabular", "n_samples": 200, "n_features": 8, "n_informative": 3,
                 "n_classes": 2, "flip_y": 0.4, "class_sep": 0.5}
    r["model"] = {"name": "mlp", "hidden": [64, 64]}
    r["phases"] = [{"name": "long", "epochs": 60, "batch_size": 16,
                    "optimizer": {"name": "adam", "lr": 0.02}}]
    r["methods"] = [{"name": "early_stopping", "monitor": monitor, "patience": 3, "restore_best": restore_best}]
    r["log"] = {"every_steps": 10}
    return r


def _val_entries(run_dir: Path) -> list[dict]:
    return [e for e in read_metrics(run_dir) if "val/loss" in e and not any(k.startswith("test/") for k in e)]


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("early") / "run"
    trainer, summary = fit(early_stopping_recipe(), run_dir)
    return run_dir, trainer, summary


def test_early_stopping_stops_before_the_planned_steps(early_stopped):
    run_dir, trainer, summary = early_stopped
    assert summary["steps"] < trainer.total_steps
    assert summary["stop_reason"] and "early stopping" in summary["stop_reason"]
    assert summary["status"] == "finished"
    vals = [e["val/loss"] for e in _val_entries(run_dir)]
    best = vals.index(min(vals))
    # It stopped exactly `patience` evaluations after the best one.
    assert len(vals) - 1 - best == 3
    assert all(v >= vals[best] for v in vals[best + 1:])
    assert trainer.methods[0].best == min(vals)


def test_early_stopping_restores_the_best_weights(early_stopped):
    run_dir, _, summary = early_stopped
    vals = [e["val/loss"] for e in _val_entries(run_dir)]
    assert summary["metrics"]["val/loss"] == pytest.approx(min(vals), rel=1e-9)
    assert summary["metrics"]["val/loss"] < vals[-1]


def test_early_stopping_without_restore_keeps_the_last_weights(tmp_path):
    _, summary = fit(early_stopping_recipe(restore_best=False), tmp_path / "run")
    vals = [e["val/loss"] for e in _val_entries(tmp_path / "run")]
    assert summary["stop_reason"]
    assert summary["metrics"]["val/loss"] == pytest.approx(vals[-1], rel=1e-9)
    assert summary["metrics"]["val/loss"] > min(vals)


@pytest.mark.parametrize("monitor, mode", [("val/accuracy", "max"), ("val/f1_macro", "max"), ("val/r2", "max"),
                                           ("val/loss", "min"), ("val/nll", "min"), ("val/mae", "min")])
def test_early_stopping_auto_mode(monitor, mode):
    assert EarlyStopping(monitor=monitor, mode="auto").mode == mode


def _feed(method: EarlyStopping, values: list[float]) -> SimpleNamespace:
    state = SimpleNamespace(step=0, stop_reason=None, eval_model=nn.Linear(1, 1))
    for i, v in enumerate(values):
        state.step = i + 1
        method.on_eval_end(state, {"val/other": 0.0, method.monitor: v})
        if state.stop_reason:
            break
    return state


def test_early_stopping_max_mode_counts_patience_on_accuracy():
    rising = _feed(EarlyStopping(monitor="val/accuracy", patience=2), [0.5, 0.6, 0.7, 0.8])
    assert rising.stop_reason is None
    method = EarlyStopping(monitor="val/accuracy", patience=2)
    state = _feed(method, [0.5, 0.7, 0.65, 0.7, 0.9])
    assert state.stop_reason is not None and state.step == 4    # 0.65 and a tie 0.7 do not improve
    assert method.best == 0.7 and method.best_step == 2
    # min_delta: improvements smaller than it do not count.
    method = EarlyStopping(monitor="val/loss", patience=2, min_delta=0.1)
    state = _feed(method, [1.0, 0.95, 0.92, 0.5])
    assert state.step == 3 and method.best == 1.0


def test_early_stopping_unknown_monitor_names_the_metrics():
    state = SimpleNamespace(step=1, stop_reason=None, eval_model=nn.Linear(1, 1))
    with pytest.raises(ValueError, match="val/accuracy"):
        EarlyStopping(monitor="val/acuracy").on_eval_end(state, {"val/loss": 0.3, "val/accuracy": 0.9})


def test_ema_warmup_decay_follows_the_num_updates_formula(tmp_path):
    from torchdojo.methods.ema import warmed_up_decay
    assert [warmed_up_decay(0.99, n) for n in (0, 1, 8, 1000)] == [0.1, 2 / 11, 9 / 18, 0.99]
    # In the trainer: the first update averages with decay 0.1, i.e. 90% of the new weights.
    r = make_tiny_recipe()
    r["phases"] = [{"name": "one", "steps": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.5}}]
    r["methods"] = [{"name": "ema", "decay": 0.99}, {"name": PROBE, "weights": True}]
    trainer, _ = fit(r, None)
    ema, probe = trainer.methods
    for k, v in ema.average.state_dict().items():
        if v.dtype.is_floating_point:
            expected = 0.1 * probe.initial[k].double() + 0.9 * probe.weight_log[0][k].double()
            torch.testing.assert_close(v.double(), expected, rtol=1e-6, atol=1e-7, msg=k)
