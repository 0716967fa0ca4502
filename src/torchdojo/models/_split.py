"""The encoder/head split shared by models built as `features` (any module) then `head` (an
nn.Sequential whose last layer maps features to outputs)."""
from __future__ import annotations

import torch
from torch import nn


class FeaturesThenHead(nn.Module):
    features: nn.Module
    head: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features before the output layer (after the hidden layer's ReLU and dropout), (N, feature_dim):
        `forward(x) == output_layer(encode(x))`."""
        h = self.features(x)
        for layer in self.head[:-1]:
            h = layer(h)
        return h

    @property
    def output_layer(self) -> nn.Linear:
        """The final layer, from features to outputs."""
        return self.head[-1]
