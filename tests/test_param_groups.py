"""Parameter groups: every parameter in exactly one group, rules, layer decay, no_decay, and the
trainer's frozen groups (lr 0, no new group on unfreeze, BatchNorm kept in eval unless train_bn)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_tiny_recipe
from torchdojo import ConfigError, Trainer, load_recipe
from torchdojo.models import CNN, MLP
from torchdojo.optim import LAMB, param_groups
from torchdojo.optim.param_groups import apply_lr_mult

DOJO = str(Path(sys.executable).with_name("dojo"))


def cnn() -> CNN:
    torch.manual_seed(0)
    return CNN((1, 8, 8), 10)


def assert_partition(model: nn.Module, groups: list[dict]) -> None:
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is in no group"


@pytest.mark.parametrize("kwargs", [
    {},
    {"no_decay": False},
    {"rules": [{"match": "features.0", "lr_mult": 0.1}, {"match": "features.*", "lr_mult": 0.5}]},
    {"layer_decay": 0.5},
    {"rules": [{"match": "head.*", "lr_mult": 2.0}], "layer_decay": 0.9,
     "frozen": {"a": {"features.0.0.weight", "features.0.1.weight", "features.0.1.bias"}, "b": set()}},
])
def test_every_parameter_lands_in_exactly_one_group(kwargs):
    model = cnn()
    assert_partition(model, param_groups(model, **kwargs))


def test_first_matching_rule_wins_and_sets_lr_and_weight_decay():
    model = cnn()
    groups = param_groups(model, [{"match": "features.0", "lr_mult": 0.1, "weight_decay": 0.5},
                                  {"match": "features.*", "lr_mult": 0.3}], lr=1.0, weight_decay=0.01,
                          no_decay=False)
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        if name.startswith("features.0."):
            assert (g["lr"], g["weight_decay"]) == (0.1, 0.5), name
        elif name.startswith("features."):
            assert (g["lr"], g["weight_decay"]) == (0.3, 0.01), name
        else:
            assert (g["lr"], g["weight_decay"]) == (1.0, 0.01), name


def test_no_decay_covers_biases_and_norm_weights_only():
    model = MLP((6,), 3, MLP.Config(hidden=[8, 8], batch_norm=True))
    groups = param_groups(model, weight_decay=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        is_norm_weight = name in ("body.1.1.weight", "body.2.1.weight")
        if name.endswith("bias") or is_norm_weight:
            assert g["weight_decay"] == 0.0 and g["trust_ratio"] is False, name
        else:
            assert g["weight_decay"] == 0.1 and "trust_ratio" not in g, name
    assert all("trust_ratio" not in g for g in param_groups(model, no_decay=False))


def test_layer_decay_gives_geometric_lrs_by_block():
    model = cnn()                               # blocks: features.0, features.1, head
    groups = param_groups(model, layer_decay=0.5, lr=1.0, no_decay=False)
    lr_of = {n: g["lr"] for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert lr_of["features.0.0.weight"] == 0.25
    assert lr_of["features.1.0.weight"] == 0.5
    assert lr_of["head.1.weight"] == 1.0 and lr_of["head.4.bias"] == 1.0


def test_layer_decay_needs_a_block_order():
    with pytest.raises(ValueError, match="block_names"):
        param_groups(nn.Linear(2, 2), layer_decay=0.8)


def test_rule_matching_nothing_is_an_error_in_python_and_in_recipes(tiny_recipe):
    with pytest.raises(ValueError, match="matches no parameter"):
        param_groups(cnn(), [{"match": "backbone.*"}])
    tiny_recipe["param_groups"] = [{"match": "backbone.*", "lr_mult": 0.1}]
    with pytest.raises(ConfigError) as err:
        Trainer(load_recipe(tiny_recipe), None, quiet=True).fit()
    assert err.value.path == "param_groups"


def test_phase_param_groups_need_that_phases_optimizer(tiny_recipe):
    tiny_recipe["phases"][1].pop("optimizer")
    tiny_recipe["phases"][1]["param_groups"] = [{"match": "head", "lr_mult": 2}]
    with pytest.raises(ConfigError) as err:
        load_recipe(tiny_recipe)
    assert err.value.path == "phases.1.param_groups"


def test_groups_work_with_our_optimizers_and_apply_lr_mult():
    model = cnn()
    opt = LAMB(param_groups(model, [{"match": "features", "lr_mult": 0.1}]), lr=0.01)
    apply_lr_mult(opt)
    lrs = sorted({round(g["lr"], 12) for g in opt.param_groups})
    assert lrs == [0.001, 0.01]
    flags = {g.get("trust_ratio") for g in opt.param_groups}
    assert flags == {True, False}               # LAMB's default for groups without the key is True


def freeze_recipe(**phase1) -> dict:
    r = make_tiny_recipe()
    r["model"] = {"name": "mlp", "hidden": [16, 16], "batch_norm": True}
    r["param_groups"] = {"rules": [{"match": "head", "lr_mult": 2.0}]}
    r["phases"] = [
        {"name": "frozen", "steps": 8, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01},
         "freeze": ["body.1"], **phase1},
        {"name": "thawed", "steps": 8},
    ]
    return r


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_frozen_groups_run_at_lr_zero_and_come_back_without_new_groups(tmp_path):
    trainer = Trainer(load_recipe(freeze_recipe()), tmp_path / "run", quiet=True)
    trainer.fit()
    optimizer = trainer.state.optimizer
    names = {id(p): n for n, p in trainer.state.model.named_parameters()}
    frozen_idx = [i for i, g in enumerate(optimizer.param_groups)
                  if all(names[id(p)].startswith("body.1.") for p in g["params"])]
    assert frozen_idx, "the frozen module has its own groups"
    train = [e for e in read_metrics(tmp_path / "run") if "train/loss" in e and "lr/group0" in e]
    n_groups = len(optimizer.param_groups)
    for e in train:
        lrs = [e[f"lr/group{i}"] for i in range(n_groups)]
        assert f"lr/group{n_groups}" not in e                      # never a group more
        for i in frozen_idx:
            assert (lrs[i] == 0.0) == (e["phase"] == "frozen"), (e["phase"], i, lrs[i])
    head = [i for i, g in enumerate(optimizer.param_groups) if g["name"].startswith("head")]
    assert all(optimizer.param_groups[i]["initial_lr"] == 0.02 for i in head)


def test_train_bn_keeps_frozen_batchnorm_statistics_training(tmp_path):
    def stats(trainer):
        return {k: v.clone() for k, v in trainer.state.model.state_dict().items() if k.startswith("body.1.")}

    for train_bn in (False, True):
        r = freeze_recipe(train_bn=train_bn)
        r["phases"] = r["phases"][:1]
        trainer = Trainer(load_recipe(r), None, quiet=True)
        before = stats(trainer)
        trainer.fit()
        after = stats(trainer)
        assert torch.equal(before["body.1.0.weight"], after["body.1.0.weight"])   # frozen either way
        assert torch.equal(before["body.1.1.weight"], after["body.1.1.weight"])
        moved = not torch.equal(before["body.1.1.running_mean"], after["body.1.1.running_mean"])
        assert moved == train_bn


def test_resume_inside_the_frozen_phase_is_exact(tmp_path):
    r = freeze_recipe()
    r["checkpoint"] = {"every_steps": 3, "every_epochs": None, "keep_last": 10}
    full = Trainer(load_recipe(r), tmp_path / "full", quiet=True).fit()
    Trainer(load_recipe(r), tmp_path / "part", quiet=True).fit()
    resumed = Trainer.from_run_dir(tmp_path / "part", quiet=True,
                                   checkpoint=tmp_path / "part/checkpoints/step-00000006").fit()
    assert resumed["metrics"] == full["metrics"]

    def logged(run):   # throughput is the only thing allowed to differ
        return [{k: v for k, v in e.items() if k != "train/samples_per_sec"} for e in read_metrics(run)]
    assert logged(tmp_path / "part") == logged(tmp_path / "full")


def test_param_groups_command_prints_the_table(tmp_path):
    recipe = tmp_path / "r.yaml"
    import yaml
    recipe.write_text(yaml.safe_dump(freeze_recipe()))
    out = subprocess.run([DOJO, "param-groups", str(recipe)], capture_output=True, text=True,
                         env={"COLUMNS": "200", "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "phase frozen: adamw" in out.stdout and "phase thawed" not in out.stdout
    assert "head" in out.stdout and "no_decay" in out.stdout and "0.02" in out.stdout
    bad = subprocess.run([DOJO, "param-groups", str(recipe), "param_groups.rules=[{match: nope}]"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "matches no parameter" in bad.stderr
