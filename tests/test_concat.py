"""Encoder/head split of the registered models, the `concat` model (registered and run encoders, frozen
or trained) and `dojo pair-search`."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

from conftest import make_tiny_recipe
from torchdojo import Trainer, load_recipe
from torchdojo.errors import ConfigError
from torchdojo.models import Concat
from torchdojo.models.concat import load_run_encoder
from torchdojo.pair_search import pair_search, pair_search_command
from torchdojo.registry import MODELS

# (model spec, input shape): every registered single model, some in their less common configurations.
SPLIT_CASES = [
    ({"name": "mlp"}, (7,)),
    ({"name": "mlp", "hidden": []}, (2, 3)),                       # no hidden layer: the flattened input
    ({"name": "mlp", "hidden": [9, 5], "batch_norm": True, "dropout": 0.2, "activation": "gelu"}, (7,)),
    ({"name": "cnn", "channels": [4, 6], "hidden": 10, "dropout": 0.3}, (1, 8, 8)),
    ({"name": "cnn", "channels": [3], "hidden": 5, "batch_norm": False}, (2, 4, 4)),
    ({"name": "cnn1d", "channels": [4, 5], "hidden": 11}, (1, 40)),
    ({"name": "gru", "hidden": 6}, (2, 12)),
    ({"name": "gru", "hidden": 5, "layers": 2, "bidirectional": True, "dropout": 0.1}, (2, 12)),
]
EXPECTED_DIM = [128, 6, 5, 10, 5, 11, 6, 10]


def build(spec: dict, shape, num_outputs: int = 3) -> nn.Module:
    return MODELS.build(spec, "model", input_shape=tuple(shape), num_outputs=num_outputs)


@pytest.mark.parametrize("case", range(len(SPLIT_CASES)), ids=[f"{s['name']}{i}" for i, (s, _) in enumerate(SPLIT_CASES)])
def test_encode_is_everything_but_the_output_layer(case):
    spec, shape = SPLIT_CASES[case]
    torch.manual_seed(case)
    model = build(spec, shape, num_outputs=4)
    x = torch.randn(5, *shape)
    model.train()
    model(x)                                # move BatchNorm statistics off their initial values
    model.eval()
    with torch.no_grad():
        features = model.encode(x)
        assert features.shape == (5, model.feature_dim) and model.feature_dim == EXPECTED_DIM[case]
        assert isinstance(model.output_layer, nn.Linear) and model.output_layer.in_features == model.feature_dim
        torch.testing.assert_close(model.output_layer(features), model(x), rtol=0, atol=0)
    # The output layer is a module the model already had: no new parameters, the same names.
    assert {id(p) for p in model.output_layer.parameters()} <= {id(p) for p in model.parameters()}
    assert all(not n.startswith("output_layer") for n, _ in model.named_parameters())


def test_parameter_names_are_unchanged():
    """Checkpoints written before the encoder/head split load as they did."""
    assert [n for n, _ in build({"name": "mlp", "hidden": [4]}, (3,)).named_parameters()] == \
        ["body.1.0.weight", "body.1.0.bias", "head.weight", "head.bias"]
    assert [n for n, _ in build({"name": "cnn", "channels": [2], "hidden": 4}, (1, 4, 4)).named_parameters()] == \
        ["features.0.0.weight", "features.0.1.weight", "features.0.1.bias", "head.1.weight", "head.1.bias",
         "head.4.weight", "head.4.bias"]
    assert [n for n, _ in build({"name": "gru", "hidden": 4}, (2, 5)).named_parameters()] == \
        ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0", "head.weight", "head.bias"]


def test_concat_forwards_the_concatenated_features():
    torch.manual_seed(0)
    encoders = [{"name": "cnn1d", "channels": [4], "hidden": 7}, {"name": "gru", "hidden": 5, "bidirectional": True},
                {"name": "mlp", "hidden": [3]}]
    model = build({"name": "concat", "encoders": encoders, "head": {"hidden": [6]}}, (2, 12), num_outputs=4)
    assert isinstance(model, Concat)
    assert model.feature_dim == 7 + 10 + 3 == sum(e.feature_dim for e in model.encoders)
    assert model.head[0].in_features == model.feature_dim
    model.eval()
    x = torch.randn(9, 2, 12)
    with torch.no_grad():
        features = model.encode(x)
        assert features.shape == (9, 20)
        torch.testing.assert_close(features, torch.cat([e.encode(x) for e in model.encoders], dim=1), rtol=0, atol=0)
        out = model(x)
        assert out.shape == (9, 4)
        torch.testing.assert_close(out, model.head(features), rtol=0, atol=0)
    assert model.block_names() == ["encoders", "head"]
    linear = build({"name": "concat", "encoders": encoders[:1]}, (2, 12))   # default head: one Linear
    assert [type(m) for m in linear.head] == [nn.Linear] and linear.head[0].in_features == 7


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_encoders_stay_fixed_and_unfrozen_ones_train():
    torch.manual_seed(0)
    spec = {"name": "concat", "head": {"hidden": [8], "dropout": 0.2}, "encoders": [
        {"name": "cnn1d", "channels": [4], "hidden": 6, "dropout": 0.5, "freeze": True},     # BatchNorm + dropout
        {"name": "mlp", "hidden": [5], "batch_norm": True, "dropout": 0.3},                # trained
    ]}
    model = build(spec, (1, 16))
    frozen, trained = model.encoders
    assert model.frozen == (True, False)
    before_frozen, before_trained = _snapshot(frozen), _snapshot(trained)
    assert all(not p.requires_grad for p in frozen.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    x, y = torch.randn(32, 1, 16), torch.randint(0, 3, (32,))
    for step in range(4):
        # What the trainer does at every phase start: switch all gradients on, then train mode.
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        assert model.training and trained.training and model.head.training
        assert not frozen.training and not any(m.training for m in frozen.modules())
        assert all(not p.requires_grad for p in frozen.parameters())
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert all(p.grad is None for p in frozen.parameters())
        opt.step()
    # Even with gradients switched on and no train() call, nothing flows into a frozen encoder.
    for p in frozen.parameters():
        p.requires_grad_(True)
    model(x).sum().backward()
    assert all(p.grad is None for p in frozen.parameters())
    after = _snapshot(frozen)
    for k, v in before_frozen.items():       # weights and BatchNorm running statistics
        assert torch.equal(v, after[k]), k
    bn = [m for m in frozen.modules() if isinstance(m, nn.BatchNorm1d)][0]
    assert int(bn.num_batches_tracked) == 0
    changed = [k for k, v in _snapshot(trained).items() if not torch.equal(v, before_trained[k])]
    assert "body.1.0.weight" in changed and "body.1.1.running_mean" in changed
    model.eval()
    assert not any(m.training for m in model.modules())


def test_encoder_spec_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="at least one encoder"):
        build({"name": "concat"}, (4,))
    with pytest.raises(ConfigError, match=r"model\.encoders\.0\.hiden: unknown key 'hiden'.*did you mean 'hidden'"):
        build({"name": "concat", "encoders": [{"name": "mlp", "hiden": [3]}]}, (4,))
    with pytest.raises(ConfigError, match=r"model\.encoders\.0\.frezze: .*did you mean 'freeze'"):
        build({"name": "concat", "encoders": [{"run": str(tmp_path), "frezze": True}]}, (4,))
    with pytest.raises(ConfigError, match=r"model\.encoders\.0: an encoder is either"):
        build({"name": "concat", "encoders": [{"run": str(tmp_path), "name": "mlp"}]}, (4,))
    with pytest.raises(ConfigError, match=r"model\.encoders\.0\.run: .* is not a run directory"):
        build({"name": "concat", "encoders": [{"run": str(tmp_path)}]}, (4,))
    with pytest.raises(ConfigError, match=r"model\.head\.hiden: unknown key"):
        load_recipe({**make_tiny_recipe(), "model": {"name": "concat", "encoders": [{"name": "mlp"}],
                                                     "head": {"hiden": [3]}}})


# -- runs as encoders ----------------------------------------------------------------------------------

def _quick(recipe: dict) -> dict:
    recipe["log"] = {"every_steps": 11, "tensorboard": False}
    return recipe


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Three finished tiny runs on the same data and split: MLPs of different widths (one with BatchNorm)."""
    root = tmp_path_factory.mktemp("encoders")
    runs = []
    for name, model in [("wide", {"hidden": [16]}), ("deep", {"hidden": [8, 8], "batch_norm": True}),
                        ("tanh", {"hidden": [12], "activation": "tanh", "dropout": 0.1})]:
        recipe = _quick(make_tiny_recipe())
        recipe["model"].update(model)
        Trainer(load_recipe(recipe), root / name, quiet=True).fit()
        runs.append(root / name)
    return runs


def _head_recipe(encoders: list[dict], **head) -> dict:
    recipe = _quick(make_tiny_recipe())
    recipe["model"] = {"name": "concat", "encoders": encoders, "head": head}
    return recipe


def test_concat_of_two_runs_trains_a_head_end_to_end(tiny_runs, tmp_path):
    wide, deep, _ = tiny_runs
    recipe = _head_recipe([{"run": str(wide), "freeze": True}, {"run": str(deep)}], hidden=[8])
    trainer = Trainer(load_recipe(recipe), tmp_path / "head", quiet=True)
    model = trainer.state.model
    assert model.frozen == (True, True) and model.feature_dim == 16 + 8
    assert model.describe()[0].startswith(f"encoders.0: run {wide}, 16 features, frozen")
    # Loading a run (which seeds its own trainer) leaves the caller's random state as it was.
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    first, shape = load_run_encoder(deep)
    assert torch.equal(torch.get_rng_state(), rng) and shape == (8,)
    second, _ = load_run_encoder(deep)        # from the cache: a model of its own, the same weights
    assert second is not first and not second.training
    assert all(torch.equal(a, b) and a is not b for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    head_before = _snapshot(model.head)
    summary = trainer.fit()
    assert summary["status"] == "finished" and 0 <= summary["metrics"]["test/accuracy"] <= 1
    assert math.isfinite(summary["metrics"]["test/loss"])
    final = load_file(str(tmp_path / "head" / "checkpoints" / "final" / "model.safetensors"))
    for i, run in enumerate((wide, deep)):     # the frozen encoders are the runs' weights, BatchNorm included
        own = load_file(str(run / "checkpoints" / "final" / "model.safetensors"))
        for k, v in own.items():
            assert torch.equal(final[f"encoders.{i}.{k}"], v), (i, k)
    assert any(not torch.equal(v, final[f"head.{k}"]) for k, v in head_before.items())
    # The run reloads (its encoders from their runs, then its own weights) and predicts the same.
    reloaded = Trainer.from_run_dir(tmp_path / "head", quiet=True)
    again = reloaded.trained_models(calibrated=False)[""]
    x = reloaded.state.data.test.x
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_run_encoder_with_other_input_shape_is_a_config_error(tiny_runs, tmp_path):
    recipe = _head_recipe([{"run": str(tiny_runs[0])}])
    recipe["data"]["n_features"] = 6
    with pytest.raises(ConfigError, match=r"model\.encoders\.0\.run: run .* inputs of shape \(8,\), but this "
                                          r"data's inputs have shape \(6,\)"):
        Trainer(load_recipe(recipe), None, quiet=True)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text((tiny_runs[0] / "recipe.yaml").read_text())
    with pytest.raises(ConfigError, match="has not finished"):
        Trainer(load_recipe(_head_recipe([{"run": str(unfinished)}])), None, quiet=True)


def test_an_unfrozen_run_encoder_fine_tunes_and_a_registered_one_trains(tiny_runs, tmp_path):
    recipe = _head_recipe([{"run": str(tiny_runs[0]), "freeze": False}, {"name": "mlp", "hidden": [4]}])
    recipe["phases"] = recipe["phases"][:1]
    trainer = Trainer(load_recipe(recipe), tmp_path / "tune", quiet=True)
    assert trainer.state.model.frozen == (False, False)
    trainer.fit()
    final = load_file(str(tmp_path / "tune" / "checkpoints" / "final" / "model.safetensors"))
    own = load_file(str(tiny_runs[0] / "checkpoints" / "final" / "model.safetensors"))
    assert not torch.equal(final["encoders.0.body.1.0.weight"], own["body.1.0.weight"])
    fresh = Trainer(load_recipe(recipe), None, quiet=True).state.model      # same seed: the initial weights
    assert not torch.equal(final["encoders.1.body.1.0.weight"], fresh.encoders[1].body[1][0].weight)


# -- pair search -------------------------------------------------------------------------------------------

def _own_predictions(run):
    trainer = Trainer.from_run_dir(run, quiet=True)
    model = trainer.trained_models(calibrated=False)[""]
    with torch.no_grad():
        return model(trainer.state.data.test.x).argmax(1), trainer.state.data.test.y


def test_pair_search_trains_singles_and_pairs_and_writes_the_table(tiny_runs, tmp_path):
    import yaml

    head = _quick(make_tiny_recipe())
    head["phases"] = head["phases"][:1]
    (tmp_path / "head.yaml").write_text(yaml.safe_dump(head))
    out = tmp_path / "pairs"
    args = [*map(str, tiny_runs), "--recipe", str(tmp_path / "head.yaml"), "--out", str(out), "-q",
            "model.head.dropout=0.1"]
    result = CliRunner().invoke(pair_search_command, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for label in ("wide", "deep", "tanh", "wide + deep", "wide + tanh", "deep + tanh"):
        assert label in result.output
    assert "disagreement" in result.output
    doc = json.loads((out / "pair_search.json").read_text())
    assert [s["label"] for s in doc["singles"]] == ["wide", "deep", "tanh"]
    assert [p["label"] for p in doc["pairs"]] == ["wide + deep", "wide + tanh", "deep + tanh"]
    assert all(e["status"] == "finished" for e in doc["singles"] + doc["pairs"])
    singles = {s["label"]: s for s in doc["singles"]}
    preds = {}
    for run, s in zip(tiny_runs, doc["singles"]):
        summary = json.loads((run / "summary.json").read_text())
        assert s["own_test_accuracy"] == pytest.approx(summary["metrics"]["test/accuracy"])
        assert s["test_accuracy"] == json.loads((out / s["label"] / "summary.json").read_text())["metrics"]["test/accuracy"]
        preds[s["label"]], y = _own_predictions(run)
        assert len(y) == doc["test_rows"]
    for p in doc["pairs"]:
        a, b = p["runs"]
        recipe = yaml.safe_load((out / f"{a}+{b}" / "recipe.yaml").read_text())
        assert recipe["model"]["encoders"] == [{"run": str(r.resolve()), "freeze": True}
                                               for r in tiny_runs if r.name in (a, b)]
        assert recipe["model"]["head"] == {"hidden": [], "dropout": 0.1}
        direct = (preds[a] != preds[b]).double().mean().item()
        assert 0 <= p["disagreement"] <= 1 and p["disagreement"] == pytest.approx(direct, abs=1e-12)
        best = max(singles[a]["test_accuracy"], singles[b]["test_accuracy"])
        assert p["best_single_accuracy"] == best and p["gain"] == pytest.approx(p["test_accuracy"] - best)
    assert any(p["disagreement"] > 0 for p in doc["pairs"])
    md = (out / "pair_search.md").read_text()
    assert "## Pairs" in md and "`deep + tanh`" in md and md.count("\n| `") == 6

    # Rerunning reuses the finished heads; the same numbers come back.
    again = pair_search(tiny_runs, str(tmp_path / "head.yaml"), out, ["model.head.dropout=0.1"], quiet=True)
    assert [p["test_accuracy"] for p in again["pairs"]] == [p["test_accuracy"] for p in doc["pairs"]]


def test_pair_search_refuses_runs_on_another_split(tiny_runs, tmp_path):
    result = CliRunner().invoke(pair_search_command, [*map(str, tiny_runs[:2]), "--recipe", "quickstart", "-q",
                                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "trained on other data or another split" in result.output
    import yaml
    (tmp_path / "head.yaml").write_text(yaml.safe_dump(_quick(make_tiny_recipe())))
    result = CliRunner().invoke(pair_search_command, [*map(str, tiny_runs[:2]), "--recipe", str(tmp_path / "head.yaml"),
                                                      "-q", "--out", str(tmp_path / "y"), "seed=4"])
    assert result.exit_code == 2 and "split_seed" in result.output and not (tmp_path / "y").exists()
    result = CliRunner().invoke(pair_search_command, [str(tiny_runs[0]), "--recipe", str(tmp_path / "head.yaml"), "-q"])
    assert result.exit_code == 2 and "at least two run directories" in result.output


def test_run_labels_are_short_and_unique(tmp_path):
    from torchdojo.pair_search import run_labels

    assert run_labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
    assert run_labels([tmp_path / "x" / "seed0", tmp_path / "y" / "seed0"]) == ["x/seed0", "y/seed0"]
