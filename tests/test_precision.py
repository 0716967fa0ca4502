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


@pytest.mark.parametrize("change", [
    lambda r: r.update(model={"name": "moe_mlp", "width": 8, "experts": 2, "expert_hidden": 8},
                       methods=[{"name": "load_balance"}]),
    lambda r: r.update(model={"name": "autoencoder", "encoder": {"name": "mlp", "hidden": [16]}, "latent": 4},
                       task={"name": "autoencode", "noise": [{"name": "noise", "std": 0.3}]}),
    lambda r: r.update(model={"name": "autoencoder", "encoder": {"name": "mlp", "hidden": [16]}, "latent": 4,
                              "variational": True}, task={"name": "vae"}),
    lambda r: (r["data"].update(train_size=60, unlabeled=True),
               r.update(task={"name": "semisup", "threshold": 0.5, "strong": [{"name": "swap_noise", "p": 0.2}]})),
], ids=["moe_mlp", "autoencode", "vae", "semisup"])
def test_bf16_with_the_pretraining_and_semi_supervised_pieces(change, tiny_recipe):
    """Each trains under bf16 autocast to the float32 run's metrics within bfloat16 rounding (the mixture
    of experts once failed there: its bfloat16 rows met a float32 gate)."""
    change(tiny_recipe)
    _, s32 = _fit(dict(tiny_recipe))
    tiny_recipe["precision"] = "bf16"
    _, s16 = _fit(tiny_recipe)
    assert s16["metrics"]["test/loss"] == pytest.approx(s32["metrics"]["test/loss"], rel=0.2)
