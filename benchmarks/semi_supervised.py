"""Semi-supervised learning on MNIST-1D: with 250 labelled signals and the other ~3,000 training signals
unlabelled, do thresholded pseudo-labelling and FixMatch beat supervised training on the labelled rows?

FixMatch (Sohn et al. 2020, arXiv 2001.07685): an unlabelled row's prediction on a weakly augmented view
becomes its pseudo-label when the confidence reaches a threshold (0.95), and the model learns to predict
that label on a strongly augmented view, weighted by lambda_u (1.0), with mu = 7 unlabelled rows per
labelled one. Without weak and strong augmentations it is pseudo-labelling with a confidence threshold
(Lee 2013, "Pseudo-Label", ICML workshop on challenges in representation learning). torchdojo's task
`semisup` (src/torchdojo/tasks/semisup.py) does both; `data.train_size` + `data.unlabeled: true` keep
`train_size` labelled training rows (stratified) and turn the rest into an unlabelled stream (labels dropped).

Setup: the built-in MNIST-1D set (Greydanus 2020, arXiv 2011.14439; 4,000 training signals, 10% of them
held out for validation, 1,000 test signals: one test signal is 0.001 accuracy), `data.train_size`
(default 250) labelled rows, 3,350 unlabelled rows. The same model, optimiser and number of steps in
every arm: cnn1d channels [32, 64], hidden 128 (no dropout), `--steps` (default 1500) steps of batch 32
(labelled rows), AdamW lr 1e-3 wd 0.01, warmup 100 steps + cosine, and the phase augmentation
`shift` (max_steps 3) on the labelled batch in every arm. The arms (fixed before running this benchmark,
not tuned on its results):
  (a) supervised   task classify on the 250 labelled rows only
  (b) pseudo-label task semisup, weak [] and strong [], threshold 0.95, weight 1.0, unlabeled_ratio 7
  (c) FixMatch     task semisup as (b) with weak [shift max_steps 3] and strong [shift max_steps 6, scale
                   (0.8-1.2), time_warp (max_warp 0.2, 4 knots), jitter std 0.1]
  (d) oracle       task classify with every training row labelled (no train_size): the upper bound
For one seed every arm has the same recipe seed: the same validation split, labelled subset (a-c),
initialisation and labelled-batch order. Checkpoints and TensorBoard files are switched off (they do not
change the training).

Reported per arm: test accuracy of the final model (no early stopping or model selection) per seed, mean
and sample std over seeds, the paired per-seed difference to (a) and its mean; for (b) and (c) the
unlabelled loss term (`train/loss/unlabeled` in the run's metrics.jsonl: weight x the masked
cross-entropy averaged over all mu*B unlabelled rows, 0 when no row is confident) at the last logged step
and averaged over the last 10 logged steps, to show the term is active; and, for every arm, the final
model's view of the unlabelled rows (unaugmented): the share with confidence >= 0.95 and the accuracy
of those confident predictions (the pseudo-labels' quality; their true labels are looked up from the
full training split). Verdicts use `_stats.verdict` on the per-seed differences: "holds" when better on
every seed, "mixed" when better on average only, "does not hold" when not better on average.
When this script was written (seeds 0-2, 1500 steps, 250 labelled rows): supervised 0.817 mean test
accuracy, pseudo-labelling 0.825 (+0.008, better on 2 of 3 seeds: its unlabelled term stays near 0.004,
since with identical weak and strong views it only sharpens predictions that are already confident),
FixMatch 0.880 (+0.063, better on every seed), oracle 0.948; FixMatch closed about half the gap to the
oracle. About 4 minutes on one thread.

Every run goes through `torchdojo.Trainer`, quiet, into a temporary run directory. Torch runs with ONE
intra-op thread by default (`--threads 0` keeps torch's default).

Run: .venv/bin/python benchmarks/semi_supervised.py [--seeds 0,1,2] [--train-size 250] [--steps 1500]
     [--arms supervised pseudo_label fixmatch oracle] [--out DIR]
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stats import (add_threads_option, apply_threads, cell, mean, paired_claim, parse_args, parse_ints,  # noqa: E402
                    print_json_line, r4, sized, sized_data, std, verdict)

THRESHOLD = 0.95
ARMS = {
    "supervised": "(a) supervised",
    "pseudo_label": "(b) pseudo-label",
    "fixmatch": "(c) FixMatch",
    "oracle": "(d) oracle (all labelled)",
}
SEMISUP = {"pseudo_label", "fixmatch"}
WEAK = [{"name": "shift", "max_steps": 3}]
STRONG = [{"name": "shift", "max_steps": 6}, {"name": "scale"}, {"name": "time_warp"},
          {"name": "jitter", "std": 0.1}]
BASE = {
    "model": {"name": "cnn1d", "channels": [32, 64], "hidden": 128},
    "checkpoint": {"every_epochs": None},
    "log": {"tensorboard": False},
}


def recipe(arm: str, seed: int, train_size: int, steps: int) -> dict:
    raw = copy.deepcopy(BASE)
    raw.update(name=f"semisup-{arm}", seed=seed, device="cpu")
    raw["data"] = {"name": "mnist1d"}
    if arm != "oracle":
        raw["data"]["train_size"] = train_size
    if arm in SEMISUP:
        raw["data"]["unlabeled"] = True
        raw["task"] = {"name": "semisup", "threshold": THRESHOLD, "weight": 1.0, "unlabeled_ratio": 7,
                       "weak": WEAK if arm == "fixmatch" else [], "strong": STRONG if arm == "fixmatch" else []}
    else:
        raw["task"] = {"name": "classify"}
    raw["phases"] = [{"name": "main", "steps": steps, "batch_size": 32,
                      "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01},
                      "schedule": [{"name": "warmup", "steps": 100}, {"name": "cosine"}],
                      "augment": [{"name": "shift", "max_steps": 3}]}]
    return raw


# -- running -----------------------------------------------------------------------------------------

def unlabeled_rows(seed: int, train_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unlabelled rows of seed `seed` (as `data.unlabeled` builds them) with their true labels,
    looked up by content in the full training split."""
    full = load_data(sized_data({"name": "mnist1d"}), seed).train
    part = load_data(sized_data({"name": "mnist1d", "train_size": train_size, "unlabeled": True}), seed).unlabeled
    label = {row.numpy().tobytes(): int(y) for row, y in zip(full.x, full.y)}
    y = torch.tensor([label[row.numpy().tobytes()] for row in part.x])
    return part.x, y


def run(recipe_dict: dict, run_dir: Path, unlabeled: tuple[torch.Tensor, torch.Tensor]) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    trainer = Trainer(load_recipe(sized(recipe_dict)), run_dir, quiet=True)
    summary = trainer.fit()
    seconds = time.perf_counter() - t0
    m = summary["metrics"]
    out = {"test_accuracy": m["test/accuracy"], "test_nll": m["test/nll"], "val_accuracy": m.get("val/accuracy"),
           "seconds": seconds, "steps": summary["steps"]}
    sizes = json.loads((run_dir / "data_info.json").read_text())["sizes"]
    out["sizes"] = sizes
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    u = [(r["step"], r["train/loss/unlabeled"]) for r in losses if "train/loss/unlabeled" in r]
    if u:
        out["unlabeled_loss_last"] = u[-1][1]
        out["unlabeled_loss_last_step"] = u[-1][0]
        out["unlabeled_loss_last10"] = mean(v for _, v in u[-10:])
        out["unlabeled_loss_logged"] = len(u)
    # The final model's confidence on the (unaugmented) unlabelled rows and the accuracy of its confident
    # predictions there: what the pseudo-labels look like at the end.
    model = trainer.state.model
    model.eval()
    x, y = unlabeled
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(xb.to(trainer.device)).float(), dim=1).cpu()
                           for xb in x.split(1024)])
    conf, pred = probs.max(dim=1)
    mask = conf >= THRESHOLD
    out["unl_confident_share"] = mask.float().mean().item()
    out["unl_confident_accuracy"] = (pred[mask] == y[mask]).float().mean().item() if mask.any() else None
    out["unl_accuracy"] = (pred == y).float().mean().item()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=parse_ints, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--train-size", type=int, default=250, help="labelled training rows (default 250)")
    ap.add_argument("--steps", type=int, default=1500, help="training steps of every run (default 1500)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                    help="arms to run (default all; drop `oracle` to save about a fifth of the time)")
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder, removed at the end)")
    add_threads_option(ap)
    # smoke: 20 steps, so that the logs (every 10 steps) hold the unlabelled loss checked below
    args = parse_args(ap, argv, seeds=[0], steps=20)
    if "supervised" not in args.arms:
        ap.error("--arms must include supervised (the baseline)")
    if not args.seeds or args.train_size < 1 or args.steps < 1:
        ap.error("need at least one seed, a positive train size and positive steps")
    arms = [a for a in ARMS if a in args.arms]
    seeds = args.seeds
    default_threads = apply_threads(args)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-semisup-"))
    t_start = time.perf_counter()

    res: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for seed in seeds:
        unlabeled = unlabeled_rows(seed, args.train_size)
        for arm in arms:
            r = run(recipe(arm, seed, args.train_size, args.steps), root / arm / f"seed{seed}", unlabeled)
            assert r["steps"] == args.steps, (arm, r["steps"])
            assert (arm in SEMISUP) == ("unlabeled_loss_last" in r), arm
            if arm in SEMISUP:
                assert r["sizes"].get("unlabeled") == len(unlabeled[0]), (r["sizes"], len(unlabeled[0]))
            res[arm][seed] = r
            print(f"seed {seed} {arm}: test accuracy {r['test_accuracy']:.4f} ({r['seconds']:.1f} s)", file=sys.stderr)
    total_seconds = time.perf_counter() - t_start
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)

    # -- report -----------------------------------------------------------------------------------------
    s0 = seeds[0]
    sizes = res["supervised"][s0]["sizes"]
    n_unl = len(unlabeled_rows(s0, args.train_size)[0])
    print(f"semi_supervised: pseudo-labelling and FixMatch on MNIST-1D (torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op thread(s), torch's default here {default_threads}; "
          f"{platform.python_implementation()} {platform.python_version()}); seeds {seeds}")
    print()
    print(f"{sizes['train']} labelled training signals, {n_unl} unlabelled, {sizes['val']} validation, "
          f"{sizes['test']} test (1 test signal = {1 / sizes['test']:.3f}); cnn1d [32, 64] hidden 128; "
          f"{args.steps} steps of batch 32 in every arm (+ 7 x 32 unlabelled rows per step in (b), (c)); "
          f"AdamW lr 1e-3 wd 0.01, warmup 100 + cosine; shift(3) on the labelled batch")
    if "oracle" in arms:
        print(f"(d) oracle: all {res['oracle'][s0]['sizes']['train']} training signals labelled, same steps")
    print()
    w = max(14, 8 * len(seeds))
    head = (f"{'arm':<26}  " + "  ".join(f"{'acc s' + str(s):>8}" for s in seeds)
            + f"  {'mean':>7}  {'std':>6}  {'- (a) per seed':>{w}}  {'mean diff':>9}  {'wall s':>6}")
    print("Test accuracy of the final model")
    print(head)
    print("-" * len(head))
    fig: dict[str, dict] = {}
    for arm in arms:
        acc = [res[arm][s]["test_accuracy"] for s in seeds]
        diffs = [res[arm][s]["test_accuracy"] - res["supervised"][s]["test_accuracy"] for s in seeds]
        wall = [res[arm][s]["seconds"] for s in seeds]
        per_seed = " ".join(f"{d:+.3f}" for d in diffs) if arm != "supervised" else "-"
        md = f"{mean(diffs):+9.4f}" if arm != "supervised" else f"{'-':>9}"
        print(f"{ARMS[arm]:<26}  " + "  ".join(f"{a:8.4f}" for a in acc)
              + f"  {mean(acc):7.4f}  {std(acc):6.4f}  {per_seed:>{w}}  {md}  {mean(wall):6.1f}")
        f = {"test_accuracy": [r4(a) for a in acc], "test_accuracy_mean": r4(mean(acc)),
             "test_accuracy_std": r4(std(acc)),
             "test_nll_mean": r4(mean(res[arm][s]["test_nll"] for s in seeds)),
             "wall_seconds_mean": round(mean(wall), 2),
             "unlabeled_confident_share": [r4(res[arm][s]["unl_confident_share"]) for s in seeds],
             "unlabeled_confident_accuracy": [None if res[arm][s]["unl_confident_accuracy"] is None
                                              else r4(res[arm][s]["unl_confident_accuracy"]) for s in seeds]}
        if arm != "supervised":
            f["minus_supervised"] = [r4(d) for d in diffs]
            f["minus_supervised_mean"] = r4(mean(diffs))
            f["vs_supervised"] = verdict(diffs)
        if arm in SEMISUP:
            f["unlabeled_loss_last"] = [r4(res[arm][s]["unlabeled_loss_last"]) for s in seeds]
            f["unlabeled_loss_last10_mean"] = [r4(res[arm][s]["unlabeled_loss_last10"]) for s in seeds]
        fig[arm] = f
    print("-" * len(head))
    print()

    last_step = max(res[a][s]["unlabeled_loss_last_step"] for a in arms if a in SEMISUP for s in seeds) \
        if SEMISUP & set(arms) else args.steps
    print(f"Unlabelled rows: loss term `train/loss/unlabeled` (last logged step {last_step}; mean of the last 10 "
          f"logs) and the final model on the {n_unl} unaugmented unlabelled rows: share with confidence >= "
          f"{THRESHOLD} (accuracy of those; accuracy on all)")
    head2 = f"{'arm':<26}  {'seed':>4}  {'u-loss last':>11}  {'u-loss last10':>13}  {'conf share':>10}  {'conf acc':>8}  {'acc all':>7}"
    print(head2)
    print("-" * len(head2))
    for arm in arms:
        for s in seeds:
            r = res[arm][s]
            ul = f"{r['unlabeled_loss_last']:11.4f}" if arm in SEMISUP else f"{'-':>11}"
            ul10 = f"{r['unlabeled_loss_last10']:13.4f}" if arm in SEMISUP else f"{'-':>13}"
            print(f"{ARMS[arm]:<26}  {s:>4}  {ul}  {ul10}  {r['unl_confident_share']:10.3f}  "
                  f"{cell(r['unl_confident_accuracy'], 8)}  {r['unl_accuracy']:7.3f}")
    print("-" * len(head2))
    if "oracle" in arms:
        print("  (the oracle trains on these rows with their labels: its figures there are training figures)")
    print()

    claims = {}

    def line(claim: str, a: str, b: str) -> None:
        if a not in res or b not in res:
            return
        diffs = [res[a][s]["test_accuracy"] - res[b][s]["test_accuracy"] for s in seeds]
        claims[f"{a}_vs_{b}"] = paired_claim(claim, ARMS[a][:3], ARMS[b][:3], diffs)

    print("Verdicts (paired per seed):")
    line("pseudo-labelling beats supervised", "pseudo_label", "supervised")
    line("FixMatch beats supervised", "fixmatch", "supervised")
    line("FixMatch beats pseudo-labelling (strong augmentation helps)", "fixmatch", "pseudo_label")
    line("the oracle beats FixMatch (labels still worth more)", "oracle", "fixmatch")
    if "oracle" in arms:
        gap = mean(res["oracle"][s]["test_accuracy"] - res["supervised"][s]["test_accuracy"] for s in seeds)
        closed = {}
        for arm in ("pseudo_label", "fixmatch"):
            if arm in arms and gap > 0:
                closed[arm] = mean(res[arm][s]["test_accuracy"] - res["supervised"][s]["test_accuracy"]
                                   for s in seeds) / gap
        print(f"  gap supervised -> oracle: {gap:+.3f} (mean); share closed: "
              + (", ".join(f"{ARMS[a]} {c:.0%}" for a, c in closed.items()) or "-"))
        claims["oracle_gap"] = {"mean_gap": r4(gap), "share_closed": {a: r4(c) for a, c in closed.items()}}
    best = max(arms, key=lambda a: mean(res[a][s]["test_accuracy"] for s in seeds))
    print(f"  best arm by mean test accuracy: {ARMS[best]}")
    if "oracle" not in arms:
        print("  (the oracle arm was not run)")
    print()
    print(f"total {total_seconds:.0f} s")
    figures = {
        "benchmark": "semi_supervised",
        "seeds": seeds,
        "train_size": args.train_size,
        "unlabeled_rows": n_unl,
        "steps": args.steps,
        "threshold": THRESHOLD,
        "arms": fig,
        "claims": claims,
        "best_arm": best,
    }
    return print_json_line(figures, total_seconds, default_threads)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
