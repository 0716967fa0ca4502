"""Loss terms switched on later: exactly 0 before the start, the full weight after the ramp."""
from __future__ import annotations

import json
import math

import pytest

from conftest import make_tiny_recipe
from torchdojo import ConfigError, Trainer, load_recipe
from torchdojo.recipe import LossWeightSchedule


def test_weight_schedule_closed_form():
    lin = LossWeightSchedule(value=0.5, start_step=10, ramp_steps=4)
    assert [lin.at(s, 0.0) for s in (0, 9, 10, 11, 13, 14, 100)] == [0, 0, 0, 0.125, 0.375, 0.5, 0.5]
    sig = LossWeightSchedule(value=2.0, start_epoch=1.0, ramp_epochs=2.0, shape="sigmoid")
    assert sig.at(0, 0.99) == 0.0
    assert sig.at(0, 2.0) == pytest.approx(2.0 * math.exp(-5 * 0.25))
    assert sig.at(0, 3.0) == 2.0
    assert LossWeightSchedule(value=0.3, start_step=4).at(4, 0) == 0.3      # no ramp: on at the start


def test_scheduled_term_in_training_is_zero_then_ramps_to_its_value(tmp_path):
    r = make_tiny_recipe()
    r["phases"][0]["losses"] = [
        {"name": "cross_entropy"},
        {"name": "cross_entropy", "label_smoothing": 0.1, "weight": {"start_step": 5, "ramp_steps": 4, "value": 0.5}},
    ]
    Trainer(load_recipe(r), tmp_path / "run", quiet=True).fit()
    entries = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [e for e in entries if "train/loss/cross_entropy2" in e]
    for e in train:
        steps_before = e["step"] - 1                     # the weight used by the step logged as `step`
        part, main = e["train/loss/cross_entropy2"], e["train/loss/cross_entropy"]
        if steps_before < 5:
            assert part == 0.0
        else:
            weight = 0.5 * min(1.0, (steps_before - 5) / 4)
            # the smoothed CE is within label-smoothing distance of the plain CE, times the weight
            assert part == pytest.approx(weight * main, rel=0.35, abs=1e-6)
            assert (part == 0.0) == (weight == 0.0)
        assert e["train/loss"] == pytest.approx(main + part, rel=1e-5)


@pytest.mark.parametrize("weight, path", [
    ({"start_step": 1, "ramp_epochs": 2}, "phases.0.losses.1.weight"),
    ({"value": 1}, "phases.0.losses.1.weight"),
    ({"start_step": 1, "shape": "cubic"}, "phases.0.losses.1.weight.shape"),
    ("heavy", "phases.0.losses.1.weight"),
])
def test_bad_weight_schedules_are_config_errors(weight, path):
    r = make_tiny_recipe()
    r["phases"][0]["losses"] = [{"name": "cross_entropy"}, {"name": "mse", "weight": weight}]
    with pytest.raises(ConfigError) as err:
        load_recipe(r)
    assert err.value.path == path
