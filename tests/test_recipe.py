"""Recipes: loading, dotted overrides, validation errors (key path + helpful text), the CLI's error
contract (exit code 2, one `error:` line, no traceback) and user-registered components."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from torchdojo.cli import main
from torchdojo.errors import ConfigError, DojoError
from torchdojo.recipe import Recipe, builtin_recipes, load_recipe, read_recipe_source
from torchdojo.registry import MODELS, OPTIMIZERS

TINY = {
    "name": "tiny",
    "data": {"name": "iris"},
    "model": {"name": "mlp", "hidden": [8]},
    "phases": [{"name": "main", "epochs": 1, "batch_size": 16, "optimizer": {"name": "adam", "lr": 0.01}}],
}


def tiny(**changes) -> dict:
    raw = copy.deepcopy(TINY)
    raw.update(changes)
    return raw


def quickstart_raw() -> dict:
    raw, _ = read_recipe_source("quickstart")
    return raw


def config_error(raw: dict, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_recipe(raw, list(overrides))
    return info.value


# -- loading -------------------------------------------------------------------------------------

def test_quickstart_loads_and_fills_defaults():
    r = load_recipe("quickstart")
    assert isinstance(r, Recipe)
    assert r.name == "quickstart"
    assert [r.phase_name(i) for i in range(len(r.phases))] == ["main", "settle"]
    # Component options are validated and completed with the factories' defaults.
    assert r.phases[0].optimizer == {"name": "adamw", "lr": 3.0e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                                     "weight_decay": 0.01, "amsgrad": False}
    assert r.model == {"name": "cnn", "channels": [32, 64], "hidden": 128, "dropout": 0.1, "batch_norm": True}
    assert [m["name"] for m in r.methods] == ["grad_clip", "ema"]
    # The second phase's batch size is its own; losses carry over from the first phase.
    assert r.batch_size(0) == 32 and r.batch_size(1) == 128
    assert r.losses(1) == r.losses(0) and r.losses(0)[0]["label_smoothing"] == 0.05


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_builtin_recipe_validates(name):
    r = load_recipe(name)
    assert r.phases and r.phases[0].optimizer is not None
    # Resolved recipes round-trip: what a run saves validates again to the same recipe.
    from torchdojo.recipe import parse_yaml
    again = load_recipe(parse_yaml(r.to_yaml(), "resolved"))
    assert again.model_dump(mode="json") == r.model_dump(mode="json")


def test_builtin_recipes_include_quickstart():
    assert "quickstart" in builtin_recipes()


def test_recipe_file_path_loads(tmp_path):
    import yaml
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(TINY))
    r = load_recipe(str(path))
    assert r.name == "tiny" and r.model["hidden"] == [8]


# -- overrides -----------------------------------------------------------------------------------

def test_overrides_take_effect():
    base = load_recipe("quickstart")
    r = load_recipe("quickstart", ["phases.0.epochs=2", "phases.settle.epochs=5", "seed=3",
                                   "model.channels=[8,16]"])
    assert r.phases[0].epochs == 2 and base.phases[0].epochs == 20
    assert r.phases[1].epochs == 5 and base.phases[1].epochs == 3
    assert r.seed == 3 and base.seed == 0
    assert r.model["channels"] == [8, 16]
    # Everything not overridden is unchanged.
    assert r.model["hidden"] == base.model["hidden"] == 128
    assert r.phases[0].optimizer == base.phases[0].optimizer


def test_override_by_phase_name_equals_override_by_index():
    by_name = load_recipe("quickstart", ["phases.main.epochs=2"])
    by_index = load_recipe("quickstart", ["phases.0.epochs=2"])
    assert by_name.phases[0].epochs == 2
    assert by_name.model_dump() == by_index.model_dump()


def test_override_values_are_parsed_as_yaml():
    r = load_recipe("quickstart", ["phases.0.optimizer.lr=1e-2", "phases.main.optimizer.betas=[0.8, 0.9]",
                                   "phases.-1.batch_size=7", "description=hello world"])
    assert r.phases[0].optimizer["lr"] == pytest.approx(1e-2)
    assert tuple(r.phases[0].optimizer["betas"]) == (0.8, 0.9)
    assert r.phases[1].batch_size == 7
    assert r.description == "hello world"


def test_overrides_do_not_mutate_a_mapping_source():
    raw = tiny()
    snapshot = copy.deepcopy(raw)
    load_recipe(raw, ["seed=9", "phases.0.epochs=3"])
    assert raw == snapshot


def test_override_unknown_phase_name_suggests():
    err = config_error(quickstart_raw(), ["phases.mian.epochs=2"])
    assert err.path == "phases.mian"
    assert "did you mean 'main'" in str(err) and "settle" in str(err)


def test_override_index_out_of_range():
    err = config_error(quickstart_raw(), ["phases.5.epochs=2"])
    assert err.path == "phases.5" and "out of range" in str(err) and "2 items" in str(err)


def test_override_without_equals_sign():
    err = config_error(quickstart_raw(), ["seed"])
    assert "key.path=value" in str(err)


def test_override_with_wrong_type_names_the_key():
    err = config_error(quickstart_raw(), ["seed=abc"])
    assert err.path == "seed" and "'abc'" in str(err)


def test_train_help_examples_are_valid_overrides():
    """Every `dojo train quickstart ...` example in the command's help must be a valid command."""
    help_text = main.commands["train"].help
    examples = [line.split()[3:] for line in help_text.splitlines()
                if line.strip().startswith("dojo train quickstart")]
    assert examples, "the help shows examples"
    for overrides in examples:
        overrides = [o for o in overrides if "=" in o]
        load_recipe("quickstart", overrides)   # raises ConfigError if an example is wrong


# -- validation errors ---------------------------------------------------------------------------

def test_unknown_top_level_key():
    raw = quickstart_raw()
    raw["optimzer"] = {"name": "adam"}
    err = config_error(raw)
    assert err.path == "optimzer"
    assert "unknown key 'optimzer'" in str(err)
    # There is no top-level `optimizer`: the message lists the real top-level keys, and any
    # suggestion of `optimizer` must point to where it belongs (inside a phase).
    valid = err.message.split("valid keys:")[1]
    assert "optimizer" not in valid
    for key in ("phases", "model", "data", "seed"):
        assert key in valid
    if "did you mean 'optimizer'" in err.message:
        assert "phase" in err.message.split("did you mean")[1].split(";")[0]


def test_unknown_key_inside_a_phase_suggests():
    raw = quickstart_raw()
    raw["phases"][0]["optimzer"] = raw["phases"][0].pop("optimizer")
    err = config_error(raw)
    assert err.path == "phases.0.optimzer"
    assert "unknown key 'optimzer'" in str(err) and "did you mean 'optimizer'" in str(err)


def test_unknown_key_in_nested_section():
    err = config_error(tiny(eval={"every_epoch": 1}))
    assert err.path == "eval.every_epoch" and "did you mean 'every_epochs'" in str(err)


def test_wrong_type_names_the_key_and_value():
    raw = quickstart_raw()
    raw["phases"][0]["epochs"] = "abc"
    err = config_error(raw)
    assert err.path == "phases.0.epochs"
    assert "'abc'" in str(err) and "number" in str(err)


def test_out_of_range_value():
    err = config_error(tiny(), ["phases.0.batch_size=0"])
    assert err.path == "phases.0.batch_size" and "greater than 0" in str(err)


def test_missing_required_key():
    raw = tiny()
    del raw["model"]
    err = config_error(raw)
    assert err.path == "model" and "missing" in str(err)


def test_unregistered_optimizer_lists_choices_and_suggests():
    raw = quickstart_raw()
    raw["phases"][0]["optimizer"]["name"] = "adamww"
    err = config_error(raw)
    assert err.path == "phases.0.optimizer.name"
    assert "did you mean 'adamw'" in str(err)
    for name in OPTIMIZERS.names():
        assert name in str(err)


def test_unknown_optimizer_option_suggests():
    raw = quickstart_raw()
    raw["phases"][0]["optimizer"]["lrr"] = 0.1
    err = config_error(raw)
    assert err.path == "phases.0.optimizer.lrr"
    assert "unknown key 'lrr'" in str(err) and "did you mean 'lr'" in str(err)
    assert "weight_decay" in str(err)      # lists the valid keys


def test_wrong_type_of_optimizer_option():
    err = config_error(tiny(), ["phases.0.optimizer.lr=fast"])
    assert err.path == "phases.0.optimizer.lr" and "'fast'" in str(err)


def test_unknown_model_option_suggests():
    raw = quickstart_raw()
    raw["model"]["chanels"] = [8]
    err = config_error(raw)
    assert err.path == "model.chanels"
    assert "did you mean 'channels'" in str(err) and "hidden" in str(err)


def test_unregistered_model_dataset_method_loss():
    err = config_error(tiny(model={"name": "resnet"}))
    assert err.path == "model.name" and "mlp" in str(err) and "cnn1d" in str(err)
    err = config_error(tiny(data={"name": "irs"}))
    assert err.path == "data.name" and "did you mean 'iris'" in str(err)
    err = config_error(tiny(methods=[{"name": "grad_clip", "max_norm": 1.0}, {"name": "emaa"}]))
    assert err.path == "methods.1.name" and "did you mean 'ema'" in str(err)
    raw = tiny()
    raw["phases"][0]["losses"] = [{"name": "cross_entropyy"}]
    err = config_error(raw)
    assert err.path == "phases.0.losses.0.name" and "did you mean 'cross_entropy'" in str(err)


def test_unknown_dataset_option():
    err = config_error(tiny(data={"name": "synthetic_tabular", "n_sample": 10}))
    assert err.path == "data.n_sample" and "did you mean 'n_samples'" in str(err)


def test_phase_with_both_epochs_and_steps():
    raw = quickstart_raw()
    raw["phases"][1]["steps"] = 10
    err = config_error(raw)
    assert err.path == "phases.1" and "exactly one of `epochs` or `steps`" in str(err)


def test_phase_with_neither_epochs_nor_steps():
    raw = quickstart_raw()
    del raw["phases"][1]["epochs"]
    err = config_error(raw)
    assert err.path == "phases.1" and "exactly one" in str(err)


def test_first_phase_without_optimizer():
    raw = quickstart_raw()
    del raw["phases"][0]["optimizer"]
    err = config_error(raw)
    assert err.path == "phases.0.optimizer"
    assert "first phase" in str(err) and "adamw" in str(err)


def test_later_phase_may_omit_optimizer():
    raw = quickstart_raw()
    del raw["phases"][1]["optimizer"]
    r = load_recipe(raw)
    assert r.phases[1].optimizer is None and r.active_optimizer_phase(1) == 0


def test_duplicate_phase_names():
    raw = quickstart_raw()
    raw["phases"][1]["name"] = "main"
    err = config_error(raw)
    assert err.path == "phases.1.name" and "twice" in str(err)


def test_empty_phase_list():
    err = config_error(tiny(phases=[]))
    assert err.path == "phases"


def test_duplicate_yaml_key_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: dup\nseed: 0\ndata: {name: iris}\nseed: 1\nmodel: {name: mlp}\n"
                    "phases:\n  - {epochs: 1, optimizer: {name: adam}}\n")
    with pytest.raises(DojoError, match="duplicate key 'seed'"):
        load_recipe(str(path))


def test_duplicate_yaml_key_inside_a_phase_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: dup\ndata: {name: iris}\nmodel: {name: mlp}\nphases:\n"
                    "  - epochs: 1\n    optimizer: {name: adam}\n    epochs: 2\n")
    with pytest.raises(DojoError, match="duplicate key 'epochs'"):
        load_recipe(str(path))


def test_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(DojoError, match="mapping"):
        load_recipe(str(path))


def test_unknown_recipe_name_suggests():
    with pytest.raises(DojoError) as info:
        load_recipe("quikstart")
    assert "did you mean 'quickstart'" in str(info.value)
    assert "quikstart" in str(info.value)


def test_yaml_is_parsed_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(DojoError, match="invalid YAML"):
        load_recipe(str(path))


# -- the CLI's error contract --------------------------------------------------------------------

def run_cli(*args):
    return CliRunner().invoke(main, list(args))


def assert_one_error_line(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)   # a clean exit, not an escaped exception
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_bad_recipe_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: {name: iris}\nmodel: {name: mlp}\n"
                    "phases:\n  - {epochs: 1, optimizer: {name: adamww}}\n")
    result = run_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_error_line(result, "phases.0.optimizer.name", "adamw")
    assert not (tmp_path / "run").exists()


def test_cli_bad_override(tmp_path):
    result = run_cli("train", "quickstart", "phases.0.epochs=abc", "--run-dir", str(tmp_path / "run"))
    assert_one_error_line(result, "phases.0.epochs")
    result = run_cli("train", "quickstart", "phases.warmup.epochs=1", "--run-dir", str(tmp_path / "run"))
    assert_one_error_line(result, "phases.warmup")


def test_cli_unknown_recipe_name(tmp_path):
    result = run_cli("train", "quikstart", "--run-dir", str(tmp_path / "run"))
    assert_one_error_line(result, "did you mean 'quickstart'")


def test_cli_yaml_syntax_error_is_one_line_with_its_location(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nseed: 0\nphases: [\n")
    result = run_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_error_line(result, "broken.yaml", "line")


def test_cli_duplicate_key_is_one_line_with_its_location(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: dup\nseed: 0\nseed: 1\n")
    result = run_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_error_line(result, "duplicate key 'seed'", "line 3")


def test_cli_override_with_invalid_yaml_is_one_line(tmp_path):
    result = run_cli("train", "quickstart", "model.channels=[8", "--run-dir", str(tmp_path / "run"))
    assert_one_error_line(result, "model.channels")


def test_cli_refuses_non_empty_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    result = run_cli("train", "quickstart", "--run-dir", str(run))
    assert_one_error_line(result, "not empty")
    assert (run / "keep.txt").read_text() == "precious"


# -- user components through the registry --------------------------------------------------------

@dataclasses.dataclass
class _TwoLayerConfig:
    width: int = 6


class _TwoLayer(nn.Module):
    """A user's own model."""
    Config = _TwoLayerConfig

    def __init__(self, input_shape, num_outputs, config: _TwoLayerConfig = _TwoLayerConfig()):
        super().__init__()
        self.body = nn.Linear(input_shape[0], config.width)
        self.head = nn.Linear(config.width, num_outputs)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


@pytest.fixture
def user_model():
    name = "test_user_two_layer"
    MODELS.register(name, _TwoLayer, config=_TwoLayerConfig, injected=("input_shape", "num_outputs"))
    try:
        yield name
    finally:
        MODELS.unregister(name)


def test_user_registered_model_is_usable_from_a_recipe(user_model):
    from torchdojo.trainer import Trainer

    assert user_model in MODELS.names()
    r = load_recipe(tiny(model={"name": user_model, "width": 5}))
    assert r.model == {"name": user_model, "width": 5}
    # The trainer builds it with the data's input shape (iris: 4 features, 3 classes).
    trainer = Trainer(r, None, quiet=True)
    model = trainer.state.model
    assert isinstance(model, _TwoLayer)
    assert (model.body.in_features, model.body.out_features, model.head.out_features) == (4, 5, 3)
    # Its options are validated like a built-in's.
    err = config_error(tiny(model={"name": user_model, "widht": 5}))
    assert err.path == "model.widht" and "did you mean 'width'" in str(err)
    err = config_error(tiny(model={"name": user_model, "width": "wide"}))
    assert err.path == "model.width"


def test_user_registered_factory_function(tmp_path):
    name = "test_user_factory"

    def factory(input_shape, num_outputs, depth: int = 1):
        return nn.Sequential(*[nn.Linear(input_shape[0], input_shape[0]) for _ in range(depth)],
                             nn.Linear(input_shape[0], num_outputs))

    MODELS.register(name, factory, injected=("input_shape", "num_outputs"))
    try:
        r = load_recipe(tiny(model={"name": name, "depth": 3}))
        assert r.model == {"name": name, "depth": 3}
        model = MODELS.build(r.model, "model", input_shape=(4,), num_outputs=3)
        assert len(model) == 4 and model(torch.zeros(2, 4)).shape == (2, 3)
        assert MODELS.get(name).option_names() == ["depth"]
    finally:
        MODELS.unregister(name)
    # Once removed, recipes can no longer name it.
    assert config_error(tiny(model={"name": name})).path == "model.name"


def test_registering_a_taken_name_fails(user_model):
    with pytest.raises(ValueError, match="already registered"):
        MODELS.register(user_model, _TwoLayer, config=_TwoLayerConfig)
    with pytest.raises(ValueError, match="already registered"):
        MODELS.register("mlp", _TwoLayer)


def test_error_text_format():
    err = ConfigError("phases.0.epochs", "bad")
    assert str(err) == "phases.0.epochs: bad" and err.path == "phases.0.epochs"
    assert str(ConfigError("", "bad")) == "bad"
