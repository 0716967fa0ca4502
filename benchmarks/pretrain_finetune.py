"""Supervised pretraining and fine-tuning on MNIST-1D: does pretraining on a big, related dataset help a
small task, and which fine-tuning scheme works best?

Yosinski et al. 2014 ("How transferable are features in deep neural networks?", arXiv 1411.1792)
measured how well features learnt on one half of a dataset's classes transfer to the other half, frozen
or fine-tuned; Howard & Ruder 2018 (ULMFiT, arXiv 1801.06146) fine-tune a pretrained model with a new
head trained first, then everything with lower LRs for the pretrained layers (discriminative LRs, gradual
unfreezing). This benchmark asks the same questions at small scale with torchdojo's `init`, `freeze` and
`param_groups`.

Pretraining: the built-in recipe `mnist1d-pretrain` as shipped (cnn1d, channels [32, 64], hidden 128,
dropout 0.1, on a generated 24,000-signal MNIST-1D pool of the digits 0-4 only: about 9,000 training
signals; 15 epochs of AdamW lr 3e-3 wd 0.01, batch 128, warmup 1 epoch + cosine), once per
`--pretrain-seeds` seed (default: seed 0 only). Reported: its test accuracy (digits 0-4) and wall time.

Target task: the built-in recipe `mnist1d-finetune`: the digits 5-9 of the built-in MNIST-1D set (the
published split: 2,007 training signals, 10% of them held out for validation, 493 test signals),
relabelled 0-4, with only `data.train_size` training signals kept (stratified; default 250,
`--train-sizes 250,1000` for more). No signal of the digits 5-9 is in the pretraining pool. The same
model and batch size (32) in every arm, 50 epochs in all, AdamW with weight decay 0.01:
  (a) scratch      `init: null`, nothing frozen, one phase of 50 epochs, lr 3e-3, warmup 2 epochs + cosine
  (b) linear probe `init` = the pretrained `features.*` (the encoder; the head is new), `features` frozen
                   (and in eval mode) for all 50 epochs, only the head trains: lr 3e-3, cosine
  (c) full fine-tune `init` as (b), nothing frozen, one phase of 50 epochs, lr 1e-3 for every layer,
                   warmup 2 epochs + cosine
  (d) encoding refinement: the recipe as shipped: phase "head" (10 epochs, `features` frozen, lr 3e-3,
                   cosine), then phase "refine" (40 epochs, everything trains, lr 1e-3 with the encoder at
                   `lr_mult: 0.1`, warmup 2 epochs + cosine)
The arms were fixed before running this benchmark and are not tuned on its results. For one seed, every
arm has the same recipe seed, so the same training subset, validation split, initialisation of the
non-pretrained tensors and batch order. With several pretraining seeds, fine-tuning seed i starts from
pretraining run i mod (number of pretraining seeds).

Reported per train size and arm: test accuracy (of the final model; no early stopping or model
selection) per seed, mean and sample std over seeds; and, per arm, the paired difference to (a) scratch
seed by seed and its mean. Verdicts use `_stats.verdict` on the per-seed differences: "holds" when the arm
is better on every seed, "mixed" when better on average only, "does not hold" when not better on average.
With 493 test signals, one test signal is 0.002 accuracy. When this script was written (3 seeds, one
pretraining run), all three pretrained arms beat scratch on every seed at train_size 250 (full fine-tuning
most, +0.05), none did at 1000, and the shipped refinement recipe (d) never beat full fine-tuning (c).

Every run goes through `torchdojo.Trainer`, quiet; the pretraining runs are written to a run directory
(the fine-tuning runs read their final weights from it), the fine-tuning runs too (for `init.json`).
Torch runs with ONE intra-op thread by default (`--threads 0` keeps torch's default).

Run: .venv/bin/python benchmarks/pretrain_finetune.py [--seeds 3] [--train-sizes 250,1000]
     [--pretrain-seeds 0] [--out DIR]
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

from torchdojo.recipe import load_recipe, read_recipe_source
from torchdojo.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stats import (add_threads_option, apply_threads, mean, parse_args, parse_ints, print_json_line, r4,  # noqa: E402
                    sized, std, verdict)

PRETRAIN, FINETUNE = "mnist1d-pretrain", "mnist1d-finetune"
EPOCHS = 50
OPT = {"name": "adamw", "weight_decay": 0.01}
ARMS = {
    "scratch": "(a) scratch",
    "linear_probe": "(b) linear probe",
    "full_finetune": "(c) full fine-tune",
    "refine": "(d) encoding refinement",
}


# -- recipes -----------------------------------------------------------------------------------------

def pretrain_recipe(seed: int) -> dict:
    raw = copy.deepcopy(read_recipe_source(PRETRAIN)[0])
    raw["seed"] = seed
    raw["device"] = "cpu"
    return raw


def finetune_recipe(arm: str, seed: int, train_size: int, pretrained: Path) -> dict:
    """The shipped fine-tuning recipe with this seed, train size and pretrained run; arms (a)-(c)
    replace its phases (same batch size and total epochs)."""
    raw = copy.deepcopy(read_recipe_source(FINETUNE)[0])
    raw["name"] = f"{raw['name']}-{arm}"
    raw["seed"] = seed
    raw["device"] = "cpu"
    raw["data"]["train_size"] = train_size
    raw["checkpoint"] = {"every_epochs": None}
    batch_size = raw["phases"][0]["batch_size"]
    assert sum(p["epochs"] for p in raw["phases"]) == EPOCHS, "the shipped recipe no longer has 50 epochs"
    if arm == "scratch":
        raw["init"] = None
        raw["phases"] = [{"name": "main", "epochs": EPOCHS, "batch_size": batch_size,
                          "optimizer": {**OPT, "lr": 3e-3},
                          "schedule": [{"name": "warmup", "epochs": 2}, {"name": "cosine"}]}]
        return raw
    raw["init"]["run"] = str(pretrained)
    if arm == "linear_probe":
        raw["phases"] = [{"name": "head", "epochs": EPOCHS, "batch_size": batch_size, "freeze": ["features"],
                          "optimizer": {**OPT, "lr": 3e-3}, "schedule": [{"name": "cosine"}]}]
    elif arm == "full_finetune":
        raw["phases"] = [{"name": "main", "epochs": EPOCHS, "batch_size": batch_size,
                          "optimizer": {**OPT, "lr": 1e-3},
                          "schedule": [{"name": "warmup", "epochs": 2}, {"name": "cosine"}]}]
    else:
        assert arm == "refine", arm
    return raw


# -- running -----------------------------------------------------------------------------------------

def run(recipe_dict: dict, run_dir: Path) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    summary = Trainer(load_recipe(sized(recipe_dict)), run_dir, quiet=True).fit()
    m = summary["metrics"]
    out = {"test_accuracy": m["test/accuracy"], "test_nll": m["test/nll"], "val_accuracy": m.get("val/accuracy"),
           "seconds": time.perf_counter() - t0, "steps": summary["steps"]}
    init = run_dir / "init.json"
    out["init_loaded"] = len(json.loads(init.read_text())["loaded"]) if init.is_file() else 0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds 0..N-1 (default 3)")
    ap.add_argument("--train-sizes", type=parse_ints, default=[250, 1000],
                    help="comma-separated training-set sizes of the target task (default 250,1000)")
    ap.add_argument("--pretrain-seeds", type=parse_ints, default=[0],
                    help="comma-separated seeds of the pretraining runs (default 0)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder, removed at the end)")
    add_threads_option(ap)
    # smoke: train sizes within the ~360 training signals of the target digits in smoke-sized data
    args = parse_args(ap, argv, seeds=1, train_sizes=[100, 200])
    if "scratch" not in args.arms:
        ap.error("--arms must include scratch (the baseline)")
    if args.seeds < 1 or not args.train_sizes or not args.pretrain_seeds:
        ap.error("need at least one seed, train size and pretraining seed")
    args.train_sizes = sorted(set(args.train_sizes))
    default_threads = apply_threads(args)
    seeds = list(range(args.seeds))
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    t_start = time.perf_counter()

    # -- pretraining ------------------------------------------------------------------------------------
    pre = {}
    for ps in args.pretrain_seeds:
        pre[ps] = run(pretrain_recipe(ps), root / "pretrain" / f"seed{ps}")
        print(f"pretrain seed {ps}: test accuracy {pre[ps]['test_accuracy']:.4f} in {pre[ps]['seconds']:.1f} s",
              file=sys.stderr)

    # -- fine-tuning ------------------------------------------------------------------------------------
    res: dict[int, dict[str, dict[int, dict]]] = {}
    for size in args.train_sizes:
        res[size] = {arm: {} for arm in args.arms}
        for seed in seeds:
            ps = args.pretrain_seeds[seed % len(args.pretrain_seeds)]
            for arm in args.arms:
                r = run(finetune_recipe(arm, seed, size, root / "pretrain" / f"seed{ps}"),
                        root / "finetune" / f"n{size}" / arm / f"seed{seed}")
                r["pretrain_seed"] = None if arm == "scratch" else ps
                assert (r["init_loaded"] > 0) == (arm != "scratch"), (arm, r["init_loaded"])
                res[size][arm][seed] = r
                print(f"n={size} seed {seed} {arm}: test accuracy {r['test_accuracy']:.4f} "
                      f"({r['seconds']:.1f} s)", file=sys.stderr)
    total_seconds = time.perf_counter() - t_start
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)

    # -- report -----------------------------------------------------------------------------------------
    print(f"pretrain_finetune: supervised pretraining then fine-tuning on MNIST-1D (torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op thread(s), torch's default here {default_threads}; "
          f"{platform.python_implementation()} {platform.python_version()}); fine-tuning seeds {seeds}")
    print()
    print(f"Pretraining ('{PRETRAIN}': cnn1d on 24,000 generated MNIST-1D signals of the digits 0-4, 15 epochs):")
    for ps, r in pre.items():
        print(f"  seed {ps}: test accuracy (digits 0-4) {r['test_accuracy']:.4f}, {r['steps']} steps, "
              f"{r['seconds']:.1f} s")
    loaded = {r["init_loaded"] for size in res for arm in res[size] if arm != "scratch"
              for r in res[size][arm].values()}
    print(f"  fine-tuning arms (b)-(d) load {', '.join(map(str, sorted(loaded)))} tensors (`features.*`, "
          f"BatchNorm statistics included); the head is new")
    print()
    print(f"Target task ('{FINETUNE}'): digits 5-9 of the built-in MNIST-1D set, train_size signals, "
          f"{EPOCHS} epochs in every arm, batch 32; test accuracy of the final model")
    claims = {}
    figures_sizes = {}
    for size in args.train_sizes:
        arms = res[size]
        steps = arms["scratch"][seeds[0]]["steps"]
        print()
        print(f"train_size {size} ({steps} steps per run)")
        head = (f"{'arm':<26}  " + "  ".join(f"{'acc s' + str(s):>8}" for s in seeds)
                + f"  {'mean':>7}  {'std':>6}  {'- (a) per seed':>{max(14, 8 * len(seeds))}}  {'mean diff':>9}"
                + f"  {'wall s':>6}")
        print(head)
        print("-" * len(head))
        fig = {}
        for arm in args.arms:
            acc = [arms[arm][s]["test_accuracy"] for s in seeds]
            diffs = [arms[arm][s]["test_accuracy"] - arms["scratch"][s]["test_accuracy"] for s in seeds]
            wall = [arms[arm][s]["seconds"] for s in seeds]
            per_seed = " ".join(f"{d:+.3f}" for d in diffs) if arm != "scratch" else "-"
            md = f"{mean(diffs):+9.4f}" if arm != "scratch" else f"{'-':>9}"
            print(f"{ARMS[arm]:<26}  " + "  ".join(f"{a:8.4f}" for a in acc)
                  + f"  {mean(acc):7.4f}  {std(acc):6.4f}  {per_seed:>{max(14, 8 * len(seeds))}}  {md}"
                  + f"  {mean(wall):6.1f}")
            fig[arm] = {"test_accuracy": [r4(a) for a in acc], "test_accuracy_mean": r4(mean(acc)),
                        "test_accuracy_std": r4(std(acc)),
                        "test_nll_mean": r4(mean(arms[arm][s]["test_nll"] for s in seeds)),
                        "wall_seconds_mean": round(mean(wall), 2)}
            if arm != "scratch":
                fig[arm]["minus_scratch"] = [r4(d) for d in diffs]
                fig[arm]["minus_scratch_mean"] = r4(mean(diffs))
                fig[arm]["vs_scratch"] = verdict(diffs)
        print("-" * len(head))
        fig["steps"] = steps
        figures_sizes[str(size)] = fig

        # verdicts, one line per claim
        def line(claim: str, a: str, b: str) -> None:
            if a not in arms or b not in arms:
                return
            diffs = [arms[a][s]["test_accuracy"] - arms[b][s]["test_accuracy"] for s in seeds]
            v = verdict(diffs)
            wins = sum(d > 0 for d in diffs)
            print(f"  {claim}: {ARMS[a][:3]} - {ARMS[b][:3]} = {mean(diffs):+.3f} "
                  f"(better on {wins}/{len(diffs)} seeds) -> {v.upper()}")
            claims.setdefault(str(size), {})[f"{a}_vs_{b}"] = {"mean_diff": r4(mean(diffs)), "verdict": v}

        line("pretraining helps the small task", "refine", "scratch")
        line("frozen pretrained features alone beat scratch", "linear_probe", "scratch")
        line("full fine-tuning beats scratch", "full_finetune", "scratch")
        line("refinement (frozen head phase + encoder at 0.1 LR) beats full fine-tuning", "refine", "full_finetune")
        line("refinement beats the linear probe (adapting the encoder helps)", "refine", "linear_probe")
        best = max(args.arms, key=lambda a: mean(arms[a][s]["test_accuracy"] for s in seeds))
        print(f"  best arm by mean test accuracy: {ARMS[best]}")
        fig["best_arm"] = best

    if len(args.train_sizes) > 1 and "refine" in args.arms:
        gains = {size: mean(res[size]["refine"][s]["test_accuracy"] - res[size]["scratch"][s]["test_accuracy"]
                            for s in seeds) for size in args.train_sizes}
        print()
        print("gain of (d) over (a) by train size: " + ", ".join(f"{n}: {g:+.3f}" for n, g in gains.items())
              + (" (the gain shrinks with more target data)" if gains[args.train_sizes[0]] > gains[args.train_sizes[-1]]
                 else " (the gain does not shrink with more target data)"))
    print()
    print(f"total {total_seconds:.0f} s")
    figures = {
        "benchmark": "pretrain_finetune",
        "seeds": seeds,
        "pretrain_seeds": args.pretrain_seeds,
        "train_sizes": args.train_sizes,
        "epochs": EPOCHS,
        "pretrain": {str(ps): {"test_accuracy": r4(r["test_accuracy"]), "seconds": round(r["seconds"], 1),
                               "steps": r["steps"]} for ps, r in pre.items()},
        "finetune": figures_sizes,
        "claims": claims,
    }
    return print_json_line(figures, total_seconds, default_threads)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
