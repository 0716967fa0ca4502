"""`precision: bf16`: the training forward pass under torch.autocast(bfloat16), float32 weights."""
from __future__ import annotations

import pytest
import torch

from torchdojo import Trainer, load_recipe
from torchdojo.methods import Method
from torchdojo.registry import METHODS


class OutputDtypes(Method):
    """Records the dtype of the model's output in training forward passes."""

    def on_fit_start(self, state):
        self.dtypes = set()
        state.model.register_forward_hook(lambda m, a, out: self.dtypes.add(out.dtype) if m.training else None)


@pytest.fixture
def output_dtypes():
    METHODS.register("output_dtypes", OutputDtypes)
    yield
    METHODS.unregister("output_dtypes")


def _fit(recipe):
    trainer = Trainer(load_recipe(recipe), quiet=True)
    return trainer, trainer.fit()


def test_bf16_trains_in_bfloat16_with_float32_weights(output_dtypes, tiny_recipe):
    tiny_recipe["methods"] = [{"name": "output_dtypes"}]
    fp32, s32 = _fit(dict(tiny_recipe))
    tiny_recipe["precision"] = "bf16"
    bf16, s16 = _fit(tiny_recipe)
    assert fp32.methods[0].dtypes == {torch.float32}
    assert bf16.methods[0].dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in bf16.state.model.parameters())
    # Same training up to bfloat16 rounding: accuracy within a few test rows, and not the same numbers.
    assert s16["metrics"]["test/accuracy"] == pytest.approx(s32["metrics"]["test/accuracy"], abs=0.05)
    assert s16["metrics"]["test/loss"] != s32["metrics"]["test/loss"]
