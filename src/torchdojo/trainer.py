"""The trainer: one loop over the recipe's phases that calls the methods' hooks.

Read `Trainer.fit` top to bottom: phases, epochs, steps, evaluation, checkpoints. Everything that
varies between recipes lives in the task (objective, metrics) and the methods (hooks)."""
from __future__ import annotations

import contextlib
import fnmatch
import math
import json
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write_text
from .checkpoint import (WEIGHTS, CheckpointUnreadable, checkpoint_step, is_disk_full, latest_valid_checkpoint,
                         list_checkpoints, load_checkpoint, read_final_weights, remove_leftovers, save_checkpoint,
                         save_final, validate_checkpoint)
from .checkpoint_state import StateError, check_state
from .data import DataBundle, TensorLoader, load_data
from .distributed import Dist
from .errors import ConfigError, DiskFull, DojoError, StoppedBySignal, choices_text
from .log import MetricsFile, Reporter, TensorBoardSink
from .methods import HOOKS, GradClip, Method
from .optim.param_groups import apply_lr_mult, param_groups
from .pretrained import load_pretrained
from .recipe import BALANCED_OPTIONS, LossWeightSchedule, Recipe, load_recipe
from .run_lock import acquire_run_dir
from .runfiles import read_json_object
from .registry import AUGMENTS, LOSSES, METHODS, MODELS, OPTIMIZERS, TASKS
from .schedules import Clock
from .sync_batchnorm import convert_sync_batchnorm
from .tasks import LossTerm

CHECKPOINT_FORMAT = 1
# `nonfinite: raise` checks the losses of the steps between log steps together, at least this often.
WATCH_FOLD = 64


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint; `exit_code` is 130 or 143."""

    def __init__(self, exit_code: int, run_dir: Path | None):
        self.exit_code, self.run_dir = exit_code, run_dir
        super().__init__(f"interrupted; resume with: dojo resume {run_dir}" if run_dir else "interrupted")


class NonFiniteError(DojoError):
    """A training step produced a NaN/inf loss or gradient (`nonfinite.policy: raise`, or more than
    `nonfinite.max_consecutive` skipped steps in a row or rollbacks to one checkpoint)."""


class _RollBack(Exception):
    """Raised inside the loop by `nonfinite: rollback`; `fit` restores the last good checkpoint."""

    def __init__(self, step: int, what: str):
        self.step, self.what = step, what


@dataclass
class TrainState:
    """Everything a method may read. Counters are the single source of truth for resume."""
    recipe: Recipe
    model: nn.Module
    data: DataBundle
    task: Any
    device: torch.device
    optimizer: torch.optim.Optimizer | None = None
    loader: TensorLoader | None = None
    phase_index: int = 0
    phase_name: str = ""
    phase_steps: int = 0             # length of the current phase in optimizer steps
    steps_per_epoch: int = 0
    step: int = 0                    # optimizer steps since the start of the run
    step_in_phase: int = 0
    epoch_in_phase: int = 0          # completed epochs in the current phase
    batch_in_epoch: int = 0
    epochs_done: float = 0.0         # completed epochs in finished phases
    stop_reason: str | None = None
    eval_model: nn.Module | None = None
    schedule: Any = None             # the current phase's torchdojo.schedules.Schedule
    run_dir: Path | None = None
    step_logs: dict[str, Any] = field(default_factory=dict)   # scalars methods want logged
    # emit({"name": value, ...}): a method's own metrics line (step, epoch and phase are added), written
    # to metrics.jsonl and TensorBoard now, whatever the log interval. Set by the Trainer.
    emit: Any = None

    @property
    def epoch(self) -> float:
        """Epochs done so far, counting partial ones: `metrics.jsonl`'s `epoch`."""
        return self.epochs_done + self.epoch_in_phase + self.batch_in_epoch / max(1, self.steps_per_epoch)


def data_kind(data: DataBundle) -> str:
    """What augmentations fit: token ids are text; (C, H, W) inputs images, (C, L) sequences, (F,) tables."""
    if not data.train.x.is_floating_point():
        return "text"
    return {3: "image", 2: "sequence", 1: "table"}.get(len(data.info.input_shape), "other")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DojoError("device: cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in rng["python"]))
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def load_weights_into(model: nn.Module, weights: dict, what: str) -> None:
    """`model.load_state_dict(weights)`; tensors that do not fit (missing, unexpected, another shape) are
    one DojoError naming `what`, not torch's multi-line RuntimeError."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        raise DojoError(f"{what} do not fit the run's model: {' '.join(first[:2])[:300]}") from None


def _loggable(value):
    """A logged scalar as checkpoint state (`weights_only` loading takes tensors and plain numbers)."""
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def carry_state(previous: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Give `new` the per-parameter state of `previous` (same optimizer class and groups), keeping the
    new phase's hyperparameters (lr, weight decay, ...)."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in new.param_groups]
    new.load_state_dict(previous.state_dict())
    for group, settings in zip(new.param_groups, hyper):
        group.update(settings)


def _named(model: nn.Module, modules: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(m)], m) for m in modules]


def frozen_modules(model: nn.Module, patterns: list[str], path: str) -> list[nn.Module]:
    """Modules whose qualified names match any glob pattern; a pattern matching nothing is an error."""
    named = dict(model.named_modules())
    found = []
    for pattern in patterns:
        matches = [m for name, m in named.items() if name and fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            top = [n for n in named if n and "." not in n]
            raise ConfigError(path, f"freeze pattern '{pattern}' matches no module; top-level modules: "
                                    f"{choices_text(top)}")
        found += matches
    return found


class LossMeter:
    """Running mean of the training loss between log points. Saved in checkpoints, so a resumed run
    logs the same means as an uninterrupted one."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = 0
        self.samples, self.since = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.total = loss if self.total is None else self.total + loss
        self.count += 1
        self.samples += samples

    def take(self) -> tuple[torch.Tensor | None, float]:
        """(mean loss or None if nothing was added, samples/s) since the last take; resets the meter."""
        now = time.perf_counter()
        mean = self.total / self.count if self.count else None
        speed = self.samples / max(now - self.since, 1e-9)
        self.total, self.count, self.samples, self.since = None, 0, 0, now
        return mean, speed

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count, "samples": self.samples}

    def load_state_dict(self, state: dict, seconds: float = 0.0) -> None:
        """`seconds`: how long the meter had been running at the save (a measurement of the machine,
        kept beside the state): the first line after a resume then reports the throughput of the steps
        before the stop too, not 0 samples/s."""
        self.total, self.count = state["total"], state["count"]
        self.samples = state.get("samples", 0)
        self.since = time.perf_counter() - seconds

    def seconds(self) -> float:
        return time.perf_counter() - self.since


class _BatchLoss(nn.Module):
    """A batch's training loss as one module call: the unit DistributedDataParallel wraps, as DDP only
    synchronizes gradients of parameters used inside its wrapper's forward."""

    def __init__(self, model: nn.Module, compute):
        super().__init__()
        self.model = model
        self.compute = compute      # (model, batch) -> (loss, parts)

    def forward(self, batch: dict):
        return self.compute(self.model, batch)


class _LineCounter:
    """Stands in for rank 0's MetricsFile on the other ranks: writes nothing, counts the lines."""

    def __init__(self, lines: int):
        self.lines = lines

    def write(self, entry: dict) -> None:
        self.lines += 1

    def close(self) -> None:
        pass


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: str | Path | None = None, quiet: bool = False,
                 reporter: Reporter | None = None):
        self.recipe = recipe
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # Kept on every rank (only rank 0 writes there): `nonfinite: rollback` reads it on all of them.
        self._checkpoint_dir = self.run_dir / "checkpoints" if self.run_dir is not None else None
        self.quiet = quiet
        seed_everything(recipe.seed)
        self.device = resolve_device(recipe.device)
        # Data parallel under torchrun (see torchdojo.distributed): every rank builds the same model
        # from the same seed and trains on its slice of each global batch. World 1: nothing changes.
        self.dist = Dist.from_env()
        if self.dist.enabled:
            self.dist.init()
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.dist.local_rank)
            for i in range(len(recipe.phases)):
                if recipe.batch_size(i) % self.dist.world:
                    raise ConfigError(f"phases.{i}.batch_size", f"the global batch size {recipe.batch_size(i)} "
                                      f"does not divide over {self.dist.world} processes")
            if recipe.sync_batchnorm and recipe.ensemble is not None:
                raise ConfigError("sync_batchnorm", "synchronized BatchNorm does not run inside a joint "
                                  "ensemble's vmap; leave it out or train the members one by one")
        self._ddp: nn.Module | None = None      # the DistributedDataParallel wrapper of the current phase
        data = load_data(recipe.data.model_dump(), recipe.seed)
        task = TASKS.build(recipe.task, "task")
        if task.task_type not in ("any", data.info.task_type):     # "any": unsupervised, labels unused
            raise ConfigError("task.name", f"task '{recipe.task['name']}' is for {task.task_type}, but the "
                                           f"data '{recipe.data.name}' is a {data.info.task_type} dataset")
        build = lambda: MODELS.build(recipe.model, "model", input_shape=tuple(data.info.input_shape),  # noqa: E731
                                     num_outputs=data.info.num_outputs)
        from .models.size import check_model_size       # counted on the meta device before anything is allocated
        check_model_size(build, recipe.model["name"], copies=recipe.ensemble.members if recipe.ensemble else 1)
        self.ensemble = recipe.ensemble          # joint members: one StackedEnsemble is the model
        if self.ensemble is not None:
            model = self._stacked_ensemble(build, task, data).to(self.device)
        else:
            model = build().to(self.device)
            if recipe.sync_batchnorm and self.dist.enabled:     # before any optimizer holds its parameters
                model = convert_sync_batchnorm(model)
        self.methods: list[Method] = [METHODS.build(m, f"methods.{i}") for i, m in enumerate(recipe.methods)]
        # Only hooks a method overrides are called: unused hooks cost nothing in the step.
        self.hooks = {h: [m for m in self.methods if getattr(type(m), h) is not getattr(Method, h)] for h in HOOKS}
        on_device = data.to(self.device)
        if recipe.data.num_workers:      # worker processes read the training rows from CPU memory
            on_device = DataBundle(data.train, on_device.val, on_device.test, data.info, on_device.unlabeled)
        self.state = TrainState(recipe, model, on_device, task, self.device, run_dir=self.run_dir)
        if hasattr(task, "bind"):       # tasks that need the data or augmentations (semisup, autoencode)
            task.bind(self)
        self._task_logs = hasattr(task, "step_logs")     # scalars a task wants logged (semisup's mask rate)
        self.state.emit = self._emit
        self._row_weights: torch.Tensor | None = None    # the balanced sampler's, computed on first use
        # Parameter names frozen in each phase, known up front so groups never appear mid-run.
        self.frozen_by_phase = {
            recipe.phase_name(i): {f"{prefix}.{n}" if prefix else n
                                   for prefix, module in _named(model, frozen_modules(model, p.freeze, f"phases.{i}.freeze"))
                                   for n, _ in module.named_parameters()}
            for i, p in enumerate(recipe.phases)}
        self._augments = [self.build_augment(recipe.augment(i), f"phases.{i}.augment")
                          for i in range(len(recipe.phases))]
        self.phase_plan = [self._phase_length(i) for i in range(len(recipe.phases))]
        recipe.check_schedules(self.phase_plan)     # here, not only in fit: param-groups refuses what train would
        self.total_steps = sum(steps for steps, _ in self.phase_plan)
        self.reporter = reporter or Reporter(self.total_steps, quiet=quiet)
        self._optimizer_phase = -1
        self._resume_from: tuple[dict, dict] | None = None
        self.skipped_checkpoints: list[Path] = []     # newer checkpoints from_run_dir could not use
        self._wall_before = 0.0
        self._last_eval_step = -1
        self._last_checkpoint_lines = -1    # metrics.jsonl lines covered by the last checkpoint
        self._interrupt: int | None = None
        self._steps_started = False       # signals before the first step stop at once (see the handler)
        self._last_train: dict = {}
        self._meter = LossMeter()
        self._last_parts: dict = {}       # the last step's loss terms, logged with the next train line
        self._recipe_yaml = recipe.to_yaml()     # saved in every checkpoint; serialised once
        self._last_val: dict = {}
        self._run: MetricsFile | None = None
        self._nonfinite_skips, self._nonfinite_in_a_row = 0, 0
        self._first_bad: torch.Tensor | None = None     # `raise`: the first non-finite step since the last read
        self._watched: list[torch.Tensor] = []          # `raise`: losses of steps not checked yet
        self._watched_from = 0                          # the step of the first of them
        self._bf16 = recipe.precision == "bf16"
        self._frozen: list[nn.Module] = []      # the current phase's frozen modules (set per phase)
        self._train_bn = False
        self._lr_factor = 1.0             # lowered by each `nonfinite: rollback`
        self._rollbacks: list[int] = []   # checkpoint steps rolled back to, in order
        self._log_grad_norm = not any(isinstance(m, GradClip) for m in self.methods)   # it logs its own
        if self.dist.rank > 0:
            # Every rank built the same model from the recipe's seed; from here on each draws its own
            # dropout masks (and other training noise) for its own rows. Rank 0 keeps the seed's stream,
            # as in one process. Checkpoints hold each rank's state, so resume stays exact.
            seed_everything(int(np.random.SeedSequence([recipe.seed, self.dist.rank]).generate_state(1)[0]))
        StoppedBySignal.raise_pending()      # data and model built: a swallowed stop during setup ends here

    # -- building pieces -------------------------------------------------------------------------

    def _phase_length(self, i: int) -> tuple[int, Clock]:
        """(steps in phase i, its Clock: steps in each of its epochs at that epoch's batch size)."""
        phase = self.recipe.phases[i]
        clock = Clock(lambda k: len(self.train_loader(i, k)))
        steps = phase.steps if phase.steps is not None else max(1, clock.steps_at(phase.epochs))
        return steps, clock

    def train_loader(self, i: int, epoch: int = 0) -> TensorLoader:
        """The shuffled training batches of phase i in its epoch `epoch` (at that epoch's batch size);
        with `data.sampler: balanced`, a class-balanced sample drawn with replacement instead."""
        weights = self._balanced_row_weights() if self.recipe.data.sampler == "balanced" else None
        return TensorLoader(self.state.data.train, self.recipe.batch_size(i, epoch), shuffle=True,
                            seed=self.recipe.seed * 100 + i, drop_last=True, weights=weights,
                            transform=self._augments[i],
                            num_workers=self.recipe.data.num_workers,
                            # Without workers the rows already live on the device.
                            device=self.device if self.recipe.data.num_workers else None)

    def build_augment(self, specs: list[dict], path: str):
        """A Compose of the augmentations `specs` (None when empty), each checked against the data's kind
        (image, sequence, table, text) and given the class count or special token ids it asks for."""
        if not specs:
            return None
        from .augment import Compose
        kind, info = data_kind(self.state.data), self.state.data.info
        injected = {"num_classes": info.num_outputs if info.task_type == "classification" else None,
                    "special_ids": list(getattr(info, "special_ids", None) or [])}
        transforms = []
        for j, spec in enumerate(specs):
            entry = AUGMENTS.get(spec["name"], f"{path}.{j}.name")
            if entry.factory.kind not in ("any", kind):
                raise ConfigError(f"{path}.{j}", f"augmentation '{spec['name']}' is for {entry.factory.kind} data, "
                                                 f"but data '{self.recipe.data.name}' is {kind} data")
            if entry.factory.mixes_labels and info.task_type != "classification":
                raise ConfigError(f"{path}.{j}", f"'{spec['name']}' mixes class labels: it needs classification data")
            transforms.append(AUGMENTS.build(spec, f"{path}.{j}", **{k: injected[k] for k in entry.injected}))
        return Compose(transforms)

    def _stacked_ensemble(self, build, task, data) -> nn.Module:
        """`ensemble` with `vary: [seed]`: members of one architecture with different initialisations (seeds
        seed*1000 + i), trained together in one vectorised pass (see docs/ensembles.md)."""
        from .ensembles import StackedEnsemble
        spec = self.ensemble
        if spec.vary != ["seed"]:
            raise DojoError("an ensemble whose members vary more than `seed` trains its members one after "
                            "another: run it with `dojo train` or torchdojo.ensemble_runs.train_ensemble")
        if self.recipe.task["name"] not in ("classify", "regress"):
            raise ConfigError("ensemble", f"joint ensembles train with the classify or regress task, not "
                                          f"'{self.recipe.task['name']}'")
        how = ("mean_logprob" if spec.combine == "mean_logprob" else "mean_prob") \
            if task.task_type == "classification" else "mean"
        return StackedEnsemble.from_seeds(build, [self.recipe.seed * 1000 + i for i in range(spec.members)], how)

    def _balanced_row_weights(self) -> torch.Tensor:
        """Per training row 1 / n_class(y) (computed once): the balanced sampler draws each class about
        equally often."""
        if self._row_weights is None:
            y = self.state.data.train.y.cpu()
            self._row_weights = 1.0 / self._train_class_counts().double()[y]
        return self._row_weights

    def _train_class_counts(self) -> torch.Tensor:
        """Training rows per class (classification data), on the CPU."""
        info = self.state.data.info
        if info.task_type != "classification":
            raise DojoError("class counts need classification data")
        return torch.bincount(self.state.data.train.y.cpu(), minlength=info.num_outputs)

    def balanced_class_weights(self) -> list[float]:
        """n / (K n_c) per class from the training labels (`class_weights: balanced`); 0 for a class with
        no training rows (its weight never applies to an index target)."""
        counts = self._train_class_counts().double()
        n, k = float(counts.sum()), len(counts)
        return torch.where(counts > 0, n / (k * counts.clamp(min=1)), torch.zeros_like(counts)).tolist()

    def eval_loader(self, split: str) -> TensorLoader:
        """Batches of a split in order, at the recipe's evaluation batch size."""
        return TensorLoader(self.state.data.split(split), self.recipe.eval.batch_size)

    def _enter_phase(self, i: int) -> None:
        """Build what phase i uses: optimizer (if it switches), loader, schedule, losses, frozen parts."""
        s, phase = self.state, self.recipe.phases[i]
        s.phase_index, s.phase_name = i, self.recipe.phase_name(i)
        s.phase_steps, clock = self.phase_plan[i]
        path = f"phases.{i}"
        for p in s.model.parameters():
            p.requires_grad_(True)
        self._frozen = frozen_modules(s.model, phase.freeze, f"{path}.freeze")
        self._train_bn = phase.train_bn
        for m in self._frozen:
            m.requires_grad_(False)
        if self.dist.enabled:
            # Rebuilt per phase: DDP registers the parameters that need a gradient when it is built,
            # and freezing changes them. `s.model` stays the plain module, so checkpoints, evaluation
            # and the methods see its own parameter names; only the training forward goes through DDP.
            # DDP wraps the whole loss computation (_BatchLoss), so everything that uses the parameters
            # in a step (a joint ensemble's members included) runs inside its forward.
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(_BatchLoss(s.model, self._batch_loss), device_ids=ids)
        opt_phase = self.recipe.active_optimizer_phase(i)
        if opt_phase != self._optimizer_phase:
            # A phase that names an optimizer starts it fresh (or carries the same optimizer's state);
            # one that does not keeps the current one.
            previous = s.optimizer
            s.optimizer = self.build_optimizer(opt_phase)
            if phase.optimizer_state == "carry" and previous is not None:
                carry_state(previous, s.optimizer)
            self._optimizer_phase = opt_phase
        # Frozen groups run at lr 0 (and get no gradient); unfreezing restores them: no group is added.
        frozen_names = self.frozen_by_phase[s.phase_name]
        frozen_ids = {id(p) for n, p in s.model.named_parameters() if n in frozen_names}
        self._group_base = [0.0 if g["params"] and all(id(p) in frozen_ids for p in g["params"]) else g["initial_lr"]
                            for g in s.optimizer.param_groups]
        s.schedule = self._schedule = self.recipe.schedule(i, s.phase_steps, clock)
        self._has_lr_floor = any(seg.plateau is not None and seg.plateau.min_lr > 0 for seg in self._schedule.segments)
        self._loss_terms = self.build_losses(i)
        self._accumulate = self.recipe.accumulate(i)
        if self._accumulate > 1:
            summed = [t.name for t in self._loss_terms if getattr(t.fn, "reduction", "mean") == "sum"]
            if summed:
                raise ConfigError(f"{path}.accumulate", f"gradient accumulation weights each micro-batch's "
                                  f"mean loss by its share of the batch; loss {summed[0]!r} uses reduction: sum")
        self._start_epoch()
        self._set_train_mode()

    def _start_epoch(self) -> None:
        """The loader (and, with lr_scaling, the base LRs) for the current epoch's batch size."""
        s, i = self.state, self.state.phase_index
        s.loader = self.train_loader(i, s.epoch_in_phase)
        s.steps_per_epoch = len(s.loader)
        if self.dist.enabled and s.loader.batch_size % self.dist.world:     # a batch size schedule's
            raise ConfigError(f"phases.{i}.batch_size", f"the global batch size {s.loader.batch_size} (epoch "
                              f"{s.epoch_in_phase}) does not divide over {self.dist.world} processes")
        factor = self.lr_scale(i, s.epoch_in_phase)
        self._base_lrs = [base * factor for base in self._group_base]

    def lr_scale(self, i: int, epoch: int) -> float:
        """The `lr_scaling` factor of phase i in an epoch: its batch size over the batch size the active
        optimizer's LR was set for (linear: Goyal et al. 2017, arXiv 1706.02677; sqrt: Krizhevsky 2014,
        arXiv 1404.5997)."""
        mode = self.recipe.phases[i].lr_scaling
        if mode == "none":
            return 1.0
        ratio = self.recipe.batch_size(i, epoch) / self.recipe.batch_size(self.recipe.active_optimizer_phase(i), 0)
        return ratio if mode == "linear" else ratio ** 0.5

    def build_optimizer(self, i: int) -> torch.optim.Optimizer:
        """The optimizer phase i names, over the recipe's parameter groups (lr scaled by each group's
        lr_mult; `initial_lr` holds the base LR the schedules scale, kept in its state_dict)."""
        spec = self.recipe.param_groups_for(i)
        where = f"phases.{i}.param_groups" if self.recipe.phases[i].param_groups else "param_groups"
        try:
            groups = param_groups(self.state.model, [r.model_dump() for r in spec.rules], no_decay=spec.no_decay,
                                  layer_decay=spec.layer_decay, frozen=self.frozen_by_phase)
        except ValueError as exc:
            raise ConfigError(where, str(exc)) from None
        optimizer = OPTIMIZERS.build(self.recipe.phases[i].optimizer, f"phases.{i}.optimizer", params=groups)
        apply_lr_mult(optimizer)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def build_losses(self, i: int) -> list[LossTerm]:
        """Phase i's loss terms; terms with a weight schedule are listed in `self._weighted_terms`."""
        terms, seen = [], {}
        self._weighted_terms: list[tuple[LossTerm, LossWeightSchedule]] = []
        for j, spec in enumerate(self.recipe.losses(i)):
            name = spec["name"]
            seen[name] = seen.get(name, 0) + 1
            label = name if seen[name] == 1 else f"{name}{seen[name]}"
            key = BALANCED_OPTIONS.get(name)
            if key is not None and spec.get(key) == "balanced":
                if self.state.data.info.task_type != "classification":
                    raise ConfigError(f"phases.{i}.losses.{j}.{key}", "`balanced` weights classes by their "
                                      "training counts, so it needs classification data")
                spec = {**spec, key: self.balanced_class_weights()}
            fn = LOSSES.build(spec, f"phases.{i}.losses.{j}", extra_keys=("weight",)).to(self.device)
            if getattr(fn, "reduction", "mean") == "none":
                raise ConfigError(f"phases.{i}.losses.{j}.reduction", "a training loss must reduce to one number: "
                                                                      "use mean or sum")
            weight = spec.get("weight", 1.0)
            term = LossTerm(label, float(weight) if not isinstance(weight, dict) else 0.0, fn)
            if isinstance(weight, dict):
                self._weighted_terms.append((term, LossWeightSchedule.model_validate(weight)))
            terms.append(term)
        return terms

    def _set_train_mode(self) -> None:
        # Frozen modules stay in eval mode so BatchNorm statistics and dropout stay fixed
        # (unless the phase asks for `train_bn`, which keeps their BatchNorm layers training).
        self.state.model.train()
        for m in self._frozen:
            m.eval()
            if self._train_bn:
                for sub in m.modules():
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        sub.train()

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self) -> dict:
        s = self.state
        if not self.dist.is_main:
            # Only rank 0 writes (metrics, checkpoints, summary): the others run without a directory.
            self.run_dir = s.run_dir = None
            self.quiet = True
            self.reporter = Reporter(self.total_steps, quiet=True)
        StoppedBySignal.raise_pending()      # a stop during setup that C code swallowed: before any write
        # One writer per run directory (`dojo train`/`resume` already hold it: this only counts up). Taken
        # before anything is written, and outside the `try` below, whose failure summary would otherwise
        # land in the other writer's run.
        lock = acquire_run_dir(self.run_dir) if self.run_dir is not None else None
        try:
            return self._fit()
        except StoppedBySignal as stop:
            stop.handled()      # it reaches the caller now: no fallback exit, nothing left to re-raise
            raise
        finally:
            if lock is not None:
                lock.release()

    def _fit(self) -> dict:
        s = self.state
        try:
            self._run = self._open_run()
        except OSError as exc:          # no room even for recipe.yaml: no summary can be written either
            full = self._disk_full(exc)
            if full is None:
                raise
            raise full from None
        if not self.dist.is_main:
            # Counts the lines rank 0 writes, so decisions that depend on them (the checkpoint at a
            # phase end) are the same on every rank: each one is a collective.
            self._run = _LineCounter(self._resume_from[1]["metrics_lines"] if self._resume_from else 0)
        t_start = time.perf_counter()
        previous_handlers = self._install_signal_handlers()
        self.reporter.start(s.step)
        try:
            if self.recipe.init is not None and self._resume_from is None:
                self._load_pretrained()     # before the methods copy the model (EMA, SWA)
            for m in self.hooks["on_fit_start"]:
                m.on_fit_start(s)
            if self.recipe.nonfinite.policy == "rollback" and self._checkpoint_dir is None:
                raise DojoError("nonfinite.policy: rollback restores the last checkpoint, so it needs a run "
                                "directory")
            resuming = self._resume_from is not None
            while True:
                try:
                    self._run_phases(t_start, resuming)
                    break
                except _RollBack as bad:
                    self._roll_back(bad)
                    resuming = True
            summary = self._finish(t_start)
        except Interrupted:
            raise
        except Exception as exc:       # `dojo runs` shows the run as failed, with the reason
            full = self._disk_full(exc)
            error = full or exc
            try:
                self._write_summary("failed", t_start, error=f"{type(error).__name__}: {error}")
            except OSError:
                pass        # a full disk may not take even the summary; the one-line error still says why
            if full is not None:
                raise full from None
            raise
        finally:
            self.reporter.stop()
            self._restore_signal_handlers(previous_handlers)
            if self._run is not None:
                self._run.close()
            # The DDP wrapper lives for one fit: release it before the caller destroys the process group.
            # It refers back to this trainer (_BatchLoss holds a bound method), so left alone only the
            # garbage collector would free it, at interpreter exit, where its reducer's teardown aborts
            # the process ("terminate called without an active exception").
            self._ddp = None
        return summary

    def _disk_full(self, exc: Exception) -> DiskFull | None:
        """For a write that failed for want of space (anywhere: a checkpoint, metrics.jsonl, the summary):
        one DiskFull error naming the last good checkpoint and how to go on; else None."""
        # Only write failures: the free-space rule of `is_disk_full` is for a save that failed without an
        # errno; applied to any error (a bad recipe, a NaN) on a nearly full disk it would misname it.
        if not isinstance(exc, DiskFull) and not (isinstance(exc, OSError) and self.run_dir is not None
                                                  and is_disk_full(exc, self.run_dir)):
            return None
        if isinstance(exc, DiskFull):
            what = str(exc)
        else:
            where = exc.filename if isinstance(exc, OSError) and exc.filename else self.run_dir
            what = f"no space left on the device while writing {where}"
        path, _ = latest_valid_checkpoint(self.run_dir / "checkpoints") if self.run_dir is not None else (None, [])
        how = (f"the last good checkpoint is {path.name} (step {checkpoint_step(path)}); free some space "
               f"and run `dojo resume {self.run_dir}`") if path is not None else \
            "no checkpoint was written yet; free some space and train again with --overwrite"
        return DiskFull(f"{what}; {how}")

    def _run_phases(self, t_start: float, resuming: bool) -> None:
        s = self.state
        while s.phase_index < len(self.recipe.phases) and s.stop_reason is None:
            self._enter_phase(s.phase_index)
            for m in self.hooks["on_phase_start"]:
                m.on_phase_start(s)
            if resuming:
                self._restore_state()
                resuming = False
            elif s.step == 0 and self.recipe.nonfinite.policy == "rollback":
                self._save_checkpoint(t_start)      # something to roll back to before the first save
            self._run_phase(t_start)
            if s.stop_reason is not None:
                break
            for m in self.hooks["on_phase_end"]:
                m.on_phase_end(s)
            s.epochs_done += s.epoch_in_phase + s.batch_in_epoch / s.steps_per_epoch
            s.phase_index, s.step_in_phase, s.epoch_in_phase, s.batch_in_epoch = s.phase_index + 1, 0, 0, 0

    def _load_pretrained(self) -> None:
        """`init`: copy the pretrained tensors into the model; say what was loaded (and write init.json)."""
        spec = self.recipe.init
        which = "init.run" if spec.run is not None else "init.weights"
        try:
            report = load_pretrained(self.state.model, spec.run or spec.weights, spec.include, spec.exclude,
                                     spec.output_layer, spec.prefix)
        except DojoError as exc:
            raise ConfigError(which, str(exc)) from None
        if self.run_dir is not None:
            atomic_write_text(self.run_dir / "init.json", json.dumps(report.to_dict(), indent=2) + "\n")
        self.reporter.message(report.summary())

    def _roll_back(self, bad: _RollBack) -> None:
        """`nonfinite: rollback`: load the newest valid checkpoint (weights, optimizer, methods, RNG, data
        position), lower the LR factor, and cut metrics.jsonl back to that checkpoint, plus one line
        recording the rollback. More than `max_consecutive` rollbacks to one checkpoint raise."""
        spec, s = self.recipe.nonfinite, self.state
        # Every rank reads rank 0's checkpoint (with several machines the run directory must be shared,
        # as for resuming); they agreed on the rollback, and rank 0's last save ended before it.
        path, _ = latest_valid_checkpoint(self._checkpoint_dir)
        if path is None:
            raise NonFiniteError(f"non-finite values at step {bad.step} in: {bad.what}; no valid checkpoint "
                                 f"to roll back to")
        wall_before = self._wall_before
        self.load_checkpoint(path)
        self._wall_before = wall_before          # wall time keeps counting from this fit's start
        step = s.step
        if self._rollbacks.count(step) >= spec.max_consecutive:
            raise NonFiniteError(f"non-finite values at step {bad.step} after {spec.max_consecutive} rollbacks "
                                 f"to the checkpoint at step {step} (nonfinite.max_consecutive), in: {bad.what}")
        lr_factor = self._lr_factor * spec.lr_factor
        # The rollback's own record outlives the checkpoint's (older) one when `_restore_state` runs.
        self._resume_from[1]["rollback"] = {"lr_factor": lr_factor, "to_steps": [*self._rollbacks, step]}
        s.optimizer, self._optimizer_phase = None, -1       # rebuilt by _enter_phase, then loaded
        s.stop_reason = None
        self._run.close()
        self._run = self._metrics_file(self._resume_from[1]["metrics_lines"], purge_step=step + 1)
        self._run.write({"step": step, "phase": self.recipe.phase_name(s.phase_index), "event": "rollback",
                         "nonfinite_step": bad.step, "nonfinite": bad.what, "lr_factor": lr_factor,
                         "rollbacks": len(self._resume_from[1]["rollback"]["to_steps"])})
        self._resume_from[1]["metrics_lines"] = self._run.lines
        self.reporter.message(f"non-finite values at step {bad.step} ({bad.what}): rolled back to step {step}, "
                              f"LR factor now {lr_factor:.3g}")

    def _run_phase(self, t_start: float) -> None:
        s, ck = self.state, self.recipe.checkpoint
        log_every = self.recipe.log.every_steps
        self._steps_started = True
        while s.stop_reason is None:
            # An epoch's end is handled here, at the top, and not right after its last batch: a run
            # resumed from a checkpoint saved at that last batch (a periodic save, SIGTERM) comes in with
            # the epoch complete and must do the same end-of-epoch work, in the same order.
            if s.batch_in_epoch >= s.steps_per_epoch:
                s.epoch_in_phase, s.batch_in_epoch = s.epoch_in_phase + 1, 0
                if s.epoch_in_phase % self.recipe.eval.every_epochs == 0:
                    self._validate()
                if ck.every_epochs and s.epoch_in_phase % ck.every_epochs == 0:
                    self._save_checkpoint(t_start)
            if s.step_in_phase >= s.phase_steps or s.stop_reason is not None:    # early stopping
                break
            self._start_epoch()
            for batch in s.loader.epoch(s.epoch_in_phase, start=s.batch_in_epoch):
                batch = self._shard(batch)
                loss, self._last_parts, finite = self._train_step(batch)
                if finite:      # a skipped step's NaN stays out of the logged mean
                    self._meter.add(loss, len(batch["x"]) * self.dist.world)
                if s.step % log_every == 0:
                    self._log_train(self._last_parts)
                if ck.every_steps and s.step % ck.every_steps == 0:
                    self._save_checkpoint(t_start)
                if self._interrupted():
                    self._stop_for_signal(t_start)
                if s.step_in_phase >= s.phase_steps:
                    break
        self._check_watched()       # the phase's last steps since a log point, before anything uses them
        if s.stop_reason is None:
            if self._meter.count:           # the phase's last steps since a log point
                self._log_train(self._last_parts)
            if self._last_eval_step != s.step:
                self._validate()
            if self._last_checkpoint_lines != self._lines_logged():
                self._save_checkpoint(t_start)

    def _shard(self, batch: dict) -> dict:
        """This rank's rows of a global batch: the contiguous slice [r*B/W, (r+1)*B/W). With mean losses,
        DDP's averaged gradients are then the single-process gradient of the whole batch."""
        if not self.dist.enabled:
            return batch
        n = len(batch["x"]) // self.dist.world
        return {k: v[self.dist.rank * n:(self.dist.rank + 1) * n] for k, v in batch.items()}

    def _interrupted(self) -> bool:
        """Whether to stop for SIGINT/SIGTERM. Ranks get the signal at slightly different moments, so with
        several processes they agree on it each step (one tiny all-reduce) and stop at the same step."""
        if not self.dist.enabled:
            return self._interrupt is not None
        if self.dist.any(self._interrupt is not None, self.device):
            self._interrupt = self._interrupt or signal.SIGTERM
            return True
        return False

    def _train_step(self, batch: dict):
        s = self.state
        mult = self._schedule(s.step_in_phase) * self._lr_factor
        if self._has_lr_floor:
            floor = self._schedule.min_lr(s.step_in_phase)
            for group, base in zip(s.optimizer.param_groups, self._base_lrs):
                group["lr"] = max(base * mult, floor) if base > 0 else 0.0
        else:
            for group, base in zip(s.optimizer.param_groups, self._base_lrs):
                group["lr"] = base * mult
        for term, schedule in self._weighted_terms:
            term.weight = schedule.at(s.step, s.epoch)
        for m in self.hooks["on_batch"]:
            batch = m.on_batch(s, batch)
        s.optimizer.zero_grad(set_to_none=True)
        if self._accumulate == 1:
            loss, parts = self._forward_backward(batch)
        else:
            loss, parts = self._accumulated_forward_backward(batch)
        for m in self.hooks["on_after_backward"]:
            m.on_after_backward(s)
        finite = self._check_finite(loss)
        if finite:
            s.optimizer.step()
        s.step += 1
        s.step_in_phase += 1
        s.batch_in_epoch += 1
        if finite:
            for m in self.hooks["on_step_end"]:
                m.on_step_end(s)
        else:
            for m in self.hooks["on_step_skipped"]:
                m.on_step_skipped(s)
        return loss.detach(), parts, finite

    def _forward_backward(self, batch: dict, share: float = 1.0):
        """Loss of a (micro-)batch after the methods' `on_loss` hooks; back-propagates `share` of it."""
        s = self.state
        with self._precision():
            # Through the DDP wrapper with several processes: its forward arms the gradient sync.
            loss, parts = self._ddp(batch) if self._ddp is not None else self._batch_loss(s.model, batch)
        if self._task_logs:
            s.step_logs.update(s.task.step_logs)
        for m in self.hooks["on_loss"]:
            loss = m.on_loss(s, loss, parts)
        (loss * share if share != 1.0 else loss).backward()
        return loss, parts

    def _batch_loss(self, model: nn.Module, batch: dict):
        """(loss, loss terms) of a batch: the task's training loss, or for a joint ensemble each member's
        own loss plus the diversity penalties."""
        s = self.state
        if self.ensemble is not None:
            from .ensembles import ensemble_training_loss
            return ensemble_training_loss(model, batch, self._loss_terms, self.ensemble.ncl,
                                          self.ensemble.weight_distance, s.data.info.task_type)
        return s.task.training_loss(model, batch, self._loss_terms)

    def _precision(self):
        """bf16 autocast for `precision: bf16`; a no-op context otherwise (nothing entered per step)."""
        if self._bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _accumulated_forward_backward(self, batch: dict):
        """Gradient accumulation: the batch in `accumulate` micro-batches, each loss weighted by its share
        of the rows, so the gradients (and the returned loss and parts) are those of the whole batch
        for mean-reduced losses. BatchNorm sees the micro-batches, so it is the one thing that differs."""
        rows = len(batch["y"])
        pieces = zip(*(torch.tensor_split(v, min(self._accumulate, rows)) for v in batch.values()))
        total, parts_total = None, {}
        pieces = list(pieces)
        for k, piece in enumerate(pieces):
            micro = dict(zip(batch.keys(), piece))
            share = len(micro["y"]) / rows
            if self._ddp is not None and k < len(pieces) - 1:
                with self._ddp.no_sync():      # gradients sync once, on the last micro-batch
                    loss, parts = self._forward_backward(micro, share)
            else:
                loss, parts = self._forward_backward(micro, share)
            total = loss.detach() * share if total is None else total + loss.detach() * share
            for name, value in parts.items():
                parts_total[name] = value * share + parts_total.get(name, 0.0)
        return total, parts_total

    def _check_finite(self, loss: torch.Tensor) -> bool:
        """Whether this step may update the model. With `raise` (default) the loss is checked every step
        (one scalar read; a non-finite gradient makes the next loss non-finite) and the gradients on log
        steps; with `skip` and `rollback` the loss and all gradients every step, in one fused reduction
        (both must act before the update: a rollback must never find a poisoned checkpoint). Logs the
        total gradient norm as `train/grad_norm` on log steps unless a `grad_clip` method logs it before
        clipping. On a non-finite value: `raise` raises NonFiniteError naming the step and the tensors;
        `skip` zeroes the gradients (the caller then skips the optimizer step and `on_step_end`) and
        counts it in `train/nonfinite_skips`; `rollback` raises _RollBack for `fit` to handle."""
        s, policy = self.state, self.recipe.nonfinite.policy
        log_step = (s.step + 1) % self.recipe.log.every_steps == 0
        if policy == "raise" and not log_step:
            self._watch_loss(loss)      # on the device: read on the next log step or checkpoint save
            return True
        grads = [(n, p.grad) for n, p in s.model.named_parameters() if p.grad is not None]
        norms = torch._foreach_norm([g for _, g in grads]) if grads else []
        grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else loss.new_zeros(())
        if self._log_grad_norm and log_step and norms:
            s.step_logs["train/grad_norm"] = grad_norm.detach()
        if policy == "skip":
            s.step_logs["train/nonfinite_skips"] = self._nonfinite_skips
        finite_now = torch.isfinite(grad_norm + loss.detach().float())
        if policy == "raise":
            self._fold_watched()
        if policy == "raise" and self._first_bad is not None:
            # One read for the window's watched steps and this step together.
            first_bad, finite = torch.stack([self._first_bad, finite_now.to(self._first_bad.dtype)]).tolist()
            self._first_bad = None
            self._raise_watched(first_bad)
            finite = bool(finite)
        else:
            finite = bool(finite_now)
        if self.dist.enabled and policy != "raise":
            # The averaged gradients agree across ranks, but each rank's loss is its own: all ranks skip
            # (or roll back) together. `raise` needs no agreement: the failing rank ends the job.
            finite = not self.dist.any(not finite, self.device)
        if finite:
            self._nonfinite_in_a_row = 0
            return True
        return self._non_finite(loss, grads, norms)

    def _watch_loss(self, loss: torch.Tensor) -> None:
        """`nonfinite: raise` between log steps: keep the step's loss to check later, without reading
        anything back (a read per step would stop the host from queueing work ahead of a GPU) and
        without launching anything (a list append). A non-finite gradient makes the next step's loss
        non-finite, so the loss is enough. `_check_watched` reads them on log steps, at phase ends and
        before every checkpoint; every WATCH_FOLD steps they are folded into one tensor on the device."""
        if not self._watched:
            self._watched_from = self.state.step + 1       # the watched steps are consecutive
        self._watched.append(loss.detach())
        if len(self._watched) >= WATCH_FOLD:
            self._fold_watched()

    def _fold_watched(self) -> None:
        """Fold the watched losses into `_first_bad` (the first non-finite step, -1 if none) with device
        operations only."""
        if not self._watched:
            return
        bad = ~torch.isfinite(torch.stack(self._watched).float())
        first = torch.where(bad.any(), self._watched_from + bad.to(torch.uint8).argmax(), -1)
        self._first_bad = first if self._first_bad is None else \
            torch.where(self._first_bad < 0, first, self._first_bad)
        self._watched = []

    def _check_watched(self) -> None:
        """Raise NonFiniteError if a watched step had a non-finite loss (one host read, then reset). Called
        before a checkpoint is saved, so no checkpoint ever holds a model updated from a NaN."""
        self._fold_watched()
        if self._first_bad is not None:
            first_bad, self._first_bad = int(self._first_bad), None
            self._raise_watched(first_bad)

    def _raise_watched(self, step: int) -> None:
        if step >= 0:
            raise NonFiniteError(f"non-finite values at step {step} (phase '{self._phase_at(step)}') in: loss; "
                                 f"set `nonfinite.policy: skip` or `rollback` to go on (they check every step)")

    def _phase_at(self, step: int) -> str:
        """The name of the phase that ran optimizer step `step` (counted from 1)."""
        end = 0
        for i, (steps, _) in enumerate(self.phase_plan):
            end += steps
            if step <= end:
                return self.recipe.phase_name(i)
        return self.state.phase_name

    def _non_finite(self, loss: torch.Tensor, grads: list, norms: list) -> bool:
        s, spec = self.state, self.recipe.nonfinite
        bad = ["loss"] if not bool(torch.isfinite(loss.detach()).all()) else []
        bad += [n for (n, _), norm in zip(grads, norms) if not bool(torch.isfinite(norm))]
        if self.dist.enabled and spec.policy != "raise":      # every rank is here (they agreed): name all
            bad = list(dict.fromkeys(name for names in self.dist.gather_objects(bad) for name in names))
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        where = f"step {s.step + 1} (phase '{s.phase_name}')"
        if spec.policy == "raise":
            raise NonFiniteError(f"non-finite values at {where} in: {shown}; set `nonfinite.policy: skip` "
                                 f"or `rollback` to go on")
        if spec.policy == "rollback":
            s.optimizer.zero_grad(set_to_none=True)
            raise _RollBack(s.step + 1, shown)
        self._nonfinite_in_a_row += 1
        if self._nonfinite_in_a_row > spec.max_consecutive:
            raise NonFiniteError(f"{self._nonfinite_in_a_row} non-finite steps in a row (more than "
                                 f"nonfinite.max_consecutive={spec.max_consecutive}), the last at {where} "
                                 f"in: {shown}")
        self._nonfinite_skips += 1
        s.step_logs["train/nonfinite_skips"] = self._nonfinite_skips
        s.optimizer.zero_grad(set_to_none=True)
        return False

    # -- evaluation ------------------------------------------------------------------------------

    def eval_model(self) -> nn.Module:
        model = self.state.model
        for m in self.hooks["on_eval_model"]:
            model = m.on_eval_model(self.state, model)
        return model

    def evaluate(self, split: str, model: nn.Module | None = None, name: str = "") -> dict[str, float]:
        """Metrics of `model` (default: the evaluation model) on a split, named `split/metric`, or
        `split/name/metric` for a named model such as an ensemble."""
        s = self.state
        model = model if model is not None else self.eval_model()
        was_training = s.model.training
        model.eval()
        metrics = s.task.evaluate(model, self.eval_loader(split), s.data.info)
        if was_training:
            self._set_train_mode()
        prefix = f"{split}/{name}/" if name else f"{split}/"
        return {prefix + k: v for k, v in metrics.items()}

    def named_models(self, model: nn.Module, tta_views: int | None = None) -> dict[str, nn.Module]:
        """The final model (named "") and what methods add (e.g. "ensemble" from snapshot_ensemble); with
        test-time augmentation (`eval.tta`, or `tta_views`), each also under TTA as "tta" (the final
        model) or "<name>_tta"."""
        models = {"": model}
        if self.ensemble is not None:
            models.update(self._ensemble_models(model))
        for m in self.hooks["on_models"]:
            models = m.on_models(self.state, models)
        tta = self.tta_wrapper(tta_views)
        if tta is not None:
            models.update({f"{name}_tta" if name else "tta": tta(m) for name, m in list(models.items())})
        return models

    def _ensemble_models(self, model: nn.Module) -> dict[str, nn.Module]:
        """A joint ensemble's members ("member<i>") and their combination ("ensemble": the mean, or with
        `combine: weights` the weighted mean with weights fitted on the validation split)."""
        from .ensembles import WeightedEnsemble, fit_combination_weights
        members = {f"member{i}": m.eval() for i, m in enumerate(model.member_list())}
        if self.ensemble.combine != "weights":
            return {"ensemble": model, **members}
        outputs, y = self._member_outputs("val", model)
        task_type = self.state.data.info.task_type
        weights = fit_combination_weights(outputs, y, task_type=task_type)
        how = "mean_prob" if task_type == "classification" else "mean"
        return {"ensemble": WeightedEnsemble(list(members.values()), weights, how).eval(), **members}

    @torch.no_grad()
    def _member_outputs(self, split: str, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = model.training
        model.eval()
        outs, ys = [], []
        for batch in self.eval_loader(split):
            outs.append(model.member_outputs(batch["x"]))
            ys.append(batch["y"])
        model.train(was_training)
        return torch.cat(outs, dim=1), torch.cat(ys)

    def member_metrics(self, split: str, model: nn.Module) -> dict[str, float]:
        """Pairwise disagreement of a joint ensemble's members and their mean and lowest accuracy."""
        from .ensembles import member_accuracies, pairwise_disagreement
        outputs, y = self._member_outputs(split, model)
        accs = member_accuracies(outputs, y)
        return {f"{split}/disagreement": pairwise_disagreement(outputs),
                f"{split}/member_accuracy_mean": sum(accs) / len(accs), f"{split}/member_accuracy_min": min(accs)}

    def tta_wrapper(self, views: int | None = None):
        """A function model -> TestTimeAugmentation per `eval.tta` (views overridden by `views`), or None
        when neither asks for TTA. Its augmentations default to the last phase's, minus label mixing."""
        spec = self.recipe.eval.tta
        if spec is None and not views:
            return None
        if self.state.task.task_type == "any":
            raise ConfigError("eval.tta", f"test-time augmentation averages predictions; task "
                                          f"'{self.recipe.task['name']}' reconstructs its input")
        from .recipe import TTASpec
        from .tta import TestTimeAugmentation
        spec = spec or TTASpec()
        views = spec.views if views is None else views
        specs = spec.augment if spec.augment is not None else self.recipe.augment(len(self.recipe.phases) - 1)
        specs = [a for a in specs if not AUGMENTS.get(a["name"]).factory.mixes_labels]
        if not specs:
            raise DojoError("test-time augmentation needs augmentations: set `eval.tta.augment` (the last phase "
                            "has none that keep the labels)")
        transform = self.build_augment(specs, "eval.tta.augment")
        how = spec.combine if self.state.data.info.task_type == "classification" else "mean"
        return lambda model: TestTimeAugmentation(model, transform, views, how, spec.seed).eval()

    def _validate(self) -> None:
        self._check_watched()       # a model spoiled by a NaN is reported as such, not evaluated
        s = self.state
        s.eval_model = self.eval_model()
        metrics = self.evaluate("val", s.eval_model)
        if hasattr(s.eval_model, "member_outputs") and s.data.info.task_type == "classification":
            metrics.update(self.member_metrics("val", s.eval_model))
        for m in self.hooks["on_eval_end"]:
            m.on_eval_end(s, metrics)
        try:
            if self._schedule.observe(s.step_in_phase, metrics):
                self.reporter.message(f"plateau: LR multiplier now {self._schedule(s.step_in_phase):.3g} "
                                      f"at step {s.step}")
        except ValueError as exc:
            raise ConfigError(f"phases.{s.phase_index}.schedule", str(exc)) from None
        self._last_eval_step, self._last_val = s.step, metrics
        entry = {"step": s.step, "epoch": round(s.epoch, 4), "phase": s.phase_name, **metrics}
        if self._run is not None:
            self._run.write(entry)
        self.reporter.epoch_line({**entry, **self._last_train})

    def _log_train(self, parts: dict) -> None:
        s = self.state
        loss, samples_per_sec = self._meter.take()
        if self.dist.enabled:
            # The mean over ranks, on every rank (a collective) before rank 0 writes it. A rank whose
            # every step since the last log point was skipped contributes nothing.
            stats = torch.stack([loss.float().cpu() if loss is not None else torch.zeros(()),
                                 torch.ones(()) if loss is not None else torch.zeros(()),
                                 *[torch.as_tensor(v).detach().float().cpu() for v in parts.values()]])
            stats = stats.to(self.device)
            stats = self.dist.all_reduce_mean(stats)
            loss = stats[0] / stats[1] if float(stats[1]) > 0 else None
            parts = dict(zip(parts, stats[2:]))
        entry = {"step": s.step, "epoch": round(s.epoch, 4), "phase": s.phase_name}
        if loss is not None:            # None: every step since the last log point was skipped
            entry["train/loss"] = loss.item()
        for name, value in parts.items():
            if len(parts) > 1:
                entry[f"train/loss/{name}"] = value.item()
        for k, v in s.step_logs.items():
            entry[k] = v.item() if isinstance(v, torch.Tensor) else v
        for i, group in enumerate(s.optimizer.param_groups):
            entry[f"lr/group{i}"] = group["lr"]
        entry["train/samples_per_sec"] = round(samples_per_sec, 1)
        self._last_train = {"train/loss": entry.get("train/loss", math.nan)}
        if self._run is not None:
            self._run.write(entry)
        self.reporter.update(s.step, s.phase_name, s.epoch, self._last_train["train/loss"], entry["lr/group0"],
                             samples_per_sec)

    def final_model(self) -> nn.Module:
        model = self.eval_model()
        for m in self.hooks["on_fit_end"]:
            model = m.on_fit_end(self.state, model)
        return model

    def _finish(self, t_start: float) -> dict:
        s = self.state
        if s.stop_reason:
            self.reporter.message(s.stop_reason)
        model = self.final_model()
        models = self.named_models(model)
        # The last validation already measured this model unless a method replaced it at the end.
        same_model = not self.hooks["on_fit_end"] and self._last_eval_step == s.step and self._last_val
        metrics = {}
        for split in ("val", "test"):
            for name, m in models.items():
                reuse = split == "val" and name == "" and same_model
                metrics.update(self._last_val if reuse else self.evaluate(split, m, name))
        wall = self._wall_before + time.perf_counter() - t_start
        summary = {"recipe": self.recipe.name, "status": "finished", "metrics": metrics, "steps": s.step,
                   "epochs": round(s.epoch, 4), "wall_seconds": round(wall, 3), "stop_reason": s.stop_reason}
        if self.run_dir is not None:
            remove_leftovers(self.run_dir / "checkpoints")     # of a crash inside an earlier save
            # summary.json comes last: it is what says "finished" (and what stops `dojo resume`), so
            # everything it vouches for (final weights with their manifest, the final metrics line) is
            # on disk first. A kill before it leaves a run that resumes from its last checkpoint.
            save_final(self.run_dir / "checkpoints", model)
            self._run.write({"step": s.step, "epoch": round(s.epoch, 4), "phase": s.phase_name, **metrics})
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.reporter.stop()
        self.reporter.table(metrics, f"{self.recipe.name}: final metrics")
        return summary

    # -- run directory, checkpoints, resume ----------------------------------------------------------

    def _open_run(self) -> MetricsFile | None:
        if self.run_dir is None:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "recipe.yaml", self._recipe_yaml)
        atomic_write_text(self.run_dir / "data_info.json", json.dumps(self.state.data.info.to_dict(), indent=2) + "\n")
        if self._resume_from:
            return self._metrics_file(self._resume_from[1]["metrics_lines"], self._resume_from[1]["step"] + 1)
        return self._metrics_file(None, None)

    def _metrics_file(self, keep_lines: int | None, purge_step: int | None) -> MetricsFile | _LineCounter:
        """metrics.jsonl (cut back to `keep_lines` on resume), with TensorBoard unless `log.tensorboard`
        is off; TensorBoard hides its events from `purge_step` on, as they will be logged again. On ranks
        other than 0, a line counter instead."""
        if self.run_dir is None:
            return _LineCounter(keep_lines or 0)
        sink = TensorBoardSink(self.run_dir / "tb", purge_step) if self.recipe.log.tensorboard else None
        return MetricsFile(self.run_dir / "metrics.jsonl", keep_lines=keep_lines, tensorboard=sink)

    def _emit(self, values: dict) -> None:
        s = self.state
        if self._run is not None:
            self._run.write({"step": s.step, "epoch": round(s.epoch, 4), "phase": s.phase_name, **values})

    def _lines_logged(self) -> int:
        return self._run.lines if self._run is not None else 0

    def _checkpoint_state(self, t_start: float) -> dict:
        s = self.state
        return {"format": CHECKPOINT_FORMAT, "recipe": self._recipe_yaml, "step": s.step,
                "phase_index": s.phase_index, "step_in_phase": s.step_in_phase,
                "epoch_in_phase": s.epoch_in_phase, "batch_in_epoch": s.batch_in_epoch,
                "epochs_done": s.epochs_done, "optimizer_phase": self._optimizer_phase,
                "optimizer": s.optimizer.state_dict(), "methods": [m.state_dict() for m in self.methods],
                "rng": _rng_state(), "last_eval_step": self._last_eval_step, "stop_reason": s.stop_reason,
                "loss_meter": self._meter.state_dict(), "metrics_lines": self._lines_logged(),
                "schedule": self._schedule.state_dict(),
                "nonfinite": [self._nonfinite_skips, self._nonfinite_in_a_row],
                "rollback": {"lr_factor": self._lr_factor, "to_steps": list(self._rollbacks)},
                "pending_log": {"parts": {k: _loggable(v) for k, v in self._last_parts.items()},
                                "step_logs": {k: _loggable(v) for k, v in s.step_logs.items()}},
                "wall_seconds": self._wall_before + time.perf_counter() - t_start, "meter_seconds": self._meter.seconds()}

    def _save_checkpoint(self, t_start: float) -> None:
        self._check_watched()       # never a checkpoint of a model updated from a non-finite step
        # Every rank gathers its own RNG and loss-meter state (a collective: before the rank-0 branch).
        ranks = self.dist.gather_objects({"rng": _rng_state(), "loss_meter": self._meter.state_dict()}) \
            if self.dist.enabled else None
        # On every rank (not only where files are written): whether a phase end saves again depends on
        # it, and that save is a collective.
        self._last_checkpoint_lines = self._lines_logged()
        if self.run_dir is None:
            return
        state = self._checkpoint_state(t_start)
        if ranks is not None:
            state["ranks"] = ranks
        save_checkpoint(self.run_dir / "checkpoints", f"step-{self.state.step:08d}", self.state.model,
                        state, self.recipe.checkpoint.keep_last)

    def load_checkpoint(self, path: Path) -> None:
        """Prepare to continue from a checkpoint folder; `fit()` then resumes there. The folder must
        match its manifest (see `checkpoint.validate_checkpoint`), else DojoError names the reason."""
        weights, state = load_checkpoint(path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise StateError(f"checkpoint {path} has format {found!r}, expected {CHECKPOINT_FORMAT}")
        if not isinstance(state.get("recipe"), str):
            raise StateError(f"checkpoint {path}: state.pt holds no recipe")
        self._check_recipe_matches(path, state["recipe"])
        check_state(state, phase_steps=[steps for steps, _ in self.phase_plan], methods=len(self.methods),
                    where=f"checkpoint {path}")
        try:        # into a throwaway optimizer of the same phase: a mismatch is refused before anything moves
            self.build_optimizer(state["optimizer_phase"]).load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            raise StateError(f"checkpoint {path}: state.pt `optimizer` does not fit this recipe's optimizer "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        try:
            load_weights_into(self.state.model, weights, f"the weights of checkpoint {path}")
        except DojoError as exc:
            raise StateError(str(exc)) from None
        s = self.state
        s.phase_index, s.step = state["phase_index"], state["step"]
        self._resume_from = (weights, state)
        self._wall_before = state["wall_seconds"]
        self._last_eval_step = state["last_eval_step"]
        self._last_checkpoint_lines = state["metrics_lines"]

    @property
    def checkpoint_step(self) -> int | None:
        """The step of the checkpoint loaded to resume from, if any."""
        return self._resume_from[1]["step"] if self._resume_from is not None else None

    def trained_models(self, *, calibrated: bool = True, tta_views: int | None = None) -> dict[str, nn.Module]:
        """For eval/predict: a finished run's final weights, else the latest checkpoint's final model
        (with the methods' state, e.g. EMA weights), plus the named models methods add; in eval mode.

        With `calibrated` (the default), a finished classification run with a `calibration.json`
        (written by `dojo calibrate`) has every model, ensembles included, wrapped in
        `calibrate.TemperatureScaled`: outputs divided by the stored temperature, the same argmax.
        `calibrated=False` gives the raw models."""
        final = self.run_dir / "checkpoints" / "final" / WEIGHTS if self.run_dir else None
        finished = final is not None and final.is_file()
        if finished:
            load_weights_into(self.state.model, read_final_weights(self.run_dir), f"the final weights in {final.parent}")
            model = self.state.model
        elif self._resume_from is None:
            raise DojoError(f"{self.run_dir} has neither a final model nor a checkpoint")
        else:
            for m in self.hooks["on_fit_start"]:
                m.on_fit_start(self.state)
            for m, sd in zip(self.methods, self._resume_from[1]["methods"]):
                m.load_state_dict(sd)
            model = self.final_model()
        models = {name: m.eval() for name, m in self.named_models(model, tta_views).items()}
        # The temperature was fitted on the final weights: a checkpoint's model stays as it is.
        if calibrated and finished and self.state.task.task_type == "classification":
            from .calibrate import TemperatureScaled, load_calibration
            scaling = load_calibration(self.run_dir)
            if scaling is not None:
                models = {name: TemperatureScaled(m, scaling).eval() for name, m in models.items()}
        return models

    def _restore_state(self) -> None:
        """Called inside `fit` once the resumed phase's optimizer and loader exist."""
        _, state = self._resume_from
        s = self.state
        s.step_in_phase, s.epoch_in_phase = state["step_in_phase"], state["epoch_in_phase"]
        s.batch_in_epoch, s.epochs_done = state["batch_in_epoch"], state["epochs_done"]
        try:
            s.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            raise StateError(f"the checkpoint's optimizer state does not fit phase {s.phase_index}'s optimizer: "
                             f"{str(exc).splitlines()[0][:200]}") from None
        # A multi-process checkpoint has each rank's own RNG and loss meter (see `_save_checkpoint`).
        ranks = state.get("ranks")
        own = ranks[self.dist.rank] if ranks is not None and len(ranks) == self.dist.world else state
        self._meter.load_state_dict(own["loss_meter"], state.get("meter_seconds", 0.0))
        self._schedule.load_state_dict(state["schedule"])
        for i, (m, sd) in enumerate(zip(self.methods, state["methods"])):
            try:
                m.load_state_dict(sd)
            except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as exc:
                raise StateError(f"the checkpoint's state of methods.{i} ({type(m).__name__}) cannot be "
                                 f"restored: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        self._nonfinite_skips, self._nonfinite_in_a_row = state.get("nonfinite", (0, 0))   # older: none
        rollback = state.get("rollback", {"lr_factor": 1.0, "to_steps": []})
        self._lr_factor, self._rollbacks = rollback["lr_factor"], list(rollback["to_steps"])
        # What the next train line reports besides the loss mean: the last step's loss parts and the
        # scalars methods and tasks logged (older checkpoints: none).
        pending = state.get("pending_log", {"parts": {}, "step_logs": {}})
        # A checkpoint written after early stopping decided to stop (the epoch's save follows its
        # validation): the resumed run stops there too instead of training on.
        s.stop_reason = state.get("stop_reason")
        self._last_parts = dict(pending["parts"])
        s.step_logs.clear()
        s.step_logs.update(pending["step_logs"])
        _set_rng_state(own["rng"])
        self._start_epoch()     # the restored epoch's loader (its batch size can differ from epoch 0's)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, quiet: bool = False, checkpoint: Path | None = None) -> "Trainer":
        """Rebuild a run from its directory and load its latest (or the given) checkpoint."""
        run_dir = Path(run_dir)
        if not (run_dir / "recipe.yaml").is_file():
            raise DojoError(f"{run_dir} is not a run directory (no recipe.yaml)")
        from .recipe import read_recipe_source
        recipe_file = run_dir / "recipe.yaml"
        raw, _ = read_recipe_source(str(recipe_file))     # one clear error if it is damaged
        try:
            recipe = load_recipe(raw)
        except DojoError as exc:
            raise DojoError(f"{recipe_file}: {exc}") from None
        trainer = cls(recipe, run_dir, quiet=quiet)
        info_file = run_dir / "data_info.json"
        if info_file.is_file():        # the data file may have changed since training (a new label, ...)
            saved = read_json_object(info_file)
            source = getattr(recipe.data, "path", None) or f"data '{recipe.data.name}'"
            trainer.state.data.info.check_same_data(saved, str(source), str(info_file))
        if checkpoint is not None:            # asked for explicitly: refuse it if invalid, no fallback
            trainer.load_checkpoint(Path(checkpoint))
            return trainer
        # The newest checkpoint that matches its manifest and whose state loads; one that passes its
        # manifest but cannot be used (written by another version, crafted) is skipped like a damaged one.
        for path in reversed(list_checkpoints(run_dir / "checkpoints")):
            reason = validate_checkpoint(path)
            if reason is None:
                try:
                    trainer.load_checkpoint(path)
                    break
                except (StateError, CheckpointUnreadable) as exc:
                    reason = str(exc)
            warnings.warn(f"skipping checkpoint {path}: {reason}", stacklevel=2)
            trainer.skipped_checkpoints.append(path)
        return trainer

    def _check_recipe_matches(self, path: Path, saved: str) -> None:
        """The run's recipe.yaml must be the recipe the checkpoint was trained with (each checkpoint keeps
        a copy, covered by its sha256): a changed or damaged file would silently train something else."""
        if saved != self._recipe_yaml:
            raise DojoError(f"{self.run_dir / 'recipe.yaml'} differs from the recipe saved in checkpoint {path} "
                            f"(the file was edited or damaged); restore it, or start a new run")

    # -- signals -----------------------------------------------------------------------------------

    def _install_signal_handlers(self):
        def handler(signum, frame):
            self._interrupt = signum
            # Before the first step nothing new exists to save (setup can take long: data, a big
            # model, a schedule): stop now rather than at a step that may be minutes away.
            if not self._steps_started:
                raise StoppedBySignal(130 if signum == signal.SIGINT else 143,
                                      f"interrupted before training started{self._resume_hint()}")
        try:
            return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:   # not in the main thread: leave signals alone
            return {}

    def _resume_hint(self) -> str:
        if self.run_dir is None or not (self.run_dir / "recipe.yaml").exists():
            return ""
        if self._resume_from is not None:
            return f"; nothing was lost, resume with: dojo resume {self.run_dir}"
        return f"; start it again with --overwrite (--run-dir {self.run_dir})"

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)

    def _write_summary(self, status: str, t_start: float, **extra) -> None:
        """summary.json of a run that did not finish (interrupted or failed)."""
        if self.run_dir is None or not self.run_dir.is_dir():
            return
        summary = {"recipe": self.recipe.name, "status": status, "steps": self.state.step, "metrics": {},
                   "wall_seconds": round(self._wall_before + time.perf_counter() - t_start, 3), **extra}
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")

    def _stop_for_signal(self, t_start: float) -> None:
        self._save_checkpoint(t_start)
        self._write_summary("interrupted", t_start)
        code = 130 if self._interrupt == signal.SIGINT else 143
        raise Interrupted(code, self.run_dir)


def default_run_dir(recipe: Recipe, root: str | Path = "runs") -> Path:
    return Path(root) / f"{recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def train(recipe: Recipe | str | dict, run_dir: str | Path | None = None, overrides: list[str] = (),
          quiet: bool = True) -> dict:
    """Python API: train a recipe (object, file, built-in name or mapping) and return its summary."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    from .ensemble_runs import is_sequential, train_ensemble
    if is_sequential(recipe):
        if run_dir is None:
            raise DojoError("an ensemble whose members train one after another needs a run directory")
        return train_ensemble(recipe, Path(run_dir), quiet=quiet)
    return Trainer(recipe, run_dir, quiet=quiet).fit()
