"""Recipe values that cannot run are refused up front, in one line (issue 21): run names that are paths,
YAML aliases that expand past a bound, counts and seeds beyond what can run, models larger than the
machine's memory, and schedules that training would refuse. Plus a hypothesis test that throws random
overrides at `dojo param-groups`: exit 0, or one `error:` line and exit code 2, never a traceback."""
from __future__ import annotations

import resource
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from torchdojo.cli import main
from torchdojo.errors import ConfigError, DojoError
from torchdojo.models.size import check_model_size
from torchdojo.recipe import (MAX_BATCH, MAX_EPOCHS, MAX_SEED, MAX_STEPS, MAX_YAML_NODES, load_recipe, parse_yaml,
                              read_recipe_source)
from torchdojo.registry import MAX_INT_OPTION, MODELS
from torchdojo.schedules import Clock, Schedule, cosine, cosine_restarts, linear_warmup
from torchdojo.trainer import default_run_dir

from conftest import make_tiny_recipe

DOJO = [sys.executable, "-m", "torchdojo"]
HUGE_DIGITS = "9" * 5000          # past Python's 4,300-digit limit for int("...")


def recipe_file(tmp_path: Path, recipe: dict | None = None) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe or make_tiny_recipe(), sort_keys=False))
    return path


def one_line_error(result) -> str:
    """The single `error: ...` line of a CliRunner result that exited with code 2."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def param_groups(path: Path, *overrides: str):
    return CliRunner().invoke(main, ["param-groups", str(path), *overrides])


# -- 1. run names stay inside runs/ -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["/tmp/x", "../../../../tmp/x", "a/b", "a\\b", "..", "a..b", "", "  ", "a\x00b",
                                  "x" * 201])
def test_a_recipe_name_is_a_name_not_a_path(name):
    recipe = make_tiny_recipe()
    recipe["name"] = name
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert err.value.path == "name" and "--run-dir" in err.value.message, str(err.value)


def test_ordinary_names_still_make_a_run_directory_under_runs():
    for name in ("tiny", "my run.v2", "ablation-lr_3e-3", "\u00e9t\u00e9"):
        recipe = make_tiny_recipe()
        recipe["name"] = name
        run_dir = default_run_dir(load_recipe(recipe))
        assert run_dir.parent == Path("runs") and run_dir.name.startswith(name + "-")


def test_train_with_a_path_as_name_writes_nothing(tmp_path, monkeypatch):
    """`dojo train RECIPE name=/abs/path` used to train into /abs/path-<timestamp>, outside runs/."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    escaped = tmp_path / "escaped"
    result = CliRunner().invoke(main, ["train", str(recipe_file(tmp_path)), f"name={escaped}", "-q"])
    line = one_line_error(result)
    assert line.startswith("error: name: ") and "--run-dir" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "recipe.yaml"]
    assert not any(cwd.iterdir())


@pytest.mark.parametrize("name", ["a/b", "..", "", "a\x00"])
def test_phase_names_follow_the_same_rule(name):
    recipe = make_tiny_recipe()
    recipe["phases"][0]["name"] = name
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert err.value.path == "phases.0.name"


def test_a_phase_name_may_not_clash_with_an_unnamed_phase():
    """Phase 1 without a name is called 'phase1'; a phase 0 named 'phase1' made the two share one entry
    of the trainer's per-phase tables (frozen parameters)."""
    recipe = make_tiny_recipe()
    recipe["phases"][0]["name"] = "phase1"
    del recipe["phases"][1]["name"]
    with pytest.raises(ConfigError, match="used twice") as err:
        load_recipe(recipe)
    assert err.value.path == "phases.1.name"


# -- 2. YAML aliases that expand --------------------------------------------------------------------

def nested_anchors(levels: int, width: int = 10) -> str:
    """`l0: &l0 [x, x, ...]`, `l1: &l1 [*l0, *l0, ...]`, ...: width**levels values from a few lines."""
    lines = [f"  l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def laughing_recipe(levels: int = 9) -> str:
    """The tiny recipe with 10**levels values hidden under `data:` (levels=9: about 1.2 kB of YAML)."""
    recipe = make_tiny_recipe()
    data = recipe.pop("data")
    text = yaml.safe_dump(recipe, sort_keys=False) + yaml.safe_dump({"data": data}, sort_keys=False)
    return text + nested_anchors(levels)


def test_aliases_expanding_past_the_bound_are_refused_before_expansion():
    text = laughing_recipe()
    assert len(text.encode()) < 2000
    t0 = time.perf_counter()
    with pytest.raises(DojoError) as err:
        parse_yaml(text, "laughs.yaml")
    assert time.perf_counter() - t0 < 2
    message = str(err.value)
    assert message.startswith("laughs.yaml") and f"{MAX_YAML_NODES:,}" in message and "\n" not in message


def test_counting_the_expansion_is_linear_in_the_text():
    """60 levels of doubling is 2**60 values: counted per node, never per expanded value."""
    t0 = time.perf_counter()
    with pytest.raises(DojoError, match="expands"):
        parse_yaml("root:\n" + nested_anchors(60, width=2), "doubling.yaml")
    assert time.perf_counter() - t0 < 2


def test_an_anchor_used_inside_itself_is_refused():
    with pytest.raises(DojoError, match="expands"):
        parse_yaml("a: &a [1, *a]\n", "cycle.yaml")


def test_aliases_within_the_bound_still_work(tmp_path):
    recipe = make_tiny_recipe()
    recipe["phases"][1]["optimizer"] = recipe["phases"][0]["optimizer"]    # one object: dumped as &id001/*id001
    path = tmp_path / "aliases.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert "*id001" in path.read_text()
    assert load_recipe(str(path)).phases[1].optimizer["name"] == "adamw"
    assert parse_yaml("root:\n" + nested_anchors(4), "x")["root"]["l3"][9][9][9][9] == "x"    # 10**4 values: fine


def test_a_run_recipe_with_expanding_aliases_is_one_error(tmp_path):
    """`dojo compare` and `dojo resume` read a run's recipe.yaml through read_recipe_source."""
    path = tmp_path / "recipe.yaml"
    path.write_text(laughing_recipe())
    with pytest.raises(DojoError) as err:
        read_recipe_source(str(path))
    assert str(err.value).startswith(str(path))


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (6 * 2 ** 30, 6 * 2 ** 30))


def test_param_groups_on_expanding_aliases_is_one_line_and_fast(tmp_path):
    """Before: `dojo param-groups` grew past 1.2 GB in recipe.data.model_dump() and never returned (run in
    a subprocess with a timeout and a memory cap so that the old behaviour fails instead of hanging)."""
    path = tmp_path / "laughs.yaml"
    path.write_text(laughing_recipe())
    out = subprocess.run(DOJO + ["param-groups", str(path)], capture_output=True, text=True, timeout=90,
                         preexec_fn=_limit_memory)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and "expands" in lines[0], out.stderr


# -- 3. counts and seeds ---------------------------------------------------------------------------

@pytest.mark.parametrize("override, path, bound", [
    ("phases.0.steps=1000000000000", "phases.0.steps", MAX_STEPS),
    ("phases.1.epochs=1.0e+7", "phases.1.epochs", MAX_EPOCHS),
    ("phases.1.epochs=1.0e+30", "phases.1.epochs", MAX_EPOCHS),
    ("phases.0.batch_size=10000000", "phases.0.batch_size", MAX_BATCH),
    ("phases.0.batch_size={start: 32, end: 10000000, every_epochs: 1}", "phases.0.batch_size.end", MAX_BATCH),
    ("phases.0.batch_size={start: 32, end: 64, every_epochs: 1.0e+30}", "phases.0.batch_size.every_epochs",
     MAX_EPOCHS),
    ("phases.0.accumulate=10000000", "phases.0.accumulate", MAX_BATCH),
    ("eval.batch_size=100000000000000000000", "eval.batch_size", MAX_BATCH),
    ("eval.every_epochs=10000000", "eval.every_epochs", MAX_EPOCHS),
    ("eval.tta={views: 1000000000000}", "eval.tta.views", 1024),
    ("checkpoint.every_steps=10000000000", "checkpoint.every_steps", MAX_STEPS),
    ("checkpoint.every_epochs=10000000", "checkpoint.every_epochs", MAX_EPOCHS),
    ("checkpoint.keep_last=10000000000", "checkpoint.keep_last", 10 ** 9),
    ("log.every_steps=10000000000", "log.every_steps", MAX_STEPS),
    ("nonfinite.max_consecutive=10000000000", "nonfinite.max_consecutive", 10 ** 9),
    ("data.train_size=1000000000000000000000000000000", "data.train_size", 10 ** 9),
    ("phases.0.losses=[{name: cross_entropy, weight: {start_step: 10000000000}}]",
     "phases.0.losses.0.weight.start_step", MAX_STEPS),
    # Component options (any registry) are bounded too: schedules, methods, models, datasets.
    ("phases.0.schedule.0.steps=1000000000000000000000000000000", "phases.0.schedule.0.steps", MAX_INT_OPTION),
    ("methods=[{name: ema, every_steps: 1000000000000000000000000000000}]", "methods.0.every_steps", MAX_INT_OPTION),
    ("model.hidden=[1000000000000000000000000000000]", "model.hidden.0", MAX_INT_OPTION),
    ("data.n_samples=1000000000000000000000000000000", "data.n_samples", MAX_INT_OPTION),
])
def test_counts_beyond_what_can_run_are_refused_with_the_bound(override, path, bound):
    with pytest.raises(ConfigError) as err:
        load_recipe(make_tiny_recipe(), [override])
    assert err.value.path == path, str(err.value)
    assert str(bound) in err.value.message, str(err.value)


def test_counts_at_the_bounds_are_accepted():
    recipe = load_recipe(make_tiny_recipe(), [f"phases.0.steps={MAX_STEPS}", f"phases.1.epochs={MAX_EPOCHS}",
                                              f"eval.batch_size={MAX_BATCH}", f"seed={MAX_SEED}"])
    assert recipe.phases[0].steps == MAX_STEPS and recipe.seed == MAX_SEED


@pytest.mark.parametrize("override", ["seed=-1", "data.split_seed=-3", "seed=99999999999999999999",
                                      f"seed={HUGE_DIGITS}", f"data.split_seed=-{HUGE_DIGITS}",
                                      "eval.tta={seed: -1}", f"seed={MAX_SEED + 1}"])
def test_seeds_out_of_range_are_one_line(tmp_path, override):
    """Before: sklearn's InvalidParameterError, an overflow and Python's int-string limit, as tracebacks."""
    line = one_line_error(param_groups(recipe_file(tmp_path), override))
    assert str(MAX_SEED) in line or "digits" in line, line


def test_the_largest_seed_trains_its_data_split(tmp_path):
    """seed + 2 (the split's third draw) must still be a valid scikit-learn seed."""
    result = param_groups(recipe_file(tmp_path), f"seed={MAX_SEED}")
    assert result.exit_code == 0, (result.output, result.exception)


@pytest.mark.parametrize("key", [f"phases.{HUGE_DIGITS}.steps", "phases.\u00b2.steps", "phases.-99999999999999999999.steps"])
def test_override_indices_that_are_not_small_integers_are_errors(key):
    with pytest.raises(ConfigError):
        load_recipe(make_tiny_recipe(), [f"{key}=1"])


class WalkCounter:
    """steps_in_epoch for a Clock that fails once it has been asked about more epochs than a short phase has."""

    def __init__(self, steps: int = 8, limit: int = 10 ** 4):
        self.steps, self.limit, self.calls = steps, limit, 0

    def __call__(self, k: int) -> int:
        self.calls += 1
        assert self.calls <= self.limit, "the clock walked far past the phase"
        return self.steps


def test_a_segment_past_the_phase_end_does_not_walk_the_clock():
    """A 10**9-step warmup in an 18-step phase: the clock used to walk 10**9 / 8 epochs (GBs, minutes)."""
    schedule = Schedule([linear_warmup(steps=10 ** 9), cosine()], 18, Clock(WalkCounter()))
    assert schedule(0) == pytest.approx(1e-9)
    assert schedule.starts == [0, 10 ** 9]


def test_a_clock_refuses_to_walk_past_the_most_epochs_a_phase_spans():
    with pytest.raises(ValueError, match=str(MAX_EPOCHS)):
        Schedule([linear_warmup(epochs=2.0 * MAX_EPOCHS), cosine()], 18, Clock(8))


def test_schedule_lengths_in_epochs_beyond_the_bound_are_one_line(tmp_path):
    line = one_line_error(param_groups(recipe_file(tmp_path), "phases.0.schedule.0={name: warmup, epochs: 1.0e+30}"))
    assert line.startswith("error: phases.0.schedule") and str(MAX_EPOCHS) in line


def test_cosine_restarts_never_has_more_cycles_than_steps():
    seg = cosine_restarts(cycles=10 ** 7)
    ends = seg.cycle_ends(18, lambda t: 0.0)
    assert len(ends) <= 18 and ends[-1] == 18
    with pytest.raises(ValueError, match="too large"):
        cosine_restarts(cycles=2000, cycle_mult=2.0)


# -- 4. model sizes --------------------------------------------------------------------------------

def mlp_builder(hidden: list[int], input_size: int = 8):
    return lambda: MODELS.build({"name": "mlp", "hidden": hidden}, "model", input_shape=(input_size,), num_outputs=3)


def test_model_size_counts_the_model_without_building_it():
    build = mlp_builder([16])
    real = build()
    expected = sum(p.numel() for p in real.parameters()) + sum(b.numel() for b in real.buffers())
    assert check_model_size(build, "mlp") == expected
    t0 = time.perf_counter()
    assert check_model_size(mlp_builder([10 ** 6, 10 ** 6]), "mlp", budget=2 ** 50) > 10 ** 12   # 4 TB, on meta
    assert time.perf_counter() - t0 < 2


def test_the_meta_build_leaves_the_real_weights_unchanged():
    build = mlp_builder([16, 8])
    torch.manual_seed(0)
    before = build().state_dict()
    torch.manual_seed(0)
    check_model_size(build, "mlp")
    after = build().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_over_the_budget_names_its_size():
    with pytest.raises(ConfigError) as err:
        check_model_size(mlp_builder([1000]), "mlp", budget=1000)
    assert err.value.path == "model"
    assert "12,003 parameters" in err.value.message and "GiB" in err.value.message
    with pytest.raises(ConfigError, match="3 members of 12,003"):
        check_model_size(mlp_builder([1000]), "mlp", copies=3, budget=10 ** 5)


@pytest.mark.parametrize("exc", [TypeError("empty(): argument 'size' must be tuple of ints\nmore"),
                                 OverflowError("too big"), RuntimeError("bad shape")])
def test_a_constructor_error_becomes_a_config_error(exc):
    def build():
        raise exc
    with pytest.raises(ConfigError) as err:
        check_model_size(build, "mlp")
    assert err.value.path == "model" and "cannot build model 'mlp'" in err.value.message
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("exc", [NotImplementedError("no meta kernel for this op"),
                                 RuntimeError("Cannot copy out of meta tensor; no data!")])
def test_a_model_that_needs_real_tensors_is_left_to_the_real_build(exc):
    """A concat model with an encoder loaded from a finished run cannot be built on meta: no verdict."""
    def build():
        raise exc
    assert check_model_size(build, "concat") is None


def test_a_model_larger_than_memory_is_one_line_before_any_allocation(tmp_path):
    """Before: torch's allocator error (4 TB of weights) as a traceback."""
    line = one_line_error(param_groups(recipe_file(tmp_path), "model.hidden=[1000000, 1000000]"))
    assert line.startswith("error: model: ") and "parameters" in line and "GiB" in line


# -- 5. one schedule validation for param-groups and train ------------------------------------------

@pytest.mark.parametrize("override", ["phases.0.schedule.1={name: plateau, factor: -1}",
                                      "phases.0.schedule=[{name: cosine}, {name: constant}]"])
def test_param_groups_refuses_the_schedules_train_refuses(tmp_path, override):
    path = recipe_file(tmp_path)
    dry = one_line_error(param_groups(path, override))
    trained = one_line_error(CliRunner().invoke(main, ["train", str(path), override, "--run-dir",
                                                       str(tmp_path / "run"), "-q"]))
    assert dry == trained and dry.startswith("error: phases.0.schedule")


# -- 6. random overrides through `dojo param-groups` --------------------------------------------------

def _recipe_paths(node, prefix=""):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        path = f"{prefix}{k}"
        yield path
        yield from _recipe_paths(v, path + ".")


KEYS = st.one_of(st.sampled_from(sorted(set(_recipe_paths(make_tiny_recipe())))),
                 st.sampled_from(["seed", "name", "eval.tta", "eval.tta.views", "eval.batch_size", "log.every_steps",
                                  "checkpoint.keep_last", "data.split_seed", "data.train_size", "data.num_workers",
                                  "phases.0.accumulate", "phases.0.schedule.0.epochs", "phases.1.schedule",
                                  "phases.0.batch_size.end", "ensemble", "ensemble.members", "methods",
                                  "nonsense", "phases.9.steps", "phases.warm.name", "data.nope.deeper"]))
EXTREMES = st.sampled_from([
    "-1", "0", "1", "2", "3", "0.5", "0.01", "1e30", "1.0e+30", "-1.0e+30", str(10 ** 30), str(2 ** 63), HUGE_DIGITS,
    "-" + HUGE_DIGITS, ".nan", ".inf", "x", "''", "null", "true", "[]", "[1, 2]", f"[{10 ** 30}]", "[-1]",
    "{}", "{a: 1}", "{name: x}", "{start: 1, end: 1000000000000, every_epochs: 1}", "/tmp/x", "../../x",
    "a/b", "{name: plateau, factor: -1}", "[{name: cosine}, {name: constant}]", "{views: 1000000000000}",
    "{members: 1000000000000}", "[{name: ema, every_steps: 0}]"])
OVERRIDES = st.lists(st.builds(lambda k, v: f"{k}={v}", KEYS, EXTREMES), min_size=1, max_size=3)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    path = recipe_file(tmp_path_factory.mktemp("limits"))
    assert param_groups(path).exit_code == 0     # the first call imports data and table code: not timed
    return path


@settings(max_examples=150, deadline=timedelta(seconds=5), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(OVERRIDES)
@example(["name=/tmp/x"])
@example(["seed=-1"])
@example([f"seed={HUGE_DIGITS}"])
@example(["phases.0.schedule.0.steps=1e30"])
@example(["phases.0.schedule.0.steps=1.0e+30"])
@example(["model.hidden=[1000000000000000000000000000000]"])
@example(["phases.0.schedule.1.factor=-1"])
def test_random_overrides_through_param_groups(tiny_file, overrides):
    result = CliRunner().invoke(main, ["param-groups", str(tiny_file), *overrides])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        (overrides, "".join(traceback.format_exception(result.exception)))
    assert result.exit_code in (0, 2), (overrides, result.exit_code, result.output)
    if result.exit_code == 2:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (overrides, result.stderr)


def test_the_random_overrides_reach_both_outcomes(tiny_file):
    """The strategy is not degenerate: some mutants pass, many fail with different messages."""
    outcomes: list[str] = []

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(OVERRIDES)
    def collect(overrides):
        result = CliRunner().invoke(main, ["param-groups", str(tiny_file), *overrides])
        outcomes.append("ok" if result.exit_code == 0 else result.stderr.split(":")[1] if ":" in result.stderr else "?")

    collect()
    assert "ok" in outcomes and len(set(outcomes) - {"ok"}) >= 5, outcomes
