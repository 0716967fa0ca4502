"""Large-batch training on MNIST-1D: the built-in `mnist1d-large-batch` recipe (global batch 4096, LAMB,
warmup + cosine) against the same recipe at batch 128 with AdamW (lr 3e-3, weight decay 0.01).

Both run in one process with one torch thread on a 40,000-signal MNIST-1D pool (30,000 train / 2,000 val /
the pool's own 8,000 test rows), 40 epochs each, validation every epoch. Reported per arm: test accuracy,
optimizer steps, wall time, and the steps and epochs until validation accuracy first reaches `--target`
(default 0.95). What a 2-core CPU can show: the step counts and accuracy, not the speed-up a large batch
buys on accelerators, where one 4096-sample step costs about as much wall time as a 128-sample one.

Run: .venv/bin/python benchmarks/large_batch.py [--epochs 40] [--target 0.95] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from torchdojo import Trainer, load_recipe
from torchdojo.recipe import read_recipe_source

from _stats import parse_args, r4, run_figures, sized

ARMS = {
    "batch 4096, LAMB": [],
    "batch 128, AdamW": ["phases.main.batch_size=128",
                         "phases.main.optimizer={name: adamw, lr: 3.0e-3, weight_decay: 0.01}"],
}


def steps_to(entries: list[dict], target: float) -> tuple[int | None, float | None]:
    for e in entries:
        if "val/accuracy" in e and e["val/accuracy"] >= target:
            return e["step"], e["epoch"]
    return None, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=float, default=40)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    args = parse_args(ap, argv, epochs=1)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="dojo-bench-lb-") as tmp:
        for arm, overrides in ARMS.items():
            recipe = load_recipe(sized(read_recipe_source("mnist1d-large-batch")[0]),
                                 [*overrides, f"phases.main.epochs={args.epochs}", "eval.every_epochs=1",
                                  f"seed={args.seed}", "checkpoint.every_epochs=null", "log.tensorboard=false"])
            run_dir = Path(tmp) / arm.replace(" ", "").replace(",", "-")
            t0 = time.perf_counter()
            summary = Trainer(recipe, run_dir, quiet=True).fit()
            seconds = time.perf_counter() - t0
            entries = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            step, epoch = steps_to(entries, args.target)
            results[arm] = {"test_accuracy": r4(summary["metrics"]["test/accuracy"]),
                            "val_accuracy": r4(summary["metrics"]["val/accuracy"]), "steps": summary["steps"],
                            "seconds": round(seconds, 1), "steps_to_target": step,
                            "epochs_to_target": epoch}
            r = results[arm]
            print(f"{arm:18s} test acc {r['test_accuracy']:.4f}  {r['steps']:5d} steps  {seconds:6.1f} s  "
                  f"val acc >= {args.target}: " + (f"step {step} (epoch {epoch:.1f})" if step else "never"),
                  flush=True)
    print(json.dumps({"benchmark": "large_batch", "arms": results, "target": args.target, "epochs": args.epochs,
                      "seed": args.seed, **run_figures(time.perf_counter() - t_start, default_threads)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
