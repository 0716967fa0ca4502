"""Encoder concatenation on MNIST-1D: does a head on two frozen encoders beat the better one alone, and
more so when the encoders differ more?

The lecture's claim: concatenating different encoders (pairwise) and training a head on top increases
diversity, and the more the encoders differ (architecture, training), the larger the gain.

Encoders, each one `torchdojo.Trainer` run on MNIST-1D (`data: {name: mnist1d, split_seed: 0}`: every run
sees the same 3,600 training rows, the same 400 validation and 1,000 test rows), AdamW lr 3e-3 with
weight decay 0.01, one warmup epoch then cosine, batch 64, `--epochs` epochs (default 20):
  mlp      mlp, hidden [256, 128]                       (seed 0)
  cnn1d    cnn1d with its defaults (channels [32, 64], hidden 128)   (seed 0)
  cnn1d-s1 the same cnn1d recipe with seed 1: same architecture and training, another initialisation
           and batch order (the least different partner of `cnn1d`)
  gru      gru, hidden 64                                (seed 0)
Then `dojo pair-search` (torchdojo.pair_search.pair_search) with a head recipe on the same data and split:
a linear head (`head: {hidden: [], dropout: 0}`) on the frozen encoders' features, AdamW lr 3e-3 (weight
decay 0.01), warmup + cosine, batch 64, `--head-epochs` epochs (default 10), for each single encoder and
each of the 6 pairs.

Reported: each single head's test accuracy (and the encoder run's own), each pair's test accuracy, the
better single's, the gain, and the two encoders' own models' disagreement on the test rows; the Pearson
correlation of disagreement and gain over the pairs; and the verdict on the claim: "holds" when every
cross-architecture pair gains more than the same-architecture pair (cnn1d + cnn1d-s1) and the correlation
is positive, "does not hold" when the same-architecture pair gains at least as much as the mean
cross-architecture pair, "mixed" otherwise. One test row = 0.001 accuracy; with 1,000 test rows,
differences of a few rows are noise.

Torch runs with ONE intra-op thread by default (`--threads 0` keeps torch's default).

Run: .venv/bin/python benchmarks/encoder_concat.py [--epochs 20] [--head-epochs 10] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from torchdojo.pair_search import pair_search
from torchdojo.recipe import load_recipe
from torchdojo.trainer import Trainer

from _stats import parse_args, sized

DATA = {"name": "mnist1d", "split_seed": 0}
ENCODERS = {
    "mlp": ({"name": "mlp", "hidden": [256, 128]}, 0),
    "cnn1d": ({"name": "cnn1d"}, 0),
    "cnn1d-s1": ({"name": "cnn1d"}, 1),
    "gru": ({"name": "gru", "hidden": 64}, 0),
}
SAME_ARCH = "cnn1d + cnn1d-s1"


def recipe(name: str, model: dict, seed: int, epochs: int) -> dict:
    return sized({"name": name, "seed": seed, "device": "cpu", "data": dict(DATA), "model": model,
                  "task": {"name": "classify"},
                  "phases": [{"name": "main", "epochs": epochs, "batch_size": 64,
                              "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
                              "schedule": [{"name": "warmup", "epochs": 1}, {"name": "cosine"}]}],
                  "log": {"every_steps": 50, "tensorboard": False}})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = parse_args(parser, argv, epochs=1, head_epochs=1)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-concat-"))
    encoder_seconds = {}
    for name, (model, seed) in ENCODERS.items():
        run = root / "encoders" / name
        if not (run / "summary.json").is_file():
            t0 = time.perf_counter()
            Trainer(load_recipe(recipe(f"bench-{name}", model, seed, args.epochs)), run, quiet=True).fit()
            encoder_seconds[name] = round(time.perf_counter() - t0, 1)
            print(f"encoder {name}: {encoder_seconds[name]} s", file=sys.stderr)
    head = recipe("bench-concat-head", {"name": "concat", "encoders": [], "head": {"hidden": [], "dropout": 0.0}},
                  0, args.head_epochs)
    head_file = root / "head.yaml"
    head_file.write_text(yaml.safe_dump(head, sort_keys=False))
    t0 = time.perf_counter()
    doc = pair_search([root / "encoders" / n for n in ENCODERS], str(head_file), root / "pairs", quiet=True,
                      command=f"dojo pair-search {' '.join(f'encoders/{n}' for n in ENCODERS)} --recipe head.yaml "
                              f"--out pairs")
    head_seconds = round(time.perf_counter() - t0, 1)
    print((root / "pairs" / "pair_search.md").read_text())

    pairs = {p["label"]: p for p in doc["pairs"]}
    same = pairs[SAME_ARCH]["gain"]
    cross = [p["gain"] for label, p in pairs.items() if label != SAME_ARCH]
    r = doc["disagreement_gain_correlation"]
    if all(g > same for g in cross) and r is not None and r > 0:
        verdict = "holds"
    elif same >= sum(cross) / len(cross):
        verdict = "does not hold"
    else:
        verdict = "mixed"
    print(f"same-architecture pair gain {same:+.4f}; cross-architecture gains {', '.join(f'{g:+.4f}' for g in cross)}; "
          f"disagreement-gain correlation {r if r is None else round(r, 3)}: the claim {verdict}")
    if args.smoke and not args.out:
        shutil.rmtree(root)         # a smoke run's folder is of no use; a full run's is kept to look at
    else:
        print(f"runs in {root}")
    figures = {"epochs": args.epochs, "head_epochs": args.head_epochs, "threads": torch.get_num_threads(),
               "singles": {s["label"]: {"head": s["test_accuracy"], "own": s["own_test_accuracy"]}
                           for s in doc["singles"]},
               "pairs": {p["label"]: {k: p[k] for k in ("test_accuracy", "best_single_accuracy", "gain", "disagreement")}
                         for p in doc["pairs"]},
               "correlation": r, "verdict": verdict, "encoder_seconds": encoder_seconds,
               "pair_search_seconds": head_seconds}
    print(json.dumps(figures))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
