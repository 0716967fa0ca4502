"""Optimizer step speed: torchdojo's LAMB, LARS and Lookahead against torch's own optimizers and pytorch_optimizer.

One parameter set shaped like a small 6-layer transformer (d_model 256, feed-forward 1024): per layer the
attention in-projection (q/k/v packed as in `nn.MultiheadAttention`, 768x256 + bias), the out-projection
(256x256 + bias), two LayerNorms (weight + bias) and the two feed-forward linears (1024x256, 256x1024 + biases);
plus token and position embeddings (512x256 each) and a final LayerNorm: 76 tensors, 5,001,216 float32
parameters, initialised like a transformer (weights N(0, 0.02), biases 0, LayerNorm weights 1). The
gradients are random (N(0, 0.01), one seed) and set once; every contender gets its own copy of the same
parameters and gradients and keeps it for the whole run. Measured: `optimizer.step()` only.

Contenders (every optimizer in one parameter group; "default" means the constructor's `foreach=None`):
  torch AdamW        lr 1e-3, weight_decay 0.01: for-loop (foreach=False), foreach=True, fused=True (when
                     this torch supports it on this device; reported, but not a baseline: the goals are
                     against eager, non-fused code)
  torch SGD          lr 0.1, momentum 0.9, weight_decay 1e-4: foreach False and True
  torchdojo LAMB     its defaults (lr 1e-3, betas (0.9, 0.999), eps 1e-6, weight_decay 0.01, bias correction):
                     default, foreach False, foreach True
  torchdojo LARS     lr 0.1, momentum 0.9, weight_decay 1e-4, eta 1e-3, eps 1e-8: default, foreach False, True
  torchdojo Lookahead(torch AdamW foreach=True), k 5, alpha 0.5
  pytorch_optimizer  Lamb, LARS and Lookahead(torch AdamW foreach=True), each at its default foreach=None,
                     which on CPU takes its batched (torch._foreach_*) path

LARS and SGD run with weight decay (1e-4, `--lars-weight-decay`) because LARS is used with it and its trust
ratio includes it; with 0 both torch's and torchdojo's foreach paths skip a whole-list temporary, see below.

Peer settings, chosen closest to torchdojo's rules (from pytorch_optimizer 4.x's source):
  Lamb(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, weight_decouple=False, rectify=False,
       grad_averaging=True, pre_norm=False, adam=False). weight_decouple=False adds weight_decay*w to the
       update before the trust ratio, as torchdojo (and the paper) do. Remaining differences: it never
       bias-corrects v and applies m's bias correction as lr/(1-b1^t) AFTER the trust ratio (torchdojo
       corrects both before it, where m's correction cancels in the trust ratio); it clamps ||w|| at 10 and
       adds eps to ||r||; it stores each tensor's weight norm, update norm and trust ratio in its state every
       step (a Python loop over the tensors, part of its cost).
  LARS(lr=0.1, momentum=0.9, dampening=0, weight_decay=1e-4, trust_coefficient=1e-3, nesterov=False).
       Differences: 1-D tensors (biases, LayerNorm weights: 50 of the 76 tensors, 0.4% of the elements) get
       neither the trust ratio nor weight decay (torchdojo applies both to every tensor of a group unless the
       group says `trust_ratio: False`); no eps in the trust-ratio denominator; it writes the scaled gradient
       and then the momentum buffer into `p.grad` in place, so its gradients do not stay fixed (the work per
       step is the same and the values stay finite).
  Lookahead(AdamW, k=5, alpha=0.5, pullback_momentum='none'): the same rule (it lerps the fast weights
       toward the slow ones and copies them back; torchdojo lerps the slow ones and copies them out).

Timing: after 5 unmeasured warm-up steps each, `--rounds` rounds; in each round every contender runs one block
of 5 consecutive steps (`--block`, a multiple of Lookahead's k = 5, so every block holds exactly one
slow-weight sync and the Lookahead figure is amortised over it); the order rotates by one contender per round
(round-robin). Per step = block time / block length; a contender's figure is the median over rounds. A ratio
is the median over rounds of the paired per-round ratio contender/baseline (the two blocks ran within about
a second of each other), which cancels slow drifts in machine load. Baselines: "fastest eager AdamW/SGD" is
whichever of torch's for-loop and foreach variants has the lower median. The goal for "our LAMB/LARS" uses
the default construction (foreach=None), i.e. what a user gets; the explicit foreach False/True rows show
both paths.

Torch runs with ONE intra-op thread by default (`--threads 0` keeps torch's default): the machine is
shared and a 2-thread run stalls whenever another process takes a core. The "faults/step" column counts
minor page faults per step (getrusage): on Linux/glibc a freed multi-megabyte temporary is returned to the
kernel and the next step faults its pages back in, which is what makes whole-list temporaries (a
`torch._foreach_*` op without a trailing underscore over 20 MB of parameters) expensive on CPU.

torch.compile (`--compile auto`, the default: only for torchdojo's LAMB/LARS when one of their eager goals is
missed; `always`, `never`): after two eager steps, a function calling `opt.step()` is first traced by dynamo
alone (backend "eager", cheap) with recompiles turned into errors; if it traces without recompiling it is
compiled with inductor, else the reason is reported and the optimizer's foreach math (`_lamb_foreach` /
`_lars_foreach`, patched into the module for that contender's calls only) is compiled instead, with dynamic
shapes, while the step's state bookkeeping stays eager. Compile time (the first calls, minus the steady
per-step time, with inductor's and AOTAutograd's on-disk caches off so it is the cold figure) is reported
separately and excluded; then the compiled contenders and their baselines run
`--compile-rounds` more interleaved rounds for paired ratios (one kind at a time).

Run: .venv/bin/python benchmarks/optim_speed.py [--rounds 20] [--threads 1] [--compile auto|always|never]
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import platform
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import torchdojo
from torchdojo.optim import LAMB, LARS, Lookahead

from _stats import parse_args

try:
    import resource
except ImportError:       # not on Windows
    resource = None

try:
    import pytorch_optimizer as peer
    PEER_VERSION = getattr(peer, "__version__", None)
    if PEER_VERSION is None:
        from importlib.metadata import version
        PEER_VERSION = version("pytorch_optimizer")
except ImportError:
    peer, PEER_VERSION = None, None

SEED = 0
D_MODEL, D_FF, LAYERS, VOCAB, CONTEXT = 256, 1024, 6, 512, 512
K = 5                      # Lookahead k
ADAMW = dict(lr=1e-3, weight_decay=0.01)
LAMB_KW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
SGD_LR, MOMENTUM, ETA = 0.1, 0.9, 1e-3
WARMUP_STEPS = 5
GOALS = {  # name: (contender, baseline, limit)
    "lamb_vs_peer": ("lamb_default", "peer_lamb", 0.8),
    "lamb_vs_adamw": ("lamb_default", "adamw_best", 1.6),
    "lars_vs_sgd": ("lars_default", "sgd_best", 2.0),
    "lars_vs_peer": ("lars_default", "peer_lars", 0.8),
    "lookahead_overhead": ("lookahead_adamw", "adamw_foreach", 1.10),
}
GOAL_TEXT = {
    "lamb_vs_peer": "our LAMB <= 0.8x pytorch_optimizer Lamb",
    "lamb_vs_adamw": "our LAMB <= 1.6x torch's fastest eager AdamW",
    "lars_vs_sgd": "our LARS <= 2x torch's fastest eager SGD momentum",
    "lars_vs_peer": "our LARS <= 0.8x pytorch_optimizer LARS",
    "lookahead_overhead": "Lookahead(AdamW foreach) <= 1.10x AdamW foreach",
}


# -- the parameter set -------------------------------------------------------------------------------

def parameter_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("tok_emb", (VOCAB, D_MODEL)), ("pos_emb", (CONTEXT, D_MODEL))]
    for i in range(LAYERS):
        p = f"layers.{i}."
        shapes += [(p + "attn.in_proj_weight", (3 * D_MODEL, D_MODEL)), (p + "attn.in_proj_bias", (3 * D_MODEL,)),
                   (p + "attn.out_proj.weight", (D_MODEL, D_MODEL)), (p + "attn.out_proj.bias", (D_MODEL,)),
                   (p + "norm1.weight", (D_MODEL,)), (p + "norm1.bias", (D_MODEL,)),
                   (p + "ff.linear1.weight", (D_FF, D_MODEL)), (p + "ff.linear1.bias", (D_FF,)),
                   (p + "ff.linear2.weight", (D_MODEL, D_FF)), (p + "ff.linear2.bias", (D_MODEL,)),
                   (p + "norm2.weight", (D_MODEL,)), (p + "norm2.bias", (D_MODEL,))]
    shapes += [("norm.weight", (D_MODEL,)), ("norm.bias", (D_MODEL,))]
    return shapes


def make_reference() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(SEED)
    values, grads = [], []
    for name, shape in parameter_shapes():
        if "norm" in name and name.endswith("weight"):
            w = torch.ones(shape)
        elif len(shape) == 1:
            w = torch.zeros(shape)
        else:
            w = torch.randn(shape, generator=gen) * 0.02
        values.append(w)
        grads.append(torch.randn(shape, generator=gen) * 0.01)
    return values, grads


def fresh_params(ref) -> list[nn.Parameter]:
    params = []
    for w, g in zip(*ref):
        p = nn.Parameter(w.clone())
        p.grad = g.clone()
        params.append(p)
    return params


# -- contenders --------------------------------------------------------------------------------------

def contenders(lars_wd: float) -> dict[str, tuple[str, callable]]:
    sgd = dict(lr=SGD_LR, momentum=MOMENTUM, weight_decay=lars_wd)
    lars = dict(lr=SGD_LR, momentum=MOMENTUM, weight_decay=lars_wd, eta=ETA, eps=1e-8)
    c = {
        "adamw_loop": ("torch AdamW, for-loop", lambda P: torch.optim.AdamW(P, **ADAMW, foreach=False)),
        "adamw_foreach": ("torch AdamW, foreach", lambda P: torch.optim.AdamW(P, **ADAMW, foreach=True)),
        "adamw_fused": ("torch AdamW, fused", lambda P: torch.optim.AdamW(P, **ADAMW, fused=True)),
        "sgd_loop": ("torch SGD momentum, for-loop", lambda P: torch.optim.SGD(P, **sgd, foreach=False)),
        "sgd_foreach": ("torch SGD momentum, foreach", lambda P: torch.optim.SGD(P, **sgd, foreach=True)),
        "lamb_default": ("torchdojo LAMB, default", lambda P: LAMB(P, **LAMB_KW)),
        "lamb_loop": ("torchdojo LAMB, foreach=False", lambda P: LAMB(P, **LAMB_KW, foreach=False)),
        "lamb_foreach": ("torchdojo LAMB, foreach=True", lambda P: LAMB(P, **LAMB_KW, foreach=True)),
        "lars_default": ("torchdojo LARS, default", lambda P: LARS(P, **lars)),
        "lars_loop": ("torchdojo LARS, foreach=False", lambda P: LARS(P, **lars, foreach=False)),
        "lars_foreach": ("torchdojo LARS, foreach=True", lambda P: LARS(P, **lars, foreach=True)),
        "lookahead_adamw": ("torchdojo Lookahead(AdamW foreach)",
                            lambda P: Lookahead(torch.optim.AdamW(P, **ADAMW, foreach=True), k=K, alpha=0.5)),
    }
    if peer is not None:
        c.update({
            "peer_lamb": ("pytorch_optimizer Lamb", lambda P: peer.Lamb(
                P, **LAMB_KW, weight_decouple=False, rectify=False, grad_averaging=True, pre_norm=False,
                adam=False)),
            "peer_lars": ("pytorch_optimizer LARS", lambda P: peer.LARS(
                P, lr=SGD_LR, momentum=MOMENTUM, dampening=0.0, weight_decay=lars_wd, trust_coefficient=ETA,
                nesterov=False)),
            "peer_lookahead_adamw": ("pytorch_optimizer Lookahead(AdamW foreach)", lambda P: peer.Lookahead(
                torch.optim.AdamW(P, **ADAMW, foreach=True), k=K, alpha=0.5, pullback_momentum="none")),
        })
    return c


# baselines for the table: key -> (torch baseline, peer baseline)
def baselines_of(key: str) -> tuple[str | None, str | None]:
    if key.startswith("adamw_") or key == "peer_lamb":
        return "adamw_best", None
    if key.startswith("sgd_") or key == "peer_lars":
        return "sgd_best", None
    if key.startswith("lamb"):
        return "adamw_best", "peer_lamb"
    if key.startswith("lars"):
        return "sgd_best", "peer_lars"
    if key == "lookahead_adamw":
        return "adamw_foreach", "peer_lookahead_adamw"
    if key == "peer_lookahead_adamw":
        return "adamw_foreach", None
    return None, None


def rnd(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def time_block(step, steps: int) -> tuple[float, float]:
    """ms per step and minor page faults per step over one block of `steps` consecutive steps."""
    f0 = faults()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    return dt / steps * 1e3, (faults() - f0) / steps


def run_rounds(steps: dict, rounds: int, block: int) -> tuple[dict, dict]:
    """Round-robin: each round runs one block per contender, starting one contender later than the last."""
    names = list(steps)
    ms = {k: [] for k in names}
    flt = {k: [] for k in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            shift = r % len(names)
            for k in names[shift:] + names[:shift]:
                t, f = time_block(steps[k], block)
                ms[k].append(t)
                flt[k].append(f)
    finally:
        gc.enable()
    return ms, flt


def paired(ms: dict, key: str, base: str) -> float | None:
    if key not in ms or base not in ms:
        return None
    return statistics.median(a / b for a, b in zip(ms[key], ms[base]))


# -- torch.compile -----------------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # dynamo's recompile error names the failing guard on its third line
    guard = [ln[2:] for ln in lines if ln.startswith("- ") and "==" in ln][:1]
    if guard:
        return f"{type(exc).__name__}, failed guard: {guard[0]}"[:400]
    return lines[0][:400]


def compile_contender(kind: str, make, ref, warm_calls: int = 3) -> dict:
    """Compile one torchdojo optimizer's step: the whole step if dynamo traces it without recompiling, else its
    foreach math. Returns {"step", "how", "what", "compile_s", ...} or {"error", ...}."""
    import torch._dynamo as dynamo
    module = sys.modules[f"torchdojo.optim.{kind}"]
    inner_name = f"_{kind}_foreach"
    attempts = []
    params = fresh_params(ref)
    opt = make(params)
    for _ in range(2):
        opt.step()                                   # state exists: no first-step graph
    old_flag = dynamo.config.error_on_recompile
    dynamo.config.error_on_recompile = True
    try:
        # 1. the whole step, as a user would compile it. Traced by dynamo alone first: cheap, and the
        #    guards (and so the recompiles) are dynamo's, not inductor's.
        dynamo.reset()
        probe = torch.compile(lambda: opt.step(), backend="eager")
        try:
            for _ in range(3):
                probe()
            full_ok, why = True, None
        except Exception as exc:                     # noqa: BLE001 - reported, not hidden
            full_ok, why = False, _first_line(exc)
            if "['step']" in why:
                why += (" (state['step'] is a Python int that dynamo specialises into the graph, so every step "
                        "recompiles until the recompile limit, after which the step runs eagerly)")
        dynamo.reset()
        if full_ok:
            how, what = "torch.compile(lambda: opt.step())", "whole step"
            step = torch.compile(lambda: opt.step())
        else:
            attempts.append(f"compiling a function that calls opt.step() fails: {why}")
            how = f"opt.step() with {inner_name} compiled (dynamic=True); state bookkeeping eager"
            what = f"{inner_name} only"
            original = getattr(module, inner_name)
            compiled_inner = torch.compile(original, dynamic=True)

            def step():
                setattr(module, inner_name, compiled_inner)
                try:
                    opt.step()
                finally:
                    setattr(module, inner_name, original)
        t0 = time.perf_counter()
        calls = []
        try:
            for _ in range(warm_calls):
                t = time.perf_counter()
                step()
                calls.append(time.perf_counter() - t)
        except Exception as exc:                     # noqa: BLE001
            attempts.append(f"{how} fails: {_first_line(exc)}")
            return {"error": "; ".join(attempts), "how": how}
        warm_s = time.perf_counter() - t0
        steady = statistics.median(calls[1:]) if len(calls) > 1 else 0.0
        finite = all(torch.isfinite(p).all() for p in params)
        return {"step": step, "how": how, "what": what, "compile_s": warm_s - steady * len(calls), "notes": attempts,
                "finite": bool(finite)}
    finally:
        dynamo.config.error_on_recompile = old_flag


# -- driver ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (one block per contender each)")
    ap.add_argument("--block", type=int, default=K, help=f"steps per timed block (a multiple of k={K})")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads; 0 keeps torch's default (one per core). Default 1: see the docstring")
    ap.add_argument("--lars-weight-decay", type=float, default=1e-4, help="weight decay of SGD and both LARS")
    ap.add_argument("--compile", choices=("auto", "always", "never"), default="auto",
                    help="torch.compile our LAMB/LARS: when one of their eager goals is missed (auto), always, never")
    ap.add_argument("--compile-rounds", type=int, default=10, help="interleaved rounds for the compiled contenders")
    # smoke: no torch.compile, which takes about a minute here (and with `auto` would depend on noisy ratios)
    args = parse_args(ap, argv, rounds=2, compile="never")
    if args.block % K:
        ap.error(f"--block must be a multiple of Lookahead's k={K}")
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR)
    try:   # compile time is measured cold: no inductor/AOTAutograd cache hits from earlier runs
        importlib.import_module("torch._inductor.config").fx_graph_cache = False
        importlib.import_module("torch._functorch.config").enable_autograd_cache = False
    except (ImportError, AttributeError):
        pass
    started = time.perf_counter()

    ref = make_reference()
    n_tensors, n_params = len(ref[0]), sum(w.numel() for w in ref[0])
    specs = contenders(args.lars_weight_decay)
    opts, params, steps, labels, skipped = {}, {}, {}, {}, {}
    for key, (label, make) in specs.items():
        P = fresh_params(ref)
        try:
            opt = make(P)
            for _ in range(WARMUP_STEPS):
                opt.step()
        except Exception as exc:                      # noqa: BLE001 - e.g. fused AdamW on an old torch
            skipped[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        opts[key], params[key], steps[key], labels[key] = opt, P, opt.step, label

    ms, flt = run_rounds(steps, args.rounds, args.block)
    med = {k: statistics.median(v) for k, v in ms.items()}
    med_flt = {k: statistics.median(v) for k, v in flt.items()}
    finite = {k: bool(all(torch.isfinite(p).all() for p in P)) for k, P in params.items()}

    # the fastest eager baselines, per round
    def best_of(a, b):
        pick = a if med[a] <= med[b] else b
        return pick
    alias = {"adamw_best": best_of("adamw_loop", "adamw_foreach"), "sgd_best": best_of("sgd_loop", "sgd_foreach")}

    def ratio(key, base, table=ms):
        return paired(table, key, alias.get(base, base)) if base else None

    goals = {}
    for name, (key, base, limit) in GOALS.items():
        r = ratio(key, base)
        goals[name] = {"goal": GOAL_TEXT[name], "contender": key, "baseline": alias.get(base, base),
                       "limit": limit, "ratio": None if r is None else round(r, 4),
                       "met": None if r is None else r <= limit}

    # -- torch.compile of our LAMB/LARS
    # Each kind is compiled and then timed (with its eager baselines) before the next is compiled: compiling
    # the next one starts with dynamo.reset(), which drops every compiled graph.
    compile_info = {}
    want = {"lamb": any(not goals[g]["met"] for g in ("lamb_vs_peer", "lamb_vs_adamw") if goals[g]["met"] is not None),
            "lars": any(not goals[g]["met"] for g in ("lars_vs_sgd", "lars_vs_peer") if goals[g]["met"] is not None)}
    kinds = (("lamb", lambda P: LAMB(P, **LAMB_KW, foreach=True), "adamw_best", "peer_lamb"),
             ("lars", lambda P: LARS(P, lr=SGD_LR, momentum=MOMENTUM, weight_decay=args.lars_weight_decay,
                                     eta=ETA, eps=1e-8, foreach=True), "sgd_best", "peer_lars"))
    for kind, make, torch_base, peer_base in kinds if args.compile != "never" else ():
        if args.compile == "auto" and not want[kind]:
            compile_info[kind] = {"skipped": "its eager goals are met"}
            continue
        t = time.perf_counter()
        try:
            res = compile_contender(kind, make, ref)
        except Exception as exc:                      # noqa: BLE001 - reported
            res = {"error": _first_line(exc), "how": "torch.compile"}
        res["wall_s"] = time.perf_counter() - t
        compile_info[kind] = info = {k: v for k, v in res.items() if k != "step"}
        if "step" not in res:
            continue
        key = f"{kind}_compiled"
        phase2 = {key: res["step"]}
        for k in (f"{kind}_default", peer_base, alias[torch_base]):
            if k in steps:
                phase2[k] = steps[k]
        from torch._dynamo.utils import counters
        graphs_before = counters["stats"]["unique_graphs"]
        cms, cflt = run_rounds(phase2, args.compile_rounds, args.block)
        info.update({
            "median_ms": round(statistics.median(cms[key]), 3),
            "faults_per_step": statistics.median(cflt[key]),
            "eager_default_median_ms_same_rounds": round(statistics.median(cms[f"{kind}_default"]), 3),
            "ratio_vs_torch": rnd(paired(cms, key, alias[torch_base])),
            "ratio_vs_peer": rnd(paired(cms, key, peer_base)),
            "recompiled_while_timed": counters["stats"]["unique_graphs"] != graphs_before,
        })

    # -- report
    spread = max(ms[alias["adamw_best"]]) / min(ms[alias["adamw_best"]])
    noisy = spread > 1.5
    print(f"optim_speed: optimizer.step() time, torch {torch.__version__}, pytorch_optimizer {PEER_VERSION}, "
          f"{torch.get_num_threads()} intra-op thread(s) (torch's default here {default_threads}); "
          f"{platform.python_implementation()} {platform.python_version()}")
    print(f"parameters: transformer-like, {LAYERS} layers, d_model {D_MODEL}, ff {D_FF}, embeddings {VOCAB}+{CONTEXT}: "
          f"{n_tensors} tensors, {n_params:,} float32 parameters, fixed random gradients; one parameter group")
    print(f"{args.rounds} round-robin rounds of {args.block} steps per contender after {WARMUP_STEPS} warm-up steps; "
          f"medians over rounds; ratios = median of per-round paired ratios; SGD/LARS weight decay "
          f"{args.lars_weight_decay:g}")
    print()
    head = (f"{'contender':<44} {'ms/step':>8} {'min':>7} {'faults/step':>11}  {'vs torch':>8}  {'vs peer':>7}  "
            f"torch baseline")
    print(head)
    print("-" * len(head))
    for key in steps:
        tb, pb = baselines_of(key)
        rt, rp = ratio(key, tb), ratio(key, pb)
        base_label = labels.get(alias.get(tb, tb), "") if tb else ""
        print(f"{labels[key]:<44} {med[key]:8.2f} {min(ms[key]):7.2f} {med_flt[key]:11.0f}  "
              f"{fmt(rt):>8}  {fmt(rp):>7}  {base_label}")
    for key, why in skipped.items():
        print(f"{specs[key][0]:<44} skipped: {why}")
    print("-" * len(head))
    print("vs torch: LAMB and pytorch_optimizer Lamb against torch's fastest eager AdamW; LARS and pytorch_optimizer "
          "LARS against the fastest eager SGD momentum; the Lookaheads against AdamW foreach (their inner optimizer). "
          "vs peer: against pytorch_optimizer's counterpart. 'default' = foreach=None.")
    if compile_info:
        print()
        print("torch.compile (compile time excluded; timed in a second set of interleaved rounds with the baselines):")
        for kind, info in compile_info.items():
            if "skipped" in info:
                print(f"  {kind}: not compiled, {info['skipped']}")
                continue
            for note in info.get("notes", []):
                print(f"  {kind}: {note}")
            if "error" in info:
                print(f"  {kind}: COMPILE FAILED ({info['wall_s']:.0f} s): {info['error']}")
                continue
            print(f"  {kind}: {info['how']}: compile {info['compile_s']:.1f} s; {info['median_ms']:.2f} ms/step "
                  f"(eager default {info['eager_default_median_ms_same_rounds']:.2f} in the same rounds), "
                  f"{info['faults_per_step']:.0f} faults/step; vs torch {fmt(info['ratio_vs_torch'])}, "
                  f"vs peer {fmt(info['ratio_vs_peer'])}"
                  + (" (RECOMPILED while timed)" if info["recompiled_while_timed"] else ""))
    print()
    print("goals (paired median ratios):")
    for name, g in goals.items():
        verdict = "n/a" if g["met"] is None else ("yes" if g["met"] else "NO")
        shown = "-" if g["ratio"] is None else f"{g['ratio']:.3f}"
        print(f"  {g['goal']:<52} measured {shown:>6}  met: {verdict}")
        kind = name.split("_")[0]
        if kind in ("lamb", "lars") and compile_info.get(kind, {}).get("median_ms") is not None:
            info = compile_info[kind]
            r = info["ratio_vs_peer"] if name.endswith("peer") else info["ratio_vs_torch"]
            if r is not None:
                print(f"    {'compiled (' + info['what'] + ')':<50} measured {r:6.3f}  met: "
                      f"{'yes' if r <= g['limit'] else 'NO'}")
    print(f"  per-tensor paths (foreach=False): LAMB {fmt(ratio('lamb_loop', 'peer_lamb'))}x peer, "
          f"{fmt(ratio('lamb_loop', 'adamw_best'))}x AdamW; LARS {fmt(ratio('lars_loop', 'sgd_best'))}x SGD, "
          f"{fmt(ratio('lars_loop', 'peer_lars'))}x peer")
    print(f"fastest eager AdamW: {labels[alias['adamw_best']]}; fastest eager SGD: {labels[alias['sgd_best']]}; "
          f"the AdamW baseline's block times vary {spread:.2f}x across rounds"
          + (": NOISY machine, treat ratios with care" if noisy else ""))
    bad = [k for k, ok in finite.items() if not ok]
    if bad:
        print(f"WARNING: non-finite parameters after the run: {', '.join(bad)}")
    total = time.perf_counter() - started
    print(f"total {total:.0f} s")

    figures = {
        "benchmark": "optim_speed",
        "median_ms": {k: round(v, 3) for k, v in med.items()},
        "min_ms": {k: round(min(v), 3) for k, v in ms.items()},
        "faults_per_step": med_flt,
        "ratios": {k: {"vs_torch": rnd(ratio(k, baselines_of(k)[0])), "vs_peer": rnd(ratio(k, baselines_of(k)[1]))}
                   for k in steps},
        "baselines": alias,
        "goals": goals,
        "all_goals_met": all(g["met"] for g in goals.values()),
        "compiled": compile_info,
        "skipped": skipped,
        "finite": all(finite.values()),
        "noisy": noisy,
        "baseline_spread": round(spread, 3),
        "tensors": n_tensors,
        "parameters": n_params,
        "rounds": args.rounds,
        "block": args.block,
        "lars_weight_decay": args.lars_weight_decay,
        "seed": SEED,
        "torch": torch.__version__,
        "pytorch_optimizer": PEER_VERSION,
        "torchdojo": getattr(torchdojo, "__version__", "unknown"),
        "threads": torch.get_num_threads(),
        "torch_default_threads": default_threads,
        "seconds": round(total, 1),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
