"""Snapshot ensembles and training stages on MNIST-1D: do they beat one plain run at the same cost?

Part 1, snapshot ensembles (Huang et al. 2017, "Snapshot Ensembles: Train 1, get M for free", arXiv
1704.00109). Their claim: with the same training budget, an ensemble of the models taken at the end of
each cycle of a cosine schedule with restarts beats one model trained with a single cosine decay.
Arms, all on MNIST-1D (`data: {name: mnist1d}`, the published 4,000/1,000 train/test split; 10% of the
training rows held out for validation with `split_seed` fixed, so every seed sees the same 3,600
training rows), model `cnn1d` with its defaults, batch 64, SGD momentum 0.9 with weight decay 5e-4
(the paper's optimizer), the same number of epochs E and the same peak LR in every arm:
  (a) single   one run with `schedule: [{name: cosine}]` (to 0 over the E epochs)
  (b) ensemble one run with `schedule: [{name: cosine_restarts, cycles: 5}]` and the `snapshot_ensemble`
               method: `test/ensemble/accuracy`, the mean of the 5 snapshots' softmax probabilities
  (c) last     the last snapshot of the (b) run alone (`test/accuracy` of that run)
The table also shows the mean test accuracy of the 5 snapshots taken one by one (from the method's
in-memory snapshots). Test-time cost is not equal: the ensemble runs 5 forward passes per example.

The peak LR is chosen for arm (a) alone, never for the ensemble: seed 0 of the single cosine run is
trained at each LR of `--lr-grid` (default 0.05 0.1 0.2 0.4) and the LR with the best VALIDATION
accuracy (ties: the lower validation NLL) is used for every arm and seed (that seed-0 run is then
reused as arm (a)'s seed 0). `--lr X` skips the sweep. When this script was written (E=100) the sweep
gave validation accuracy 0.9725 / 0.9675 / 0.9825 / 0.8975 for 0.05 / 0.1 / 0.2 / 0.4: 0.2 was picked.

Verdict on the paper's claim, from the test accuracy of (b) minus (a), paired by seed: "holds" when (b)
is better on every seed, "does not hold" when the mean difference is <= 0, "mixed" otherwise (better on
average, not on every seed). The same rule is applied to test NLL (lower is better). 1 test row = 0.001.

Part 2, training stages: the built-in recipe `mnist1d-stages` (30 epochs AdamW warmup+cosine, 6 epochs
Lookahead+SGD with growing batches, 5 epochs SWA) against one AdamW phase of the same 41 epochs, built
from the stages recipe: its first phase's batch size, optimizer and warmup+cosine schedule stretched over
41 epochs, no methods; same data, model and seed. Test accuracy and NLL (of the SWA model for the
stages recipe) per seed, and wall seconds (Trainer.fit, evaluations included; the stages recipe runs its
last 11 epochs at batch sizes 128-512, so fewer steps). Only the recipe's `seed` changes between runs
(its val split follows the seed, the same in both arms).

Every run goes through `torchdojo.Trainer` without a run directory (nothing written to disk), quiet,
with validation every epoch (the recipe default). Torch runs with ONE intra-op thread by default
(`--threads 0` keeps torch's default): on a shared 2-core machine that keeps the timings steady; the
accuracies do not depend on it beyond float rounding.

Run: .venv/bin/python benchmarks/snapshot_ensemble.py [--epochs 100] [--seeds 0 1 2] [--lr-grid ...|--lr 0.2]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import os
import sys
import time

import torch

from torchdojo.recipe import load_recipe, read_recipe_source
from torchdojo.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stats import (add_threads_option, apply_threads, mean, parse_args, r4, run_figures, sized, std,  # noqa: E402
                    verdict)

BATCH_SIZE = 64
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
CYCLES = 5
SPLIT_SEED = 0
LR_GRID = (0.05, 0.1, 0.2, 0.4)
STAGES = "mnist1d-stages"


# -- recipes -----------------------------------------------------------------------------------------

def snapshot_recipe(epochs: int, lr: float, seed: int, ensemble: bool) -> dict:
    schedule = [{"name": "cosine_restarts", "cycles": CYCLES}] if ensemble else [{"name": "cosine"}]
    recipe = {
        "name": "bench-snapshot-ensemble" if ensemble else "bench-single-cosine",
        "seed": seed,
        "device": "cpu",
        "data": {"name": "mnist1d", "split_seed": SPLIT_SEED},
        "model": {"name": "cnn1d"},
        "task": {"name": "classify"},
        "phases": [{"name": "main", "epochs": epochs, "batch_size": BATCH_SIZE,
                    "optimizer": {"name": "sgd", "lr": lr, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
                    "schedule": schedule}],
        "checkpoint": {"every_epochs": None},
    }
    if ensemble:
        recipe["methods"] = [{"name": "snapshot_ensemble"}]
    return recipe


def stages_recipe(seed: int) -> dict:
    raw, _ = read_recipe_source(STAGES)
    raw = copy.deepcopy(raw)
    raw["seed"] = seed
    raw["checkpoint"] = {"every_epochs": None}
    return raw


def single_phase_recipe(seed: int) -> dict:
    """The stages recipe as one phase: its first phase's batch size, optimizer and schedule over all epochs."""
    raw = stages_recipe(seed)
    first = raw["phases"][0]
    total = sum(p["epochs"] for p in raw["phases"])
    raw["name"] = f"{raw['name']}-single-phase"
    raw["description"] = f"one AdamW warmup+cosine phase of {total} epochs"
    raw["phases"] = [{"name": "main", "epochs": total, "batch_size": first["batch_size"],
                      "optimizer": copy.deepcopy(first["optimizer"]), "schedule": copy.deepcopy(first["schedule"])}]
    raw["methods"] = []
    return raw


# -- running -----------------------------------------------------------------------------------------

def run(recipe_dict: dict) -> tuple[dict, Trainer, float]:
    t0 = time.perf_counter()
    trainer = Trainer(load_recipe(sized(recipe_dict)), None, quiet=True)
    summary = trainer.fit()
    return summary, trainer, time.perf_counter() - t0


def result(summary: dict, seconds: float, name: str = "") -> dict:
    m = summary["metrics"]
    p = f"test/{name}/" if name else "test/"
    v = f"val/{name}/" if name else "val/"
    return {"test_accuracy": m[p + "accuracy"], "test_nll": m[p + "nll"],
            "val_accuracy": m.get(v + "accuracy"), "val_nll": m.get(v + "nll"),
            "wall_seconds": summary["wall_seconds"], "seconds": seconds, "steps": summary["steps"]}


def snapshot_members(trainer: Trainer) -> list[dict]:
    """Test accuracy and NLL of each snapshot alone."""
    method = next(m for m in trainer.methods if type(m).__name__ == "SnapshotEnsemble")
    out = []
    for weights in method.snapshots:
        member = copy.deepcopy(trainer.state.model)
        member.load_state_dict(weights)
        metrics = trainer.evaluate("test", member)
        out.append({"test_accuracy": metrics["test/accuracy"], "test_nll": metrics["test/nll"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=100, help="E, epochs of every part-1 run (56 steps each)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=None, help="peak LR for part 1; default: sweep --lr-grid")
    ap.add_argument("--lr-grid", type=float, nargs="+", default=list(LR_GRID),
                    help="peak LRs tried for the single cosine run (seed = first seed), best validation accuracy wins")
    ap.add_argument("--skip-stages", action="store_true", help="run part 1 only")
    add_threads_option(ap)
    args = parse_args(ap, argv, epochs=1, seeds=[0], lr_grid=[0.1])
    default_threads = apply_threads(args)
    t_start = time.perf_counter()
    seeds, E = args.seeds, args.epochs

    # -- part 1: LR for the single cosine run, chosen on validation --------------------------------
    single: dict[int, dict] = {}
    sweep = []
    if args.lr is None:
        for lr in args.lr_grid:
            summary, _, secs = run(snapshot_recipe(E, lr, seeds[0], ensemble=False))
            sweep.append({"lr": lr, **result(summary, secs)})
        best = max(sweep, key=lambda r: (r["val_accuracy"], -r["val_nll"]))
        lr = best["lr"]
        single[seeds[0]] = {k: v for k, v in best.items() if k != "lr"}
    else:
        lr = args.lr

    ens, last, members = {}, {}, {}
    for seed in seeds:
        if seed not in single:
            summary, _, secs = run(snapshot_recipe(E, lr, seed, ensemble=False))
            single[seed] = result(summary, secs)
        summary, trainer, secs = run(snapshot_recipe(E, lr, seed, ensemble=True))
        ens[seed] = result(summary, secs, "ensemble")
        last[seed] = result(summary, secs)
        members[seed] = snapshot_members(trainer)
        assert len(members[seed]) == CYCLES, f"expected {CYCLES} snapshots, got {len(members[seed])}"
        assert abs(members[seed][-1]["test_accuracy"] - last[seed]["test_accuracy"]) < 1e-9

    # -- part 2: stages recipe vs one phase -----------------------------------------------------------
    stages, one = {}, {}
    if not args.skip_stages:
        for seed in seeds:
            summary, _, secs = run(stages_recipe(seed))
            stages[seed] = result(summary, secs)
            summary, _, secs = run(single_phase_recipe(seed))
            one[seed] = result(summary, secs)
    total_seconds = time.perf_counter() - t_start

    # -- report -----------------------------------------------------------------------------------------
    steps = single[seeds[0]]["steps"]
    print(f"snapshot_ensemble: snapshot ensembles and training stages on MNIST-1D (torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op thread(s), torch's default here {default_threads}; "
          f"{platform.python_implementation()} {platform.python_version()}); seeds {seeds}")
    print()
    print(f"Part 1: Huang et al. 2017 (arXiv 1704.00109). mnist1d 3600 train / 400 val / 1000 test (split_seed "
          f"{SPLIT_SEED}), cnn1d defaults, batch {BATCH_SIZE}, SGD momentum {MOMENTUM} wd {WEIGHT_DECAY}, "
          f"E = {E} epochs = {steps} steps in every run, peak LR {lr}")
    if sweep:
        print(f"peak LR chosen on the single cosine run, seed {seeds[0]}, by validation accuracy:")
        print(f"  {'lr':>6}  {'val acc':>7}  {'val nll':>7}  {'test acc':>8}")
        for r in sweep:
            print(f"  {r['lr']:>6g}  {r['val_accuracy']:7.4f}  {r['val_nll']:7.4f}  {r['test_accuracy']:8.4f}"
                  + ("  <- used" if r["lr"] == lr else ""))
    else:
        print("peak LR given with --lr (no sweep)")
    print()
    arms = [("(a) single cosine", single), (f"(b) snapshot ensemble x{CYCLES}", ens), ("(c) last snapshot", last)]
    member_mean = {s: {"test_accuracy": mean(m["test_accuracy"] for m in members[s]),
                       "test_nll": mean(m["test_nll"] for m in members[s])} for s in seeds}
    rows = arms + [("    mean of the snapshots alone", member_mean)]
    head = (f"{'arm':<32}  " + "  ".join(f"{'acc s' + str(s):>8}" for s in seeds)
            + f"  {'acc mean':>8}  {'std':>6}  {'nll mean':>8}  {'std':>6}")
    print("test accuracy per seed; mean and std (sample) over seeds of accuracy and NLL")
    print(head)
    print("-" * len(head))
    for label, res in rows:
        acc = [res[s]["test_accuracy"] for s in seeds]
        nll = [res[s]["test_nll"] for s in seeds]
        print(f"{label:<32}  " + "  ".join(f"{a:8.4f}" for a in acc)
              + f"  {mean(acc):8.4f}  {std(acc):6.4f}  {mean(nll):8.4f}  {std(nll):6.4f}")
    print("-" * len(head))
    print("per-snapshot test accuracy: " + "; ".join(
        f"seed {s}: " + " ".join(f"{m['test_accuracy']:.3f}" for m in members[s]) for s in seeds))
    print(f"wall seconds per run (Trainer.fit, mean): single {mean(single[s]['wall_seconds'] for s in seeds):.1f}, "
          f"snapshot run {mean(ens[s]['wall_seconds'] for s in seeds):.1f} (same steps; the ensemble's test "
          f"predictions take {CYCLES} forward passes)")
    acc_diff = [ens[s]["test_accuracy"] - single[s]["test_accuracy"] for s in seeds]
    nll_diff = [single[s]["test_nll"] - ens[s]["test_nll"] for s in seeds]
    last_diff = [last[s]["test_accuracy"] - single[s]["test_accuracy"] for s in seeds]
    v_acc, v_nll = verdict(acc_diff), verdict(nll_diff)
    print(f"(b) - (a) test accuracy per seed: {' '.join(f'{d:+.4f}' for d in acc_diff)} (mean {mean(acc_diff):+.4f})"
          f" -> the claim '(b) beats (a) at the same cost' {v_acc.upper()} on accuracy")
    print(f"(a) - (b) test NLL per seed:      {' '.join(f'{d:+.4f}' for d in nll_diff)} (mean {mean(nll_diff):+.4f})"
          f" -> {v_nll.upper()} on NLL")
    print(f"(c) - (a) test accuracy per seed: {' '.join(f'{d:+.4f}' for d in last_diff)} (mean {mean(last_diff):+.4f}):"
          f" the last snapshot alone {'beats' if mean(last_diff) > 0 else 'does not beat'} the single cosine run")

    figures = {
        "benchmark": "snapshot_ensemble",
        "seeds": seeds,
        "epochs": E,
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "optimizer": f"sgd momentum {MOMENTUM} weight_decay {WEIGHT_DECAY}",
        "cycles": CYCLES,
        "lr": lr,
        "lr_sweep": [{"lr": r["lr"], "val_accuracy": r4(r["val_accuracy"]), "val_nll": r4(r["val_nll"]),
                      "test_accuracy": r4(r["test_accuracy"])} for r in sweep],
    }
    for key, res in (("single", single), ("ensemble", ens), ("last_snapshot", last),
                     ("snapshots_mean", member_mean)):
        acc = [res[s]["test_accuracy"] for s in seeds]
        nll = [res[s]["test_nll"] for s in seeds]
        figures[key] = {"test_accuracy": [r4(a) for a in acc], "test_accuracy_mean": r4(mean(acc)),
                        "test_accuracy_std": r4(std(acc)), "test_nll": [r4(x) for x in nll],
                        "test_nll_mean": r4(mean(nll)), "test_nll_std": r4(std(nll))}
    figures["ensemble_minus_single_accuracy"] = [r4(d) for d in acc_diff]
    figures["claim_accuracy"] = v_acc
    figures["claim_nll"] = v_nll
    figures["snapshot_accuracies"] = {str(s): [r4(m["test_accuracy"]) for m in members[s]] for s in seeds}

    if not args.skip_stages:
        total = sum(p["epochs"] for p in stages_recipe(0)["phases"])
        print()
        print(f"Part 2: built-in recipe '{STAGES}' (30 AdamW warmup+cosine + 6 Lookahead/SGD growing batch + 5 SWA "
              f"epochs) vs one AdamW warmup+cosine phase of {total} epochs (batch 64, lr 3e-3, wd 0.01, "
              f"min_factor 0.05); same model and data")
        head = (f"{'recipe':<28}  " + "  ".join(f"{'acc s' + str(s):>8}" for s in seeds)
                + f"  {'acc mean':>8}  {'std':>6}  {'nll mean':>8}  {'std':>6}  {'steps':>5}  {'wall s':>6}")
        print(head)
        print("-" * len(head))
        for label, res in ((STAGES, stages), (f"single phase, {total} epochs", one)):
            acc = [res[s]["test_accuracy"] for s in seeds]
            nll = [res[s]["test_nll"] for s in seeds]
            print(f"{label:<28}  " + "  ".join(f"{a:8.4f}" for a in acc)
                  + f"  {mean(acc):8.4f}  {std(acc):6.4f}  {mean(nll):8.4f}  {std(nll):6.4f}"
                  f"  {res[seeds[0]]['steps']:>5}  {mean(res[s]['wall_seconds'] for s in seeds):6.1f}")
        print("-" * len(head))
        st_diff = [stages[s]["test_accuracy"] - one[s]["test_accuracy"] for s in seeds]
        v_st = verdict(st_diff)
        better = {"holds": "better on every seed", "mixed": "better on average, not on every seed",
                  "does not hold": "not better on average"}[v_st]
        short = {"holds": "better", "mixed": "mixed", "does not hold": "not better"}[v_st]
        print(f"stages - single phase test accuracy per seed: {' '.join(f'{d:+.4f}' for d in st_diff)} "
              f"(mean {mean(st_diff):+.4f}): the stages recipe is {better}; wall seconds (mean) "
              f"{mean(stages[s]['wall_seconds'] for s in seeds):.1f} vs {mean(one[s]['wall_seconds'] for s in seeds):.1f}")
        figures["stages"] = {}
        for key, res in (("stages", stages), ("single_phase", one)):
            acc = [res[s]["test_accuracy"] for s in seeds]
            nll = [res[s]["test_nll"] for s in seeds]
            wall = [res[s]["wall_seconds"] for s in seeds]
            figures["stages"][key] = {
                "test_accuracy": [r4(a) for a in acc], "test_accuracy_mean": r4(mean(acc)),
                "test_accuracy_std": r4(std(acc)), "test_nll_mean": r4(mean(nll)), "test_nll_std": r4(std(nll)),
                "wall_seconds": [round(w, 2) for w in wall], "wall_seconds_mean": round(mean(wall), 2),
                "steps": res[seeds[0]]["steps"]}
        figures["stages"]["epochs"] = total
        figures["stages"]["stages_minus_single_accuracy"] = [r4(d) for d in st_diff]
        figures["stages"]["stages_vs_single_phase"] = short
    print()
    print(f"total {total_seconds:.0f} s")
    figures.update(run_figures(total_seconds, default_threads))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
