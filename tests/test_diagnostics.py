"""The `diagnostics` method: per-parameter gradient and weight norms, update ratios, activation health,
LRs, loss terms, throughput and memory, in metrics.jsonl and TensorBoard."""
from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchdojo import Trainer, load_recipe
from torchdojo.methods import Method
from torchdojo.methods.diagnostics import dead_fraction, saturated_fraction
from torchdojo.registry import METHODS

from helpers import read_metrics

EVERY = 4


class Witness(Method):
    """Listed after `diagnostics`: records each step's gradients, and the weights before and after it."""

    def __init__(self):
        self.grads, self.before, self.after = {}, {}, {}

    def on_after_backward(self, state):
        step = state.step + 1
        self.grads[step] = {n: p.grad.detach().clone() for n, p in state.model.named_parameters() if p.grad is not None}
        self.before[step] = {n: p.detach().clone() for n, p in state.model.named_parameters()}

    def on_step_end(self, state):
        self.after[state.step] = {n: p.detach().clone() for n, p in state.model.named_parameters()}


@pytest.fixture
def witness():
    METHODS.register("witness", Witness)
    yield
    METHODS.unregister("witness")


def diag_lines(run_dir) -> list[dict]:
    return [e for e in read_metrics(run_dir) if any(k.startswith("diag/") for k in e)]


@pytest.fixture
def diag_run(witness, tiny_recipe, tmp_path):
    tiny_recipe["methods"] = [{"name": "diagnostics", "every_steps": EVERY}, {"name": "witness"}]
    tiny_recipe["phases"][0]["losses"] = [{"name": "cross_entropy"}, {"name": "focal", "weight": 0.5}]
    trainer = Trainer(load_recipe(tiny_recipe), tmp_path / "run", quiet=True)
    trainer.fit()
    return trainer, tmp_path / "run"


def test_lines_come_every_n_steps_with_every_kind_of_measurement(diag_run):
    trainer, run_dir = diag_run
    lines = diag_lines(run_dir)
    assert [e["step"] for e in lines] == list(range(EVERY, trainer.state.step + 1, EVERY))
    names = [n for n, _ in trainer.state.model.named_parameters()]
    first = lines[0]
    for name in names:
        for kind in ("grad_norm", "weight_norm", "update_ratio"):
            assert f"diag/{kind}/{name}" in first
    relus = [n for n, m in trainer.state.model.named_modules() if isinstance(m, torch.nn.ReLU)]
    assert relus and all(0 <= first[f"diag/dead_relu/{n}"] <= 1 for n in relus)
    assert {"diag/loss/cross_entropy", "diag/loss/focal", "diag/lr/group0"} <= first.keys()
    assert first["diag/samples_per_sec"] > 0 and first["diag/peak_memory_mb"] > 10
    assert all(e["phase"] in ("warm", "settle") for e in lines)


def test_gradient_norms_equal_vector_norm_of_each_grad(diag_run):
    trainer, run_dir = diag_run
    witness = trainer.methods[1]
    for line in diag_lines(run_dir):
        for name, grad in witness.grads[line["step"]].items():
            expected = torch.linalg.vector_norm(grad).item()
            assert line[f"diag/grad_norm/{name}"] == pytest.approx(expected, rel=1e-6), (line["step"], name)
            weight = torch.linalg.vector_norm(witness.before[line["step"]][name]).item()
            assert line[f"diag/weight_norm/{name}"] == pytest.approx(weight, rel=1e-6)


def test_update_ratio_is_the_measured_change_over_the_weight_norm(diag_run):
    trainer, run_dir = diag_run
    witness = trainer.methods[1]
    checked = 0
    for line in diag_lines(run_dir):
        step = line["step"]
        for name, before in witness.before[step].items():
            change = torch.linalg.vector_norm(witness.after[step][name] - before).item()
            expected = change / torch.linalg.vector_norm(before).item()
            assert line[f"diag/update_ratio/{name}"] == pytest.approx(expected, rel=1e-5, abs=1e-12)
            checked += expected > 0
    assert checked > 10            # real updates were measured, not only zeros


def test_lr_and_loss_terms_match_what_the_trainer_logged(diag_run):
    _, run_dir = diag_run
    train = {e["step"]: e for e in read_metrics(run_dir) if "train/loss" in e}     # log.every_steps is 1
    for line in diag_lines(run_dir):
        assert line["diag/lr/group0"] == train[line["step"]]["lr/group0"]
        if "train/loss/focal" in train[line["step"]]:
            assert line["diag/loss/focal"] == pytest.approx(train[line["step"]]["train/loss/focal"], rel=1e-6)


def test_tensorboard_has_the_same_scalars(diag_run):
    _, run_dir = diag_run
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    lines = diag_lines(run_dir)
    key = next(k for k in lines[0] if k.startswith("diag/grad_norm/"))
    assert key in tags and "train/loss" in tags and "val/accuracy" in tags
    scalars = {e.step: e.value for e in events.Scalars(key)}
    assert scalars == pytest.approx({e["step"]: e[key] for e in lines}, rel=1e-6)


def test_tensorboard_can_be_turned_off(tiny_recipe, tmp_path):
    tiny_recipe["log"] = {"every_steps": 5, "tensorboard": False}
    Trainer(load_recipe(tiny_recipe), tmp_path / "run", quiet=True).fit()
    assert not (tmp_path / "run" / "tb").exists()


def test_dead_fraction_counts_units_dead_for_the_whole_batch():
    out = torch.tensor([[0.0, 1.0, 0.0, -2.0],
                        [0.0, 0.0, 3.0, -1.0]])
    assert dead_fraction(out).item() == 0.5            # units 0 and 3 never fire
    conv = torch.zeros(2, 3, 4, 4)
    conv[1, 0, 2, 2] = 1.0                             # one unit of 48 fires once
    assert dead_fraction(conv).item() == pytest.approx(47 / 48)


def test_saturated_fraction_of_tanh_and_sigmoid():
    tanh_out = torch.tensor([0.99, -0.98, 0.5, 0.0])
    assert saturated_fraction(tanh_out, torch.nn.Tanh()).item() == 0.5
    sigmoid_out = torch.tensor([0.999, 0.001, 0.5, 0.9])
    assert saturated_fraction(sigmoid_out, torch.nn.Sigmoid()).item() == 0.5


def test_saturation_is_measured_for_tanh_models(tiny_recipe, tmp_path):
    tiny_recipe["model"] = {"name": "mlp", "hidden": [16], "activation": "tanh"}
    tiny_recipe["methods"] = [{"name": "diagnostics", "every_steps": 5}]
    trainer = Trainer(load_recipe(tiny_recipe), tmp_path / "run", quiet=True)
    trainer.fit()
    line = diag_lines(tmp_path / "run")[0]
    assert any(k.startswith("diag/saturation/") for k in line)
    assert not any(k.startswith("diag/dead_relu/") for k in line)
    assert trainer.methods[0].last == {k: v for k, v in diag_lines(tmp_path / "run")[-1].items()
                                       if k.startswith("diag/")}


def test_tensorboard_after_a_resume_shows_each_step_once(tiny_recipe, tmp_path):
    """Resuming from step 10 logs steps 11.. again: TensorBoard's purge hides the first copies."""
    tiny_recipe["checkpoint"] = {"every_steps": 5, "keep_last": 10}
    Trainer(load_recipe(tiny_recipe), tmp_path / "run", quiet=True).fit()
    Trainer.from_run_dir(tmp_path / "run", quiet=True,
                         checkpoint=tmp_path / "run" / "checkpoints" / "step-00000010").fit()
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(e["step"], e["train/loss"]) for e in read_metrics(tmp_path / "run") if "train/loss" in e]
    assert [s for s, _ in logged] == [s for s, _ in expected] == list(range(1, 23))
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
