"""The `distill` task: knowledge distillation from finished runs (Hinton et al. 2015, arXiv 1503.02531)."""
from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from torchdojo import Trainer, load_recipe
from torchdojo.ensemble import Ensemble
from torchdojo.errors import ConfigError, DojoError
from torchdojo.log import read_metrics
from torchdojo.losses import DistillationLoss, FocalLoss
from torchdojo.tasks import Distill, LossTerm

from conftest import make_tiny_recipe


def recipe(model=None, task=None, data=None, name="tiny") -> dict:
    r = make_tiny_recipe()
    r["name"] = name
    if model is not None:
        r["model"] = model
    if task is not None:
        r["task"] = task
    if data is not None:
        r["data"] = data
    return r


def train(r: dict, run_dir: Path) -> dict:
    return Trainer(load_recipe(r), run_dir, quiet=True).fit()


def final_model(run_dir: Path) -> torch.nn.Module:
    return Trainer.from_run_dir(run_dir, quiet=True).trained_models()[""]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Finished teacher runs: two wider MLPs on the tiny data, one on wine, one on 4-feature synthetic data."""
    root = tmp_path_factory.mktemp("teachers")
    runs = {"wide": recipe(model={"name": "mlp", "hidden": [32]}, name="wide"),
            "wider": recipe(model={"name": "mlp", "hidden": [48, 16]}, name="wider"),
            "wine": recipe(data={"name": "wine"}, name="wine"),
            "synthetic4": recipe(data={"name": "synthetic_tabular", "n_samples": 200, "n_features": 4,
                                       "n_informative": 3, "n_classes": 3}, name="synthetic4")}
    for name, r in runs.items():
        train(r, root / name)
    return {name: root / name for name in runs}


def first_batch(trainer: Trainer) -> dict:
    return next(iter(trainer.train_loader(0, 0).epoch(0)))


def logged_loss_at_step_1(run_dir: Path) -> float:
    return next(e["train/loss"] for e in read_metrics(run_dir / "metrics.jsonl")
                if e["step"] == 1 and "train/loss" in e)


def test_distill_trains_end_to_end_and_its_first_loss_is_the_distillation_loss(teachers, tmp_path):
    r = recipe(task={"name": "distill", "teacher": str(teachers["wide"]), "temperature": 4, "alpha": 0.9})
    trainer = Trainer(load_recipe(r), tmp_path / "student", quiet=True)
    initial = copy.deepcopy(trainer.state.model)
    batch = first_batch(trainer)
    summary = trainer.fit()
    assert summary["status"] == "finished"
    assert {"val/accuracy", "test/accuracy", "test/nll", "test/ece"} <= set(summary["metrics"])
    assert summary["metrics"]["test/accuracy"] > 0.6              # chance is 1/3

    teacher = final_model(teachers["wide"])
    with torch.no_grad():
        expected = DistillationLoss(temperature=4.0, alpha=0.9)(initial(batch["x"]), batch["y"], teacher(batch["x"]))
    assert logged_loss_at_step_1(tmp_path / "student") == pytest.approx(expected.item(), rel=1e-6)

    # The teacher stayed frozen, in eval mode, and unchanged by the student's training.
    used = trainer.state.task.teacher()
    assert not used.training and not any(p.requires_grad for p in used.parameters())
    for a, b in zip(used.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_alpha_0_is_plain_cross_entropy_training(teachers, tmp_path):
    plain = train(recipe(task={"name": "classify"}), tmp_path / "plain")
    distilled = train(recipe(task={"name": "distill", "teacher": str(teachers["wide"]), "alpha": 0.0}),
                      tmp_path / "distilled")
    assert distilled["metrics"] == plain["metrics"]
    losses = [[e["train/loss"] for e in read_metrics(tmp_path / d / "metrics.jsonl") if "train/loss" in e]
              for d in ("plain", "distilled")]
    assert losses[0] == losses[1]


def test_a_list_of_teachers_distils_their_ensemble(teachers, tmp_path):
    dirs = [str(teachers["wide"]), str(teachers["wider"])]
    r = recipe(task={"name": "distill", "teacher": dirs, "temperature": 2.0, "alpha": 0.5})
    trainer = Trainer(load_recipe(r), tmp_path / "student", quiet=True)
    initial = copy.deepcopy(trainer.state.model)
    batch = first_batch(trainer)
    assert trainer.fit()["status"] == "finished"
    used = trainer.state.task.teacher()
    assert isinstance(used, Ensemble) and len(used.members) == 2 and used.how == "mean_prob"

    ensemble = Ensemble([final_model(d) for d in dirs], how="mean_prob")
    with torch.no_grad():
        expected = DistillationLoss(2.0, 0.5)(initial(batch["x"]), batch["y"], ensemble(batch["x"]))
        single = DistillationLoss(2.0, 0.5)(initial(batch["x"]), batch["y"], final_model(dirs[0])(batch["x"]))
    got = logged_loss_at_step_1(tmp_path / "student")
    assert got == pytest.approx(expected.item(), rel=1e-6)
    assert got != pytest.approx(single.item(), rel=1e-3)        # not just the first teacher


def test_teacher_trained_on_other_data_is_refused(teachers, tmp_path):
    iris = {"name": "iris"}
    r = recipe(data=iris, task={"name": "distill", "teacher": str(teachers["wine"])})
    with pytest.raises(DojoError, match=r"wine.*input.*shape \(13,\)"):
        train(r, tmp_path / "wrong-shape")
    # Same input shape and class count but other classes: caught at the first evaluation.
    r = recipe(data=iris, task={"name": "distill", "teacher": str(teachers["synthetic4"])})
    with pytest.raises(DojoError, match=r"and this recipe use different data.*classes \['0', '1', '2'\] vs \['setosa'"):
        train(r, tmp_path / "wrong-classes")
    # Teachers of one ensemble must agree with each other too.
    r = recipe(task={"name": "distill", "teacher": [str(teachers["wide"]), str(teachers["wine"])]})
    with pytest.raises(DojoError, match="wide and .*wine use different data: input shape"):
        train(r, tmp_path / "mixed")


def test_missing_or_unfinished_teacher_is_a_dojo_error_naming_it(teachers, tmp_path):
    missing = tmp_path / "no-such-run"
    r = recipe(task={"name": "distill", "teacher": str(missing)})
    trainer = Trainer(load_recipe(r), None, quiet=True)          # loading is lazy: building works
    with pytest.raises(DojoError, match=f"{missing}.*does not exist"):
        trainer.fit()

    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    with pytest.raises(DojoError, match=f"{not_a_run} is not a run directory"):
        Trainer(load_recipe(recipe(task={"name": "distill", "teacher": str(not_a_run)})), None, quiet=True).fit()

    unfinished = tmp_path / "unfinished"
    shutil.copytree(teachers["wide"], unfinished)
    shutil.rmtree(unfinished / "checkpoints" / "final")
    with pytest.raises(DojoError, match=f"{unfinished} has not finished"):
        Trainer(load_recipe(recipe(task={"name": "distill", "teacher": str(unfinished)})), None, quiet=True).fit()


def test_a_finished_student_evaluates_without_its_teacher(teachers, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(teachers["wide"], teacher)
    r = recipe(task={"name": "distill", "teacher": str(teacher)})
    r["phases"] = r["phases"][:1]
    r["phases"][0]["steps"] = 4
    summary = train(r, tmp_path / "student")
    shutil.rmtree(teacher)
    trainer = Trainer.from_run_dir(tmp_path / "student", quiet=True)
    model = trainer.trained_models()[""]
    assert trainer.evaluate("test", model)["test/accuracy"] == summary["metrics"]["test/accuracy"]


def test_loading_the_teacher_keeps_the_students_random_streams(teachers):
    task = Distill(teacher=str(teachers["wide"]))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    task.teacher()                                   # builds the teacher run's Trainer, which seeds
    assert torch.equal(torch.get_rng_state(), before)


def test_options_are_checked_and_phase_losses_are_ignored_with_a_warning(teachers):
    with pytest.raises(ConfigError, match="task: task 'distill': temperature must be > 0"):
        Trainer(load_recipe(recipe(task={"name": "distill", "teacher": "x", "temperature": 0})), None, quiet=True)
    with pytest.raises(ConfigError, match="alpha must be in"):
        Trainer(load_recipe(recipe(task={"name": "distill", "teacher": "x", "alpha": 1.5})), None, quiet=True)
    with pytest.raises(ConfigError, match="task.teacher: required key is missing"):
        load_recipe(recipe(task={"name": "distill"}))

    task = Distill(teacher=str(teachers["wide"]), alpha=1.0)
    model = torch.nn.Linear(8, 3)
    batch = {"x": torch.randn(5, 8), "y": torch.randint(0, 3, (5,))}
    with pytest.warns(UserWarning, match="ignores the phase's losses"):
        loss, parts = task.training_loss(model, batch, [LossTerm("focal", 1.0, FocalLoss())])
    assert set(parts) == {"distill"} and torch.equal(parts["distill"], loss.detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.training_loss(model, batch, [LossTerm("focal", 1.0, FocalLoss())])    # warned once only
    teacher = final_model(teachers["wide"])
    with torch.no_grad():
        expected = DistillationLoss(4.0, 1.0)(model(batch["x"]), None, teacher(batch["x"]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_other_standardisation_statistics_give_a_warning(teachers, tmp_path):
    r = recipe(task={"name": "distill", "teacher": str(teachers["wide"])})
    r["data"]["split_seed"] = 1                     # same data, another train split: other x_mean / x_std
    r["phases"] = r["phases"][:1]
    r["phases"][0]["steps"] = 2
    with pytest.warns(UserWarning, match="standardised their inputs with different statistics"):
        train(r, tmp_path / "student")
