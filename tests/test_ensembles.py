"""Ensembles of independently initialised members (torchdojo.ensembles): stacked training under
vmap against members trained alone, the NCL and weight-distance penalties, fitted combination
weights, checkpoints of the stacked parameters, and members trained one after another."""
from __future__ import annotations

import copy
import itertools
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import update_bn

from conftest import make_tiny_recipe
from torchdojo import DojoError, Trainer, load_recipe
from torchdojo.checkpoint import save_weights
from torchdojo.ensemble import Ensemble, combine
from torchdojo.ensembles import (StackedEnsemble, WeightedEnsemble, combine_weighted, ensemble_training_loss,
                                 fit_combination_weights, load_member_models, member_accuracies, ncl_penalty,
                                 pairwise_disagreement, train_members, weight_distance_penalty)
from torchdojo.losses import MSE
from torchdojo.models.cnn1d import CNN1d, CNN1dConfig
from torchdojo.models.gru import GRU, GRUConfig
from torchdojo.models.mlp import MLP, MLPConfig
from torchdojo.tasks.base import LossTerm, weighted_loss

CE = [LossTerm("cross_entropy", 1.0, nn.CrossEntropyLoss())]


def mlp(**kw):
    return lambda: MLP((8,), 3, MLPConfig(**{"hidden": [16], **kw}))


def cnn1d():
    return CNN1d((2, 16), 3, CNN1dConfig(channels=[4, 8], kernel_size=3, hidden=8))


def gru():
    return GRU((2, 16), 3, GRUConfig(hidden=8))


def cumulative_bn():
    """BatchNorm with momentum=None (a cumulative average of the batch statistics): run in the loop."""
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=None), nn.ReLU(), nn.Linear(16, 3))


def seeded(build, seeds=(0, 1, 2), dtype=torch.float32):
    members = []
    for s in seeds:
        torch.manual_seed(s)
        members.append(build().to(dtype))
    return members


def fixed_batches(shape, dtype=torch.float32, n=4, rows=16):
    g = torch.Generator().manual_seed(123)
    return [{"x": torch.randn(rows, *shape, generator=g).to(dtype), "y": torch.randint(0, 3, (rows,), generator=g)}
            for _ in range(n)]


OPTIMIZERS = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
              "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)}


def train_stacked(ensemble, batches, opt="adamw", steps=20, **penalties):
    optimizer = OPTIMIZERS[opt](ensemble.parameters())
    ensemble.train()
    for k in range(steps):
        optimizer.zero_grad()
        loss, _ = ensemble_training_loss(ensemble, batches[k % len(batches)], CE, **penalties)
        loss.backward()
        optimizer.step()
    return ensemble


def train_alone(model, batches, opt="adamw", steps=20):
    optimizer = OPTIMIZERS[opt](model.parameters())
    model.train()
    for k in range(steps):
        optimizer.zero_grad()
        b = batches[k % len(batches)]
        loss, _ = weighted_loss(model(b["x"]), b["y"], CE)
        loss.backward()
        optimizer.step()
    return model


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def max_difference(a: nn.Module, b: nn.Module) -> float:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


# -- stacked training equals members trained alone ----------------------------------------------------

# float32 except the MLP with BatchNorm: there the Linear bias before the BatchNorm has a true gradient of
# exactly 0 (BatchNorm subtracts it again), so its gradient is float32 rounding noise (~1e-9), different
# in the batched and the plain computation, and Adam's normalisation turns that noise into steps of
# size ~lr (4.7e-2 apart after 20 steps). In float64 the noise is far below Adam's eps.
CASES = {
    "mlp-adamw": (mlp(), (8,), "adamw", torch.float32, True),
    "mlp-sgd": (mlp(), (8,), "sgd", torch.float32, True),
    "cnn1d-batchnorm-adamw": (cnn1d, (2, 16), "adamw", torch.float32, True),
    "mlp-batchnorm-adamw-float64": (mlp(batch_norm=True), (8,), "adamw", torch.float64, True),
    "gru-loop": (gru, (2, 16), "adamw", torch.float32, False),
    "batchnorm-momentum-none-loop": (cumulative_bn, (8,), "sgd", torch.float32, False),
}


@pytest.mark.parametrize("case", CASES)
def test_stacked_training_matches_members_trained_alone(case):
    build, shape, opt, dtype, vectorized = CASES[case]
    members = seeded(build, dtype=dtype)
    alone = [copy.deepcopy(m) for m in members]
    batches = fixed_batches(shape, dtype)
    ensemble = StackedEnsemble(members)
    assert ensemble.vectorize == vectorized          # a GRU has no vmap batching rule: the loop
    train_stacked(ensemble, batches, opt)
    before = seeded(build, dtype=dtype)
    for i, model in enumerate(alone):
        train_alone(model, batches, opt)
        assert max_difference(model, before[i]) > 1e-3          # training moved the weights
        assert max_difference(ensemble.member(i), model) < 1e-5, f"member {i}"
    if "batchnorm" in case:       # the running statistics were updated, each member its own
        stats = [b for n, b in ensemble.members.named_buffers() if n.endswith("running_mean")]
        assert stats and all(not torch.allclose(s[0], s[1]) for s in stats)
        tracked = [b for n, b in ensemble.members.named_buffers() if n.endswith("num_batches_tracked")]
        assert all(t.tolist() == [20, 20, 20] for t in tracked)


def test_zero_penalties_are_independent_training():
    """ncl=0 and weight_distance=0 add nothing: the loop path (no vmap rounding) gives bit-identical
    members to training each alone, and the vmap path the same as without the arguments."""
    members = seeded(cnn1d)
    batches = fixed_batches((2, 16))
    looped = train_stacked(StackedEnsemble(copy.deepcopy(members), vectorize=False), batches,
                           ncl=0.0, weight_distance=0.0)
    for i, m in enumerate(members):
        alone = train_alone(copy.deepcopy(m), batches)
        for k, v in state(alone).items():
            assert torch.equal(state(looped.member(i))[k], v), k
    plain = train_stacked(StackedEnsemble(copy.deepcopy(members)), batches)
    zero = train_stacked(StackedEnsemble(copy.deepcopy(members)), batches, ncl=0.0, weight_distance=0.0)
    for k, v in plain.state_dict().items():
        assert torch.equal(zero.state_dict()[k], v), k
    _, parts = ensemble_training_loss(zero, batches[0], CE, ncl=0.0, weight_distance=0.0)
    assert set(parts) == {"cross_entropy"}


# -- negative correlation learning ---------------------------------------------------------------------


def liu_yao_direct(f: torch.Tensor) -> torch.Tensor:
    """Σ_n Σ_i Σ_k (f_i - f̄) Σ_{j≠i} (f_j - f̄) / N, written out with loops in float64."""
    m, n = f.shape[:2]
    f = f.double().reshape(m, n, -1)
    total = torch.zeros((), dtype=torch.float64)
    for r in range(n):
        mean = f[:, r].mean(0)
        for i in range(m):
            others = sum(f[j, r] - mean for j in range(m) if j != i)
            total = total + ((f[i, r] - mean) * others).sum()
    return total / n


@pytest.mark.parametrize("shape", [(4, 6, 3), (4, 6), (4, 6, 1)])
def test_ncl_penalty_matches_liu_yao(shape):
    torch.manual_seed(0)
    raw = torch.randn(*shape, dtype=torch.float64)
    f = torch.softmax(raw, -1) if len(shape) == 3 and shape[-1] > 1 else raw
    expected = liu_yao_direct(f)
    deviation = f - f.mean(0, keepdim=True)
    assert expected < 0
    for variant, factor in (("liu_yao", 1.0), ("autograd", 2.0)):
        leaf = f.detach().clone().requires_grad_(True)
        value = ncl_penalty(leaf, variant)
        assert torch.allclose(value, expected, rtol=1e-12, atol=1e-12)
        value.backward()
        # Liu & Yao: ∂p_i/∂f_i = Σ_{j≠i}(f_j - f̄) = -(f_i - f̄), f̄ held constant; through f̄: twice that.
        assert torch.allclose(leaf.grad, -factor * deviation / shape[1], atol=1e-12), variant
    leaf = f.detach().clone().requires_grad_(True)
    liu_yao_direct(leaf).backward()            # differentiating the literal formula = the autograd variant
    assert torch.allclose(leaf.grad, -2 * deviation / shape[1], atol=1e-12)


def test_ncl_gradient_variants_differ_by_a_factor_of_two():
    members = seeded(mlp())
    batches = fixed_batches((8,))
    a = train_stacked(StackedEnsemble(copy.deepcopy(members)), batches, "sgd", steps=10, ncl=1.0)
    b = train_stacked(StackedEnsemble(copy.deepcopy(members)), batches, "sgd", steps=10, ncl=0.5,
                      ncl_gradient="autograd")
    c = train_stacked(StackedEnsemble(copy.deepcopy(members)), batches, "sgd", steps=10, ncl=1.0,
                      ncl_gradient="autograd")
    assert max_difference(a.members, b.members) < 1e-6
    assert max_difference(a.members, c.members) > 1e-4


def _blobs(n, seed):
    centers = torch.randn(3, 8, generator=torch.Generator().manual_seed(99)) * 0.5   # overlapping classes
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return centers[y] + torch.randn(n, 8, generator=g), y


def _train_ncl(ncl):
    x, y = _blobs(256, 1)
    ensemble = StackedEnsemble.from_seeds(mlp(hidden=[32]), seeds=(0, 1, 2))
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for _ in range(150):
        idx = torch.randint(0, len(y), (64,), generator=g)
        optimizer.zero_grad()
        ensemble_training_loss(ensemble, {"x": x[idx], "y": y[idx]}, CE, ncl=ncl)[0].backward()
        optimizer.step()
    x_test, y_test = _blobs(1000, 2)
    with torch.no_grad():
        out = ensemble.eval().member_outputs(x_test)
    return pairwise_disagreement(out), member_accuracies(out, y_test)


def test_ncl_makes_members_disagree_more():
    # Measured (3 MLPs, 3 overlapping classes, 150 Adam steps): disagreement 0.076 at λ=0, 0.088 at 1,
    # 0.105 at 2, 0.53 at 4 (one member collapses); λ=2 gave +11% to +38% on five seed sets, with the
    # members' accuracy unchanged.
    independent, acc0 = _train_ncl(0.0)
    negative, acc2 = _train_ncl(2.0)
    assert negative > 1.15 * independent, (independent, negative)
    assert min(acc2) > min(acc0) - 0.03


# -- weight distance -----------------------------------------------------------------------------------


def test_weight_distance_penalty_is_mean_pairwise_distance_and_pushes_apart():
    ensemble = StackedEnsemble(seeded(mlp(), seeds=(0, 1, 2, 3)))
    flat = [torch.cat([p.detach().reshape(-1).double() for p in m.parameters()]) for m in ensemble.member_list()]
    pairs = [((a - b) ** 2).sum() / len(a) for a, b in itertools.combinations(flat, 2)]
    expected = -torch.stack(pairs).mean()
    value = weight_distance_penalty(ensemble)
    assert torch.allclose(value.double(), expected, rtol=1e-5)
    assert weight_distance_penalty(StackedEnsemble(seeded(mlp(), seeds=(0,)))).item() == 0.0

    optimizer = torch.optim.SGD(ensemble.parameters(), lr=10.0)
    for _ in range(3):
        optimizer.zero_grad()
        weight_distance_penalty(ensemble).backward()
        optimizer.step()
    after = [torch.cat([p.detach().reshape(-1).double() for p in m.parameters()]) for m in ensemble.member_list()]
    for (i, j) in itertools.combinations(range(4), 2):
        assert (after[i] - after[j]).norm() > (flat[i] - flat[j]).norm()
    assert weight_distance_penalty(ensemble) < value


def test_training_loss_parts_and_regression():
    ensemble = StackedEnsemble(seeded(mlp()))
    batch = fixed_batches((8,))[0]
    loss, parts = ensemble_training_loss(ensemble, batch, CE, ncl=0.5, weight_distance=0.1)
    out = ensemble.member_outputs(batch["x"])
    each = [nn.functional.cross_entropy(o, batch["y"]) for o in out]
    ncl = 0.5 * ncl_penalty(torch.softmax(out, -1))
    wd = 0.1 * weight_distance_penalty(ensemble)
    assert set(parts) == {"cross_entropy", "ncl", "weight_distance"}
    assert torch.allclose(parts["cross_entropy"], torch.stack(each).mean())
    assert torch.allclose(parts["ncl"], ncl) and torch.allclose(parts["weight_distance"], wd)
    assert torch.allclose(loss, sum(each) + ncl + wd)          # members' losses summed, not averaged
    assert not any(v.requires_grad for v in parts.values())

    reg = StackedEnsemble([MLP((8,), 1, MLPConfig(hidden=[4])) for _ in range(3)], how="mean")
    y = torch.randn(16, 1)
    loss, parts = ensemble_training_loss(reg, {"x": batch["x"], "y": y}, [LossTerm("mse", 1.0, MSE())],
                                         ncl=0.5, task_type="regression")
    out = reg.member_outputs(batch["x"])
    assert out.shape == (3, 16, 1)
    expected = sum(((o - y) ** 2).mean() for o in out) + 0.5 * ncl_penalty(out)
    assert torch.allclose(loss, expected)
    assert torch.allclose(reg(batch["x"]), out.mean(0))
    with pytest.raises(ValueError, match="task_type"):
        ensemble_training_loss(reg, {"x": batch["x"], "y": y}, CE, task_type="segmentation")


def test_disagreement_and_member_accuracies():
    logits = torch.eye(3)[torch.tensor([[0, 1, 2, 0], [0, 1, 2, 1], [2, 1, 0, 0]])]    # (M=3, N=4, K=3)
    # pairs (0,1): 1 of 4 rows differ, (0,2): 2 of 4, (1,2): 3 of 4
    assert pairwise_disagreement(logits) == pytest.approx((0.25 + 0.5 + 0.75) / 3)
    assert member_accuracies(logits, torch.tensor([0, 1, 2, 0])) == [1.0, 0.75, 0.5]
    assert pairwise_disagreement(logits[:1]) == 0.0


# -- combination weights -------------------------------------------------------------------------------


def test_fit_combination_weights_prefers_the_good_member():
    torch.manual_seed(0)
    n, k = 400, 5
    y = torch.randint(0, k, (n,))
    perfect = 4.0 * nn.functional.one_hot(y, k).float()
    noise = [3.0 * torch.randn(n, k) for _ in range(3)]
    logits = torch.stack([noise[0], perfect, noise[1], noise[2]])
    w = fit_combination_weights(logits, y)
    assert w.shape == (4,) and (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert w[1] > 0.9, w
    nll = nn.functional.nll_loss(combine_weighted(logits, w), y)
    uniform = nn.functional.nll_loss(combine(list(logits)), y)
    assert nll < uniform
    assert torch.allclose(combine_weighted(logits, torch.full((4,), 0.25)), combine(list(logits)), atol=1e-6)
    assert torch.equal(fit_combination_weights(logits, y), w)                    # deterministic
    # Members that are all equally useless: no weight set beats uniform by much, and none is worse.
    same = torch.stack([noise[0]] * 3)
    w_same = fit_combination_weights(same, y)
    nll_same = nn.functional.nll_loss(combine_weighted(same, w_same), y)
    assert nll_same <= nn.functional.nll_loss(combine(list(same)), y) + 1e-6

    models = [nn.Linear(2, 3) for _ in range(2)]
    x = torch.randn(5, 2)
    weighted = WeightedEnsemble(models, torch.tensor([0.3, 0.7]))
    assert torch.allclose(weighted(x), combine_weighted([m(x) for m in models], torch.tensor([0.3, 0.7])))
    assert "weights" in weighted.state_dict()


# -- the module: checkpoints, members, modes -----------------------------------------------------------


def test_state_dict_round_trips_through_safetensors(tmp_path):
    ensemble = train_stacked(StackedEnsemble(seeded(cnn1d)), fixed_batches((2, 16)), steps=3)
    names = [n for n, _ in ensemble.named_parameters()]
    assert "members.head.1.weight" in names and "members.features.0.1.weight" in names
    assert ensemble.get_parameter("members.head.1.weight").shape == (3, 8, 32)
    assert "members.features.0.1.running_var" in ensemble.state_dict()
    save_weights(ensemble, tmp_path / "model.safetensors")
    other = StackedEnsemble(seeded(cnn1d, seeds=(7, 8, 9)))
    other.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    x = fixed_batches((2, 16))[0]["x"]
    ensemble.eval(), other.eval()
    with torch.no_grad():
        outs = ensemble.member_outputs(x)
        assert torch.equal(other.member_outputs(x), outs)
        for i in range(3):
            member = ensemble.member(i)
            assert not member.training
            assert torch.allclose(member(x), outs[i], atol=1e-6)
        assert torch.allclose(ensemble(x), combine(list(outs)), atol=1e-6)

    # Train mode: batch statistics, and every member updates its own running statistics like a copy.
    ensemble.train()
    copies = ensemble.member_list()
    assert all(m.training for m in copies)
    with torch.no_grad():
        outs = ensemble.member_outputs(x)
        for i, member in enumerate(copies):
            assert torch.allclose(member(x), outs[i], atol=1e-5)
            assert max_difference(member, ensemble.member(i)) < 1e-6


def test_swa_update_bn_recomputes_each_members_statistics():
    """torch.optim.swa_utils.update_bn sets BatchNorm momentum to None (a cumulative average), which vmap
    cannot run: the ensemble switches to its loop for those calls and matches each member's own update_bn."""
    members = seeded(cnn1d)
    ensemble = StackedEnsemble(copy.deepcopy(members))
    loader = [b["x"] for b in fixed_batches((2, 16), n=3)]
    update_bn(loader, ensemble)
    for i, m in enumerate(members):
        update_bn(loader, m)
        assert max_difference(ensemble.member(i), m) < 1e-6
    assert ensemble.vectorize


def test_train_and_eval_switch_dropout():
    ensemble = StackedEnsemble(seeded(mlp(dropout=0.5)))
    x = torch.randn(32, 8)
    with torch.no_grad():
        ensemble.train()
        assert not torch.equal(ensemble.member_outputs(x), ensemble.member_outputs(x))
        ensemble.eval()
        outs = ensemble.member_outputs(x)
        assert torch.equal(outs, ensemble.member_outputs(x))
        assert torch.allclose(ensemble.member(2)(x), outs[2], atol=1e-6)
        # Each member draws its own dropout mask: identical members give different outputs in train mode.
        twins = StackedEnsemble(seeded(mlp(dropout=0.5), seeds=(0, 0))).train()
        out = twins.member_outputs(x)
        assert not torch.equal(out[0], out[1])
        assert torch.equal(*twins.eval().member_outputs(x))


def test_members_must_match():
    with pytest.raises(ValueError, match="other parameters"):
        StackedEnsemble([MLP((8,), 3, MLPConfig(hidden=[16])), MLP((8,), 3, MLPConfig(hidden=[8]))])
    with pytest.raises(ValueError, match="architecture"):
        StackedEnsemble([mlp()(), cnn1d()])
    shared = mlp()()
    with pytest.raises(ValueError, match="share"):
        StackedEnsemble([shared, shared])
    with pytest.raises(ValueError, match="no vmap batching rule"):
        StackedEnsemble([gru(), gru()], vectorize=True)


# -- members trained one after another -----------------------------------------------------------------


def _member_recipes():
    recipes = []
    for i, hidden in enumerate(([16], [8])):
        r = make_tiny_recipe()
        r["name"], r["seed"], r["model"]["hidden"] = f"tiny-m{i}", i, hidden
        r["data"]["split_seed"] = 0           # the same split for every member, whatever its seed
        r["phases"][0]["steps"] = 12
        r["log"] = {"every_steps": 3, "tensorboard": False}
        r["checkpoint"] = {"every_steps": 4, "keep_last": 20}
        recipes.append(r)
    return recipes


def test_train_members_and_load_member_models(tmp_path, monkeypatch):
    recipes = _member_recipes()
    summaries = train_members(recipes, tmp_path, quiet=True)
    assert [s["status"] for s in summaries] == ["finished", "finished"]
    assert [s["steps"] for s in summaries] == [16, 16]
    models = load_member_models(tmp_path)
    assert [m.body[1][0].out_features for m in models] == [16, 8] and not any(m.training for m in models)

    # Each loaded model is its member's final model: it reproduces the member's own test accuracy.
    trainer = Trainer(load_recipe(recipes[0]), None, quiet=True)
    test = trainer.state.data.test
    with torch.no_grad():
        outs = [m(test.x) for m in models]
        for out, summary in zip(outs, summaries):
            accuracy = (out.argmax(1) == test.y).double().mean().item()
            assert accuracy == pytest.approx(summary["metrics"]["test/accuracy"])
        assert torch.equal(Ensemble(models)(test.x), combine(outs))

    # A second call skips finished members; member 1, "interrupted" after step 8, resumes from there.
    m0_metrics = tmp_path / "members" / "m0" / "metrics.jsonl"
    m0_before = (m0_metrics.read_bytes(), m0_metrics.stat().st_mtime_ns)
    for folder in (tmp_path / "members" / "m1" / "checkpoints").iterdir():
        if folder.name == "final" or folder.name >= "step-00000012":
            shutil.rmtree(folder)
    (tmp_path / "members" / "m1" / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    steps_run = []
    train_step = Trainer._train_step
    monkeypatch.setattr(Trainer, "_train_step", lambda self, batch: steps_run.append(1) or train_step(self, batch))
    again = train_members(recipes, tmp_path, quiet=True)
    assert len(steps_run) == 8                  # steps 9..16 of member 1 only
    assert again[0] == summaries[0]
    assert (m0_metrics.read_bytes(), m0_metrics.stat().st_mtime_ns) == m0_before      # not run again
    assert again[1]["status"] == "finished" and again[1]["steps"] == 16
    assert json.loads((tmp_path / "members" / "m1" / "summary.json").read_text())["status"] == "finished"

    unpinned = copy.deepcopy(recipes)
    for r in unpinned:
        del r["data"]["split_seed"]
    with pytest.raises(DojoError, match="split_seed"):      # member 1's split would follow its seed
        train_members(unpinned, tmp_path / "other", quiet=True)
    assert not (tmp_path / "other").exists()

    changed = copy.deepcopy(recipes)
    changed[1]["model"]["hidden"] = [4]
    with pytest.raises(DojoError, match="remove"):
        train_members(changed, tmp_path, quiet=True)
    (tmp_path / "members" / "m1" / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    with pytest.raises(DojoError, match="not finished"):
        load_member_models(tmp_path)
