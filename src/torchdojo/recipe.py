"""Recipes: YAML files validated with pydantic before anything is built.

`load_recipe(source, overrides)` reads a file or built-in recipe name, applies dotted `key.path=value`
overrides, and validates the structure and every named component against its registry. Any problem
is one `ConfigError` naming the key path and the valid choices."""
from __future__ import annotations

import math
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from .data.bundle import SPLIT_KEYS
from .errors import ConfigError, DojoError, choices_text, did_you_mean
from .registry import (AUGMENTS, DATASETS, LOSSES, METHODS, MODELS, OPTIMIZERS, SCHEDULES, TASKS, load_plugins,
                       shown)
from .schedules import MAX_EPOCHS, Clock, Schedule

# Bounds on every count a recipe sets: beyond them nothing can run, and a huge value would make the trainer
# allocate and loop for minutes before failing somewhere deep inside.
MAX_STEPS = 10 ** 9          # steps of a phase, log/checkpoint intervals, loss-weight ramps
MAX_BATCH = 10 ** 6          # rows in a batch (training, scheduled and evaluation), micro-batches
MAX_COUNT = 10 ** 9          # other counts: checkpoints kept, skipped steps in a row, training rows
# Seeds: [0, 2**31 - 1]. The data split draws with seed, seed + 1 and seed + 2 through scikit-learn, whose
# random_state must be below 2**32; numpy and torch take any of these.
MAX_SEED = 2 ** 31 - 1
MAX_NAME_BYTES = 200         # the run directory is <name>-<timestamp>: file names end at 255 bytes
# Nodes of a YAML document counted with its aliases expanded: real recipes have under 1,000, while a few
# lines of nested anchors (`b: &b [*a, *a, ...]`) expand to billions and would exhaust memory.
MAX_YAML_NODES = 100_000

Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Epochs = Annotated[float, Field(gt=0, le=MAX_EPOCHS)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]


def _seed(value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"a seed is between 0 and {MAX_SEED} (2**31 - 1)")
    return value


Seed = Annotated[int, pydantic.AfterValidator(_seed)]


def _plain_name(value: str, hint: str = "") -> str:
    """A name is a word for people, metrics and directory names, never a path."""
    bad = next((s for s in ("/", "\\", "..", "\x00") if s in value), None)
    if bad is not None:
        raise ValueError(f"a name cannot contain {bad!r}: it is a name, not a path{hint}")
    if not value.strip():
        raise ValueError(f"a name cannot be empty{hint}")
    if len(value.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"a name is at most {MAX_NAME_BYTES} bytes long{hint}")
    return value


Name = Annotated[str, pydantic.AfterValidator(_plain_name)]
# The recipe's name also names its default run directory, runs/<name>-<timestamp>.
RunName = Annotated[str, pydantic.AfterValidator(
    lambda v: _plain_name(v, " (the run directory is runs/<name>-<timestamp>; choose another place with --run-dir)"))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ImbalanceSpec(_Strict):
    """`data.imbalance`: make the training split imbalanced (classification only). Each `minority` class
    keeps round(n_c / ratio) of its training rows (at least 1, drawn with the split seed); the other
    classes keep all of theirs. Val and test are left as they are. See docs/imbalance.md."""
    ratio: float = Field(ge=1)
    minority: Optional[list[int]] = Field(None, min_length=1)   # default: class ids >= K // 2


class DataSpec(BaseModel):
    """`data:`: the dataset's own options (by `name`) plus how to split it."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: Optional[Seed] = None         # default: the recipe's seed
    standardize: Optional[bool] = None        # default: yes for tables
    imbalance: Optional[ImbalanceSpec] = None
    sampler: Literal["uniform", "balanced"] = "uniform"   # balanced: class-balanced training batches
    # Worker processes that assemble training batches. The data is in memory, so this only pays off
    # for CPU-heavy batch transforms; results do not depend on it (see data/loader.py).
    num_workers: int = Field(0, ge=0, le=64)
    # Classification only: keep these classes (relabelled 0.. in this order), e.g. a pretraining set and a
    # target task with disjoint classes.
    classes: Optional[list[int]] = Field(None, min_length=2)
    # Keep only this many training rows (stratified, drawn with the split seed): a small labelled set.
    train_size: Optional[int] = Field(None, ge=1, le=MAX_COUNT)
    # Unlabelled rows for semi-supervised tasks: `true` takes the training rows beyond train_size (labels
    # dropped); a path takes the array `x` of that NPZ file.
    unlabeled: Union[bool, str] = False


class GroupRuleSpec(_Strict):
    match: str                                # glob over parameter names or module names
    lr_mult: float = Field(1.0, ge=0)
    weight_decay: Optional[float] = Field(None, ge=0)


class ParamGroupsSpec(_Strict):
    """How parameters split into optimizer groups (see torchdojo.optim.param_groups). A plain list is
    read as `rules`."""
    rules: list[GroupRuleSpec] = []
    no_decay: bool = True                     # biases and norm weights: no weight decay, no trust ratio
    layer_decay: Optional[float] = Field(None, gt=0, le=1)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _list_is_rules(cls, value):
        return {"rules": value} if isinstance(value, list) else value


class BatchSizeSchedule(_Strict):
    """A batch size that grows inside a phase: start * factor**(epochs // every_epochs), at most end
    (Smith et al. 2017, arXiv 1711.00489: grow the batch instead of decaying the LR)."""
    start: BatchSize
    end: BatchSize
    every_epochs: Epochs
    factor: float = Field(2.0, gt=1)

    def at(self, epoch: int) -> int:
        growths = math.floor(epoch / self.every_epochs + 1e-9)
        # Past log(end/start)/log(factor) growths the batch is at `end`; no need to raise to huge powers.
        if growths >= math.log(self.end / self.start) / math.log(self.factor):
            return self.end
        return min(self.end, round(self.start * self.factor ** growths))


class PhaseSpec(_Strict):
    """One training stage. `optimizer`, `batch_size` and `losses` carry over from the previous phase
    when left out (the optimizer then keeps its state); `schedule` and `freeze` do not."""
    name: Optional[Name] = None
    epochs: Optional[Epochs] = None
    steps: Optional[Steps] = None
    batch_size: Optional[Union[int, BatchSizeSchedule]] = None      # an int is checked in validate_recipe
    # Gradient accumulation: each batch is split into this many micro-batches whose gradients add up
    # to the whole batch's, so `batch_size` keeps its meaning and only peak memory drops.
    accumulate: Optional[BatchSize] = None
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"   # scale LRs with batch size / the optimizer's
    optimizer_state: Literal["fresh", "carry"] = "fresh"      # carry: keep the same optimizer's state
    optimizer: Optional[dict[str, Any]] = None
    schedule: list[dict[str, Any]] = []
    losses: Optional[list[dict[str, Any]]] = None
    freeze: list[str] = []                    # glob patterns of module names, e.g. "features.*"
    train_bn: bool = False                    # let BatchNorm inside frozen modules keep training
    param_groups: Optional[ParamGroupsSpec] = None   # only with an optimizer in the same phase
    # Training-batch augmentations, applied in order (carried to the next phase when left out; [] for none).
    augment: Optional[list[dict[str, Any]]] = None


class TTASpec(_Strict):
    """Test-time augmentation: every input seen as is and under `views` random augmentations, the
    outputs combined. `augment` defaults to the last phase's list without label-mixing transforms."""
    views: int = Field(8, ge=0, le=1024)      # each view is one more pass over the split
    combine: Literal["mean_prob", "mean_logprob", "mean"] = "mean_prob"
    augment: Optional[list[dict[str, Any]]] = None
    seed: Seed = 0


class EnsembleSpec(_Strict):
    """`ensemble`: train `members` models and predict with their combination (see docs/ensembles.md).
    `vary: [seed]` gives members of one architecture with different initialisations, trained together
    in one vectorised pass (with the optional diversity penalties `ncl` and `weight_distance`); a mapping
    `{key.path: [one value per member]}` in `vary` trains the members one after another instead."""
    members: int = Field(ge=2, le=64)
    vary: list[Union[Literal["seed"], dict[str, list[Any]]]] = ["seed"]
    ncl: float = Field(0.0, ge=0)               # negative correlation learning (Liu & Yao 1999)
    weight_distance: float = Field(0.0, ge=0)   # pushes members' weights apart
    combine: Literal["mean_prob", "mean_logprob", "weights"] = "mean_prob"


class EvalSpec(_Strict):
    every_epochs: int = Field(1, ge=1, le=MAX_EPOCHS)
    batch_size: BatchSize = 1024
    tta: Optional[TTASpec] = None


class CheckpointSpec(_Strict):
    every_epochs: Optional[int] = Field(1, ge=1, le=MAX_EPOCHS)
    every_steps: Optional[Steps] = None
    keep_last: int = Field(2, ge=1, le=MAX_COUNT)


class LogSpec(_Strict):
    every_steps: Steps = 10
    tensorboard: bool = True                  # also write every metrics line to the run's tb/ folder


class NonFiniteSpec(_Strict):
    """`nonfinite`: what a step with a NaN/inf loss or gradient does (see docs/reliability.md).
    `raise` stops with the step and the non-finite tensors; `skip` leaves the parameters and the
    optimizer untouched and raises after more than `max_consecutive` skips in a row; `rollback`
    restores the last good checkpoint, multiplies the LR by `lr_factor` and goes on, raising after
    more than `max_consecutive` rollbacks to the same checkpoint."""
    policy: str = "raise"
    max_consecutive: int = Field(5, ge=1, le=MAX_COUNT)
    lr_factor: float = Field(0.5, gt=0, le=1)     # rollback only

    @pydantic.field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in ("raise", "skip", "rollback"):
            raise ValueError(f"unknown policy '{v}'; choose from: raise, skip, rollback")
        return v


class InitSpec(_Strict):
    """`init`: start the model from pretrained weights (torchdojo.pretrained): a finished run's final
    model (`run`) or a safetensors file (`weights`). Tensors whose names match `include` and not
    `exclude` (globs) and whose shapes agree are copied; the output layer only with `output_layer: true`.
    Applied when training starts, not on resume (the checkpoint holds the weights by then)."""
    run: Optional[str] = None
    weights: Optional[str] = None
    include: list[str] = Field(["*"], min_length=1)
    exclude: list[str] = []
    output_layer: bool = False
    # Read the source's tensors under this prefix: "encoder." takes an autoencoder's encoder.
    prefix: str = ""

    @pydantic.model_validator(mode="after")
    def _one_source(self):
        if (self.run is None) == (self.weights is None):
            raise ValueError("give exactly one of `run` (a run directory) and `weights` (a .safetensors file)")
        return self


class Recipe(_Strict):
    name: RunName
    description: str = ""
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    # bf16: the training forward pass and loss under torch.autocast(bfloat16); weights, gradients and the
    # optimizer stay float32, and evaluation runs in float32.
    precision: Literal["fp32", "bf16"] = "fp32"
    # With several processes: BatchNorm normalizes with the statistics of the whole global batch
    # (torchdojo.sync_batchnorm); with one process it changes nothing.
    sync_batchnorm: bool = False
    data: DataSpec
    model: dict[str, Any]
    init: Optional[InitSpec] = None
    task: dict[str, Any] = {"name": "classify"}
    phases: list[PhaseSpec] = Field(min_length=1)
    methods: list[dict[str, Any]] = []
    param_groups: ParamGroupsSpec = ParamGroupsSpec()
    eval: EvalSpec = EvalSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    log: LogSpec = LogSpec()
    nonfinite: NonFiniteSpec = NonFiniteSpec()
    ensemble: Optional[EnsembleSpec] = None

    def phase_name(self, i: int) -> str:
        return self.phases[i].name or f"phase{i}"

    def active_optimizer_phase(self, i: int) -> int:
        """Index of the phase whose optimizer is in use during phase i (the last one that set it)."""
        return max(j for j in range(i + 1) if self.phases[j].optimizer is not None)

    def param_groups_for(self, i: int) -> ParamGroupsSpec:
        """The grouping used by the optimizer that phase i builds (its own, else the global one)."""
        return self.phases[i].param_groups or self.param_groups

    def batch_size(self, i: int, epoch: int = 0) -> int:
        """Phase i's batch size in its epoch `epoch`; a phase without one continues with the previous
        phase's last batch size."""
        spec = self.phases[i].batch_size
        if spec is None:
            return self.batch_size(i - 1, 10 ** 6)
        return spec if isinstance(spec, int) else spec.at(epoch)

    def accumulate(self, i: int) -> int:
        """Micro-batches per batch in phase i; carried over from the previous phase when left out."""
        for p in reversed(self.phases[:i + 1]):
            if p.accumulate is not None:
                return p.accumulate
        return 1

    def augment(self, i: int) -> list[dict]:
        """Phase i's training augmentations; carried over from the previous phase when left out."""
        for p in reversed(self.phases[:i + 1]):
            if p.augment is not None:
                return p.augment
        return []

    def losses(self, i: int) -> list[dict]:
        for p in reversed(self.phases[:i + 1]):
            if p.losses is not None:
                return p.losses
        return TASKS.get(self.task["name"]).factory.default_losses

    def schedule(self, i: int, steps: int, clock: Clock) -> Schedule:
        """Phase i's LR schedule over its `steps` steps; a bad segment or combination is a ConfigError."""
        path = f"phases.{i}"
        try:
            segments = [SCHEDULES.build(spec, f"{path}.schedule.{j}") for j, spec in enumerate(self.phases[i].schedule)]
            return Schedule(segments, steps, clock)
        except ValueError as exc:
            raise ConfigError(f"{path}.schedule", str(exc)) from None

    def check_schedules(self, plan: list[tuple[int, Clock]]) -> None:
        """Build every phase's schedule once for `plan` ((steps, clock) per phase), so that a dry run
        (param-groups, lr-find) refuses what training would refuse when it reaches the phase."""
        for i, (steps, clock) in enumerate(plan):
            self.schedule(i, steps, clock)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# -- reading -------------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that rejects duplicate keys instead of silently keeping the last one, documents whose
    aliases expand past MAX_YAML_NODES nodes, and integers too long for int()."""

    def construct_document(self, node):
        # Checked on the composed node graph, where an alias is the same node object as its anchor, so the
        # count is memoized per node and linear in the text, before anything is constructed or expanded.
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"the document expands to more than {MAX_YAML_NODES:,} values through its aliases "
                            "(*name); a recipe needs far fewer, so write the values out", node.start_mark)
        return super().construct_document(node)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:      # Python's int() stops at 4,300 digits
            raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(node.value):,} digits is too "
                                                    "large for any recipe key", node.start_mark) from None


def _expanded_size(node: yaml.Node, sizes: dict[int, int | None]) -> int:
    """Nodes under `node` with aliases expanded; an alias cycle (an anchor used inside itself) counts as
    unbounded. `sizes` memoizes per node id (None: being counted)."""
    key = id(node)
    if key in sizes:
        return MAX_YAML_NODES + 1 if sizes[key] is None else sizes[key]
    sizes[key] = None
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        size = 1
    sizes[key] = size
    return size


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:       # a list or mapping as a key (`{[1]: 2}`, `? [a]`)
            raise yaml.constructor.ConstructorError(None, None, f"unhashable key {type(key).__name__} "
                                                    "(a mapping key must be a plain value)",
                                                    key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DojoError(f"{where}{at}: invalid YAML: {problem}") from None
    except RecursionError:      # the composer recurses once per nesting level
        raise DojoError(f"{where}: invalid YAML: nested too deeply") from None


def builtin_recipes() -> dict[str, Path]:
    folder = resources.files("torchdojo") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def read_recipe_source(source: str) -> tuple[dict, str]:
    """A YAML file path or a built-in recipe name -> (raw mapping, where it came from)."""
    path = Path(source)
    if path.is_file():
        where = str(path)
    else:
        builtins = builtin_recipes()
        if source not in builtins:
            raise DojoError(f"no recipe file or built-in recipe '{source}'{did_you_mean(source, builtins)}; "
                            f"built-in recipes: {choices_text(builtins)}")
        path, where = builtins[source], f"built-in recipe '{source}'"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DojoError(f"{where}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                        f"save the recipe as UTF-8") from None
    raw = parse_yaml(text, where)
    if not isinstance(raw, dict):
        raise DojoError(f"{where}: a recipe must be a YAML mapping")
    return raw, where


def apply_override(raw: dict, assignment: str) -> None:
    """Apply `a.b.0.c=value` (value parsed as YAML) to the raw recipe; list items by index or name."""
    if "=" not in assignment:
        raise ConfigError(assignment, "an override must look like key.path=value")
    key, _, text = assignment.partition("=")
    value = parse_yaml(text, f"override {key}") if text.strip() else None
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[:i + 1])
        if isinstance(node, list):
            index = _list_index(node, part, where)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(where, f"cannot set a key inside a {type(node).__name__} value")


def _list_index(items: list, part: str, where: str) -> int:
    if re.fullmatch(r"-?[0-9]+", part):
        # A long digit string is out of range anyway (and int() refuses more than 4,300 digits).
        index = int(part) if len(part) <= 18 else len(items)
        if not -len(items) <= index < len(items):
            shown_part = part if len(part) <= 20 else part[:20] + "..."
            raise ConfigError(where, f"index {shown_part} is out of range (the list has {len(items)} items)")
        return index
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if part in names:
        return names.index(part)
    raise ConfigError(where, f"no list item named '{part}'{did_you_mean(part, [n for n in names if n])}; "
                             "use an index or one of: " + choices_text([n for n in names if n]))


# -- validation ----------------------------------------------------------------------------------

def _model_at(model: type, loc: tuple) -> type | None:
    """The pydantic model class reached by following `loc` from `model` (for listing valid keys)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = current.model_fields[part].annotation
        while typing.get_origin(current) in (typing.Union, types.UnionType, list):
            args = [a for a in typing.get_args(current) if a is not type(None)]
            current = args[0] if args else None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _union_error(errors: list[dict]) -> tuple[dict, tuple]:
    """(error, key path) to report. A value that fits no member of a union (`batch_size: int |
    BatchSizeSchedule`) gets one error per member, each under the member's name (`batch_size.int`,
    `batch_size.BatchSizeSchedule.end`): report the deepest, the member the value was written for, without
    the member's name in the path."""
    err, loc = errors[0], tuple(errors[0]["loc"])
    if not loc or not isinstance(loc[-1], str) or _model_at(Recipe, loc[:-1]) is not None:
        return err, loc         # a key of a model: no union here
    n = len(loc) - 1
    members = [e for e in errors if tuple(e["loc"])[:n] == loc[:n] and len(e["loc"]) > n]
    best = max(members, key=lambda e: len(e["loc"]))      # the first of the deepest
    best_loc = tuple(best["loc"])
    return best, best_loc[:n] + best_loc[n + 1:]


def _structure_error(exc: pydantic.ValidationError) -> ConfigError:
    err, loc = _union_error(exc.errors())
    path = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        parent = _model_at(Recipe, loc[:-1])
        valid = list(parent.model_fields) if parent else []
        key = str(loc[-1])
        hint = did_you_mean(key, valid)
        if len(loc) == 1 and not hint:
            # A phase key written at the top level (e.g. `optimizer:`) belongs inside a phase.
            phase_hint = did_you_mean(key, PhaseSpec.model_fields)
            if phase_hint:
                hint = phase_hint[:-2] + ", which is set per phase under phases.N?)"
        return ConfigError(path, f"unknown key '{key}'{hint}; valid keys: {choices_text(valid)}")
    if err["type"] == "missing":
        return ConfigError(path, "required key is missing")
    return ConfigError(path, f"{err['msg'].removeprefix('Value error, ')} (got {shown(err.get('input'))})")


def validate_recipe(raw: dict) -> Recipe:
    """Structure first (pydantic), then each named component against its registry."""
    load_plugins()
    try:
        recipe = Recipe.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise _structure_error(exc) from None

    def component(registry, spec, path, extra=()):
        options = registry.validate(spec, path, extra)
        return {"name": spec["name"], **options, **{k: spec[k] for k in extra if k in spec}}

    data = component(DATASETS, recipe.data.model_dump(), "data", SPLIT_KEYS)
    recipe.data = DataSpec.model_validate(data)
    if "path" in data and not Path(str(data["path"])).expanduser().is_file():
        raise ConfigError("data.path", f"file not found: {data['path']}")
    recipe.model = component(MODELS, recipe.model, "model")
    recipe.task = component(TASKS, recipe.task, "task")
    task_type = getattr(TASKS.get(recipe.task["name"]).factory, "task_type", None)
    if task_type not in (None, "classification"):
        for key, used in (("imbalance", recipe.data.imbalance is not None), ("sampler", recipe.data.sampler != "uniform")):
            if used:
                raise ConfigError(f"data.{key}", f"needs classification data, but task '{recipe.task['name']}' "
                                                 f"is for {task_type}")
    recipe.methods = [component(METHODS, m, f"methods.{i}") for i, m in enumerate(recipe.methods)]
    if recipe.phases[0].optimizer is None:
        raise ConfigError("phases.0.optimizer", "the first phase must set an optimizer; choose one of: "
                          + choices_text(OPTIMIZERS.names()))
    if recipe.phases[0].batch_size is None:
        recipe.phases[0].batch_size = 64
    names = set()
    for i, phase in enumerate(recipe.phases):
        path = f"phases.{i}"
        if (phase.epochs is None) == (phase.steps is None):
            raise ConfigError(path, "a phase needs exactly one of `epochs` or `steps`")
        name = recipe.phase_name(i)     # an unnamed phase is called phase<i>: it may not clash either
        if name in names:
            unnamed = f" (phase {i} has no name, so it is called '{name}')" if phase.name is None else ""
            raise ConfigError(f"{path}.name", f"phase name '{name}' is used twice{unnamed}")
        names.add(name)
        if isinstance(phase.batch_size, int) and phase.batch_size < 1:
            raise ConfigError(f"{path}.batch_size", f"must be greater than 0 (got {phase.batch_size})")
        if isinstance(phase.batch_size, int) and phase.batch_size > MAX_BATCH:
            raise ConfigError(f"{path}.batch_size", f"must be at most {MAX_BATCH} (got {shown(phase.batch_size)})")
        if isinstance(phase.batch_size, BatchSizeSchedule) and phase.batch_size.end < phase.batch_size.start:
            raise ConfigError(f"{path}.batch_size.end", "must be at least `start`")
        if phase.optimizer_state == "carry":
            previous = recipe.phases[recipe.active_optimizer_phase(i - 1)].optimizer if i > 0 else None
            if phase.optimizer is None or previous is None or previous["name"] != phase.optimizer["name"]:
                raise ConfigError(f"{path}.optimizer_state", "`carry` keeps the previous optimizer's state, so "
                                  "this phase must name the same optimizer as the one before it")
        if phase.optimizer is not None:
            phase.optimizer = component(OPTIMIZERS, phase.optimizer, f"{path}.optimizer")
        elif phase.param_groups is not None:
            raise ConfigError(f"{path}.param_groups", "param_groups in a phase needs an optimizer in that phase "
                              "(groups are fixed for an optimizer's lifetime); set it at the top level instead")
        phase.schedule = [component(SCHEDULES, s, f"{path}.schedule.{j}") for j, s in enumerate(phase.schedule)]
        if phase.losses is not None:
            if not phase.losses:
                raise ConfigError(f"{path}.losses", "give at least one loss term")
            phase.losses = [_loss_term(t, f"{path}.losses.{j}") for j, t in enumerate(phase.losses)]
        if phase.augment is not None:
            phase.augment = [component(AUGMENTS, a, f"{path}.augment.{j}") for j, a in enumerate(phase.augment)]
    if recipe.ensemble is not None:
        _check_ensemble(recipe.ensemble)
    if recipe.eval.tta is not None and recipe.eval.tta.augment is not None:
        recipe.eval.tta.augment = [component(AUGMENTS, a, f"eval.tta.augment.{j}")
                                   for j, a in enumerate(recipe.eval.tta.augment)]
    return recipe


def _check_ensemble(spec: EnsembleSpec) -> None:
    sequential = [v for v in spec.vary if isinstance(v, dict)]
    for j, varied in enumerate(sequential):
        for key, values in varied.items():
            if len(values) != spec.members:
                raise ConfigError(f"ensemble.vary.{key}", f"give one value per member: {spec.members} "
                                                           f"members, {len(values)} values")
    if sequential and (spec.ncl or spec.weight_distance):
        raise ConfigError("ensemble", "ncl and weight_distance need members trained together, so `vary` may "
                                      "only be [seed] with them")


class LossWeightSchedule(_Strict):
    """A loss term switched on later: 0 before `start_step`/`start_epoch` (counted over the whole run),
    then ramped up to `value` over `ramp_steps`/`ramp_epochs`, linearly or along the sigmoid-shaped
    curve exp(-5 (1 - x)^2) of Laine & Aila 2016 (arXiv 1610.02242)."""
    value: float = 1.0
    start_step: Optional[int] = Field(None, ge=0, le=MAX_STEPS)
    start_epoch: Optional[float] = Field(None, ge=0, le=MAX_EPOCHS)
    ramp_steps: Optional[int] = Field(None, ge=0, le=MAX_STEPS)
    ramp_epochs: Optional[float] = Field(None, ge=0, le=MAX_EPOCHS)
    shape: Literal["linear", "sigmoid"] = "linear"

    @pydantic.model_validator(mode="after")
    def _same_units(self):
        if (self.start_step is None) == (self.start_epoch is None):
            raise ValueError("give exactly one of start_step or start_epoch")
        if (self.start_step is not None and self.ramp_epochs is not None) or \
                (self.start_epoch is not None and self.ramp_steps is not None):
            raise ValueError("give the start and the ramp in the same unit (steps or epochs)")
        return self

    def at(self, step: int, epoch: float) -> float:
        """The weight for the step that follows `step` steps and `epoch` epochs of training."""
        if self.start_step is not None:
            progress, ramp = step - self.start_step, self.ramp_steps or 0
        else:
            progress, ramp = epoch - self.start_epoch, self.ramp_epochs or 0
        if progress < 0:
            return 0.0
        if ramp == 0 or progress >= ramp:
            return self.value
        x = progress / ramp
        return self.value * (x if self.shape == "linear" else math.exp(-5.0 * (1.0 - x) ** 2))


# Loss options that may be the word "balanced": weights n / (K n_c) from the training labels, filled in
# by the trainer when it builds the loss (Trainer.build_losses).
BALANCED_OPTIONS = {"cross_entropy": "class_weights", "focal": "alpha"}


def _loss_term(spec: dict, path: str) -> dict:
    key = BALANCED_OPTIONS.get(spec.get("name")) if isinstance(spec, dict) else None
    balanced = key is not None and isinstance(spec.get(key), str)
    if balanced:
        if spec[key] != "balanced":
            raise ConfigError(f"{path}.{key}", f"give a list with one weight per class or the word 'balanced' "
                                               f"(got {spec[key]!r})")
        spec = {k: v for k, v in spec.items() if k != key}
    options = LOSSES.validate(spec, path, extra_keys=("weight",))
    if balanced:
        options[key] = "balanced"
    weight = spec.get("weight", 1.0)
    if isinstance(weight, dict):
        try:
            weight = LossWeightSchedule.model_validate(weight).model_dump()
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in (f"{path}.weight", *err["loc"]) if p != "")
            raise ConfigError(where, err["msg"].removeprefix("Value error, ")) from None
    elif isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ConfigError(f"{path}.weight", f"a loss weight must be a number or a schedule "
                                            f"{{value, start_step|start_epoch, ramp_steps|ramp_epochs, shape}} (got {weight!r})")
    else:
        weight = float(weight)
    return {"name": spec["name"], **options, "weight": weight}


def load_recipe(source: str | dict, overrides: list[str] = ()) -> Recipe:
    """Read (file, built-in name or mapping), apply overrides, validate."""
    if isinstance(source, dict):
        import copy
        raw = copy.deepcopy(source)
    else:
        raw, _ = read_recipe_source(source)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_recipe(raw)
