"""Gradient accumulation (`accumulate: N` in a phase): each batch runs as N micro-batches whose
share-weighted gradients equal the whole batch's, so a run trains the same model with less memory."""
from __future__ import annotations

import pytest
import torch

from torchdojo import Trainer, load_recipe
from torchdojo.errors import ConfigError
from torchdojo.methods import Method
from torchdojo.registry import METHODS

from helpers import read_metrics, train_entries


def run(tiny_recipe, tmp_path, name, accumulate=None, batch_size=32):
    r = {**tiny_recipe, "phases": [dict(p) for p in tiny_recipe["phases"]]}
    r["phases"][0]["batch_size"] = batch_size
    if accumulate is not None:
        r["phases"][0]["accumulate"] = accumulate
    trainer = Trainer(load_recipe(r), tmp_path / name, quiet=True)
    trainer.fit()
    return trainer, train_entries(read_metrics(tmp_path / name))


@pytest.mark.parametrize("accumulate, batch_size", [(2, 32), (4, 30), (3, 32)],
                         ids=["even", "uneven-4x30", "uneven-3x32"])
def test_accumulated_run_matches_the_whole_batch_run(tiny_recipe, tmp_path, accumulate, batch_size):
    whole, whole_log = run(tiny_recipe, tmp_path, "whole", batch_size=batch_size)
    accum, accum_log = run(tiny_recipe, tmp_path, "accum", accumulate, batch_size)
    # Same gradients up to float32 summation order, over 22 steps of AdamW then SGD.
    for (name, a), b in zip(whole.state.model.state_dict().items(), accum.state.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert [e["step"] for e in whole_log] == [e["step"] for e in accum_log]
    for a, b in zip(whole_log, accum_log):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)


class RecordForwardRows(Method):
    """Records the row count of every forward pass the model sees in training."""

    def on_fit_start(self, state):
        self.rows = []
        state.model.register_forward_pre_hook(
            lambda module, args: self.rows.append(len(args[0])) if module.training else None)


@pytest.fixture
def record_rows():
    METHODS.register("record_rows", RecordForwardRows)
    yield
    METHODS.unregister("record_rows")


def test_micro_batches_are_what_the_model_sees_and_accumulate_carries_over(record_rows, tiny_recipe, tmp_path):
    tiny_recipe["methods"] = [{"name": "record_rows"}]
    tiny_recipe["phases"][0]["accumulate"] = 4          # phase 2 (batch 64) keeps accumulating by 4
    trainer, _ = run(tiny_recipe, tmp_path, "rows", accumulate=4, batch_size=30)
    rows = trainer.methods[0].rows
    assert rows[:4] == [8, 8, 7, 7]                      # torch.tensor_split of 30 rows into 4
    assert rows[-4:] == [16, 16, 16, 16]                 # the second phase's 64-row batches
    assert len(rows) == 4 * 22


def test_summed_losses_are_refused_with_accumulation(tiny_recipe):
    tiny_recipe["phases"][0]["accumulate"] = 2
    tiny_recipe["phases"][0]["losses"] = [{"name": "focal", "reduction": "sum"}]
    with pytest.raises(ConfigError, match=r"phases.0.accumulate: .*reduction: sum"):
        Trainer(load_recipe(tiny_recipe), quiet=True).fit()


def test_accumulate_must_be_positive(tiny_recipe):
    tiny_recipe["phases"][0]["accumulate"] = 0
    with pytest.raises(ConfigError, match="phases.0.accumulate"):
        load_recipe(tiny_recipe)
