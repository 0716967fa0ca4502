"""Unsupervised pretraining (denoising autoencoder, VAE) on a big unlabelled MNIST-1D pool, then full
fine-tuning on a small labelled task: does it help, compared with training from scratch and with
supervised pretraining? (The lecture's "pretraining way 3: autoencoders".)

Vincent et al. 2008 ("Extracting and composing robust features with denoising autoencoders", ICML)
pretrain an encoder to reconstruct clean inputs from corrupted ones; Kingma & Welling 2013 (arXiv
1312.6114; tutorial: Doersch 2016, arXiv 1606.05908) train a variational autoencoder by its ELBO; Erhan
et al. 2010 ("Why does unsupervised pre-training help deep learning?", JMLR 11) measured when such
pretraining helps a supervised task. This benchmark asks the question at small scale with torchdojo's
`autoencoder` model, its `autoencode` and `vae` tasks and `init: {run, prefix: "encoder."}`.

Unlabelled pool: 24,000 generated MNIST-1D signals of all ten digits (about 18,000 training signals
with `val_fraction: 0.05`; the labels are loaded but no autoencoder task reads them): `mnist1d-dae`'s
data. MNIST-1D generates its signals class by class from one seeded stream, so any pool generated with
the built-in set's seed (42), whatever its size, contains every digit-0 signal of the built-in set (up to
the dataset-wide standardisation, so not byte-equal: a row hash misses them). The pool is therefore
generated with another seed (`data.seed: POOL_SEED`, as in the shipped `mnist1d-dae` and
`mnist1d-pretrain`), and checked before any training: no pool signal may equal any train/val/test signal of a target task exactly (row hashes) or up to an affine
rescaling (nearest-neighbour correlation below CORR_LIMIT). The same check on the shipped supervised
pool is asserted too.
Model: `{name: autoencoder, encoder: {name: cnn1d, channels: [32, 64], hidden: 128, dropout: 0.1},
latent: 32, decoder: [128]}` - the encoder is the fine-tuning model with a 32-wide output layer (the
bottleneck). 15 epochs, batch 128, AdamW lr 3e-3 wd 0.01, warmup 1 epoch + cosine (as
`mnist1d-pretrain`), seed 0, one run each:
  DAE: task `{name: autoencode, noise: [{name: noise, std: 0.5}]}`, mse loss. The data are
       standardised to mean 0 and std 1 over the whole set (MNIST-1D's own generator), so the noise has
       a quarter of the signal's variance: a clearly visible but not overwhelming corruption (fixed from
       the data scale before any fine-tuning result was seen; the identity map's denoise MSE is 0.25).
  VAE: `variational: true`, task `{name: vae, beta: 1.0}` (the negative ELBO with a unit-variance
       Gaussian decoder).
Reported: the DAE's val/test mse and denoise_mse, the VAE's val recon, kl and mse, wall times, and as a
reference the MSE of predicting every value by the pool's training mean (global, and per position).

Supervised reference: `mnist1d-pretrain` as shipped (cnn1d, digits 0-4 of a 24,000-signal pool generated
with seed POOL_SEED, labelled, 15 epochs); it shares no signal with either target.

Targets (the built-in MNIST-1D set: published 4,000/1,000 split, 10% of the training signals held out
for validation; `data.train_size` training signals kept, stratified):
  T1: `mnist1d-finetune`'s data: digits 5-9 relabelled 0-4, train_size 250 (493 test signals).
  T2: all ten digits (`classes` unset), train_size 500 (1,000 test signals). `--targets t1` drops it.
Arms, all with the same cnn1d (dropout 0.1), batch 32, 50 epochs, AdamW wd 0.01 and full fine-tuning
(everything trains, lr 1e-3, warmup 2 epochs + cosine: the best arm of benchmarks/pretrain_finetune.py
at 250 signals); only the initialisation differs:
  (a) scratch       `init: null`
  (b) DAE           `init: {run: DAE, prefix: "encoder.", include: ["features.*"]}`
  (c) VAE           `init: {run: VAE, prefix: "encoder.", include: ["features.*"]}`
  (d) supervised    `init: {run: SUPERVISED, include: ["features.*"]}` (as `mnist1d-finetune`)
  (e) DAE probe     as (b) with `features` frozen (and in eval mode) all 50 epochs, lr 3e-3, cosine: only
                    the new head (hidden layer + output) trains - how good the DAE's conv features are
                    on their own.
  (a') scratch at lr 3e-3 (pretrain_finetune's scratch arm), reported as a second baseline so that a
       gain of (b)-(d) cannot come from (a)'s lower LR alone.
Every pretrained arm loads the same twelve `features.*` tensors (conv weights, BatchNorm weights,
biases and statistics); the hidden layer `head.1` is new in every arm, so the arms differ only by the conv
features they start from. The arms were fixed before running this benchmark and are not tuned on its
results. Fine-tuning seeds 0..N-1: for one seed every arm has the same training subset, validation
split, head initialisation and batch order.

Reported per target and arm: test accuracy of the final model (no early stopping or selection) per
seed, mean and sample std, and the paired difference to (a) scratch seed by seed and its mean, with
`_stats.verdict` ("holds": better on every seed, "mixed": better on average only, "does not hold": not
better on average).

In T2 the supervised reference (d) saw labels of T2's digits 0-4 (on other signals), so there it is
partly the same task, not only transfer to new classes; T1 is the clean comparison.

When this script was written (3 seeds, one pretraining run each): neither the DAE (val mse 0.071 against
1.009 for predicting the mean; denoise_mse 0.138 against 0.25 for the identity) nor the VAE (val mse
0.39, KL only 3.9 nats over 32 latents) helped: (b) and (c) were within +-0.02 of scratch on T1
(0.808 vs 0.808 and 0.810) and 0.008-0.015 below it on T2, below scratch at lr 3e-3 (a') everywhere,
and the frozen DAE encoder + head (e) lost 0.07-0.11. Supervised pretraining on digits 0-4 (d) beat
scratch on every seed: +0.071 on T1 (0.879, the same figure as pretrain_finetune's full fine-tuning)
and +0.119 on T2.

Every run goes through `torchdojo.Trainer`, quiet, in a temporary run directory. Torch runs with ONE
intra-op thread by default (`--threads 0` keeps torch's default).

Run: .venv/bin/python benchmarks/autoencoder_pretrain.py [--seeds 3] [--targets t1,t2] [--no-probe]
     [--no-scratch-3e-3] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from torchdojo.data import load_data
from torchdojo.recipe import load_recipe, read_recipe_source
from torchdojo.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stats import (add_threads_option, apply_threads, mean, parse_args, print_json_line, r4, sized,  # noqa: E402
                    sized_data, std, verdict)

PRETRAIN, FINETUNE = "mnist1d-pretrain", "mnist1d-finetune"
POOL_SEED = 2024                # MNIST-1D generation seed of the unlabelled pool (the built-in set uses 42)
CORR_LIMIT = 0.999              # a pool signal this correlated with a target signal counts as the same
NOISE_STD = 0.5
LATENT = 32
ENCODER = {"name": "cnn1d", "channels": [32, 64], "hidden": 128, "dropout": 0.1}
EPOCHS = 50
OPT = {"name": "adamw", "weight_decay": 0.01}
TARGETS = {
    "t1": {"label": "T1: digits 5-9, train_size 250", "classes": [5, 6, 7, 8, 9], "train_size": 250},
    "t2": {"label": "T2: all ten digits, train_size 500", "classes": None, "train_size": 500},
}
ARMS = {
    "scratch": "(a) scratch, lr 1e-3",
    "dae": "(b) DAE encoder",
    "vae": "(c) VAE encoder",
    "supervised": "(d) supervised 0-4",
    "dae_probe": "(e) DAE frozen + head",
    "scratch_3e-3": "(a') scratch, lr 3e-3",
}


# -- recipes -----------------------------------------------------------------------------------------

def pool_spec() -> dict:
    """The unlabelled pool: `mnist1d-dae`'s data (generator seed POOL_SEED, as `mnist1d-pretrain`'s)."""
    return sized_data({"name": "mnist1d", "num_samples": 24000, "seed": POOL_SEED, "val_fraction": 0.05})


def autoencoder_recipe(kind: str) -> dict:
    """The DAE or VAE pretraining recipe: `mnist1d-pretrain`'s schedule on the unlabelled pool."""
    raw = copy.deepcopy(read_recipe_source(PRETRAIN)[0])
    raw.pop("description", None)
    raw["name"] = f"mnist1d-{kind}"
    raw["seed"] = 0
    raw["device"] = "cpu"
    raw["data"] = pool_spec()
    raw["model"] = {"name": "autoencoder", "encoder": dict(ENCODER), "latent": LATENT, "decoder": [128],
                    "variational": kind == "vae"}
    raw["task"] = ({"name": "autoencode", "noise": [{"name": "noise", "std": NOISE_STD}]} if kind == "dae"
                   else {"name": "vae", "beta": 1.0})
    raw["checkpoint"] = {"every_epochs": None}
    return raw


def supervised_recipe() -> dict:
    raw = copy.deepcopy(read_recipe_source(PRETRAIN)[0])
    raw["seed"] = 0
    raw["device"] = "cpu"
    raw["checkpoint"] = {"every_epochs": None}
    return raw


def target_data(target: str) -> dict:
    raw = copy.deepcopy(read_recipe_source(FINETUNE)[0])
    data = raw["data"]
    data["train_size"] = TARGETS[target]["train_size"]
    if TARGETS[target]["classes"] is None:
        data.pop("classes", None)
    else:
        data["classes"] = TARGETS[target]["classes"]
    return sized_data(data)


def finetune_recipe(arm: str, target: str, seed: int, source: Path | None) -> dict:
    raw = copy.deepcopy(read_recipe_source(FINETUNE)[0])
    raw["name"] = f"{raw['name']}-{target}-{arm}"
    raw["seed"] = seed
    raw["device"] = "cpu"
    raw["data"] = target_data(target)
    raw["checkpoint"] = {"every_epochs": None}
    assert raw["model"] == {**ENCODER, "name": "cnn1d"}, "the fine-tuning model is no longer the pretrained encoder"
    batch_size = raw["phases"][0]["batch_size"]
    phase = {"name": "main", "epochs": EPOCHS, "batch_size": batch_size, "optimizer": {**OPT, "lr": 1e-3},
             "schedule": [{"name": "warmup", "epochs": 2}, {"name": "cosine"}]}
    if arm.startswith("scratch"):
        raw["init"] = None
        if arm == "scratch_3e-3":
            phase["optimizer"]["lr"] = 3e-3
    else:
        raw["init"] = {"run": str(source), "include": ["features.*"]}
        if arm in ("dae", "vae", "dae_probe"):
            raw["init"]["prefix"] = "encoder."
        if arm == "dae_probe":
            phase = {"name": "head", "epochs": EPOCHS, "batch_size": batch_size, "freeze": ["features"],
                     "optimizer": {**OPT, "lr": 3e-3}, "schedule": [{"name": "cosine"}]}
    raw["phases"] = [phase]
    return raw


# -- data checks -------------------------------------------------------------------------------------

def rows(bundle) -> np.ndarray:
    return np.concatenate([bundle.train.x.numpy(), bundle.val.x.numpy(), bundle.test.x.numpy()]).reshape(
        len(bundle.train) + len(bundle.val) + len(bundle.test), -1).astype(np.float32)


def overlap(pool: np.ndarray, target: np.ndarray) -> tuple[int, int, float]:
    """(target rows byte-equal to a pool row, target rows with a pool row correlated >= CORR_LIMIT, the
    largest such correlation): the second catches a signal rescaled by another standardisation."""
    hashes = {hashlib.sha1(r.tobytes()).digest() for r in pool}
    exact = sum(hashlib.sha1(r.tobytes()).digest() in hashes for r in target)

    def unit(a):
        a = torch.from_numpy(a).double()
        a = a - a.mean(1, keepdim=True)
        return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    p, t = unit(pool), unit(target)
    best = torch.cat([(t[i:i + 1000] @ p.T).max(1).values for i in range(0, len(t), 1000)])
    return exact, int((best >= CORR_LIMIT).sum()), float(best.max())


# -- running -----------------------------------------------------------------------------------------

def run(recipe_dict: dict, run_dir: Path) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    summary = Trainer(load_recipe(sized(recipe_dict)), run_dir, quiet=True).fit()
    out = {"metrics": summary["metrics"], "seconds": time.perf_counter() - t0, "steps": summary["steps"]}
    init = run_dir / "init.json"
    out["init_loaded"] = json.loads(init.read_text())["loaded"] if init.is_file() else []
    return out


def parse_targets(text: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in out if t not in TARGETS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"targets are {', '.join(TARGETS)}; got {text!r}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds 0..N-1 (default 3)")
    ap.add_argument("--targets", type=parse_targets, default=["t1", "t2"],
                    help="comma-separated targets: t1 (digits 5-9, 250) and/or t2 (all digits, 500)")
    ap.add_argument("--no-probe", action="store_true", help="skip arm (e), the frozen DAE encoder")
    ap.add_argument("--no-scratch-3e-3", action="store_true", help="skip arm (a'), scratch at lr 3e-3")
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder, removed at the end)")
    add_threads_option(ap)
    args = parse_args(ap, argv, seeds=1)
    if args.seeds < 1:
        ap.error("need at least one seed")
    default_threads = apply_threads(args)
    seeds = list(range(args.seeds))
    arms = [a for a in ARMS if not (a == "dae_probe" and args.no_probe)
            and not (a == "scratch_3e-3" and args.no_scratch_3e_3)]
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-aepre-"))
    t_start = time.perf_counter()

    # -- data: the pool, its references, and no shared signal ------------------------------------------
    pool = load_data(pool_spec(), 0)
    pool_rows = rows(pool)
    train = pool.train.x.numpy().reshape(len(pool.train), -1)
    val = pool.val.x.numpy().reshape(len(pool.val), -1)
    ref = {"pool_signals": len(pool_rows), "pool_train": len(train), "pool_value_mean": float(pool_rows.mean()),
           "pool_value_std": float(pool_rows.std()),
           "val_mse_global_mean": float(((val - train.mean()) ** 2).mean()),
           "val_mse_position_mean": float(((val - train.mean(0)) ** 2).mean()),
           "val_denoise_mse_identity": NOISE_STD ** 2}
    shipped_rows = rows(load_data(sized_data(read_recipe_source(PRETRAIN)[0]["data"]), 0))
    checks = {}
    for target in args.targets:
        tgt = rows(load_data({**target_data(target), "train_size": None}, 0))   # every row of every split
        for pool_name, p in (("unlabelled", pool_rows), ("shipped_supervised", shipped_rows)):
            exact, near, best = overlap(p, tgt)
            checks[f"{target}/{pool_name}"] = {"target_signals": len(tgt), "exact": exact, "near": near,
                                               "max_corr": round(best, 6)}
        for pool_name in ("unlabelled", "shipped_supervised"):
            c = checks[f"{target}/{pool_name}"]
            assert c["exact"] == 0 and c["near"] == 0, f"the {pool_name} pool shares signals with {target}: {c}"
    del pool, pool_rows, shipped_rows, train, val
    print(f"data checks done in {time.perf_counter() - t_start:.1f} s: {checks}", file=sys.stderr)

    # -- pretraining -----------------------------------------------------------------------------------
    pre = {}
    for kind in ("dae", "vae"):
        pre[kind] = run(autoencoder_recipe(kind), root / "pretrain" / kind)
        print(f"pretrain {kind}: {pre[kind]['metrics']} in {pre[kind]['seconds']:.1f} s", file=sys.stderr)
    sources = {"t1": {"dae": root / "pretrain" / "dae", "vae": root / "pretrain" / "vae",
                      "dae_probe": root / "pretrain" / "dae"}}
    sources["t2"] = dict(sources["t1"])
    if "supervised" in arms:
        pre["supervised"] = run(supervised_recipe(), root / "pretrain" / "supervised")
        for target in ("t1", "t2"):
            sources[target]["supervised"] = root / "pretrain" / "supervised"
        print(f"pretrain supervised: test accuracy {pre['supervised']['metrics']['test/accuracy']:.4f} "
              f"in {pre['supervised']['seconds']:.1f} s", file=sys.stderr)

    # -- fine-tuning -----------------------------------------------------------------------------------
    res: dict[str, dict[str, dict[int, dict]]] = {}
    loaded_names = set()
    for target in args.targets:
        res[target] = {arm: {} for arm in arms}
        for seed in seeds:
            for arm in arms:
                r = run(finetune_recipe(arm, target, seed, sources[target].get(arm)),
                        root / "finetune" / target / arm / f"seed{seed}")
                assert bool(r["init_loaded"]) == (not arm.startswith("scratch")), (arm, r["init_loaded"])
                if r["init_loaded"]:
                    loaded_names.add(tuple(r["init_loaded"]))
                res[target][arm][seed] = r
                print(f"{target} seed {seed} {arm}: test accuracy {r['metrics']['test/accuracy']:.4f} "
                      f"({r['seconds']:.1f} s)", file=sys.stderr)
    assert len(loaded_names) <= 1, f"the pretrained arms load different tensors: {loaded_names}"
    total_seconds = time.perf_counter() - t_start
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)

    # -- report ----------------------------------------------------------------------------------------
    print(f"autoencoder_pretrain: unsupervised (DAE, VAE) vs supervised pretraining vs scratch on MNIST-1D "
          f"(torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), torch's default here "
          f"{default_threads}; {platform.python_implementation()} {platform.python_version()}); "
          f"fine-tuning seeds {seeds}")
    print()
    print(f"Unlabelled pool: MNIST-1D generated with seed {POOL_SEED}, {ref['pool_signals']} signals of all ten "
          f"digits ({ref['pool_train']} train); values: mean {ref['pool_value_mean']:+.3f}, "
          f"std {ref['pool_value_std']:.3f}")
    print("Shared signals with the targets (every train/val/test row; exact = byte-equal, "
          f"near = correlation >= {CORR_LIMIT}):")
    for key, c in checks.items():
        target, pool_name = key.split("/")
        print(f"  {target} ({c['target_signals']} signals) vs {pool_name + ' pool':<26} exact {c['exact']:>4}, "
              f"near {c['near']:>4}, max correlation {c['max_corr']:.4f}")
    print()
    print(f"Pretraining (15 epochs, batch 128, AdamW 3e-3, seed 0); reference MSEs on the pool's val signals: "
          f"predict the train mean {ref['val_mse_global_mean']:.4f}, the per-position train mean "
          f"{ref['val_mse_position_mean']:.4f}; identity map on noisy input (denoise) {NOISE_STD ** 2:.4f}")
    m = pre["dae"]["metrics"]
    print(f"  DAE (noise std {NOISE_STD}, latent {LATENT}): val mse {m['val/mse']:.4f}, val denoise_mse "
          f"{m['val/denoise_mse']:.4f}, test mse {m['test/mse']:.4f}; {pre['dae']['steps']} steps, "
          f"{pre['dae']['seconds']:.1f} s")
    m = pre["vae"]["metrics"]
    print(f"  VAE (beta 1, latent {LATENT}):      val recon {m['val/recon']:.3f} (per signal, 1/2 sum of squares), "
          f"val kl {m['val/kl']:.3f}, val mse {m['val/mse']:.4f}; {pre['vae']['steps']} steps, "
          f"{pre['vae']['seconds']:.1f} s")
    if "supervised" in pre:
        k = "supervised"
        print(f"  supervised 0-4 (as shipped): test accuracy (digits 0-4) "
              f"{pre[k]['metrics']['test/accuracy']:.4f}; {pre[k]['steps']} steps, {pre[k]['seconds']:.1f} s")
    if loaded_names:
        names = next(iter(loaded_names))
        print(f"  every pretrained arm loads the same {len(names)} tensors: {', '.join(names)}")

    claims, figures_targets = {}, {}
    for target in args.targets:
        arms_res = res[target]
        acc_of = lambda arm, s: arms_res[arm][s]["metrics"]["test/accuracy"]  # noqa: E731
        steps = arms_res["scratch"][seeds[0]]["steps"]
        print()
        print(f"{TARGETS[target]['label']} ({steps} steps per run, {EPOCHS} epochs, batch 32); "
              f"test accuracy of the final model")
        w = max(14, 8 * len(seeds))
        head = (f"{'arm':<24}  " + "  ".join(f"{'acc s' + str(s):>8}" for s in seeds)
                + f"  {'mean':>7}  {'std':>6}  {'- (a) per seed':>{w}}  {'mean diff':>9}  {'vs (a)':>13}"
                + f"  {'wall s':>6}")
        print(head)
        print("-" * len(head))
        fig = {}
        for arm in arms:
            acc = [acc_of(arm, s) for s in seeds]
            diffs = [acc_of(arm, s) - acc_of("scratch", s) for s in seeds]
            wall = [arms_res[arm][s]["seconds"] for s in seeds]
            base = arm == "scratch"
            per_seed = "-" if base else " ".join(f"{d:+.3f}" for d in diffs)
            md = f"{'-':>9}" if base else f"{mean(diffs):+9.4f}"
            v = "-" if base else verdict(diffs)
            print(f"{ARMS[arm]:<24}  " + "  ".join(f"{a:8.4f}" for a in acc)
                  + f"  {mean(acc):7.4f}  {std(acc):6.4f}  {per_seed:>{w}}  {md}  {v:>13}  {mean(wall):6.1f}")
            fig[arm] = {"test_accuracy": [r4(a) for a in acc], "test_accuracy_mean": r4(mean(acc)),
                        "test_accuracy_std": r4(std(acc)),
                        "test_nll_mean": r4(mean(arms_res[arm][s]["metrics"]["test/nll"] for s in seeds)),
                        "wall_seconds_mean": round(mean(wall), 2)}
            if not base:
                fig[arm].update(minus_scratch=[r4(d) for d in diffs], minus_scratch_mean=r4(mean(diffs)),
                                vs_scratch=v)
        print("-" * len(head))
        fig["steps"] = steps

        def line(claim: str, a: str, b: str) -> None:
            if a not in arms_res or b not in arms_res:
                return
            diffs = [acc_of(a, s) - acc_of(b, s) for s in seeds]
            v = verdict(diffs)
            print(f"  {claim}: {ARMS[a].split(' ')[0]} - {ARMS[b].split(' ')[0]} = {mean(diffs):+.3f} "
                  f"(better on {sum(d > 0 for d in diffs)}/{len(diffs)} seeds) -> {v.upper()}")
            claims.setdefault(target, {})[f"{a}_vs_{b}"] = {"mean_diff": r4(mean(diffs)), "verdict": v}

        line("DAE pretraining helps", "dae", "scratch")
        line("VAE pretraining helps", "vae", "scratch")
        line("supervised pretraining helps", "supervised", "scratch")
        line("DAE beats scratch at lr 3e-3 too", "dae", "scratch_3e-3")
        line("DAE matches supervised pretraining", "dae", "supervised")
        line("VAE matches supervised pretraining", "vae", "supervised")
        line("frozen DAE features + head beat scratch", "dae_probe", "scratch")
        if target == "t2" and "supervised" in arms:
            print("  (in T2, (d) was pretrained with labels of T2's digits 0-4 - other signals of the same classes)")
        best = max(arms, key=lambda a: mean(acc_of(a, s) for s in seeds))
        print(f"  best arm by mean test accuracy: {ARMS[best]}")
        fig["best_arm"] = best
        figures_targets[target] = fig
    if "t2" not in args.targets:
        print()
        print("T2 (all ten digits) not run (--targets).")
    print()
    print(f"total {total_seconds:.0f} s")
    figures = {
        "benchmark": "autoencoder_pretrain",
        "seeds": seeds,
        "targets": {t: {k: v for k, v in TARGETS[t].items() if k != "label"} for t in args.targets},
        "arms": arms,
        "epochs": EPOCHS,
        "pool_seed": POOL_SEED,
        "overlap": checks,
        "reference": {k: (r4(v) if isinstance(v, float) else v) for k, v in ref.items()},
        "pretrain": {
            k: {"seconds": round(r["seconds"], 1), "steps": r["steps"],
                **{n: r4(r["metrics"][n]) for n in ("val/mse", "val/denoise_mse", "test/mse", "val/recon",
                                                    "val/kl", "test/accuracy") if n in r["metrics"]}}
            for k, r in pre.items()},
        "finetune": figures_targets,
        "claims": claims,
    }
    return print_json_line(figures, total_seconds, default_threads)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
