"""A small 1-D convolutional network for (C, L) sequences such as MNIST-1D."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ._split import FeaturesThenHead
from ._types import Dropout, Width


@dataclass
class CNN1dConfig:
    channels: list[Width] = field(default_factory=lambda: [32, 64])
    kernel_size: Width = 5
    hidden: Width = 128
    dropout: Dropout = 0.0
    batch_norm: bool = True


class CNN1d(FeaturesThenHead):
    """Blocks of conv1d -> BatchNorm -> ReLU -> max-pool by 2 (while the sequence is at least 4 long)."""
    Config = CNN1dConfig

    def __init__(self, input_shape, num_outputs: int, config: CNN1dConfig = CNN1dConfig()):
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(f"cnn1d expects sequences (C, L), got shape {tuple(input_shape)}")
        c, length = input_shape
        blocks: list[nn.Module] = []
        for out in config.channels:
            layers = [nn.Conv1d(c, out, config.kernel_size, padding="same", bias=not config.batch_norm)]
            layers += [nn.BatchNorm1d(out)] if config.batch_norm else []
            layers += [nn.ReLU()]
            if length >= 4:
                layers.append(nn.MaxPool1d(2))
                length //= 2
            blocks.append(nn.Sequential(*layers))
            c = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * length, config.hidden), nn.ReLU(),
                                  nn.Dropout(config.dropout), nn.Linear(config.hidden, num_outputs))
        self.feature_dim = config.hidden    # the width of `encode`'s output

    def block_names(self) -> list[str]:
        """Blocks from input to output, for layer-wise LR decay."""
        return [f"features.{i}" for i in range(len(self.features))] + ["head"]
