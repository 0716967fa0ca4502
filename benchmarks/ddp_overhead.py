"""Data-parallel overhead on this machine: samples per second of 1 process vs 2 processes (one torch thread
each, gloo, the same global batch), and the share of a 2-process step spent communicating.

Part 1 trains the same recipe (cnn on digits, global batch 128, `--epochs` epochs, no checkpoints or
TensorBoard) with `Trainer` in this process and with `dojo train --nproc 2` (torchrun); samples/s = the median
of the logged training throughput between log points (the first interval, with a fresh process's start-up
costs, left out). Part 2 runs a torchrun job of 2 workers (this file with
`--worker`) that time `--steps` DDP training steps of the same model with gradient synchronisation and
the same steps under `no_sync()` (no communication); communication share = 1 - t(no_sync) / t(sync).
The workers also time the cnn with BatchNorm, plain and with `sync_batchnorm` (torchdojo's CPU
SyncBatchNorm: two more all-reduces per BatchNorm layer in each direction): the cost of the option.

What a 2-core machine can show: whether two processes on two cores beat one (the model is tiny, so the
fixed per-step cost of synchronising ~100k gradients weighs a lot), not how data parallelism scales on
real hardware, where each process has its own accelerator and the interconnect is much faster than
gloo over loopback.

Run: .venv/bin/python benchmarks/ddp_overhead.py [--epochs 10] [--steps 60]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _stats import parse_args, r4, run_figures

HERE = Path(__file__).resolve().parent
BATCH = 128


def recipe(epochs: int) -> dict:
    return {"name": "bench-ddp", "seed": 0, "data": {"name": "digits"},
            "model": {"name": "cnn", "channels": [32, 64], "hidden": 128, "batch_norm": False},
            "phases": [{"name": "main", "epochs": epochs, "batch_size": BATCH,
                        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01}}],
            "checkpoint": {"every_epochs": None}, "log": {"every_steps": 10, "tensorboard": False}}


def steady_rate(run_dir: Path) -> float:
    """Median logged training throughput (global samples/s between log points), leaving out the first
    interval, which carries the one-time start-up costs of a fresh process."""
    rates = [e["train/samples_per_sec"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "train/samples_per_sec" in e]
    return statistics.median(rates[1:] or rates)


def worker(steps: int) -> None:
    """One torchrun worker: time DDP steps with and without gradient synchronisation."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from torchdojo.registry import MODELS
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = MODELS.build({"name": "cnn", "channels": [32, 64], "hidden": 128, "batch_norm": False}, "model",
                         input_shape=(1, 8, 8), num_outputs=10)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(BATCH // world, 1, 8, 8), torch.randint(0, 10, (BATCH // world,))

    def step(sync: bool) -> None:
        opt.zero_grad(set_to_none=True)
        if sync:
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
        else:
            with ddp.no_sync():
                torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()

    def timed(run_step, *args) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            run_step(*args)
        dist.barrier()
        return time.perf_counter() - t0

    times = {}
    for sync in (True, False, True, False):           # warm-up rounds, then the measured ones
        times[sync] = timed(step, sync)

    from torchdojo.sync_batchnorm import convert_sync_batchnorm
    bn_times = {}
    for synced in (False, True, False, True):
        torch.manual_seed(0)
        bn_model = MODELS.build({"name": "cnn", "channels": [32, 64], "hidden": 128, "batch_norm": True}, "model",
                                input_shape=(1, 8, 8), num_outputs=10)
        bn_ddp = DistributedDataParallel(convert_sync_batchnorm(bn_model) if synced else bn_model)
        bn_opt = torch.optim.AdamW(bn_model.parameters(), lr=1e-3)

        def bn_step() -> None:
            bn_opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(bn_ddp(x), y).backward()
            bn_opt.step()
        bn_times[synced] = timed(bn_step)
    if rank == 0:
        print(json.dumps({"sync_seconds": times[True], "no_sync_seconds": times[False], "steps": steps,
                          "bn_seconds": bn_times[False], "sync_bn_seconds": bn_times[True]}))
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of both parts; medians are reported")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parse_args(ap, argv, epochs=1, steps=5, repeats=1)
    if args.worker:
        worker(args.steps)
        return 0
    from torchdojo import Trainer, load_recipe

    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t_start = time.perf_counter()
    rounds = []
    for k in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="dojo-bench-ddp-") as tmp:
            r = recipe(args.epochs)
            one = Trainer(load_recipe(r), Path(tmp) / "one", quiet=True).fit()
            (Path(tmp) / "r.json").write_text(json.dumps(r))
            out = subprocess.run([sys.executable, "-m", "torchdojo", "train", str(Path(tmp) / "r.json"), "--nproc",
                                  "2", "--run-dir", str(Path(tmp) / "two"), "-q"], env=env, capture_output=True,
                                 text=True, timeout=900)
            if out.returncode != 0:
                print(out.stderr[-2000:])
                return 1
            two = json.loads((Path(tmp) / "two" / "summary.json").read_text())
            rates = [steady_rate(Path(tmp) / name) for name in ("one", "two")]
        comm = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(HERE / "ddp_overhead.py"), "--worker", "--steps", str(args.steps)],
                              env=env, capture_output=True, text=True, timeout=600)
        timing = json.loads(comm.stdout.strip().splitlines()[-1])
        rounds.append({"sps1": rates[0], "sps2": rates[1],
                       "share": 1 - timing["no_sync_seconds"] / timing["sync_seconds"],
                       "sync_bn_ratio": timing["sync_bn_seconds"] / timing["bn_seconds"], **timing})
        print(f"round {k}: 1 process {rounds[-1]['sps1']:.0f} samples/s, 2 processes {rounds[-1]['sps2']:.0f}, "
              f"communication share {rounds[-1]['share']:.1%}, sync_batchnorm step time "
              f"{rounds[-1]['sync_bn_ratio']:.2f}x", flush=True)
    med = lambda key: statistics.median(x[key] for x in rounds)  # noqa: E731
    sps1, sps2, share = med("sps1"), med("sps2"), med("share")
    timing = {"sync_seconds": med("sync_seconds"), "no_sync_seconds": med("no_sync_seconds")}
    bn_ms, sync_bn_ms = med("bn_seconds") / args.steps * 1e3, med("sync_bn_seconds") / args.steps * 1e3
    print(f"medians over {args.repeats} rounds:")
    print(f"1 process : {sps1:8.0f} samples/s ({one['steps']} steps of global batch {BATCH}, "
          f"test acc {one['metrics']['test/accuracy']:.4f})")
    print(f"2 processes: {sps2:8.0f} samples/s (test acc {two['metrics']['test/accuracy']:.4f}); "
          f"speed-up {sps2 / sps1:.2f}x")
    print(f"communication share of a 2-process step: {share:.1%} ({timing['sync_seconds'] / args.steps * 1e3:.2f} ms "
          f"per synchronised step, {timing['no_sync_seconds'] / args.steps * 1e3:.2f} ms without synchronisation)")
    print(f"cnn with BatchNorm, 2 processes: {bn_ms:.2f} ms per step, {sync_bn_ms:.2f} ms with sync_batchnorm "
          f"({med('sync_bn_ratio'):.2f}x)")
    print(json.dumps({"benchmark": "ddp_overhead", "samples_per_sec_1proc": round(sps1, 1),
                      "samples_per_sec_2proc": round(sps2, 1), "speedup": r4(sps2 / sps1),
                      "communication_share": r4(share), "ms_per_step_sync": r4(timing["sync_seconds"] / args.steps * 1e3),
                      "ms_per_step_no_sync": r4(timing["no_sync_seconds"] / args.steps * 1e3),
                      "ms_per_step_bn": r4(bn_ms), "ms_per_step_sync_bn": r4(sync_bn_ms),
                      "sync_bn_step_ratio": r4(med("sync_bn_ratio")),
                      "global_batch": BATCH, "epochs": args.epochs,
                      **run_figures(time.perf_counter() - t_start, default_threads)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
