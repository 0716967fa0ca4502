"""The `ensemble` recipe key: joint members (vary: [seed], one vectorised model, optional diversity
penalties) through the Trainer, and members that differ in more (trained one after another)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from torchdojo import Trainer, load_recipe, train
from torchdojo.cli import main
from torchdojo.ensemble import combine
from torchdojo.ensemble_runs import member_recipes
from torchdojo.ensembles import StackedEnsemble
from torchdojo.errors import ConfigError, DojoError

from helpers import read_metrics


def test_joint_ensemble_reports_members_ensemble_and_disagreement(tiny_recipe, tmp_path):
    tiny_recipe["ensemble"] = {"members": 3, "ncl": 0.5}
    trainer = Trainer(load_recipe(tiny_recipe), tmp_path / "run", quiet=True)
    assert isinstance(trainer.state.model, StackedEnsemble) and trainer.state.model.num_members == 3
    m = trainer.fit()["metrics"]
    for key in ("test/accuracy", "test/ensemble/accuracy", "test/member0/accuracy", "test/member2/accuracy",
                "val/disagreement", "val/member_accuracy_mean"):
        assert key in m, key
    assert m["test/accuracy"] == m["test/ensemble/accuracy"]
    assert 0 < m["val/disagreement"] < 1
    assert any("val/disagreement" in e for e in read_metrics(tmp_path / "run"))     # logged every epoch
    # The members really differ (different initialisations) and the ensemble is their mean probability.
    model = trainer.final_model().eval()
    x = trainer.state.data.test.x
    with torch.no_grad():
        members = [trainer.state.model.member(i).eval()(x) for i in range(3)]
        assert not torch.allclose(members[0], members[1])
        torch.testing.assert_close(model(x), combine(members, "mean_prob"))
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "-q"])
    assert res.exit_code == 0 and "member1/accuracy" in res.output and "ensemble/accuracy" in res.output


def test_weights_fitted_on_validation(tiny_recipe, tmp_path):
    tiny_recipe["ensemble"] = {"members": 2, "combine": "weights"}
    trainer = Trainer(load_recipe(tiny_recipe), tmp_path / "run", quiet=True)
    trainer.fit()
    weighted = trainer.trained_models()["ensemble"]
    w = weighted.weights
    assert w.shape == (2,) and torch.all(w >= 0) and float(w.sum()) == pytest.approx(1.0)


def test_sequential_members_differ_in_more_than_seed(tiny_recipe, tmp_path):
    tiny_recipe["ensemble"] = {"members": 2, "vary": ["seed", {"model.hidden": [[16], [8]]}]}
    recipe = load_recipe(tiny_recipe)
    members = member_recipes(recipe)
    assert [m["model"]["hidden"] for m in members] == [[16], [8]]
    assert [m["seed"] for m in members] == [0, 1]
    assert {m["data"]["split_seed"] for m in members} == {0}          # one split for all members
    summary = train(recipe, tmp_path / "run")
    assert (tmp_path / "run" / "members" / "m1" / "summary.json").is_file()
    m = summary["metrics"]
    assert {"test/accuracy", "test/member0/accuracy", "test/member1/accuracy"} <= m.keys()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "-q"])
    assert res.exit_code == 0, res.output
    assert f"{m['test/member1/accuracy']:.4g}" in res.output
    with pytest.raises(DojoError, match="one after another"):
        Trainer(recipe, quiet=True)


@pytest.mark.parametrize("ensemble, match", [
    ({"members": 3, "vary": [{"model.hidden": [[4], [8]]}]}, "one value per member: 3 members, 2 values"),
    ({"members": 2, "vary": [{"model.hidden": [[4], [8]]}], "ncl": 0.1}, "ncl and weight_distance need"),
    ({"members": 1}, "ensemble.members"),
])
def test_bad_ensemble_specs(tiny_recipe, ensemble, match):
    tiny_recipe["ensemble"] = ensemble
    with pytest.raises(ConfigError, match=match):
        load_recipe(tiny_recipe)


def test_joint_ensembles_need_classify_or_regress(tiny_recipe, tmp_path):
    teacher = copy.deepcopy(tiny_recipe)
    Trainer(load_recipe(teacher), tmp_path / "teacher", quiet=True).fit()
    tiny_recipe["task"] = {"name": "distill", "teacher": str(tmp_path / "teacher")}
    tiny_recipe["ensemble"] = {"members": 2}
    with pytest.raises(ConfigError, match="joint ensembles train with the classify or regress task"):
        Trainer(load_recipe(tiny_recipe), quiet=True)
