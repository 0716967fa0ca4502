"""Optimizers: LAMB and LARS against the update rules of the spec (per-tensor and foreach paths), against
the peer library pytorch_optimizer, Lookahead (rule, state_dict, LR schedules, ranger), LR schedulers and
state_dict round trips, convergence of every registered optimizer, and Lookahead in recipes/the trainer."""
from __future__ import annotations

import importlib
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from torchdojo import Trainer, load_recipe
from torchdojo.errors import ConfigError
from torchdojo.optim import LAMB, LARS, Lookahead, param_groups
from torchdojo.registry import OPTIMIZERS

from conftest import make_tiny_recipe

# The modules themselves (the package attributes `lamb`/`lars` are the registry's factory functions).
lamb_impl = importlib.import_module("torchdojo.optim.lamb")
lars_impl = importlib.import_module("torchdojo.optim.lars")

F64 = torch.float64


# -- a problem: tensors of several shapes, two parameter groups, 50 steps of gradients -----------------

SHAPES = [(6, 4), (5,), (3, 2, 2), (4,), (2, 3)]
GROUP0, GROUP1 = [0, 1, 2], [3, 4]       # GROUP1 is the `trust_ratio: False` group
STEPS = 50


def make_problem(steps: int = STEPS, seed: int = 0, zero_grads: bool = True):
    """Initial values and per-step gradients (float64).

    Tensor 2 starts at zero and gets a zero gradient on step 1 (so ||w|| = 0 and ||g|| = 0, then
    ||w|| = 0 with ||g|| > 0 on step 2); tensor 0 gets a zero gradient on steps 1, 5 and 17 (||g|| = 0
    with ||w|| > 0; on step 1 LAMB's update is then zero too when there is no weight decay). The tensors
    have different scales so that trust ratios differ between them."""
    g = torch.Generator().manual_seed(seed)
    scales = [0.3, 1.0, 1.0, 0.5, 2.0]
    init = [s * torch.randn(shape, generator=g, dtype=F64) for s, shape in zip(scales, SHAPES)]
    init[2].zero_()
    grads = [[torch.randn(shape, generator=g, dtype=F64) * (1 + 0.5 * math.sin(t + i))
              for i, shape in enumerate(SHAPES)] for t in range(steps)]
    grads[0][2].zero_()
    if zero_grads:
        for t in (0, 4, 16):
            if t < steps:
                grads[t][0].zero_()
    return init, grads


def build_groups(params, group1_options: dict) -> list[dict]:
    return [{"params": [params[i] for i in GROUP0]},
            {"params": [params[i] for i in GROUP1], "trust_ratio": False, **group1_options}]


def run_ours(cls, init, grads, options: dict, group1_options: dict, foreach, dtype=F64, schedule=None):
    """Run `cls` over the problem; `schedule(opt)` optionally returns an LR scheduler stepped each step."""
    params = [torch.nn.Parameter(x.to(dtype).clone()) for x in init]
    opt = cls(build_groups(params, group1_options), foreach=foreach, **options)
    sched = schedule(opt) if schedule is not None else None
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.to(dtype).clone()
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach() for p in params], opt


def resolved_groups(defaults: dict, options: dict, group1_options: dict) -> list[tuple[list[int], dict]]:
    """The hyperparameters of each group as the spec defines them (defaults < options < group's own)."""
    base = {**defaults, **options}
    return [(GROUP0, {**base, "trust_ratio": True}), (GROUP1, {**base, "trust_ratio": False, **group1_options})]


# -- independent reference implementations of the spec (plain loops, float64) ------------------------

LAMB_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                     max_trust=None)
LARS_DEFAULTS = dict(momentum=0.9, weight_decay=0.0, eta=0.001, eps=1e-8, nesterov=False)


def norm(x: torch.Tensor) -> float:
    return math.sqrt(float((x * x).sum()))


def reference_lamb(init, grads, groups, lr_at=None):
    """LAMB as the spec writes it. `lr_at(group_lr, t)` gives the lr used on step t (default constant)."""
    w = [x.clone() for x in init]
    m = [torch.zeros_like(x) for x in init]
    v = [torch.zeros_like(x) for x in init]
    steps = [0] * len(init)            # a tensor's own step count: steps without a gradient are skipped
    for k, step_grads in enumerate(grads, start=1):
        for idx, hp in groups:
            b1, b2 = hp["betas"]
            lr = lr_at(hp["lr"], k) if lr_at else hp["lr"]
            for i in idx:
                g = step_grads[i]
                if g is None:
                    continue
                steps[i] += 1
                t = steps[i]
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                if hp["bias_correction"]:
                    m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
                else:
                    m_hat, v_hat = m[i], v[i]
                r = m_hat / (torch.sqrt(v_hat) + hp["eps"]) + hp["weight_decay"] * w[i]
                if hp["trust_ratio"]:
                    w_norm, r_norm = norm(w[i]), norm(r)
                    trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
                    if hp["max_trust"] is not None:
                        trust = min(trust, hp["max_trust"])
                else:
                    trust = 1.0
                w[i] = w[i] - lr * trust * r
    return w


def reference_lars(init, grads, groups, lr_at=None):
    """LARS as the spec writes it."""
    w = [x.clone() for x in init]
    buf: list = [None] * len(init)
    for t, step_grads in enumerate(grads, start=1):
        for idx, hp in groups:
            lr = lr_at(hp["lr"], t) if lr_at else hp["lr"]
            mu = hp["momentum"]
            for i in idx:
                g = step_grads[i]
                if g is None:
                    continue
                d = g + hp["weight_decay"] * w[i]
                w_norm, g_norm = norm(w[i]), norm(g)
                if hp["trust_ratio"] and w_norm > 0 and g_norm > 0:
                    trust = hp["eta"] * w_norm / (g_norm + hp["weight_decay"] * w_norm + hp["eps"])
                else:
                    trust = 1.0
                d = trust * d
                buf[i] = d.clone() if buf[i] is None else mu * buf[i] + d
                w[i] = w[i] - lr * (d + mu * buf[i] if hp["nesterov"] else buf[i])
    return w


def assert_close_list(actual, expected, rtol, atol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"tensor {i}: {m}")


def max_abs_diff(a, b) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b))


@pytest.fixture
def path_spy(monkeypatch):
    """Counts calls of the foreach and per-tensor kernels of LAMB and LARS."""
    calls = {"foreach": 0, "single": 0}

    def spy(module, name, kind):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    spy(lamb_impl, "_lamb_foreach", "foreach")
    spy(lamb_impl, "_lamb_single", "single")
    spy(lars_impl, "_lars_foreach", "foreach")
    spy(lars_impl, "_lars_single", "single")
    return calls


# -- 1. update rules against the references ------------------------------------------------------------

LAMB_CASES = {
    "defaults": dict(lr=0.02),
    "no_weight_decay": dict(lr=0.02, weight_decay=0.0),
    "no_bias_correction": dict(lr=0.02, weight_decay=0.1, bias_correction=False),
    "max_trust": dict(lr=0.02, max_trust=0.5),
    "all_options": dict(lr=0.05, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.05, bias_correction=False,
                        max_trust=2.0),
}
LAMB_GROUP1 = {"lr": 0.01}

LARS_CASES = {
    "defaults": dict(lr=0.5),
    "weight_decay": dict(lr=0.5, weight_decay=0.01, eta=0.02),
    "nesterov": dict(lr=0.5, weight_decay=0.01, eta=0.02, nesterov=True),
    "no_momentum": dict(lr=0.1, momentum=0.0, weight_decay=0.05, eta=0.02),
    "nesterov_all_options": dict(lr=0.2, momentum=0.5, eta=0.05, eps=1e-3, nesterov=True, weight_decay=0.1),
}
LARS_GROUP1 = {"lr": 0.01, "weight_decay": 0.02}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("case", sorted(LAMB_CASES))
def test_lamb_matches_reference(case, foreach, path_spy):
    init, grads = make_problem()
    options = LAMB_CASES[case]
    ours, _ = run_ours(LAMB, init, grads, options, LAMB_GROUP1, foreach)
    assert path_spy["foreach" if foreach else "single"] > 0
    assert path_spy["single" if foreach else "foreach"] == 0
    expected = reference_lamb(init, grads, resolved_groups(LAMB_DEFAULTS, options, LAMB_GROUP1))
    assert_close_list(ours, expected, rtol=1e-10, atol=1e-12)
    # The run moved every tensor (including the zero-initialised one) well beyond the tolerance.
    assert min(max_abs_diff([o], [i]) for o, i in zip(ours, init)) > 1e-3


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("case", sorted(LARS_CASES))
def test_lars_matches_reference(case, foreach, path_spy):
    init, grads = make_problem()
    options = LARS_CASES[case]
    ours, opt = run_ours(LARS, init, grads, options, LARS_GROUP1, foreach)
    assert path_spy["foreach" if foreach else "single"] > 0
    assert path_spy["single" if foreach else "foreach"] == 0
    expected = reference_lars(init, grads, resolved_groups(LARS_DEFAULTS, options, LARS_GROUP1))
    assert_close_list(ours, expected, rtol=1e-10, atol=1e-12)
    assert min(max_abs_diff([o], [i]) for o, i in zip(ours, init)) > 1e-4
    has_buffers = [("momentum_buffer" in opt.state[p]) for g in opt.param_groups for p in g["params"]]
    assert all(has_buffers) if options.get("momentum", 0.9) != 0 else not any(has_buffers)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("cls", [LAMB, LARS], ids=["lamb", "lars"])
def test_tensors_without_gradient_are_skipped(cls, foreach):
    """Tensor 3 has no gradient on steps 1-4 (its LARS buffer starts, and its LAMB step count begins, on
    step 5), tensor 1 none on step 7: those steps leave them and their state untouched."""
    init, grads = make_problem(steps=20)
    for t in range(4):
        grads[t][3] = None
    grads[6][1] = None
    if cls is LAMB:
        options, group1, defaults, reference = dict(lr=0.02), LAMB_GROUP1, LAMB_DEFAULTS, reference_lamb
    else:
        options, group1, defaults, reference = (dict(lr=0.5, eta=0.02, weight_decay=0.01), LARS_GROUP1,
                                                LARS_DEFAULTS, reference_lars)
    ours, opt = run_ours(cls, init, grads, options, group1, foreach)
    expected = reference(init, grads, resolved_groups(defaults, options, group1))
    assert_close_list(ours, expected, rtol=1e-10, atol=1e-12)
    if cls is LAMB:
        params = [p for g in opt.param_groups for p in g["params"]]
        assert [opt.state[p]["step"] for p in params] == [20, 19, 20, 16, 20]


def test_lamb_options_change_the_result():
    """The cases above are not vacuous: the clamp, bias correction and the trust ratio all matter here."""
    init, grads = make_problem()
    base, _ = run_ours(LAMB, init, grads, dict(lr=0.02), LAMB_GROUP1, False)
    for other in (dict(lr=0.02, max_trust=0.5), dict(lr=0.02, bias_correction=False)):
        changed, _ = run_ours(LAMB, init, grads, other, LAMB_GROUP1, False)
        assert max_abs_diff(base, changed) > 1e-3
    no_trust, _ = run_ours(LAMB, init, grads, dict(lr=0.02), {**LAMB_GROUP1, "trust_ratio": True}, False)
    assert max_abs_diff(base[3:], no_trust[3:]) > 1e-3 and max_abs_diff(base[:3], no_trust[:3]) == 0


@pytest.mark.parametrize("cls,cases,group1", [(LAMB, LAMB_CASES, LAMB_GROUP1), (LARS, LARS_CASES, LARS_GROUP1)],
                         ids=["lamb", "lars"])
def test_foreach_and_single_agree_in_float32(cls, cases, group1):
    init, grads = make_problem()
    for case, options in cases.items():
        a, _ = run_ours(cls, init, grads, options, group1, True, dtype=torch.float32)
        b, _ = run_ours(cls, init, grads, options, group1, False, dtype=torch.float32)
        assert all(x.dtype == torch.float32 for x in a)
        assert_close_list(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,options", [(LAMB, {}), (LARS, {"lr": 0.1})], ids=["lamb", "lars"])
def test_foreach_default_is_per_tensor_on_cpu_and_mixed_dtypes_never_use_foreach(cls, options, path_spy):
    init, grads = make_problem(steps=3)
    n_tensors = sum(1 for _ in init)
    # foreach=None on CPU: the per-tensor path, as torch's own optimizers choose there.
    run_ours(cls, init, grads, options, {}, None)
    assert path_spy["foreach"] == 0 and path_spy["single"] > 0
    seen = path_spy["single"]
    # foreach=True with mixed dtypes in one group: still the per-tensor path, once per tensor.
    params = [torch.nn.Parameter(x.clone()) for x in init]
    params[1] = torch.nn.Parameter(init[1].float())
    opt = cls(params, foreach=True, **options)
    for p, g in zip(params, grads[1]):
        p.grad = g.to(p.dtype).clone()
    opt.step()
    assert path_spy == {"foreach": 0, "single": seen + n_tensors}


# -- 2. against the peer library pytorch_optimizer ------------------------------------------------------

def run_peer(opt_factory, init, grads, group1_options: dict):
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = opt_factory(build_groups(params, group1_options))
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()          # the peer's LARS scales p.grad in place
        opt.step()
    return [p.detach() for p in params]


# pytorch_optimizer.Lamb vs our LAMB:
# - The peer never bias-corrects v; its default (adam_debias=False) divides the whole step, weight decay
#   and trust ratio included, by 1 - b1^t. Our bias_correction=False equals its adam_debias=True.
# - Its default weight_decouple=True shrinks w by lr*wd before the step (AdamW style); ours adds wd*w to
#   the Adam direction inside the trust ratio, which is its weight_decouple=False.
# - Its trust ratio is ||w|| / (||r|| + eps) with ||w|| clamped at 10 (`Lamb.clamp`); ours is ||w||/||r||
#   with an optional cap on the ratio itself (max_trust). So the match needs ||w|| < 10 and holds to ~eps.
# - `trust_ratio: False` groups correspond to its per-group `adam: True`.
# - rectify, pre_norm (global grad-norm scaling), adanorm, grad_averaging=False have no counterpart here.
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_lamb_matches_peer_without_bias_correction(foreach):
    from pytorch_optimizer import Lamb
    init, grads = make_problem(steps=30)
    options = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05, bias_correction=False)
    ours, _ = run_ours(LAMB, init, grads, options, LAMB_GROUP1, foreach)
    peer = run_peer(lambda groups: Lamb(groups, lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05,
                                        weight_decouple=False, adam_debias=True, rectify=False,
                                        grad_averaging=True, pre_norm=False, foreach=False),
                    init, grads, {**LAMB_GROUP1, "adam": True})
    assert max(norm(x) for x in peer) < 10        # below the peer's weight-norm clamp
    # eps in the peer's trust-ratio denominator: relative differences of ~1e-6 over 30 steps.
    assert_close_list(ours, peer, rtol=1e-5, atol=1e-7)
    assert max_abs_diff(ours, init) > 0.05


def test_lamb_with_bias_correction_matches_peer_adam_debias_when_trust_ratio_and_no_weight_decay():
    # With the trust ratio and no weight decay the step is lr*||w||*r/||r||: the scale of r, and with it
    # bias correction, cancels (up to where eps sits). The peer's default adam_debias=False would scale
    # the step by 1/(1 - b1^t) instead; and without the trust ratio the peer has no v correction, so only
    # the trust-ratio group matches, and only for tensors that never have ||w|| = 0 (there trust = 1 and
    # the step's scale shows again), so the zero-initialised tensor is left out.
    from pytorch_optimizer import Lamb
    init, grads = make_problem(steps=30)
    idx = [0, 1, 4]
    params = [torch.nn.Parameter(init[i].clone()) for i in idx]
    ours = LAMB(params, lr=0.02, weight_decay=0.0, eps=1e-8, bias_correction=True)
    peer_params = [torch.nn.Parameter(init[i].clone()) for i in idx]
    peer = Lamb(peer_params, lr=0.02, weight_decay=0.0, eps=1e-8, adam_debias=True)
    for step_grads in grads:
        for p, q, i in zip(params, peer_params, idx):
            p.grad, q.grad = step_grads[i].clone(), step_grads[i].clone()
        ours.step()
        peer.step()
    assert_close_list([p.detach() for p in params], [q.detach() for q in peer_params], rtol=1e-6, atol=1e-8)


# -- complex parameters: LAMB steps a complex tensor as the pair of real numbers it is ----------------------

COMPLEX = [0, 2, 3]     # tensors of make_problem given to the optimizer as complex numbers (pairs of values)


def complex_problem(steps: int = 20):
    """make_problem's values as (real views, the tensors the optimizer gets): tensors 0, 2 and 3 become
    complex tensors whose real views hold their values, so each real/imaginary pair is one complex number."""
    init, grads = make_problem(steps=steps)

    def pairs(x):
        return x.reshape(*x.shape[:-1], -1, 2) if x.shape[-1] % 2 == 0 else x.reshape(-1, 2)

    real = [[pairs(x) if i in COMPLEX else x for i, x in enumerate(xs)] for xs in [init] + grads]
    mixed = [[torch.view_as_complex(x.contiguous()) if i in COMPLEX else x for i, x in enumerate(xs)]
             for xs in real]
    return real, mixed


def run_tensors(make_opt, init, grads):
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make_opt(build_groups(params, LAMB_GROUP1))
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("case", ["defaults", "no_bias_correction", "max_trust"])
def test_lamb_steps_complex_parameters_as_their_real_view(case, foreach, path_spy):
    """Complex tensors mixed with real ones in the same groups: the result is exactly that of the same
    run on the real views (the second moment holds re^2 and im^2, not the complex square g*g)."""
    (real_init, *real_grads), (mixed_init, *mixed_grads) = complex_problem()
    assert [x.is_complex() for x in mixed_init] == [i in COMPLEX for i in range(len(SHAPES))]
    options = LAMB_CASES[case]
    on_real, _ = run_tensors(lambda groups: LAMB(groups, foreach=foreach, **options), real_init, real_grads)
    on_mixed, opt = run_tensors(lambda groups: LAMB(groups, foreach=foreach, **options), mixed_init, mixed_grads)
    assert path_spy["foreach" if foreach else "single"] > 0
    assert path_spy["single" if foreach else "foreach"] == 0    # complex128 and float64 share a foreach call
    for i, (x, y) in enumerate(zip(on_mixed, on_real)):
        assert torch.equal(torch.view_as_real(x) if i in COMPLEX else x, y), i
    assert min(max_abs_diff([o], [i]) for o, i in zip(on_real, real_init)) > 1e-3
    # The state keeps the parameter's complex dtype (state_dict and torch.optim conventions).
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(opt.state[p]["exp_avg_sq"].dtype == p.dtype for p in params)
    v0 = torch.view_as_real(opt.state[params[0]]["exp_avg_sq"])
    assert bool((v0 >= 0).all()) and float(v0.abs().max()) > 0


def test_lamb_matches_peer_on_complex_parameters():
    """pytorch_optimizer's Lamb also steps complex tensors through their real view: same settings as
    test_lamb_matches_peer_without_bias_correction, on the complex problem."""
    from pytorch_optimizer import Lamb
    _, (init, *grads) = complex_problem(steps=30)
    ours, _ = run_tensors(lambda groups: LAMB(groups, lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05,
                                              bias_correction=False, foreach=False), init, grads)
    peer, _ = run_tensors(lambda groups: Lamb([{**g, "adam": not g.get("trust_ratio", True)} for g in groups],
                                              lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05,
                                              weight_decouple=False, adam_debias=True, rectify=False,
                                              grad_averaging=True, pre_norm=False, foreach=False), init, grads)
    assert max(norm(torch.view_as_real(x) if x.is_complex() else x) for x in peer) < 10
    assert [x.is_complex() for x in ours] == [x.is_complex() for x in peer] == [i in COMPLEX for i in range(5)]
    assert_close_list(ours, peer, rtol=1e-5, atol=1e-7)
    assert max_abs_diff(ours, init) > 0.05


# pytorch_optimizer.LARS vs our LARS:
# - The peer applies weight decay and the trust ratio only to tensors with ndim > 1; 1-D tensors get plain
#   SGD momentum without weight decay. Ours applies both to every tensor of a group unless the group sets
#   `trust_ratio: False` (and weight_decay 0), as torchdojo.optim.param_groups does for biases/norms.
# - Its trust ratio has no eps: eta*||w|| / (||g|| + wd*||w||) (ours adds eps, default 1e-8).
# - Where ||g|| = 0 but wd*||w|| > 0 it still scales (trust = eta/wd); ours uses trust = 1 there.
# - trust_coefficient = our eta; dampening must be 0 (ours has none); with dampening 0 its zero-initialised
#   buffer gives buf = d on the first step, like ours. Nesterov is the same rule.
LARS_PEER_CASES = {
    "momentum": dict(lr=0.5, momentum=0.9, weight_decay=0.0, eta=0.02),
    "weight_decay": dict(lr=0.5, momentum=0.9, weight_decay=0.01, eta=0.02),
    "nesterov": dict(lr=0.5, momentum=0.9, weight_decay=0.01, eta=0.02, nesterov=True),
    "no_momentum": dict(lr=0.2, momentum=0.0, weight_decay=0.05, eta=0.05),
}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("case", sorted(LARS_PEER_CASES))
def test_lars_matches_peer(case, foreach):
    from pytorch_optimizer import LARS as PeerLARS
    options = LARS_PEER_CASES[case]
    # No zero-gradient steps on the trust-ratio tensors when weight decay is on (see above).
    init, grads = make_problem(steps=30, zero_grads=options["weight_decay"] == 0)
    params = [torch.nn.Parameter(x.clone()) for x in init]
    multi_dim = [p for p in params if p.ndim > 1]
    one_dim = [p for p in params if p.ndim == 1]
    groups = [{"params": multi_dim}, {"params": one_dim, "trust_ratio": False, "weight_decay": 0.0}]
    ours = LARS(groups, eps=0.0, foreach=foreach, **options)
    peer_params = [torch.nn.Parameter(x.clone()) for x in init]
    peer = PeerLARS([p for p in peer_params if p.ndim > 1] + [p for p in peer_params if p.ndim == 1],
                    lr=options["lr"], momentum=options["momentum"], weight_decay=options["weight_decay"],
                    trust_coefficient=options["eta"], nesterov=options.get("nesterov", False), dampening=0.0,
                    foreach=foreach)
    for step_grads in grads:
        for p, q, g in zip(params, peer_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        peer.step()
    assert_close_list([p.detach() for p in params], [q.detach() for q in peer_params], rtol=1e-10, atol=1e-12)
    assert max_abs_diff([p.detach() for p in params], init) > 1e-3


# pytorch_optimizer.Lookahead vs ours: the same rule with pullback_momentum='none' (its 'reset'/'pullback'
# variants also change the inner momentum; ours never touches the inner state). It keeps a counter per
# parameter group and only syncs parameters that have a gradient at that step; ours counts steps once and
# syncs every parameter. Its state_dict format differs ('lookahead_state'/'base_optimizer').
@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_lookahead_matches_peer(inner):
    from pytorch_optimizer import Lookahead as PeerLookahead
    model_a, model_b = tiny_net(0), tiny_net(0)
    ours = Lookahead(INNER[inner](model_a.parameters()), k=3, alpha=0.8)
    peer = PeerLookahead(INNER[inner](model_b.parameters()), k=3, alpha=0.8, pullback_momentum="none")
    for t in range(30):
        train_step(model_a, ours, t)
        train_step(model_b, peer, t)
    assert_close_list(list(model_a.parameters()), list(model_b.parameters()), rtol=1e-12, atol=1e-14)


# -- 3. Lookahead ---------------------------------------------------------------------------------------

INNER = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.02, weight_decay=0.01),
}


def tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(16, 4, generator=g, dtype=F64)
    return x, torch.stack([x[:, 0] * x[:, 1], x[:, 2] - x[:, 3]], dim=1)


def train_step(model, opt, t: int) -> None:
    x, y = batch(t)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "single"])
@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_lookahead_matches_reference(inner, foreach):
    k, alpha = 5, 0.5
    model, ref_model, plain_model = tiny_net(0), tiny_net(0), tiny_net(0)
    opt = Lookahead(INNER[inner](model.parameters()), k=k, alpha=alpha, foreach=foreach)
    assert opt.param_groups is opt.optimizer.param_groups
    ref_inner = INNER[inner](ref_model.parameters())
    slow = [p.detach().clone() for p in ref_model.parameters()]
    plain = INNER[inner](plain_model.parameters())
    for t in range(1, 24):
        train_step(model, opt, t)
        train_step(ref_model, ref_inner, t)
        train_step(plain_model, plain, t)
        if t % k == 0:
            with torch.no_grad():
                for s, p in zip(slow, ref_model.parameters()):
                    s.add_(alpha * (p - s))
                    p.copy_(s)
            assert all(torch.equal(p, s) for p, s in zip(model.parameters(), opt.slow))
        assert_close_list(list(model.parameters()), list(ref_model.parameters()), rtol=1e-12, atol=1e-14)
        assert_close_list(opt.slow, slow, rtol=1e-12, atol=1e-14)
    assert opt.lookahead_steps == 23
    # Lookahead changed the trajectory compared with the bare inner optimizer.
    assert max_abs_diff(list(model.parameters()), list(plain_model.parameters())) > 1e-3


def _state_of(opt) -> list[dict]:
    inner = opt.optimizer if isinstance(opt, Lookahead) else opt
    return [dict(inner.state[p]) for g in inner.param_groups for p in g["params"]]


def assert_same_state(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys() and sa
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_lookahead_state_dict_resumes_exactly(inner, tmp_path):
    model = tiny_net(0)
    opt = Lookahead(INNER[inner](model.parameters()), k=5, alpha=0.5)
    for t in range(20):
        train_step(model, opt, t)

    first = tiny_net(0)
    first_opt = Lookahead(INNER[inner](first.parameters()), k=5, alpha=0.5)
    for t in range(7):            # 7 is not a multiple of k: the counter and slow weights matter
        train_step(first, first_opt, t)
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)

    resumed = tiny_net(1)         # different initial weights, so stale slow weights would show
    resumed_opt = Lookahead(INNER[inner](resumed.parameters()), k=5, alpha=0.5)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.lookahead_steps == 7
    for t in range(7, 20):
        train_step(resumed, resumed_opt, t)

    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.slow, resumed_opt.slow):
        assert torch.equal(a, b)
    assert_same_state(_state_of(opt), _state_of(resumed_opt))
    assert resumed_opt.lookahead_steps == 20


def test_lookahead_lambda_lr_drives_the_inner_lr():
    model = tiny_net(0)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=4, alpha=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8 ** s)
    for t in range(1, 12):
        expected_lr = 0.1 * 0.8 ** (t - 1)
        assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr, rel=1e-12)
        before = [p.detach().clone() for p in model.parameters()]
        train_step(model, opt, t)
        if t % 4:                  # a plain SGD step: the update is exactly the scheduled lr times g
            for p, b in zip(model.parameters(), before):
                torch.testing.assert_close(p.detach(), b - expected_lr * p.grad, rtol=1e-12, atol=1e-15)
        sched.step()


def test_lookahead_lr_schedule_still_applies_after_load_state_dict(tmp_path):
    """After load_state_dict, an LR scheduler (or the trainer's schedule) acting on the Lookahead's
    param_groups must still reach the inner optimizer."""
    model = tiny_net(0)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=5, alpha=0.5)
    for t in range(3):
        train_step(model, opt, t)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")

    resumed = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=5, alpha=0.5)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    sched = torch.optim.lr_scheduler.LambdaLR(resumed, lambda s: 0.5 ** s)
    for t in range(3, 6):
        train_step(model, resumed, t)
        sched.step()
    assert resumed.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert resumed.param_groups is resumed.optimizer.param_groups


def test_ranger_is_lookahead_over_radam():
    model, twin = tiny_net(0), tiny_net(0)
    ranger = OPTIMIZERS.build({"name": "ranger", "lr": 0.01}, params=model.parameters())
    assert isinstance(ranger, Lookahead) and type(ranger.optimizer) is torch.optim.RAdam
    assert (ranger.k, ranger.alpha) == (6, 0.5)
    manual = Lookahead(torch.optim.RAdam(twin.parameters(), lr=0.01), k=6, alpha=0.5)
    for t in range(13):
        train_step(model, ranger, t)
        train_step(twin, manual, t)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert_same_state(_state_of(ranger), _state_of(manual))


def test_registry_lookahead_builds_its_inner_optimizer():
    model = tiny_net(0)
    opt = OPTIMIZERS.build({"name": "lookahead", "inner": {"name": "lamb", "lr": 0.01}, "k": 3, "alpha": 0.3},
                           params=model.parameters())
    assert isinstance(opt, Lookahead) and isinstance(opt.optimizer, LAMB)
    assert (opt.k, opt.alpha) == (3, 0.3)
    assert opt.optimizer.defaults["lr"] == 0.01 and opt.optimizer.defaults["weight_decay"] == 0.01


# -- 4. LR schedulers and state_dict round trips for LAMB and LARS ----------------------------------------

SCHED_CASES = {
    "lamb": (LAMB, dict(lr=0.02, weight_decay=0.05), LAMB_GROUP1, LAMB_DEFAULTS, reference_lamb),
    "lars": (LARS, dict(lr=0.5, weight_decay=0.01, eta=0.02, nesterov=True), LARS_GROUP1, LARS_DEFAULTS,
             reference_lars),
}
SCHED_STEPS = 15


def lambda_factor(s: int) -> float:
    return 1.0 / (1.0 + 0.5 * s)


SCHEDULES = {
    # (torch scheduler factory, the lr on step t (from 1) for a group whose base lr is `lr`)
    "lambda": (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda_factor),
               lambda lr, t: lr * lambda_factor(t - 1)),
    "cosine": (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=SCHED_STEPS, eta_min=1e-3),
               lambda lr, t: 1e-3 + (lr - 1e-3) * (1 + math.cos(math.pi * (t - 1) / SCHED_STEPS)) / 2),
}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name", sorted(SCHED_CASES))
def test_lr_schedulers_change_the_lr_used_in_the_step(name, schedule, foreach):
    cls, options, group1, defaults, reference = SCHED_CASES[name]
    make_sched, lr_at = SCHEDULES[schedule]
    init, grads = make_problem(steps=SCHED_STEPS)
    ours, opt = run_ours(cls, init, grads, options, group1, foreach, schedule=make_sched)
    expected = reference(init, grads, resolved_groups(defaults, options, group1), lr_at=lr_at)
    assert_close_list(ours, expected, rtol=1e-9, atol=1e-12)
    constant, _ = run_ours(cls, init, grads, options, group1, foreach)
    assert max_abs_diff(ours, constant) > 1e-4
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(options["lr"], SCHED_STEPS + 1))
    assert opt.param_groups[1]["lr"] == pytest.approx(lr_at(group1["lr"], SCHED_STEPS + 1))


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("name", sorted(SCHED_CASES))
def test_state_dict_round_trip_continues_exactly(name, foreach, tmp_path):
    cls, options, group1, _, _ = SCHED_CASES[name]
    make_sched = SCHEDULES["cosine"][0]
    init, grads = make_problem(steps=20)
    full, full_opt = run_ours(cls, init, grads, options, group1, foreach, schedule=make_sched)

    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = cls(build_groups(params, group1), foreach=foreach, **options)
    sched = make_sched(opt)
    for step_grads in grads[:8]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        sched.step()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict(), "sched": sched.state_dict()},
               tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)

    fresh = [torch.nn.Parameter(torch.full_like(x, 0.25)) for x in init]
    fresh_opt = cls(build_groups(fresh, group1), foreach=foreach, **{**options, "lr": 123.0})
    fresh_sched = make_sched(fresh_opt)
    with torch.no_grad():
        for p, s in zip(fresh, saved["params"]):
            p.copy_(s)
    fresh_opt.load_state_dict(saved["opt"])
    fresh_sched.load_state_dict(saved["sched"])
    for step_grads in grads[8:]:
        for p, g in zip(fresh, step_grads):
            p.grad = g.clone()
        fresh_opt.step()
        fresh_sched.step()
    for a, b in zip(full, fresh):
        assert torch.equal(a, b.detach())
    assert_same_state(_state_of(full_opt), _state_of(fresh_opt))
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in full_opt.param_groups]
    assert fresh_opt.param_groups[1]["trust_ratio"] is False


# -- 5. convergence of every registered optimizer ----------------------------------------------------------

# Measured (1500 steps, 50 warmup + cosine): every optimizer below reaches a Rosenbrock loss < 1e-4
# (sgd 2e-5, lamb 4e-5, the rest < 1e-6) from 12.5; the assertion asks for < 1e-2. betas=(0.9, 0.99) lets
# the Adam family leave the steep start quickly; RAdam's un-rectified first steps are SGD-like, which is
# why its lr stays at 0.05 (it diverges from 0.2 on).
ROSENBROCK_SPECS = {
    "adam": {"name": "adam", "lr": 0.05, "betas": (0.9, 0.99)},
    "adamw": {"name": "adamw", "lr": 0.05, "betas": (0.9, 0.99), "weight_decay": 0.0},
    "radam": {"name": "radam", "lr": 0.05, "betas": (0.9, 0.99)},
    "ranger": {"name": "ranger", "lr": 0.1, "betas": (0.9, 0.99)},
    "lamb": {"name": "lamb", "lr": 0.1, "weight_decay": 0.0},
    "lars": {"name": "lars", "lr": 1.0, "eta": 0.01},
    "sgd": {"name": "sgd", "lr": 1.5e-3, "momentum": 0.9},
    "lookahead": {"name": "lookahead", "inner": {"name": "adam", "lr": 0.1, "betas": (0.9, 0.99)}},
}
# Linear regression (300 full-batch steps, 20 warmup + cosine, torchdojo's param_groups so biases skip
# weight decay and the trust ratio): measured, every optimizer reaches the least-squares optimum to
# < 0.1%, except those whose default weight decay pulls the weights away from it (adamw +1.3%, lamb +2.2%);
# the assertion allows 5%. RAdam with the default beta2 = 0.999 is still 2.5x off after 300 steps.
REGRESSION_SPECS = {
    "adam": {"name": "adam", "lr": 0.1},
    "adamw": {"name": "adamw", "lr": 0.1},
    "radam": {"name": "radam", "lr": 0.1, "betas": (0.9, 0.99)},
    "ranger": {"name": "ranger", "lr": 0.2, "betas": (0.9, 0.99)},
    "lamb": {"name": "lamb", "lr": 0.1},
    "lars": {"name": "lars", "lr": 1.0, "eta": 0.01},
    "sgd": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "lookahead": {"name": "lookahead", "inner": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
}


def warmup_cosine(opt, steps: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * t / steps)))


def rosenbrock(x: float, y: float) -> float:
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def test_every_registered_optimizer_has_convergence_settings():
    assert set(OPTIMIZERS.names()) == set(ROSENBROCK_SPECS) == set(REGRESSION_SPECS)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_rosenbrock_converges(name):
    steps = 1500
    p = torch.tensor([-1.5, 2.0], dtype=F64, requires_grad=True)
    opt = OPTIMIZERS.build(ROSENBROCK_SPECS[name], params=[p])
    sched = warmup_cosine(opt, steps, 50)
    start = rosenbrock(*p.tolist())
    for _ in range(steps):
        x, y = p.detach().tolist()       # the analytic gradient: 3x faster than autograd here
        p.grad = torch.tensor([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)], dtype=F64)
        opt.step()
        sched.step()
    final = rosenbrock(*p.tolist())
    assert start == 12.5
    assert final < 1e-2, f"{name}: Rosenbrock loss {final:.3g} after {steps} steps"


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_linear_regression_reaches_noise_level(name):
    steps, noise = 300, 0.1
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g)
    w_true = torch.randn(8, 1, generator=g)
    y = X @ w_true + 1.0 + noise * torch.randn(256, 1, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = OPTIMIZERS.build(REGRESSION_SPECS[name], params=param_groups(model))
    sched = warmup_cosine(opt, steps, 20)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(model(X), y).item()
        design = torch.cat([X, torch.ones(256, 1)], dim=1)
        best = torch.nn.functional.mse_loss(design @ torch.linalg.lstsq(design, y).solution, y).item()
    assert 0.5 * noise ** 2 < best < 1.5 * noise ** 2     # the problem: the optimum sits at the noise level
    assert mse < 1.05 * best, f"{name}: MSE {mse:.4g}, least squares {best:.4g}"


# -- 6. Lookahead in recipes and the trainer --------------------------------------------------------------

LOOKAHEAD_SPEC = {"name": "lookahead", "inner": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "k": 5, "alpha": 0.5}


def lookahead_recipe() -> dict:
    r = make_tiny_recipe()
    r["phases"] = [
        {"name": "look", "steps": 14, "batch_size": 32, "optimizer": dict(LOOKAHEAD_SPEC),
         "schedule": [{"name": "warmup", "steps": 3}, {"name": "cosine"}]},
        {"name": "keep", "steps": 4, "batch_size": 64},         # carries the Lookahead over
    ]
    r["checkpoint"] = {"every_steps": 4, "keep_last": 100}
    return r


def test_lookahead_spec_validates_in_a_recipe():
    recipe = load_recipe(lookahead_recipe())
    assert recipe.phases[0].optimizer == {
        "name": "lookahead", "k": 5, "alpha": 0.5,
        "inner": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0,
                  "nesterov": False}}


@pytest.fixture(scope="module")
def lookahead_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lookahead") / "run"
    trainer = Trainer(load_recipe(lookahead_recipe()), run_dir, quiet=True)
    summary = trainer.fit()
    return run_dir, trainer, summary


def test_lookahead_recipe_trains(lookahead_run):
    run_dir, trainer, summary = lookahead_run
    opt = trainer.state.optimizer
    assert isinstance(opt, Lookahead) and type(opt.optimizer) is torch.optim.SGD
    assert (opt.k, opt.alpha) == (5, 0.5) and opt.lookahead_steps == 18
    assert opt.optimizer.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups is opt.optimizer.param_groups
    # 18 steps: 15 is the last sync, so the slow weights hold the parameters of step 15.
    assert not all(torch.equal(p, s) for p, s in zip(opt._params, opt.slow))
    assert summary["status"] == "finished" and summary["steps"] == 18
    assert summary["metrics"]["val/accuracy"] > 0.6          # 3 classes: chance is 1/3
    final = load_file(str(run_dir / "checkpoints/final/model.safetensors"))
    assert final.keys() == trainer.state.model.state_dict().keys()


@pytest.mark.parametrize("step", [8, 16])
def test_lookahead_checkpoint_resumes_exactly(step, lookahead_run, tmp_path):
    src, _, ref_summary = lookahead_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    trainer = Trainer.from_run_dir(run_dir, quiet=True, checkpoint=run_dir / "checkpoints" / f"step-{step:08d}")
    summary = trainer.fit()
    assert summary["steps"] == ref_summary["steps"]
    assert summary["metrics"] == ref_summary["metrics"]
    a = load_file(str(src / "checkpoints/final/model.safetensors"))
    b = load_file(str(run_dir / "checkpoints/final/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("inner,path", [
    ({"name": "sgd", "lr": 0.1, "momentum": 0.9, "momentun": 0.5}, "phases.0.optimizer.inner.momentun"),
    ({"name": "sgdd", "lr": 0.1}, "phases.0.optimizer.inner.name"),
    ({"name": "lars"}, "phases.0.optimizer.inner.lr"),
])
def test_bad_inner_spec_names_its_path(inner, path):
    r = lookahead_recipe()
    r["phases"][0]["optimizer"] = {"name": "lookahead", "inner": inner}
    with pytest.raises(ConfigError) as info:
        load_recipe(r)
    assert info.value.path == path
    if "momentun" in path:
        assert "momentum" in info.value.message          # the did-you-mean hint


def test_unknown_lookahead_key_names_its_path():
    r = lookahead_recipe()
    r["phases"][0]["optimizer"] = {**LOOKAHEAD_SPEC, "kk": 3}
    with pytest.raises(ConfigError) as info:
        load_recipe(r)
    assert info.value.path == "phases.0.optimizer.kk"


def test_lookahead_leaves_a_module_frozen_in_a_later_phase_unchanged():
    """The trainer's freeze contract (frozen parameters stay as they are) also holds when the carried-over
    optimizer is a Lookahead: its k-step sync must not pull frozen parameters towards their slow weights."""
    r = make_tiny_recipe()
    r["model"] = {"name": "mlp", "hidden": [16, 16]}
    r["phases"] = [
        {"name": "a", "steps": 7, "batch_size": 32, "optimizer": dict(LOOKAHEAD_SPEC)},   # syncs at 5
        {"name": "b", "steps": 6, "freeze": ["body.1"]},         # keeps the Lookahead; syncs at step 10
    ]
    first_phase = make_tiny_recipe()
    first_phase.update(model=r["model"], phases=r["phases"][:1])
    before = Trainer(load_recipe(first_phase), None, quiet=True)
    before.fit()
    after = Trainer(load_recipe(r), None, quiet=True)
    after.fit()
    assert after.state.optimizer.lookahead_steps == 13
    start, end = before.state.model.state_dict(), after.state.model.state_dict()
    for key in ("body.1.0.weight", "body.1.0.bias"):
        assert torch.equal(start[key], end[key]), f"frozen {key} changed"
    for key in ("body.2.0.weight", "head.weight"):
        assert not torch.equal(start[key], end[key]), f"trainable {key} did not change"


def test_lookahead_add_param_group_gives_the_new_parameters_slow_weights():
    from torchdojo.optim import Lookahead

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = Lookahead(torch.optim.SGD([a], lr=0.1), k=2, alpha=0.5)
    opt.add_param_group({"params": [b], "lr": 0.2})
    assert len(opt.param_groups) == len(opt.optimizer.param_groups) == 2
    for _ in range(2):
        a.grad, b.grad = torch.ones(3), torch.ones(2)
        opt.step()
    # two SGD steps take b from 1 to 0.6; the sync pulls it halfway back to its slow copy (1).
    assert torch.allclose(b.detach(), torch.full((2,), 0.8))
    assert torch.allclose(a.detach(), torch.full((3,), 0.9))
