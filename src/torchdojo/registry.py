"""One explicit registry per kind of component; recipes may name only what is registered here.

Built-in components are registered in `_register_builtins()` below, in one readable list, rather than
by import side effects scattered over the package. Users add their own with `REGISTRY.register(...)`
from Python, or through a `torchdojo.plugins` entry point: a callable that receives this module.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable

import pydantic

from .errors import ConfigError, choices_text, did_you_mean

# The largest integer a component option may be (either sign): counts, widths and seeds beyond it cannot
# run, and torch, numpy and scikit-learn would turn them into overflows, huge allocations or hangs.
MAX_INT_OPTION = 2 ** 31 - 1


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable
    summary: str
    # A dataclass whose fields are the recipe keys (models); otherwise the factory's keyword parameters.
    config: type | None = None
    # Parameters the trainer supplies itself (model parameters, input shape, ...), never the recipe.
    injected: tuple[str, ...] = ()
    # Options that are themselves specs of this registry (Lookahead's `inner` optimizer).
    nested: tuple[str, ...] = ()

    def schema(self) -> type[pydantic.BaseModel]:
        """A pydantic model of the keys a recipe may set for this component (unknown keys forbidden)."""
        fields: dict[str, Any] = {}
        if self.config is not None:
            hints = typing.get_type_hints(self.config, include_extras=True)
            for f in dataclasses.fields(self.config):
                if f.default is not dataclasses.MISSING:
                    default = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    default = pydantic.Field(default_factory=f.default_factory)
                else:
                    default = ...
                fields[f.name] = (hints.get(f.name, Any), default)
        else:
            target = self.factory.__init__ if inspect.isclass(self.factory) else self.factory
            hints = typing.get_type_hints(target, include_extras=True)
            for p in inspect.signature(self.factory).parameters.values():
                if p.name in self.injected or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                default = ... if p.default is inspect.Parameter.empty else p.default
                fields[p.name] = (hints.get(p.name, Any), default)
        return pydantic.create_model(
            f"{self.name}_options",
            __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False),
            **fields,
        )

    def option_names(self) -> list[str]:
        return list(self.schema().model_fields)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, factory: Callable, summary: str = "", *, config: type | None = None,
                 injected: tuple[str, ...] = (), nested: tuple[str, ...] = ()) -> Callable:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = Entry(name, factory, summary or (inspect.getdoc(factory) or "").split("\n")[0],
                                    config, injected, nested)
        return factory

    def unregister(self, name: str) -> None:
        """Remove a component (tests and plugins that register something temporarily)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str, path: str = "name") -> Entry:
        if not isinstance(name, str):      # a list or mapping would not even be hashable
            raise ConfigError(path, f"expected the name of a {self.kind} (a string), got {name!r}; "
                                    f"choose one of: {choices_text(self._entries)}")
        if name not in self._entries:
            raise ConfigError(path, f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; "
                                    f"choose one of: {choices_text(self._entries)}")
        return self._entries[name]

    def validate(self, spec: dict, path: str, extra_keys: tuple[str, ...] = ()) -> dict:
        """Check a `{name: ..., **options}` spec; returns the options with defaults filled in.

        `extra_keys` are keys the caller handles itself (e.g. a loss term's `weight`)."""
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(path, f"expected a mapping with a 'name' key naming a {self.kind}; "
                                    f"choose one of: {choices_text(self._entries)}")
        entry = self.get(spec["name"], f"{path}.name" if path else "name")
        if "name" in entry.option_names():
            raise ValueError(f"{self.kind} '{entry.name}' has an option called 'name', which recipes use to "
                             "pick the component; rename the option")
        options = {k: v for k, v in spec.items() if k != "name" and k not in extra_keys}
        schema = entry.schema()
        try:
            validated = schema.model_validate(options)
        except pydantic.ValidationError as exc:
            valid = list(schema.model_fields) + list(extra_keys)
            raise _first_error(exc, path, valid, f"{self.kind} '{entry.name}'") from None
        options = validated.model_dump()
        for key, value in options.items():
            _check_ints(value, f"{path}.{key}" if path else key)
        for key in entry.nested:
            inner = options[key]
            options[key] = {"name": inner.get("name") if isinstance(inner, dict) else None,
                            **self.validate(inner, f"{path}.{key}" if path else key)}
        return options

    def build(self, spec: dict, path: str = "", extra_keys: tuple[str, ...] = (), **injected):
        options = self.validate(spec, path, extra_keys)
        entry = self._entries[spec["name"]]
        try:
            if entry.config is not None:
                return entry.factory(**injected, config=entry.config(**options))
            return entry.factory(**injected, **options)
        except ValueError as exc:   # a combination of values the component refuses, e.g. nesterov without momentum
            raise ConfigError(path, f"{self.kind} '{entry.name}': {exc}") from None


def _check_ints(value: Any, path: str) -> None:
    """Refuse any integer (in lists and mappings too) beyond MAX_INT_OPTION."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT_OPTION:
        raise ConfigError(path, f"must be between -{MAX_INT_OPTION} and {MAX_INT_OPTION} (got {shown(value)})")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        _check_ints(item, f"{path}.{key}")


def shown(value: Any, limit: int = 100) -> str:
    """repr(value) cut to `limit` characters, for messages that quote what the user wrote."""
    try:
        text = repr(value)
    except ValueError:      # an integer of more than 4,300 digits: Python refuses to print it
        text = f"a {type(value).__name__} with an integer too long to print"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _first_error(exc: pydantic.ValidationError, path: str, valid: list[str], what: str) -> ConfigError:
    """Turn pydantic's first error into one ConfigError with the full dotted key path."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    full = ".".join(p for p in (path, loc) if p)
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        return ConfigError(full, f"unknown key '{key}' for {what}{did_you_mean(key, valid)}; "
                                 f"valid keys: {choices_text(valid) or '(none)'}")
    if err["type"] == "missing":
        return ConfigError(full, f"required key is missing for {what}")
    return ConfigError(full, f"{err['msg']} (got {shown(err.get('input'))})")


OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")
LOSSES = Registry("loss")
MODELS = Registry("model")
DATASETS = Registry("dataset")
TASKS = Registry("task")
METHODS = Registry("method")
AUGMENTS = Registry("augmentation")
ALL = {r.kind: r for r in (OPTIMIZERS, SCHEDULES, LOSSES, MODELS, DATASETS, TASKS, METHODS, AUGMENTS)}
# What the trainer passes to an augmentation that asks for it (by naming it in its __init__).
AUGMENT_INJECTED = ("num_classes", "special_ids")


def _register_builtins() -> None:
    from . import augment, data, losses, methods, models, optim, schedules, tasks

    for name, fn in {**optim.TORCH_OPTIMIZERS, **optim.DOJO_OPTIMIZERS}.items():
        OPTIMIZERS.register(name, fn, injected=("params",))
    OPTIMIZERS.register("lookahead", _lookahead, injected=("params",), nested=("inner",))
    for name, fn in schedules.SCHEDULES.items():
        SCHEDULES.register(name, fn)
    for name, cls in losses.LOSSES.items():
        LOSSES.register(name, cls)
    for name, cls in {**models.MODELS, **models.COMPOSITE_MODELS}.items():
        MODELS.register(name, cls, config=cls.Config, injected=("input_shape", "num_outputs"))
    for name, fn in data.DATASETS.items():
        DATASETS.register(name, fn)     # generated sets take their generator's `seed` from the recipe
    for name, cls in tasks.TASKS.items():
        TASKS.register(name, cls)
    for name, cls in methods.METHODS.items():
        METHODS.register(name, cls)
    for name, cls in augment.AUGMENTS.items():
        wants = inspect.signature(cls).parameters
        AUGMENTS.register(name, cls, injected=tuple(k for k in AUGMENT_INJECTED if k in wants))


def _lookahead(params, inner: dict, k: int = 5, alpha: float = 0.5):
    """Lookahead over any registered optimizer (Zhang et al. 2019, arXiv 1907.08610)."""
    from .optim import Lookahead
    return Lookahead(OPTIMIZERS.build(inner, "inner", params=params), k=k, alpha=alpha)


_plugins_loaded = False


def load_plugins() -> None:
    """Call every `torchdojo.plugins` entry point once with this module, so it can register components."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    import sys
    for ep in entry_points(group="torchdojo.plugins"):
        ep.load()(sys.modules[__name__])


_register_builtins()
