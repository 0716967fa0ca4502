"""A GRU (Cho et al. 2014, arXiv 1406.1078) over (C, L) sequences, classifying from the last state."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._types import Dropout, Width


@dataclass
class GRUConfig:
    hidden: Width = 64
    layers: Width = 1
    bidirectional: bool = False
    dropout: Dropout = 0.0


class GRU(nn.Module):
    Config = GRUConfig

    def __init__(self, input_shape, num_outputs: int, config: GRUConfig = GRUConfig()):
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(f"gru expects sequences (C, L), got shape {tuple(input_shape)}")
        self.rnn = nn.GRU(input_shape[0], config.hidden, num_layers=config.layers, batch_first=True,
                          bidirectional=config.bidirectional,
                          dropout=config.dropout if config.layers > 1 else 0.0)
        self.feature_dim = config.hidden * (2 if config.bidirectional else 1)   # the width of `encode`'s output
        self.head = nn.Linear(self.feature_dim, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's final hidden state (both directions' when bidirectional), (N, feature_dim):
        `forward(x) == output_layer(encode(x))`."""
        _, h = self.rnn(x.transpose(1, 2))            # (B, C, L) -> (B, L, C)
        return torch.cat([h[-2], h[-1]], dim=1) if self.rnn.bidirectional else h[-1]

    @property
    def output_layer(self) -> nn.Linear:
        """The final layer, from features to outputs."""
        return self.head

    def block_names(self) -> list[str]:
        """Blocks from input to output, for layer-wise LR decay."""
        return ["rnn", "head"]
