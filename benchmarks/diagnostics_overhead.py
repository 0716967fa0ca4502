"""Diagnostics overhead: training-step time of the quickstart recipe with and without the `diagnostics`
method at its default interval (every 50 steps).

Both arms train the built-in `quickstart` recipe (CNN on digits, 23 epochs, about 1,000 steps), in a
temporary run directory with metrics.jsonl and TensorBoard on, as `dojo train` does. A timing method
in both arms, listed first and last, measures each step from its `on_batch` hook to its `on_step_end`
hook: forward, backward, the optimizer and every method's hooks, including diagnostics' measurement and
its metrics.jsonl/TensorBoard line. Pairs are interleaved with alternating order, one torch thread per
run (see loop_overhead.py for why); the headline is the median over pairs of the ratio of summed step
times (on / off), goal <= 1.05. The wall time of the whole fit is reported too.

Run: .venv/bin/python benchmarks/diagnostics_overhead.py [--pairs 5] [--every-steps 50]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from torchdojo import Trainer, load_recipe
from torchdojo.methods import Method
from torchdojo.registry import METHODS

from _stats import parse_args, r4, run_figures, sized

GOAL = 1.05


class StepTimer(Method):
    """Half of a stopwatch: `start` opens each step in on_batch, `stop` closes it in on_step_end."""

    def __init__(self, role: str = "start"):
        self.role = role

    def on_batch(self, state, batch):
        if self.role == "start":
            STOPWATCH["t0"] = time.perf_counter()
        return batch

    def on_step_end(self, state):
        if self.role == "stop":
            STOPWATCH["total"] += time.perf_counter() - STOPWATCH["t0"]
            STOPWATCH["steps"] += 1


STOPWATCH = {"t0": 0.0, "total": 0.0, "steps": 0}


def run(arm: str, every_steps: int, tmp: Path, tag: str) -> dict:
    raw = load_recipe("quickstart").model_dump(mode="json")
    middle = raw["methods"] + ([{"name": "diagnostics", "every_steps": every_steps}] if arm == "on" else [])
    raw["methods"] = [{"name": "step_timer", "role": "start"}, *middle, {"name": "step_timer", "role": "stop"}]
    STOPWATCH.update(t0=0.0, total=0.0, steps=0)
    gc.collect()
    trainer = Trainer(load_recipe(sized(raw)), tmp / f"{arm}-{tag}", quiet=True)
    t0 = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (tmp / f"{arm}-{tag}" / "metrics.jsonl").read_text().splitlines()]
    return {"step_seconds": STOPWATCH["total"], "steps": STOPWATCH["steps"], "fit_seconds": wall,
            "test_accuracy": summary["metrics"]["test/accuracy"],
            "diag_lines": sum(any(k.startswith("diag/") for k in e) for e in lines)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--every-steps", type=int, default=50, help="the diagnostics interval (default: its default)")
    args = parse_args(ap, argv, pairs=1)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    METHODS.register("step_timer", StepTimer)
    t_start = time.perf_counter()
    results = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="dojo-bench-diag-") as name:
        tmp = Path(name)
        run("on", args.every_steps, tmp, "warmup")              # imports, kernels, data: not measured
        for i in range(args.pairs):
            for arm in (("off", "on") if i % 2 == 0 else ("on", "off")):
                results[arm].append(run(arm, args.every_steps, tmp, str(i)))
                r = results[arm][-1]
                print(f"pair {i} {arm:3s}: {r['step_seconds']:.3f} s in {r['steps']} steps "
                      f"({1e3 * r['step_seconds'] / r['steps']:.2f} ms/step), fit {r['fit_seconds']:.2f} s, "
                      f"{r['diag_lines']} diagnostics lines", flush=True)
    ratios = [on["step_seconds"] / off["step_seconds"] for on, off in zip(results["on"], results["off"])]
    fit_ratios = [on["fit_seconds"] / off["fit_seconds"] for on, off in zip(results["on"], results["off"])]
    median = statistics.median(ratios)
    off_ms = statistics.median(1e3 * r["step_seconds"] / r["steps"] for r in results["off"])
    on_ms = statistics.median(1e3 * r["step_seconds"] / r["steps"] for r in results["on"])
    print(f"step time with diagnostics every {args.every_steps} steps / without: median ratio {median:.3f} "
          f"({'meets' if median <= GOAL else 'misses'} the goal <= {GOAL}); {on_ms:.2f} vs {off_ms:.2f} ms per step; "
          f"whole fit {statistics.median(fit_ratios):.3f}")
    print(json.dumps({"benchmark": "diagnostics_overhead", "median_ratio": r4(median), "ratios": [r4(x) for x in ratios],
                      "goal": GOAL, "meets_goal": median <= GOAL, "median_fit_ratio": r4(statistics.median(fit_ratios)),
                      "ms_per_step_off": r4(off_ms), "ms_per_step_on": r4(on_ms), "every_steps": args.every_steps,
                      "steps": results["on"][0]["steps"], "diag_lines": results["on"][0]["diag_lines"],
                      "pairs": args.pairs, "recipe": "quickstart",
                      **run_figures(time.perf_counter() - t_start, default_threads)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
