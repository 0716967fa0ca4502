"""Small statistics shared by the accuracy benchmarks (seeds, paired differences, verdicts), their
command-line options (threads, `--smoke`) and their JSON last line."""
from __future__ import annotations

import argparse
import statistics


def mean(xs) -> float:
    return statistics.fmean(xs)


def std(xs) -> float:
    """Sample standard deviation; 0 for a single value."""
    xs = list(xs)
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def verdict(diffs: list[float]) -> str:
    """diffs: per-seed improvement of the contender (positive = better). 'holds' when it wins on every
    seed, 'does not hold' when it does not win on average, 'mixed' otherwise."""
    if mean(diffs) <= 0:
        return "does not hold"
    return "holds" if all(d > 0 for d in diffs) else "mixed"


def r4(x: float) -> float:
    return round(x, 4)


def parse_ints(text: str) -> list[int]:
    """`--seeds 0,1,2` (commas or spaces)."""
    return [int(x) for x in text.replace(",", " ").split()]


def cell(x: float | None, width: int, fmt: str = ".3f") -> str:
    """A table cell: the number, or '-' when there is none."""
    return f"{'-':>{width}}" if x is None else f"{x:{width}{fmt}}"


def paired_claim(claim: str, a: str, b: str, diffs: list[float]) -> dict:
    """Print `claim: a - b = +x.xxx (better on k/n seeds) -> VERDICT` for per-seed differences a - b, and
    return the figures for the JSON line."""
    v, wins = verdict(diffs), sum(d > 0 for d in diffs)
    print(f"  {claim}: {a} - {b} = {mean(diffs):+.3f} (better on {wins}/{len(diffs)} seeds) -> {v.upper()}")
    return {"mean_diff": r4(mean(diffs)), "wins": wins, "verdict": v}


def print_json_line(figures: dict, total_seconds: float, default_threads: int) -> int:
    """The benchmark's last line: its figures plus the run's context (`run_figures`); returns exit code 0."""
    import json
    print(json.dumps({**figures, **run_figures(total_seconds, default_threads)}))
    return 0


def run_figures(total_seconds: float, default_threads: int) -> dict:
    """The run's context for the JSON line: time, versions and threads."""
    import torch
    import torchdojo
    return {"total_seconds": round(total_seconds, 1), "torch": torch.__version__,
            "torchdojo": getattr(torchdojo, "__version__", "unknown"),
            "threads": torch.get_num_threads(), "torch_default_threads": default_threads}


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 0 keeps torch's default (one per core)")


def apply_threads(args) -> int:
    """Set torch's intra-op threads from `--threads`; returns torch's default, for `run_figures`."""
    import torch
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    return default_threads


# -- smoke mode --------------------------------------------------------------------------------------
# `--smoke` runs a benchmark at tiny sizes with one seed, in seconds, so CI notices a broken script
# (tests/test_benchmarks_smoke.py); its figures mean nothing. It is one switch per process, set by
# `parse_args`: a benchmark script is one process, and its recipes, built in many places, all reach the
# Trainer through `sized`.
SMOKE_SIGNALS = 1000      # MNIST-1D signals generated per data set (generating 5,000 takes ~2 s per run)
SMOKE_EPOCHS = 2          # epochs per phase at most
_smoke = False


def parse_args(parser: argparse.ArgumentParser, argv=None, **smoke_defaults) -> argparse.Namespace:
    """Parse `argv` with a `--smoke` flag; with it, `smoke_defaults` replace the options' defaults (options
    given on the command line still win) and `sized` cuts every recipe down."""
    global _smoke
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one seed, a few seconds: checks that the script runs end to end "
                             "(CI); the figures mean nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke_defaults)
        args = parser.parse_args(argv)
    _smoke = args.smoke
    return args


def sized_data(data: dict) -> dict:
    """A data spec as given, or in smoke mode with at most SMOKE_SIGNALS MNIST-1D signals."""
    if not _smoke or data.get("name") != "mnist1d":
        return data
    return {**data, "num_samples": min(data.get("num_samples", SMOKE_SIGNALS), SMOKE_SIGNALS)}


def sized(recipe: dict) -> dict:
    """A recipe as given, or in smoke mode a copy with `sized_data` and at most SMOKE_EPOCHS epochs per phase."""
    if not _smoke:
        return recipe
    phases = [{**p, "epochs": min(p["epochs"], SMOKE_EPOCHS)} if p.get("epochs") else p
              for p in recipe.get("phases", [])]
    return {**recipe, "data": sized_data(recipe["data"]), "phases": phases}
