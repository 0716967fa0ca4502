"""Mixture of experts with switch (top-1) routing, `SwitchFFN` and the `moe_mlp` model, and the
`load_balance` method, against the Switch Transformer's definitions (arXiv 2101.03961)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from torchdojo import ConfigError, Trainer, load_recipe
from torchdojo.methods import LoadBalance, load_balancing_loss
from torchdojo.models import SwitchFFN

from conftest import make_tiny_recipe
from helpers import fit, read_metrics


def layer(experts=4, capacity_factor=10.0, seed=0) -> SwitchFFN:
    torch.manual_seed(seed)
    return SwitchFFN(6, 8, experts=experts, capacity_factor=capacity_factor)


def expert(m: SwitchFFN, e: int, x: torch.Tensor) -> torch.Tensor:
    return F.relu(x @ m.w1[e] + m.b1[e]) @ m.w2[e] + m.b2[e]


def test_each_row_goes_to_its_top_expert_scaled_by_the_gate():
    m = layer()
    x = torch.randn(20, 6)
    out = m(x)
    probs = torch.softmax(m.router(x), -1)
    for i in range(20):
        e = int(probs[i].argmax())
        torch.testing.assert_close(out[i], probs[i, e] * expert(m, e, x[i:i + 1])[0])


def test_rows_beyond_an_experts_capacity_are_dropped_in_arrival_order():
    m = layer(experts=2, capacity_factor=0.5)              # capacity ceil(0.5 * 8 / 2) = 2 rows per expert
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 10.0                        # x[:, 0] > 0 -> expert 0, else expert 1
    x = torch.randn(8, 6)
    x[:, 0] = torch.tensor([1.0, 2, -1, 3, -2, 4, -3, -4])   # expert 0: rows 0, 1, 3, 5; expert 1: 2, 4, 6, 7
    out = m(x)
    assert m.capacity(8) == 2
    kept = [0, 1, 2, 4]
    for i in range(8):
        if i in kept:
            assert out[i].abs().sum() > 0
        else:
            assert torch.equal(out[i], torch.zeros(6)), i
    # In eval mode no row is dropped by default; eval_capacity_factor sets a limit there too.
    m.eval()
    assert m.capacity(8) == 8 and all(m(x)[i].abs().sum() > 0 for i in range(8))
    m.eval_capacity_factor = 0.5
    assert m.capacity(8) == 2 and torch.equal(m(x), out)


def test_the_load_balancing_loss_is_experts_times_sum_of_share_times_mean_probability():
    m = layer(experts=4)
    x = torch.randn(32, 6)
    m(x)
    probs = torch.softmax(m.router(x), -1)
    share = F.one_hot(probs.argmax(-1), 4).float().mean(0)
    torch.testing.assert_close(m.aux_loss, 4 * torch.sum(share * probs.mean(0)))
    torch.testing.assert_close(m.usage, share)
    # Perfectly balanced routing (each expert first for a quarter of the rows, uniform mean probability): 1.
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[:, :4] = torch.eye(4) * 5
    x = torch.zeros(8, 6)
    x[torch.arange(8), torch.arange(8) % 4] = 1.0
    m(x)
    assert float(m.aux_loss.detach()) == pytest.approx(1.0, abs=1e-6)
    # All rows on one expert with certainty: the maximum, experts.
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 100.0
    x = torch.zeros(8, 6)
    x[:, 0] = 1.0
    m(x)
    assert float(m.aux_loss.detach()) == pytest.approx(4.0, abs=1e-4)


def test_gradients_reach_the_router_through_the_gate_and_the_balance_loss():
    m = layer()
    x = torch.randn(16, 6)
    m(x).sum().backward()
    assert m.router.weight.grad.abs().sum() > 0
    m.zero_grad()
    m(x)
    m.aux_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0 and m.w1.grad is None


def test_load_balance_adds_weight_times_the_loss_of_every_layer(tmp_path):
    r = make_tiny_recipe()
    r["model"] = {"name": "moe_mlp", "width": 8, "blocks": 2, "experts": 3, "expert_hidden": 8}
    trainer = Trainer(load_recipe(r), None, quiet=True)
    model = trainer.state.model
    model(torch.randn(10, 8))
    aux = load_balancing_loss(model)
    torch.testing.assert_close(aux, model.moe[0].aux_loss + model.moe[1].aux_loss)
    state = trainer.state
    loss = torch.tensor(0.5)
    torch.testing.assert_close(LoadBalance(weight=0.1).on_loss(state, loss, {}), loss + 0.1 * aux)
    assert math.isclose(state.step_logs["train/moe_max_share"],
                        max(float(m.usage.max()) for m in model.moe))


def test_balancing_keeps_the_experts_in_use(tmp_path):
    """Measured on the tiny task: with the balance loss (weight 0.1) no expert takes more than half of
    the rows at the end; it is logged every step."""
    r = make_tiny_recipe()
    r["model"] = {"name": "moe_mlp", "width": 16, "blocks": 1, "experts": 4, "expert_hidden": 16}
    r["methods"] = [{"name": "load_balance", "weight": 0.1}]
    _, summary = fit(r, tmp_path / "run")
    logs = [e for e in read_metrics(tmp_path / "run") if "train/moe_max_share" in e]
    assert len(logs) == summary["steps"]
    assert logs[-1]["train/moe_max_share"] < 0.5 and 1.0 <= logs[-1]["train/moe_balance"] < 1.5
    assert summary["metrics"]["test/accuracy"] > 0.5


def test_load_balance_needs_a_mixture_of_experts():
    r = make_tiny_recipe()
    r["methods"] = [{"name": "load_balance"}]
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        Trainer(load_recipe(r), None, quiet=True).fit()
