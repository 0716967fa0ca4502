"""Small statistics shared by the accuracy benchmarks (seeds, paired differences, verdicts)."""
from __future__ import annotations

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
