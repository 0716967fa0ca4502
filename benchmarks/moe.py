"""Mixture of experts on MNIST-1D: what does a switch (top-1) mixture of experts do compared with a dense
MLP of the same per-row compute, and does the load-balancing loss keep the experts in use?

Switch Transformers (Fedus, Zoph & Shazeer 2021, arXiv 2101.03961): each row goes to the one expert its
router ranks first, scaled by the router probability; an expert takes at most ceil(capacity_factor ·
rows / experts) rows per call and the rows beyond it pass through the residual unchanged; the auxiliary
load-balancing loss experts · Σ_i f_i · P_i (1 when routing is uniform), weighted 0.01 in the paper,
keeps the router from collapsing onto few experts. torchdojo's model `moe_mlp`
(src/torchdojo/models/switch.py) and method `load_balance` (src/torchdojo/methods/load_balance.py).

Setup: the built-in MNIST-1D set (Greydanus 2020, arXiv 2011.14439; 3,600 training signals, 400
validation, 1,000 test: one test signal is 0.001 accuracy), flattened. Every arm is `moe_mlp` width 64,
blocks 2 (residual x + SwitchFFN(LayerNorm(x))), expert_hidden 128, capacity_factor 1.25, dropout 0.1;
30 epochs of batch 64, AdamW lr 3e-3 wd 0.01, warmup 1 epoch + cosine. The arms (fixed before running
this benchmark, not tuned on its results):
  (a) dense          experts 1: one expert per block, the router trivial (gate 1, nothing dropped): a
                     plain residual MLP with exactly the per-row compute and shape of each expert below
  (b) 4 experts      experts 4, `load_balance` weight 0.0 (no balance loss; there only to log usage)
  (c) 4 experts + LB experts 4, `load_balance` weight 0.01 (the paper's)
  (d) 8 experts + LB experts 8, `load_balance` weight 0.01
For one seed every arm has the same recipe seed (same validation split and batch order). Checkpoints and
TensorBoard files are switched off (they do not change the training).

Reported per arm: test accuracy of the final model (no early stopping) per seed, mean and sample std over
seeds, the paired per-seed difference to (a) with `_stats.verdict` ("holds" when better on every seed,
"mixed" when better on average only, "does not hold" when not better on average); the total parameter
count and the parameters a row actually uses (stem, norms, routers, ONE expert per block, head), with the
expert part of it; from metrics.jsonl the last logged `train/moe_max_share` (largest share of a
training batch's rows any expert of any layer got as first choice; 1/experts when balanced) and
`train/moe_balance` divided by the number of blocks (the per-layer balance loss, 1.0 when balanced),
plus the mean of the last 10 logs of each; the final model's routing of the 1,000 test signals in one
eval batch (largest expert share and share of rows dropped by the capacity limit, per layer, worst
layer); and the mean wall time per run and its ratio to (a).

Note that `moe_mlp` loops over experts in Python and indexes rows per expert, so on a CPU the wall times
measure this implementation's overhead as much as the compute; the FLOPs per row are the same in every
arm (plus a router of 64 · experts per block).

When this script was written (seeds 0-2, 30 epochs = 1680 steps): dense 0.641 mean test accuracy; 4
experts without the balance loss 0.625 (-0.016, worse on every seed), with it 0.632 (-0.009), 8 experts
with it 0.627 (-0.014). No mixture beat the dense MLP at this scale (3,600 rows: the extra 100k-230k
expert parameters bring no gain; every arm overfits, test NLL ~2). The balance loss did its job: the
largest expert share over the last 10 logs went from 0.455 (no loss; balanced 0.25) to 0.334, with 8
experts 0.230 (balanced 0.125), and it beat (b) on every seed (+0.007). A first run, with the training
capacity limit applied at evaluation too, dropped up to 26% of the test rows of a layer without the
balance loss (-0.018 then); SwitchFFN has since no limit in eval mode by default, so `test dropped`
is 0. Wall time per run 1.4x (4 experts) and 2.1x (8 experts) the dense one on one CPU thread (the
per-expert Python loop). About 1 minute on one thread.

Every run goes through `torchdojo.Trainer`, quiet, into a temporary run directory. Torch runs with ONE
intra-op thread by default (`--threads 0` keeps torch's default).

Run: .venv/bin/python benchmarks/moe.py [--seeds 0,1,2] [--epochs 30] [--arms dense moe4 moe4_lb moe8_lb]
     [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from torchdojo import Trainer, load_recipe
from torchdojo.data.bundle import load_data
from torchdojo.models.switch import SwitchFFN

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stats import (add_threads_option, apply_threads, cell, mean, paired_claim, parse_args, parse_ints,  # noqa: E402
                    print_json_line, r4, sized, sized_data, std, verdict)

WIDTH, BLOCKS, HIDDEN, CAPACITY, DROPOUT = 64, 2, 128, 1.25, 0.1
BATCH = 64
ARMS = {   # name: (label, experts, load_balance weight or None)
    "dense": ("(a) dense (1 expert)", 1, None),
    "moe4": ("(b) 4 experts, no LB", 4, 0.0),
    "moe4_lb": ("(c) 4 experts + LB 0.01", 4, 0.01),
    "moe8_lb": ("(d) 8 experts + LB 0.01", 8, 0.01),
}
BASE = {
    "checkpoint": {"every_epochs": None},
    "log": {"tensorboard": False},
}


def recipe(arm: str, seed: int, epochs: float) -> dict:
    _, experts, lb = ARMS[arm]
    raw = copy.deepcopy(BASE)
    raw.update(name=f"moe-{arm}", seed=seed, device="cpu")
    raw["data"] = {"name": "mnist1d"}
    raw["task"] = {"name": "classify"}
    raw["model"] = {"name": "moe_mlp", "width": WIDTH, "blocks": BLOCKS, "experts": experts,
                    "expert_hidden": HIDDEN, "capacity_factor": CAPACITY, "dropout": DROPOUT}
    if lb is not None:
        raw["methods"] = [{"name": "load_balance", "weight": lb}]
    raw["phases"] = [{"name": "main", "epochs": epochs, "batch_size": BATCH,
                      "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
                      "schedule": [{"name": "warmup", "epochs": 1}, {"name": "cosine"}]}]
    return raw


# -- running -----------------------------------------------------------------------------------------

def param_counts(model: torch.nn.Module) -> dict:
    """Total parameters, and those one row uses: everything but the experts it is not routed to."""
    total = sum(p.numel() for p in model.parameters())
    expert_total, expert_active = 0, 0
    for m in model.modules():
        if isinstance(m, SwitchFFN):
            n = sum(p.numel() for p in (m.w1, m.b1, m.w2, m.b2))
            expert_total += n
            expert_active += n // m.experts
    return {"total": total, "active": total - expert_total + expert_active, "active_expert": expert_active}


def test_routing(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """Route the test rows through the final model in one eval batch (as the trainer's eval, batch 1024):
    the largest expert share and the share of rows dropped by the capacity limit, worst layer."""
    model.eval()
    with torch.no_grad():
        model(x)
    shares, dropped = [], []
    for m in model.modules():
        if isinstance(m, SwitchFFN):
            counts = (m.usage * len(x)).round()
            shares.append(float(m.usage.max()))
            dropped.append(float((counts - m.capacity(len(x))).clamp(min=0).sum()) / len(x))
    return {"test_max_share": max(shares), "test_dropped": max(dropped)}


def run(recipe_dict: dict, run_dir: Path, test_x: torch.Tensor) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    trainer = Trainer(load_recipe(sized(recipe_dict)), run_dir, quiet=True)
    summary = trainer.fit()
    seconds = time.perf_counter() - t0
    m = summary["metrics"]
    out = {"test_accuracy": m["test/accuracy"], "test_nll": m["test/nll"], "seconds": seconds,
           "steps": summary["steps"]}
    out["sizes"] = json.loads((run_dir / "data_info.json").read_text())["sizes"]
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    share = [r["train/moe_max_share"] for r in logs if "train/moe_max_share" in r]
    bal = [r["train/moe_balance"] / BLOCKS for r in logs if "train/moe_balance" in r]
    if share:
        out.update(max_share_last=share[-1], max_share_last10=mean(share[-10:]),
                   balance_last=bal[-1], balance_last10=mean(bal[-10:]), logged=len(share))
    model = trainer.state.model
    out["params"] = param_counts(model)
    out.update(test_routing(model, test_x.to(trainer.device)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=parse_ints, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--epochs", type=float, default=30, help="training epochs of every run (default 30)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms to run (default all)")
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder, removed at the end)")
    add_threads_option(ap)
    args = parse_args(ap, argv, seeds=[0], epochs=2)
    if "dense" not in args.arms:
        ap.error("--arms must include dense (the baseline)")
    if not args.seeds or args.epochs <= 1:
        ap.error("need at least one seed and more than one epoch (the warmup is one epoch)")
    arms = [a for a in ARMS if a in args.arms]
    seeds = args.seeds
    default_threads = apply_threads(args)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-moe-"))
    t_start = time.perf_counter()

    res: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for seed in seeds:
        test_x = load_data(sized_data({"name": "mnist1d"}), seed).test.x
        for arm in arms:
            r = run(recipe(arm, seed, args.epochs), root / arm / f"seed{seed}", test_x)
            assert (ARMS[arm][2] is not None) == ("max_share_last" in r), arm
            res[arm][seed] = r
            print(f"seed {seed} {arm}: test accuracy {r['test_accuracy']:.4f} ({r['seconds']:.1f} s)", file=sys.stderr)
    total_seconds = time.perf_counter() - t_start
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)

    # -- report -----------------------------------------------------------------------------------------
    s0 = seeds[0]
    sizes = res["dense"][s0]["sizes"]
    steps = res["dense"][s0]["steps"]
    print(f"moe: switch mixture of experts vs dense on MNIST-1D (torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op thread(s), torch's default here {default_threads}; "
          f"{platform.python_implementation()} {platform.python_version()}); seeds {seeds}")
    print()
    print(f"{sizes['train']} training signals, {sizes['val']} validation, {sizes['test']} test "
          f"(1 test signal = {1 / sizes['test']:.3f}); moe_mlp width {WIDTH}, blocks {BLOCKS}, expert_hidden "
          f"{HIDDEN}, capacity_factor {CAPACITY}, dropout {DROPOUT}; {args.epochs:g} epochs of batch {BATCH} "
          f"({steps} steps); AdamW lr 3e-3 wd 0.01, warmup 1 epoch + cosine")
    print()
    w = max(14, 8 * len(seeds))
    head = (f"{'arm':<25}  " + "  ".join(f"{'acc s' + str(s):>8}" for s in seeds)
            + f"  {'mean':>7}  {'std':>6}  {'- (a) per seed':>{w}}  {'mean diff':>9}  {'verdict':>13}")
    print("Test accuracy of the final model")
    print(head)
    print("-" * len(head))
    fig: dict[str, dict] = {}
    base_wall = mean(res["dense"][s]["seconds"] for s in seeds)
    for arm in arms:
        acc = [res[arm][s]["test_accuracy"] for s in seeds]
        diffs = [res[arm][s]["test_accuracy"] - res["dense"][s]["test_accuracy"] for s in seeds]
        wall = mean(res[arm][s]["seconds"] for s in seeds)
        p = res[arm][s0]["params"]
        f = {"experts": ARMS[arm][1], "load_balance_weight": ARMS[arm][2],
             "test_accuracy": [r4(a) for a in acc], "test_accuracy_mean": r4(mean(acc)),
             "test_accuracy_std": r4(std(acc)),
             "test_nll_mean": r4(mean(res[arm][s]["test_nll"] for s in seeds)),
             "params_total": p["total"], "params_active_per_row": p["active"],
             "expert_params_active_per_row": p["active_expert"],
             "wall_seconds_mean": round(wall, 2), "wall_ratio_to_dense": round(wall / base_wall, 2),
             "test_max_share": [r4(res[arm][s]["test_max_share"]) for s in seeds],
             "test_dropped": [r4(res[arm][s]["test_dropped"]) for s in seeds]}
        if arm == "dense":
            per_seed, md, v = "-", f"{'-':>9}", "-"
        else:
            v = verdict(diffs)
            per_seed, md = " ".join(f"{d:+.3f}" for d in diffs), f"{mean(diffs):+9.4f}"
            f.update(minus_dense=[r4(d) for d in diffs], minus_dense_mean=r4(mean(diffs)), vs_dense=v)
        if "max_share_last" in res[arm][s0]:
            f.update(max_share_last=[r4(res[arm][s]["max_share_last"]) for s in seeds],
                     balance_per_layer_last=[r4(res[arm][s]["balance_last"]) for s in seeds],
                     max_share_last10_mean=r4(mean(res[arm][s]["max_share_last10"] for s in seeds)),
                     balance_per_layer_last10_mean=r4(mean(res[arm][s]["balance_last10"] for s in seeds)))
        print(f"{ARMS[arm][0]:<25}  " + "  ".join(f"{a:8.4f}" for a in acc)
              + f"  {mean(acc):7.4f}  {std(acc):6.4f}  {per_seed:>{w}}  {md}  {v.upper():>13}")
        fig[arm] = f
    print("-" * len(head))
    print()

    print("Parameters and wall time (mean per run; `active/row`: what one row uses, stem + norms + routers "
          "+ one expert per block + head)")
    head2 = f"{'arm':<25}  {'total':>7}  {'active/row':>10}  {'of it experts':>13}  {'wall s':>6}  {'x dense':>7}"
    print(head2)
    print("-" * len(head2))
    for arm in arms:
        f = fig[arm]
        print(f"{ARMS[arm][0]:<25}  {f['params_total']:>7}  {f['params_active_per_row']:>10}  "
              f"{f['expert_params_active_per_row']:>13}  {f['wall_seconds_mean']:6.1f}  {f['wall_ratio_to_dense']:7.2f}")
    print("-" * len(head2))
    print()

    print(f"Expert use. Training (metrics.jsonl, last logged step of {steps}; mean of the last 10 logs): "
          f"`train/moe_max_share` (largest share of a batch's rows any expert of any layer got; balanced = "
          f"1/experts) and `train/moe_balance` / {BLOCKS} layers (balanced = 1.0, collapsed = experts). "
          f"Test: the final model on the {sizes['test']} test signals in one batch, worst layer: largest "
          f"expert share and share of rows dropped by the capacity limit ({CAPACITY} x rows / experts).")
    head3 = (f"{'arm':<25}  {'seed':>4}  {'max share':>9}  {'last10':>6}  {'balance':>7}  {'last10':>6}  "
             f"{'test max share':>14}  {'test dropped':>12}")
    print(head3)
    print("-" * len(head3))
    for arm in arms:
        for s in seeds:
            r = res[arm][s]
            print(f"{ARMS[arm][0]:<25}  {s:>4}  {cell(r.get('max_share_last'), 9)}  {cell(r.get('max_share_last10'), 6)}  "
                  f"{cell(r.get('balance_last'), 7)}  {cell(r.get('balance_last10'), 6)}  "
                  f"{r['test_max_share']:14.3f}  {r['test_dropped']:12.3f}")
    print("-" * len(head3))
    print("  ((a) has one expert: its share is 1 and nothing is dropped by construction; no load_balance logged)")
    print()

    claims = {}

    def line(claim: str, a: str, b: str) -> None:
        if a not in res or b not in res:
            return
        diffs = [res[a][s]["test_accuracy"] - res[b][s]["test_accuracy"] for s in seeds]
        claims[f"{a}_vs_{b}"] = paired_claim(claim, ARMS[a][0][:3], ARMS[b][0][:3], diffs)

    print("Verdicts (test accuracy, paired per seed):")
    line("4 experts (no LB) beat dense", "moe4", "dense")
    line("4 experts + LB beat dense", "moe4_lb", "dense")
    line("8 experts + LB beat dense", "moe8_lb", "dense")
    line("the balance loss helps 4 experts", "moe4_lb", "moe4")
    line("8 experts beat 4 (both with LB)", "moe8_lb", "moe4_lb")
    if "moe4" in arms and "moe4_lb" in arms:
        no, lb = (mean(res[a][s]["max_share_last10"] for s in seeds) for a in ("moe4", "moe4_lb"))
        print(f"  expert use, 4 experts (mean last-10 max share; balanced 0.25): no LB {no:.3f}, LB {lb:.3f}")
        claims["balance_lowers_max_share"] = {"no_lb": r4(no), "lb": r4(lb), "holds": lb < no}
    best = max(arms, key=lambda a: mean(res[a][s]["test_accuracy"] for s in seeds))
    print(f"  best arm by mean test accuracy: {ARMS[best][0]}")
    print()
    print(f"total {total_seconds:.0f} s")
    figures = {
        "benchmark": "moe",
        "seeds": seeds,
        "epochs": args.epochs,
        "steps": steps,
        "arms": fig,
        "claims": claims,
        "best_arm": best,
    }
    return print_json_line(figures, total_seconds, default_threads)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
