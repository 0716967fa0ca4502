"""Losses: focal (multi-class and sigmoid), cross-entropy options, distillation, against the papers' formulas
written out with plain loops in float64, torch's own cross-entropy, the registry and a short training run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from torchdojo import Trainer, load_recipe
from torchdojo.errors import ConfigError
from torchdojo.losses import (BinaryFocalLoss, CrossEntropy, DistillationLoss, FocalLoss, binary_focal_loss,
                              distillation_loss, focal_loss, softmax_with_temperature)
from torchdojo.registry import LOSSES

from conftest import make_tiny_recipe

N, K = 12, 5


def data(seed: int = 0, n: int = N, k: int = K, scale: float = 2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, generator=g) * scale).to(dtype)
    labels = torch.randint(0, k, (n,), generator=g)
    soft = torch.softmax(torch.randn(n, k, generator=g) * 2, dim=1).to(dtype)
    return logits, labels, soft


# ------------------------------------------------------------------------ reference formulas (plain loops)

def ref_focal_rows(logits, labels=None, soft=None, gamma=2.0, alpha=None, eps=0.0, ignore=-100, T=1.0):
    """Per-row focal loss from the formula: sum_k q_k alpha_k (1 - p_k)^gamma (-log p_k); None if ignored."""
    rows = []
    k = logits.shape[1]
    for i in range(logits.shape[0]):
        z = [float(v) / T for v in logits[i]]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        logp = [v - lse for v in z]
        if soft is None:
            if int(labels[i]) == ignore:
                rows.append(None)
                continue
            q = [1.0 if c == int(labels[i]) else 0.0 for c in range(k)]
        else:
            q = [float(v) for v in soft[i]]
        q = [(1 - eps) * v + eps / k for v in q]
        total = 0.0
        for c in range(k):
            a = 1.0 if alpha is None else (alpha[c] if isinstance(alpha, list) else alpha)
            total += q[c] * a * (1 - math.exp(logp[c])) ** gamma * -logp[c]
        rows.append(total)
    return rows


def reduce_rows(rows, reduction):
    kept = [r for r in rows if r is not None]
    if reduction == "none":
        return torch.tensor([0.0 if r is None else r for r in rows], dtype=torch.float64)
    total = sum(kept)
    return torch.tensor(total if reduction == "sum" else total / len(kept), dtype=torch.float64)


def ref_binary_focal(logits, target, gamma, alpha):
    """-alpha_t (1 - p_t)^gamma log p_t for targets in {0, 1}, element by element."""
    out = torch.empty_like(logits, dtype=torch.float64)
    flat_x, flat_t, flat_o = logits.reshape(-1), target.reshape(-1), out.view(-1)
    for i in range(flat_x.numel()):
        p = 1 / (1 + math.exp(-float(flat_x[i])))
        t = float(flat_t[i])
        p_t = p if t == 1 else 1 - p
        a_t = 1.0 if alpha is None else (alpha if t == 1 else 1 - alpha)
        flat_o[i] = -a_t * (1 - p_t) ** gamma * math.log(p_t)
    return out


def torchvision_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss, written out (torchvision is not a dependency)."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


# ------------------------------------------------------------------------------------------ focal loss

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_with_gamma_0_equals_cross_entropy_hard_and_soft(reduction):
    logits, labels, soft = data(1)
    focal = FocalLoss(gamma=0.0, reduction=reduction)
    torch.testing.assert_close(focal(logits, labels), F.cross_entropy(logits, labels, reduction=reduction))
    torch.testing.assert_close(focal(logits, soft), F.cross_entropy(logits, soft, reduction=reduction))
    # ignored rows and label smoothing behave as torch's cross-entropy too
    labels[[0, 3, 7]] = -100
    for eps in (0.0, 0.2):
        f = FocalLoss(gamma=0.0, reduction=reduction, label_smoothing=eps)
        torch.testing.assert_close(f(logits, labels),
                                   F.cross_entropy(logits, labels, reduction=reduction, label_smoothing=eps))
        torch.testing.assert_close(f(logits, soft),
                                   F.cross_entropy(logits, soft, reduction=reduction, label_smoothing=eps))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("gamma, alpha, eps, T", [
    (2.0, [0.25, 1.0, 0.5, 2.0, 0.75], 0.0, 1.0),
    (1.0, None, 0.1, 1.0),
    (0.5, 0.25, 0.0, 2.0),
    (3.0, [1.0, 0.1, 0.2, 0.3, 0.4], 0.3, 0.5),
])
def test_focal_hard_labels_match_the_formula(reduction, gamma, alpha, eps, T):
    logits, labels, _ = data(2)
    labels[[1, 4]] = 7                                            # ignore_index rows
    loss = FocalLoss(gamma=gamma, alpha=alpha, reduction=reduction, label_smoothing=eps, ignore_index=7,
                     temperature=T)(logits, labels)
    expected = reduce_rows(ref_focal_rows(logits, labels, gamma=gamma, alpha=alpha, eps=eps, ignore=7, T=T),
                           reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    if reduction == "none":
        assert loss[1] == 0 and loss[4] == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("gamma, alpha, eps", [(2.0, [0.25, 1.0, 0.5, 2.0, 0.75], 0.0), (1.5, 0.5, 0.2)])
def test_focal_soft_targets_match_hand_computation(reduction, gamma, alpha, eps):
    logits, _, soft = data(3)
    loss = focal_loss(logits, soft, gamma=gamma, alpha=alpha, reduction=reduction, label_smoothing=eps)
    expected = reduce_rows(ref_focal_rows(logits, soft=soft, gamma=gamma, alpha=alpha, eps=eps), reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    # a one-hot soft target is the same as its class index
    onehot = F.one_hot(torch.tensor([2, 0]), K).double()
    torch.testing.assert_close(focal_loss(logits[:2], onehot, gamma=gamma, alpha=alpha),
                               focal_loss(logits[:2], torch.tensor([2, 0]), gamma=gamma, alpha=alpha))


def test_focal_small_worked_example():
    # two classes, p_y = 0.8 for the true class: -0.25 * 0.2^2 * log 0.8
    logits = torch.tensor([[math.log(0.8), math.log(0.2)]], dtype=torch.float64)
    loss = FocalLoss(gamma=2.0, alpha=[0.25, 0.75])(logits, torch.tensor([0]))
    assert loss.item() == pytest.approx(-0.25 * 0.2 ** 2 * math.log(0.8), rel=1e-12)


def test_focal_mean_over_no_rows_is_zero_and_all_ignored_rows_get_no_gradient():
    logits, labels, _ = data(4, dtype=torch.float32)
    logits.requires_grad_()
    labels[:] = -100
    loss = FocalLoss()(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_focal_gradient_and_extra_dims():
    logits, labels, soft = data(5, n=4, k=3)
    alpha = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    for gamma in (0.5, 2.0):
        for target in (labels, soft):
            x = logits.clone().requires_grad_()
            assert torch.autograd.gradcheck(lambda z: focal_loss(z, target, gamma=gamma, alpha=alpha,
                                                                 label_smoothing=0.1), (x,))
    # (N, K, L) logits, as F.cross_entropy takes them: the same as flattening the positions into rows
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 4, 6, generator=g), torch.randint(0, 4, (3, 6), generator=g)
    per_pos = FocalLoss(reduction="none")(x, y)
    assert per_pos.shape == (3, 6)
    flat = FocalLoss(reduction="none")(x.movedim(1, -1).reshape(-1, 4), y.reshape(-1))
    torch.testing.assert_close(per_pos.reshape(-1), flat)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(x, y), F.cross_entropy(x, y))


def test_focal_is_stable_for_huge_logits_in_float32():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-3e3, 3e3, 1.0], [50.0, 50.0, -50.0]], requires_grad=True)
    y = torch.tensor([0, 0, 2])
    for gamma in (0.5, 2.0):
        loss = FocalLoss(gamma=gamma, reduction="none")(logits, y)
        assert torch.isfinite(loss).all()
        assert loss[0].item() == 0.0 and loss[1].item() == pytest.approx(6e3, rel=1e-6)
        loss.sum().backward()
        assert torch.isfinite(logits.grad).all()
        logits.grad = None


def test_focal_down_weights_easy_examples():
    easy = torch.tensor([[4.0, 0.0, 0.0]])
    hard = torch.tensor([[0.5, 0.0, 0.0]])
    y = torch.tensor([0])
    ratio_ce = F.cross_entropy(easy, y) / F.cross_entropy(hard, y)
    ratio_focal = FocalLoss(gamma=2.0)(easy, y) / FocalLoss(gamma=2.0)(hard, y)
    assert ratio_focal < ratio_ce / 10


@pytest.mark.parametrize("kwargs, message", [
    ({"gamma": -1.0}, "gamma must be >= 0"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"temperature": -2.0}, "temperature must be > 0"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
    ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 1\)"),
    ({"reduction": "avg"}, "reduction must be one of"),
    ({"alpha": -0.5}, "alpha must be >= 0"),
    ({"alpha": [1.0, -1.0]}, "alpha must be finite and >= 0"),
])
def test_focal_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FocalLoss(**kwargs)


def test_focal_checks_shapes():
    logits, labels, soft = data(6)
    with pytest.raises(ValueError, match="alpha has 3 entries but the logits have 5 classes"):
        FocalLoss(alpha=[1.0, 1.0, 1.0])(logits, labels)
    with pytest.raises(ValueError, match="class-index targets must have shape"):
        FocalLoss()(logits, labels[:-1])
    with pytest.raises(ValueError, match="soft .* targets must have the logits' shape"):
        FocalLoss()(logits, soft[:, :3])


# ----------------------------------------------------------------------------------- binary focal loss

@pytest.mark.parametrize("gamma, alpha", [(2.0, 0.25), (0.0, None), (1.0, 0.6), (3.0, None)])
def test_binary_focal_matches_the_formula_for_hard_targets(gamma, alpha):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(10, 4, generator=g, dtype=torch.float64) * 3
    target = (torch.rand(10, 4, generator=g) < 0.3).double()
    expected = ref_binary_focal(logits, target, gamma, alpha)
    torch.testing.assert_close(BinaryFocalLoss(gamma, alpha, "none")(logits, target), expected)
    torch.testing.assert_close(BinaryFocalLoss(gamma, alpha, "sum")(logits, target), expected.sum())
    torch.testing.assert_close(BinaryFocalLoss(gamma, alpha)(logits, target), expected.mean())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_focal_matches_torchvision_formula_incl_soft_targets(reduction):
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(16, 3, generator=g, dtype=torch.float64) * 2
    soft = torch.rand(16, 3, generator=g, dtype=torch.float64)
    hard = (soft > 0.5).double()
    for target in (soft, hard):
        torch.testing.assert_close(binary_focal_loss(logits, target, 2.0, 0.25, reduction),
                                   torchvision_sigmoid_focal_loss(logits, target, 0.25, 2.0, reduction))
    # alpha None is torchvision's alpha=-1 (no weighting); gamma 0 without alpha is plain BCE
    torch.testing.assert_close(binary_focal_loss(logits, soft, 1.5, None, reduction),
                               torchvision_sigmoid_focal_loss(logits, soft, -1, 1.5, reduction))
    torch.testing.assert_close(binary_focal_loss(logits, soft, 0.0, None, reduction),
                               F.binary_cross_entropy_with_logits(logits, soft, reduction=reduction))


def test_binary_focal_target_forms_and_stability():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(8, 3, generator=g)
    labels = torch.randint(0, 3, (8,), generator=g)
    loss = BinaryFocalLoss()
    # class indices for (N, K) logits: one sigmoid per class against the one-hot target
    torch.testing.assert_close(loss(logits, labels), loss(logits, F.one_hot(labels, 3).float()))
    # (N,) targets for (N, 1) logits; integer 0/1 targets
    col, t = logits[:, :1], (labels > 0).long()
    torch.testing.assert_close(loss(col, t), loss(col, t.float().unsqueeze(1)))
    with pytest.raises(ValueError, match="do not match"):
        loss(logits, torch.zeros(5))
    big = torch.tensor([200.0, -200.0, 150.0], requires_grad=True)
    value = BinaryFocalLoss(gamma=0.5, reduction="none")(big, torch.tensor([1.0, 0.0, 0.0]))
    assert value[0].item() == 0.0 and value[2].item() == pytest.approx(0.75 * 150.0, rel=1e-6)
    value.sum().backward()
    assert torch.isfinite(big.grad).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"gamma": -0.5}, "gamma must be >= 0"), ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ({"reduction": "batchmean"}, "reduction must be one of")])
def test_binary_focal_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BinaryFocalLoss(**kwargs)


# -------------------------------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_with_hard_labels_equals_torch_label_smoothing(eps):
    logits, labels, _ = data(10, dtype=torch.float32)
    torch.testing.assert_close(CrossEntropy(label_smoothing=eps)(logits, labels),
                               F.cross_entropy(logits, labels, label_smoothing=eps))
    labels[[2, 5]] = 3
    weights = [1.0, 2.0, 0.5, 0.0, 3.0]
    ce = CrossEntropy(label_smoothing=eps, ignore_index=3, class_weights=weights)
    torch.testing.assert_close(ce(logits, labels),
                               F.cross_entropy(logits, labels, weight=torch.tensor(weights), ignore_index=3,
                                               label_smoothing=eps))


def test_cross_entropy_soft_targets_and_temperature():
    logits, labels, soft = data(11)
    ce = CrossEntropy()
    # soft targets: -sum_k q_k log p_k, averaged over rows
    expected = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(ce(logits, soft), expected)
    # temperature divides the logits, for index and probability targets
    for target in (labels, soft):
        torch.testing.assert_close(CrossEntropy(temperature=3.0, label_smoothing=0.1)(logits, target),
                                   CrossEntropy(label_smoothing=0.1)(logits / 3.0, target))
    assert CrossEntropy(temperature=3.0)(logits, labels) != ce(logits, labels)


def test_cross_entropy_rejects_bad_options():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        CrossEntropy(temperature=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        CrossEntropy(label_smoothing=1.0)
    with pytest.raises(ValueError, match="class_weights must be finite and >= 0"):
        CrossEntropy(class_weights=[1.0, -1.0])
    logits, labels, _ = data(12, dtype=torch.float32)
    with pytest.raises(ValueError, match="class_weights has 2 entries"):
        CrossEntropy(class_weights=[1.0, 2.0])(logits, labels)


# ------------------------------------------------------------------------------------------ distillation

def test_distillation_value_matches_the_formula():
    s, y, _ = data(13)
    t = data(14)[0]
    T, alpha = 4.0, 0.7
    kl = 0.0
    for i in range(N):
        p = torch.softmax(t[i] / T, 0)
        q = torch.softmax(s[i] / T, 0)
        kl += sum(float(p[k]) * math.log(float(p[k]) / float(q[k])) for k in range(K))
    ce = F.cross_entropy(s, y).item()
    expected = alpha * T * T * kl / N + (1 - alpha) * ce
    assert DistillationLoss(T, alpha)(s, y, t).item() == pytest.approx(expected, rel=1e-10)
    assert distillation_loss(s, y, t, T, alpha).item() == pytest.approx(expected, rel=1e-10)
    assert DistillationLoss(T, 0.0)(s, y, t).item() == pytest.approx(ce, rel=1e-12)
    assert DistillationLoss(T, 1.0)(s, None, t).item() == pytest.approx(T * T * kl / N, rel=1e-10)


def test_distillation_gradient_is_analytic_and_keeps_its_scale_across_temperatures():
    s0, _, _ = data(15, n=64, k=10, scale=1.0, dtype=torch.float32)
    t = data(16, n=64, k=10, scale=1.0, dtype=torch.float32)[0].requires_grad_()
    norms = {}
    for T in (1.0, 4.0):
        s = s0.clone().requires_grad_()
        DistillationLoss(T, alpha=1.0)(s, None, t).backward()
        analytic = (torch.softmax(s0 / T, 1) - torch.softmax(t.detach() / T, 1)) * T / s0.shape[0]
        torch.testing.assert_close(s.grad, analytic, rtol=1e-4, atol=1e-7)
        norms[T] = s.grad.norm().item()
    assert t.grad is None                                  # the teacher is never trained through the loss
    ratio = norms[4.0] / norms[1.0]
    assert 0.5 < ratio < 2.0                               # with T^2: about the same size
    assert ratio / 16 < 1 / 8                              # without T^2 it would shrink by ~16x


def test_distillation_rejects_bad_options_and_missing_targets():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DistillationLoss(temperature=0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        DistillationLoss(alpha=1.5)
    s, _, _ = data(17)
    with pytest.raises(ValueError, match="needs the hard targets"):
        DistillationLoss(alpha=0.5)(s, None, s)
    with pytest.raises(ValueError, match="same shape"):
        DistillationLoss()(s, None, s[:, :3])


def test_softmax_with_temperature():
    logits, _, _ = data(18)
    torch.testing.assert_close(softmax_with_temperature(logits, 2.5), torch.softmax(logits / 2.5, 1))
    entropy = [-(p * p.log()).sum(1).mean().item() for p in
               (softmax_with_temperature(logits, T) for T in (0.5, 1.0, 4.0))]
    assert entropy[0] < entropy[1] < entropy[2]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        softmax_with_temperature(logits, 0.0)


# ------------------------------------------------------------------------------ registry and recipes

def test_registry_builds_focal_losses_from_recipe_specs():
    focal = LOSSES.build({"name": "focal", "gamma": 1, "alpha": [0.25, 0.5, 1.0]})
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.0
    assert focal.alpha.tolist() == [0.25, 0.5, 1.0]
    scalar = LOSSES.build({"name": "focal", "alpha": 0.5, "label_smoothing": 0.1, "temperature": 2})
    assert scalar.scale == 0.5 and scalar.alpha is None and scalar.temperature == 2.0
    binary = LOSSES.build({"name": "binary_focal", "gamma": 3, "alpha": None})
    assert isinstance(binary, BinaryFocalLoss) and binary.gamma == 3.0 and binary.alpha is None
    ce = LOSSES.build({"name": "cross_entropy", "temperature": 2, "class_weights": [1, 2], "ignore_index": 0})
    assert ce.class_weights.tolist() == [1.0, 2.0] and ce.ignore_index == 0
    assert "distillation" not in LOSSES and "focal" in LOSSES and "binary_focal" in LOSSES
    assert set(LOSSES.get("focal").option_names()) == {"gamma", "alpha", "reduction", "label_smoothing",
                                                         "ignore_index", "temperature"}


@pytest.mark.parametrize("spec, where", [
    ({"name": "focal", "gamma": -1}, "gamma must be >= 0"),
    ({"name": "focal", "gamma": "big"}, "gamma"),
    ({"name": "focal", "gamm": 2}, "did you mean 'gamma'"),
    ({"name": "focal", "reduction": "avg"}, "reduction"),
    ({"name": "focal", "temperature": 0}, "temperature must be > 0"),
    ({"name": "focal", "label_smoothing": 1.5}, "label_smoothing"),
    ({"name": "binary_focal", "alpha": 2}, "alpha must be in"),
    ({"name": "cross_entropy", "class_weights": "heavy"}, "class_weights"),
    ({"name": "focl"}, "did you mean 'focal'"),
])
def test_registry_turns_bad_loss_options_into_config_errors(spec, where):
    with pytest.raises(ConfigError, match=where) as info:
        LOSSES.build(spec, "phases.0.losses.0")
    assert str(info.value).startswith("phases.0.losses.0")


def test_a_recipe_trains_with_focal_loss():
    r = make_tiny_recipe()
    r["phases"][0]["losses"] = [{"name": "focal", "gamma": 2}]
    summary = Trainer(load_recipe(r), None, quiet=True).fit()
    assert summary["status"] == "finished"
    assert summary["metrics"]["test/accuracy"] > 0.6                    # 3 classes: chance is 1/3
    baseline = Trainer(load_recipe(make_tiny_recipe()), None, quiet=True).fit()
    assert summary["metrics"]["val/loss"] != baseline["metrics"]["val/loss"]   # the focal term was used
    bad = make_tiny_recipe()
    bad["phases"][0]["losses"] = [{"name": "focal", "gamma": -2}]
    with pytest.raises(ConfigError, match="gamma must be >= 0"):
        Trainer(load_recipe(bad), None, quiet=True).fit()
