"""Multi-layer perceptron for tables (or anything, flattened)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from ._types import Dropout, Width

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass
class MLPConfig:
    hidden: list[Width] = field(default_factory=lambda: [128, 128])
    dropout: Dropout = 0.0
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    batch_norm: bool = False


class MLP(nn.Module):
    Config = MLPConfig

    def __init__(self, input_shape, num_outputs: int, config: MLPConfig = MLPConfig()):
        super().__init__()
        blocks: list[nn.Module] = []
        width = math.prod(input_shape)
        for h in config.hidden:
            layers = [nn.Linear(width, h)]
            if config.batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(ACTIVATIONS[config.activation]())
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            blocks.append(nn.Sequential(*layers))
            width = h
        self.body = nn.Sequential(nn.Flatten(), *blocks)
        self.head = nn.Linear(width, num_outputs)
        self.feature_dim = width      # the width of `encode`'s output: the last hidden layer's (or the input's)

    def forward(self, x):
        return self.head(self.body(x))

    def encode(self, x):
        """Features before the output layer, (N, feature_dim): `forward(x) == output_layer(encode(x))`."""
        return self.body(x)

    @property
    def output_layer(self) -> nn.Linear:
        """The final layer, from features to outputs."""
        return self.head

    def block_names(self) -> list[str]:
        """Blocks from input to output, for layer-wise LR decay."""
        return [f"body.{i}" for i in range(1, len(self.body))] + ["head"]
