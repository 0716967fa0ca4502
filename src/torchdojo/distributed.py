"""Data-parallel training on PyTorch's own engine: torch.distributed, processes started by torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process's environment; `Dist` reads them (world 1
when they are absent, so single-process runs never touch torch.distributed). The trainer uses it for
the few places where processes must agree: DistributedDataParallel, the logged loss, RNG states in
checkpoints and the interrupt flag. Only rank 0 writes files; every rank calls the same collectives in
the same order (a collective inside a rank-0-only branch would hang the others)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist

# With TORCHDOJO_DIST_TRACE=DIR, each rank writes the collectives it called (in order) to DIR/rank<r>.txt
# when it leaves: the tests compare them, as ranks that disagree can otherwise pass or hang by chance.
_trace: list[str] = []


def _record(name: str) -> None:
    if os.environ.get("TORCHDOJO_DIST_TRACE"):
        _trace.append(name)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Dist":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def restart_count(self) -> int:
        """How often torchrun restarted the workers (`--max-restarts`); 0 on the first attempt."""
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))

    def init(self) -> None:
        """Join the process group (gloo on CPU, nccl with CUDA); a no-op for one process or when joined."""
        if not self.enabled or tdist.is_initialized():
            return
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)     # each process on its own GPU before any collective
        # torchrun's store outlives a restart (--max-restarts), and the group's keys in it would still
        # name the failed attempt's addresses (connections refused; cf. pytorch/pytorch#167288): each
        # attempt gets keys of its own.
        store, rank, world = next(tdist.rendezvous("env://"))
        store = tdist.PrefixStore(f"torchdojo/attempt-{self.restart_count}", store)
        tdist.init_process_group(backend, store=store, rank=rank, world_size=world)

    def barrier(self) -> None:
        if self.enabled:
            _record("barrier")
            tdist.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the processes (a new tensor; the input is left alone)."""
        if not self.enabled:
            return tensor
        _record(f"all_reduce_mean{tuple(tensor.shape)}")
        out = tensor.detach().clone()
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out / self.world

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """Whether `flag` is true on any process (every process must call it at the same point)."""
        if not self.enabled:
            return flag
        _record("any")
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every process (all_gather_object: picklable objects)."""
        if not self.enabled:
            return [obj]
        _record("gather_objects")
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def destroy(self) -> None:
        if self.enabled and tdist.is_initialized():
            trace_dir = os.environ.get("TORCHDOJO_DIST_TRACE")
            if trace_dir:
                from pathlib import Path
                Path(trace_dir, f"rank{self.rank}.txt").write_text("\n".join(_trace) + "\n")
            # Leave together: a rank that tears down its group while another still writes (rank 0's
            # final checkpoint) can abort in gloo's threads ("terminate called without an active exception").
            tdist.barrier()
            tdist.destroy_process_group()


def torchrun_command(nproc: int, args: list[str], max_restarts: int = 0) -> list[str]:
    """The command that runs `python -m torchdojo ARGS` in `nproc` local processes through torchrun.

    `--standalone` gives a private rendezvous on a free port, so several runs on one machine never
    collide."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--max-restarts", str(max_restarts), "-m", "torchdojo", *args]
