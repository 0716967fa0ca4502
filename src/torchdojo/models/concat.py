"""Encoder concatenation: several encoders side by side, one head on their concatenated features.

    model: {name: concat,
            encoders: [{run: runs/cnn1d-a, freeze: true},          # a trained run's model minus its output layer
                       {name: gru, hidden: 32}],                    # a registered model, trained from scratch
            head: {hidden: [], dropout: 0.0}}

Each encoder is either a registered model spec (trained from scratch unless `freeze: true`) or a finished
run directory `{run: PATH, freeze: true}` whose final model is loaded (`freeze: false` fine-tunes it).
`forward(x) = head(cat([encoder.encode(x) for encoder in encoders], dim=1))`. Concatenating encoders that
differ (architecture, training recipe, seed) gives the head features with more diverse errors; see
docs/concat.md and `dojo pair-search`.

A frozen encoder's parameters get no gradient (its features are computed under `torch.no_grad()`, and
`requires_grad` is switched off again whenever the model enters train mode), and it stays in eval mode
while the concat model trains, so its BatchNorm statistics and dropout stay as they were trained.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..errors import ConfigError, DojoError, choices_text, did_you_mean
from ._types import Dropout, Width

RUN_KEYS = ("run", "freeze")


class HeadConfig(BaseModel):
    """`head:`: hidden layer widths (Linear -> ReLU each) before the output layer, and the dropout applied
    to the concatenated features and after every hidden layer."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    hidden: list[Width] = []
    dropout: Dropout = 0.0


@dataclass
class ConcatConfig:
    # Each: a registered model spec {name: ..., options, freeze: false} or a run {run: PATH, freeze: true}.
    encoders: list[dict[str, Any]] = field(default_factory=list)
    head: HeadConfig = field(default_factory=HeadConfig)


# Runs loaded recently, so a pair search does not rebuild each run's trainer (and regenerate its data) for
# every head it trains: key (resolved path, sizes and modification times of its files) -> (model, shape).
_CACHE: "OrderedDict[tuple, tuple[nn.Module, tuple[int, ...]]]" = OrderedDict()
CACHE_SIZE = 16


def _cache_key(run: Path) -> tuple:
    files = [run / "recipe.yaml", run / "data_info.json", run / "calibration.json",
             *sorted((run / "checkpoints" / "final").iterdir())]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else (f.name, None, None) for f in files]
    return (str(run.resolve()), tuple(stats))


def clear_encoder_cache() -> None:
    """Forget the runs `load_run_encoder` has loaded."""
    _CACHE.clear()


def load_run_encoder(run: str | Path) -> tuple[nn.Module, tuple[int, ...]]:
    """A finished run's final model, `Trainer.from_run_dir(run).trained_models(calibrated=False)[""]` (in
    eval mode), and the input shape it was trained on. Each call returns a model of its own; the last
    CACHE_SIZE runs are kept in memory (keyed by their files' sizes and modification times).

    The global random state (torch, numpy, python) is left as it was: rebuilding the run's trainer seeds
    it with the run's seed, which must not change the caller's initialisation or batch order."""
    from ..trainer import Trainer, _rng_state, _set_rng_state

    run = Path(run)
    if not (run / "checkpoints" / "final").is_dir():
        what = "is not a run directory (no recipe.yaml)" if not (run / "recipe.yaml").is_file() else \
            "has not finished (no checkpoints/final); finish it with `dojo resume`"
        raise DojoError(f"{run} {what}")
    key = _cache_key(run)
    if key not in _CACHE:
        state = _rng_state()
        try:
            # Real tensors even while the caller counts a model on the meta device (models/size.py): the
            # run's data and weights must load, and the cache must never hold a model without storage.
            with torch.device("cpu"):
                trainer = Trainer.from_run_dir(run, quiet=True)
                model = trainer.trained_models(calibrated=False)[""]
            shape = tuple(trainer.state.data.info.input_shape)
        finally:
            _set_rng_state(state)
        _CACHE[key] = (model, shape)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    model, shape = _CACHE[key]
    return copy.deepcopy(model).eval(), shape


class Concat(nn.Module):
    """Encoders side by side (registered models or trained runs, optionally frozen), one MLP head on top."""
    Config = ConcatConfig

    def __init__(self, input_shape, num_outputs: int, config: ConcatConfig = ConcatConfig(), path: str = "model"):
        super().__init__()
        if not config.encoders:
            raise ConfigError(f"{path}.encoders", "give at least one encoder: a model spec {name: cnn1d, ...} "
                                                  "or a run {run: PATH, freeze: true}")
        head = config.head if isinstance(config.head, HeadConfig) else HeadConfig.model_validate(config.head)
        input_shape = tuple(input_shape)
        encoders, frozen, sources = [], [], []
        for i, spec in enumerate(config.encoders):
            where = f"{path}.encoders.{i}"
            encoder, freeze, source = self._build_encoder(spec, where, input_shape, num_outputs)
            if not callable(getattr(encoder, "encode", None)) or not isinstance(getattr(encoder, "feature_dim", None), int):
                raise ConfigError(where, f"{type(encoder).__name__} has no encoder/head split (an `encode(x)` method "
                                         "and a `feature_dim`); registered models have one")
            encoders.append(encoder)
            frozen.append(freeze)
            sources.append(source)
        self.encoders = nn.ModuleList(encoders)
        self.frozen = tuple(frozen)
        self.sources = tuple(sources)          # "run PATH" or "model NAME", for messages and `describe()`
        self.feature_dim = sum(e.feature_dim for e in encoders)
        layers: list[nn.Module] = [nn.Dropout(head.dropout)] if head.dropout > 0 else []
        width = self.feature_dim
        for h in head.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(head.dropout)] if head.dropout > 0 else [])
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.head = nn.Sequential(*layers)
        self._freeze()

    @staticmethod
    def _build_encoder(spec: Any, where: str, input_shape: tuple, num_outputs: int) -> tuple[nn.Module, bool, str]:
        from ..registry import MODELS

        if not isinstance(spec, dict) or ("run" in spec) == ("name" in spec):
            raise ConfigError(where, f"an encoder is either a registered model {{name: ..., options}} or a run "
                                     f"directory {{run: PATH, freeze: true}}; got {spec!r}")
        if "name" in spec:
            freeze = spec.get("freeze", False)
            if not isinstance(freeze, bool):
                raise ConfigError(f"{where}.freeze", f"expected true or false, got {freeze!r}")
            return MODELS.build(spec, where, extra_keys=("freeze",), input_shape=input_shape,
                                num_outputs=num_outputs), freeze, f"model {spec['name']}"
        unknown = [k for k in spec if k not in RUN_KEYS]
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}", f"unknown key '{unknown[0]}' for a run encoder"
                                                       f"{did_you_mean(unknown[0], RUN_KEYS)}; valid keys: "
                                                       f"{choices_text(RUN_KEYS)}")
        run, freeze = spec["run"], spec.get("freeze", True)
        if not isinstance(run, str) or not run:
            raise ConfigError(f"{where}.run", f"expected the path of a run directory, got {run!r}")
        if not isinstance(freeze, bool):
            raise ConfigError(f"{where}.freeze", f"expected true or false, got {freeze!r}")
        try:
            encoder, shape = load_run_encoder(run)
        except ConfigError as exc:
            raise ConfigError(f"{where}.run", f"run {run}: {exc}") from None
        except DojoError as exc:
            raise ConfigError(f"{where}.run", str(exc)) from None
        if shape != input_shape:
            raise ConfigError(f"{where}.run", f"run {run} was trained on inputs of shape {shape}, but this "
                                              f"data's inputs have shape {input_shape}")
        return encoder, freeze, f"run {run}"

    def _freeze(self) -> None:
        for encoder, frozen in zip(self.encoders, self.frozen):
            if frozen:
                encoder.eval()
                encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> "Concat":
        """Train mode for the head and the trainable encoders; frozen encoders stay in eval mode (BatchNorm
        statistics and dropout fixed) and without gradients, whatever the trainer switched on before."""
        super().train(mode)
        self._freeze()
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated encoder features, (N, feature_dim): the head's input."""
        features = []
        for encoder, frozen in zip(self.encoders, self.frozen):
            if frozen:
                with torch.no_grad():
                    features.append(encoder.encode(x))
            else:
                features.append(encoder.encode(x))
        return torch.cat([f.flatten(1) for f in features], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))

    def block_names(self) -> list[str]:
        """Blocks from input to output, for layer-wise LR decay: the encoders (side by side, one block), the head."""
        return ["encoders", "head"]

    def describe(self) -> list[str]:
        """One line per encoder: where it comes from, its feature width and whether it is frozen."""
        return [f"encoders.{i}: {src}, {e.feature_dim} features{', frozen' if f else ''}"
                for i, (e, f, src) in enumerate(zip(self.encoders, self.frozen, self.sources))]

