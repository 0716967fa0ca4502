"""Knowledge distillation (Hinton et al. 2015, arXiv 1503.02531): a classification task whose training
loss matches the recipe's model (the student) to a finished run's model (the teacher).

    task: {name: distill, teacher: runs/big-teacher, temperature: 4.0, alpha: 0.9}

The loss is `DistillationLoss(temperature, alpha)`:
alpha T^2 KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) CE(student, y).
It replaces the phase's `losses` (which this task ignores; it warns once if a phase sets others than
the default cross-entropy) and is logged as the term `distill`. Evaluation and prediction are those of
`Classify`: the teacher is used only for training.

The teacher is loaded on first use (the first training step), not when the task is built, so a finished
student run can be evaluated and used for prediction without its teacher. Several teacher runs may be
given as a list: their `Ensemble` (mean of the probabilities; its log-probabilities serve as teacher
logits) is the teacher."""
from __future__ import annotations

import math
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import DojoError
from ..runfiles import read_json_object
from ..losses import CrossEntropy, DistillationLoss
from .classify import Classify


class Distill(Classify):
    """Knowledge distillation from a finished run (or an ensemble of runs) into the recipe's model
    (Hinton et al. 2015, arXiv 1503.02531)."""
    task_type = "classification"
    default_losses = [{"name": "cross_entropy"}]   # not used: the distillation loss replaces the phase's losses

    def __init__(self, teacher: str | list[str], temperature: float = 4.0, alpha: float = 0.9):
        teachers = [teacher] if isinstance(teacher, str) else list(teacher)
        if not teachers:
            raise ValueError("teacher must name a run directory or a non-empty list of them")
        if any(not isinstance(t, str) or not t.strip() for t in teachers):
            raise ValueError(f"teacher must be run directories (got {teacher!r})")
        self.teachers = teachers
        self.loss_fn = DistillationLoss(temperature, alpha)   # checks temperature > 0 and alpha in [0, 1]
        self.temperature, self.alpha = temperature, alpha
        self._teacher: nn.Module | None = None
        self._teacher_device: torch.device | None = None
        self._teacher_info: dict | None = None    # data_info.json of the (first) teacher run
        self._info_checked = False
        self._warned_terms = False

    # -- the teacher -----------------------------------------------------------------------------

    def teacher(self, device: torch.device | str | None = None) -> nn.Module:
        """The frozen teacher in eval mode (an `Ensemble` for several runs), loaded on first call."""
        if self._teacher is None:
            self._teacher = self._load_teacher()
        if device is not None and self._teacher_device != torch.device(device):
            self._teacher.to(device)
            self._teacher_device = torch.device(device)
        return self._teacher

    def _load_teacher(self) -> nn.Module:
        from ..trainer import Trainer   # here: trainer imports the tasks
        models, infos = [], []
        for path in self.teachers:
            run = Path(path).expanduser()
            info = _finished_run_info(run)
            if infos:
                _check_same_data(infos[0], info, f"the teacher runs {self.teachers[0]} and {path}")
            # Building a Trainer seeds every RNG with the teacher's seed: keep the student's streams.
            with _rng_preserved():
                model = Trainer.from_run_dir(run, quiet=True).trained_models(calibrated=False)[""]
            models.append(model)
            infos.append(info)
        if len(models) == 1:
            teacher = models[0]
        else:
            from ..ensemble import Ensemble
            teacher = Ensemble(models, how="mean_prob")
        teacher.eval()
        teacher.requires_grad_(False)
        self._teacher_info = infos[0]
        return teacher

    def _check_batch(self, x: torch.Tensor, num_classes: int) -> None:
        """First step: the student's inputs and classes fit the teacher's data (the full check, class
        names included, runs at the first evaluation, where the data description is at hand)."""
        info = self._teacher_info
        if list(x.shape[1:]) != list(info["input_shape"]) or num_classes != info["num_outputs"]:
            raise DojoError(f"task.teacher: the teacher run {self.teachers[0]} was trained on inputs of shape "
                            f"{tuple(info['input_shape'])} with {info['num_outputs']} classes, but the student's "
                            f"data has inputs of shape {tuple(x.shape[1:])} and its model {num_classes} outputs; "
                            "distill on the data the teacher was trained on")

    # -- the task interface ------------------------------------------------------------------------

    def training_loss(self, model, batch, terms):
        """`DistillationLoss` between the student's and the teacher's outputs; `terms` are ignored."""
        if not self._warned_terms and not _default_terms(terms):
            self._warned_terms = True
            warnings.warn("task 'distill' ignores the phase's losses and trains on its distillation loss "
                          "(which includes (1 - alpha) x cross-entropy)", stacklevel=2)
        x = batch["x"]
        first = self._teacher is None
        teacher = self.teacher(x.device)
        student_logits = model(x)
        if first:
            self._check_batch(x, student_logits.shape[1])
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = self.loss_fn(student_logits, batch["y"], teacher_logits)
        return loss, {"distill": loss.detach()}

    def evaluate(self, model, loader, info) -> dict[str, float]:
        # Only when the teacher is in use (training): evaluating a finished student needs no teacher.
        if self._teacher is not None and not self._info_checked:
            _check_same_data(self._teacher_info, info.to_dict(), f"the teacher run {self.teachers[0]} and this recipe")
            self._info_checked = True
        return super().evaluate(model, loader, info)


# -- helpers -------------------------------------------------------------------------------------

def _finished_run_info(run: Path) -> dict:
    """The data_info.json of a finished classification run; DojoError naming the directory otherwise."""
    if not run.is_dir():
        raise DojoError(f"task.teacher: teacher run directory {run} does not exist")
    if not (run / "recipe.yaml").is_file() or not (run / "data_info.json").is_file():
        raise DojoError(f"task.teacher: {run} is not a run directory (no recipe.yaml or data_info.json)")
    from ..checkpoint import WEIGHTS
    if not (run / "checkpoints" / "final" / WEIGHTS).is_file():
        raise DojoError(f"task.teacher: the teacher run {run} has not finished (no checkpoints/final/{WEIGHTS}); "
                        f"finish it first, e.g. with: dojo resume {run}")
    try:
        info = read_json_object(run / "data_info.json")
    except DojoError as exc:
        raise DojoError(f"task.teacher: {exc}") from None
    if info.get("task_type") != "classification":
        raise DojoError(f"task.teacher: the teacher run {run} is a {info.get('task_type')} run; "
                        "distillation needs a classification teacher")
    return info


def _check_same_data(teacher: dict, student: dict, names: str) -> None:
    """Same input shape, classes (names and order) and, where both list them, feature names. `names`
    says whose data these are ("the teacher run X and this recipe")."""
    problems = []
    if list(teacher["input_shape"]) != list(student["input_shape"]):
        problems.append(f"input shape {tuple(teacher['input_shape'])} vs {tuple(student['input_shape'])}")
    if list(teacher.get("class_names") or []) != list(student.get("class_names") or []):
        problems.append(f"classes {teacher.get('class_names')} vs {student.get('class_names')}")
    tf, sf = teacher.get("feature_names") or [], student.get("feature_names") or []
    if tf and sf and list(tf) != list(sf):
        problems.append(f"feature names {_short(tf)} vs {_short(sf)}")
    if problems:
        raise DojoError(f"task.teacher: {names} use different data: " + "; ".join(problems)
                        + ". Distill on the data the teacher was trained on")
    same_scaling = all(_close(teacher.get(k), student.get(k)) for k in ("x_mean", "x_std"))
    if not same_scaling:
        warnings.warn(f"task.teacher: {names} standardised their inputs with different statistics "
                      "(another seed or split_seed?); the teacher sees the student's inputs as they are",
                      stacklevel=3)


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(math.isclose(u, v, rel_tol=1e-5, abs_tol=1e-6) for u, v in zip(a, b))


def _short(names: list) -> str:
    return str(list(names[:4]) + ["..."] if len(names) > 4 else list(names))


def _default_terms(terms) -> bool:
    """True for the default loss: one plain cross-entropy term of weight 1 (which the task replaces)."""
    if len(terms) != 1:
        return False
    term = terms[0]
    fn = term.fn
    return (term.name == "cross_entropy" and term.weight == 1.0 and isinstance(fn, CrossEntropy)
            and fn.label_smoothing == 0.0 and fn.temperature == 1.0 and fn.class_weights is None)


class _rng_preserved:
    """Restore the Python, NumPy and torch (CPU and initialised CUDA) random states on exit."""

    def __enter__(self):
        self.python, self.numpy, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return self

    def __exit__(self, *exc):
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        return False
