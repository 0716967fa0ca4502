"""Focal loss and class-weighted cross-entropy under class imbalance: do they beat plain cross-entropy?

The claim checked (Lin et al. 2017, "Focal Loss for Dense Object Detection", arXiv 1708.02002): under
class imbalance, the focal loss -(1 - p_y)^gamma log p_y, which down-weights the examples the model
already gets right, trains a better classifier than plain cross-entropy. The paper's setting is dense
detection (about 1:1000 foreground:background); here it is checked on two small long-tailed
classification sets built with `data.imbalance` (docs/imbalance.md):

  mnist1d  `data: {name: mnist1d, imbalance: {ratio: 20}}`, model `cnn1d` with its defaults. The published
           4,000/1,000 train/test split, 10% of the training rows held out for validation; classes 5-9
           (the default minority, class ids >= K // 2) keep 1/20 of their training rows (about 18 each
           against about 360 for classes 0-4).
  digits   `data: {name: digits, imbalance: {ratio: 20}}`, model `cnn` with its defaults. scikit-learn's
           8x8 digits split 70/10/20 train/val/test; classes 5-9 keep 6 training rows each against about
           125 for classes 0-4.

Val and test keep every row (balanced), so test macro-F1 and per-class recall measure how the rare
classes fare. The split (and which minority rows are kept) follows `split_seed`, left at its default,
the recipe's seed: each seed is a different draw of the imbalanced training set (and, for digits, of
the test rows); the arms of one seed share it, so differences are paired by seed.

Arms, identical in everything but the loss (same data, model, seed, batch 64, AdamW lr 3e-3 weight decay
0.01, one warmup epoch then cosine to 0.05 of the peak, the same epochs per dataset, no tuning per arm):
  ce          `losses: [{name: cross_entropy}]` (the baseline)
  focal g1    `losses: [{name: focal, gamma: 1}]`
  focal g2    `losses: [{name: focal, gamma: 2}]` (the paper's gamma; no alpha, so no class weighting)
  ce balanced `losses: [{name: cross_entropy, class_weights: balanced}]` (weights n / (K n_c))

Reported per dataset and arm, mean and sample std over seeds of: test macro-F1 (`test/f1_macro`), the
mean recall of the minority classes (mean of `test/recall/<c>` over c in 5-9), the worst-class recall
(`test/recall_min`), plus test accuracy and majority-class recall for context; then each arm minus ce,
paired by seed. The verdict for an arm on a metric follows the house rule: "holds" when the arm beats ce
on every seed, "does not hold" when the mean difference is <= 0, "mixed" otherwise. The verdict on the
claim for an arm, from macro-F1 over both datasets: "holds" when it holds on both, "does not hold" when
it does not hold on either, "mixed" otherwise. Three seeds are little: read a mean difference smaller
than the spread of the per-seed differences as "no clear effect" whatever the label says.

Every run goes through `torchdojo.Trainer` without a run directory (nothing written to disk), quiet, with
validation every epoch (the recipe default; nothing is selected on it). Torch runs with ONE intra-op
thread by default (`--threads 0` keeps torch's default). The default epochs (30 for mnist1d, 40 for
digits) keep the 24 runs to about 90 s of CPU time on a 2-core machine (150 s wall when written, with
the test suite running alongside); each mnist1d run also regenerates the data set (about 1.5 s).

Run: .venv/bin/python benchmarks/focal_imbalance.py [--seeds 0 1 2] [--epochs-mnist1d 30] [--epochs-digits 40]
"""
from __future__ import annotations

import argparse
import json
import platform
import os
import sys
import time

import torch

from torchdojo.recipe import load_recipe
from torchdojo.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stats import (add_threads_option, apply_threads, mean, parse_args, r4, run_figures, sized, std,  # noqa: E402
                    verdict)

RATIO = 20
BATCH_SIZE = 64
LR, WEIGHT_DECAY, MIN_FACTOR = 3e-3, 0.01, 0.05
NUM_CLASSES = 10
MINORITY = list(range(NUM_CLASSES // 2, NUM_CLASSES))     # the `imbalance` default: class ids >= K // 2
MAJORITY = [c for c in range(NUM_CLASSES) if c not in MINORITY]

DATASETS = {"mnist1d": "cnn1d", "digits": "cnn"}
ARMS = {
    "ce": {"name": "cross_entropy"},
    "focal_g1": {"name": "focal", "gamma": 1},
    "focal_g2": {"name": "focal", "gamma": 2},
    "ce_balanced": {"name": "cross_entropy", "class_weights": "balanced"},
}
LABELS = {"ce": "ce", "focal_g1": "focal g1", "focal_g2": "focal g2", "ce_balanced": "ce balanced"}
METRICS = [("f1_macro", "macro-F1"), ("minority_recall", "minor rec"), ("recall_min", "recall min"),
           ("accuracy", "accuracy"), ("majority_recall", "major rec")]
CLAIM_METRICS = ("f1_macro", "minority_recall", "recall_min")


# -- recipes -----------------------------------------------------------------------------------------

def recipe(dataset: str, arm: str, epochs: int, seed: int) -> dict:
    return {
        "name": f"bench-imbalance-{dataset}-{arm}",
        "seed": seed,
        "device": "cpu",
        "data": {"name": dataset, "imbalance": {"ratio": RATIO}},
        "model": {"name": DATASETS[dataset]},
        "task": {"name": "classify"},
        "phases": [{"name": "main", "epochs": epochs, "batch_size": BATCH_SIZE,
                    "optimizer": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY},
                    "schedule": [{"name": "warmup", "epochs": 1}, {"name": "cosine", "min_factor": MIN_FACTOR}],
                    "losses": [dict(ARMS[arm])]}],
        "checkpoint": {"every_epochs": None},
    }


# -- running -----------------------------------------------------------------------------------------

def run(recipe_dict: dict) -> tuple[dict, Trainer, float]:
    t0 = time.perf_counter()
    trainer = Trainer(load_recipe(sized(recipe_dict)), None, quiet=True)
    summary = trainer.fit()
    return summary, trainer, time.perf_counter() - t0


def result(summary: dict, trainer: Trainer, seconds: float) -> dict:
    m = summary["metrics"]
    recall = [m[f"test/recall/{c}"] for c in range(NUM_CLASSES)]
    counts = trainer.state.data.train.y.cpu().bincount(minlength=NUM_CLASSES).tolist()
    return {"f1_macro": m["test/f1_macro"], "accuracy": m["test/accuracy"], "recall_min": m["test/recall_min"],
            "minority_recall": mean(recall[c] for c in MINORITY),
            "majority_recall": mean(recall[c] for c in MAJORITY),
            "recall": recall, "nll": m["test/nll"], "train_class_counts": counts,
            "wall_seconds": summary["wall_seconds"], "seconds": seconds, "steps": summary["steps"]}


def combine(verdicts: list[str]) -> str:
    if all(v == "holds" for v in verdicts):
        return "holds"
    if all(v == "does not hold" for v in verdicts):
        return "does not hold"
    return "mixed"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs-mnist1d", type=int, default=30, help="epochs of every mnist1d run (29 steps each)")
    ap.add_argument("--epochs-digits", type=int, default=40, help="epochs of every digits run (about 10 steps each)")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    add_threads_option(ap)
    args = parse_args(ap, argv, seeds=[0], epochs_mnist1d=1, epochs_digits=1)
    default_threads = apply_threads(args)
    t_start = time.perf_counter()
    seeds = args.seeds
    epochs = {"mnist1d": args.epochs_mnist1d, "digits": args.epochs_digits}

    res: dict[str, dict[str, dict[int, dict]]] = {}
    for ds in args.datasets:
        res[ds] = {}
        for arm in ARMS:
            res[ds][arm] = {}
            for seed in seeds:
                summary, trainer, secs = run(recipe(ds, arm, epochs[ds], seed))
                res[ds][arm][seed] = result(summary, trainer, secs)
    total_seconds = time.perf_counter() - t_start

    # -- report -----------------------------------------------------------------------------------------
    print(f"focal_imbalance: focal loss and class weights vs cross-entropy under class imbalance (torch "
          f"{torch.__version__}, {torch.get_num_threads()} intra-op thread(s), torch's default here "
          f"{default_threads}; {platform.python_implementation()} {platform.python_version()}); seeds {seeds}")
    print(f"Lin et al. 2017 (arXiv 1708.02002). imbalance ratio {RATIO}, minority classes "
          f"{MINORITY[0]}-{MINORITY[-1]}; batch {BATCH_SIZE}, AdamW lr {LR:g} wd {WEIGHT_DECAY}, warmup 1 epoch + cosine to {MIN_FACTOR} of the "
          f"peak, same for every arm; test split balanced")
    figures: dict = {"benchmark": "focal_imbalance", "seeds": seeds, "imbalance_ratio": RATIO,
                     "minority_classes": MINORITY, "batch_size": BATCH_SIZE,
                     "optimizer": f"adamw lr {LR} weight_decay {WEIGHT_DECAY}",
                     "schedule": f"warmup 1 epoch + cosine min_factor {MIN_FACTOR}",
                     "arms": {k: v for k, v in ARMS.items()}, "datasets": {}}
    claim_f1: dict[str, list[str]] = {arm: [] for arm in ARMS if arm != "ce"}
    for ds in args.datasets:
        r = res[ds]
        first = r["ce"][seeds[0]]
        counts = first["train_class_counts"]
        print()
        print(f"{ds} (model {DATASETS[ds]}): {epochs[ds]} epochs = {first['steps']} steps per run; training rows per "
              f"class (seed {seeds[0]}): {counts}")
        head = f"{'arm':<12}" + "".join(f"  {label:>15}" for _, label in METRICS) + f"  {'wall s':>6}"
        print("test metrics, mean ± std (sample) over seeds")
        print(head)
        print("-" * len(head))
        for arm in ARMS:
            cells = []
            for key, _ in METRICS:
                xs = [r[arm][s][key] for s in seeds]
                cells.append(f"{mean(xs):.4f} ± {std(xs):.4f}")
            wall = mean(r[arm][s]["wall_seconds"] for s in seeds)
            print(f"{LABELS[arm]:<12}" + "".join(f"  {c:>15}" for c in cells) + f"  {wall:6.1f}")
        print("-" * len(head))
        print("arm - ce, paired by seed: per-seed differences (mean ± std of the differences) -> verdict")
        ds_fig = {"model": DATASETS[ds], "epochs": epochs[ds], "steps": first["steps"],
                  "train_class_counts_first_seed": counts, "arms": {}}
        for arm in ARMS:
            arm_fig = {}
            for key, _ in METRICS:
                xs = [r[arm][s][key] for s in seeds]
                arm_fig[key] = [r4(x) for x in xs]
                arm_fig[key + "_mean"] = r4(mean(xs))
                arm_fig[key + "_std"] = r4(std(xs))
            arm_fig["recall_per_class_mean"] = [r4(mean(r[arm][s]["recall"][c] for s in seeds))
                                                for c in range(NUM_CLASSES)]
            arm_fig["wall_seconds_mean"] = round(mean(r[arm][s]["wall_seconds"] for s in seeds), 2)
            if arm != "ce":
                arm_fig["minus_ce"] = {}
                for key, label in METRICS:
                    d = [r[arm][s][key] - r["ce"][s][key] for s in seeds]
                    v = verdict(d)
                    arm_fig["minus_ce"][key] = {"diffs": [r4(x) for x in d], "mean": r4(mean(d)),
                                                "std": r4(std(d)), "verdict": v}
                    if key in CLAIM_METRICS:
                        print(f"  {LABELS[arm]:<12} {label:<10} {' '.join(f'{x:+.4f}' for x in d)}  "
                              f"({mean(d):+.4f} ± {std(d):.4f}) -> {v}")
                claim_f1[arm].append(arm_fig["minus_ce"]["f1_macro"]["verdict"])
            ds_fig["arms"][arm] = arm_fig
        print("mean test recall per class over seeds (classes 0-9):")
        for arm in ARMS:
            rec = ds_fig["arms"][arm]["recall_per_class_mean"]
            print(f"  {LABELS[arm]:<12} " + " ".join(f"{x:.2f}" for x in rec))
        figures["datasets"][ds] = ds_fig

    print()
    claims = {arm: combine(v) for arm, v in claim_f1.items()}
    figures["claim_f1_macro"] = claims
    for arm, v in claims.items():
        per = ", ".join(f"{ds} {figures['datasets'][ds]['arms'][arm]['minus_ce']['f1_macro']['mean']:+.4f} "
                        f"({figures['datasets'][ds]['arms'][arm]['minus_ce']['f1_macro']['verdict']})"
                        for ds in args.datasets)
        print(f"claim '{LABELS[arm]} beats ce under imbalance' on test macro-F1: {v.upper()}  [{per}]")

    print()
    print(f"total {total_seconds:.0f} s")
    figures.update(run_figures(total_seconds, default_threads))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
