"""A small 2-D convolutional network for (C, H, W) images such as the 8x8 digits."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ._split import FeaturesThenHead
from ._types import Dropout, Width


@dataclass
class CNNConfig:
    channels: list[Width] = field(default_factory=lambda: [32, 64])
    hidden: Width = 128
    dropout: Dropout = 0.0
    batch_norm: bool = True


class CNN(FeaturesThenHead):
    """Blocks of conv3x3 -> BatchNorm -> ReLU -> 2x2 max-pool (while the image is at least 4 wide)."""
    Config = CNNConfig

    def __init__(self, input_shape, num_outputs: int, config: CNNConfig = CNNConfig()):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn expects image inputs (C, H, W), got shape {tuple(input_shape)}; "
                             "use mlp for tables or cnn1d/gru for sequences")
        c, h, w = input_shape
        blocks: list[nn.Module] = []
        for out in config.channels:
            layers = [nn.Conv2d(c, out, 3, padding=1, bias=not config.batch_norm)]
            layers += [nn.BatchNorm2d(out)] if config.batch_norm else []
            layers += [nn.ReLU()]
            if min(h, w) >= 4:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            blocks.append(nn.Sequential(*layers))
            c = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, config.hidden), nn.ReLU(),
                                  nn.Dropout(config.dropout), nn.Linear(config.hidden, num_outputs))
        self.feature_dim = config.hidden    # the width of `encode`'s output

    def block_names(self) -> list[str]:
        """Blocks from input to output, for layer-wise LR decay."""
        return [f"features.{i}" for i in range(len(self.features))] + ["head"]
