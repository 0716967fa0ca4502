"""Autoencoders for unsupervised pretraining: an hourglass of any registered encoder, a narrow code and an
MLP decoder back to the input's shape.

- Plain or denoising (Vincent et al. 2008, "Extracting and composing robust features with denoising
  autoencoders", ICML; the `autoencode` task adds the noise): `code = encoder(x)`, `x̂ = decoder(code)`.
- Variational (Kingma & Welling 2013, arXiv 1312.6114; the tutorial the lecture cites: Doersch 2016,
  arXiv 1606.05908; the `vae` task): the encoder gives the mean and log-variance of a Gaussian q(z|x),
  a sample z = μ + σ·ε (the reparameterisation trick) is decoded.

The encoder is built as the registered model named in `encoder` with `latent` (or 2·latent) outputs, so
its own output layer is the bottleneck and its tensors keep the model's names under `encoder.`: a
classifier of the same kind starts from them with `init: {run: DIR, prefix: "encoder."}` ("take out
the middle layers", as the lecture puts it), the bottleneck layer being its output layer, left new."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._types import Width


@dataclass
class AutoEncoderConfig:
    encoder: dict[str, Any] = field(default_factory=lambda: {"name": "mlp", "hidden": [128]})
    latent: Width = 16
    decoder: list[Width] = field(default_factory=lambda: [128])
    variational: bool = False


class AutoEncoder(nn.Module):
    Config = AutoEncoderConfig

    def __init__(self, input_shape, num_outputs: int, config: AutoEncoderConfig = AutoEncoderConfig()):
        super().__init__()        # num_outputs (the data's classes) is not used: the output is the input
        from ..registry import MODELS

        self.input_shape = tuple(input_shape)
        self.latent, self.variational = config.latent, config.variational
        self.encoder = MODELS.build(config.encoder, "model.encoder", input_shape=self.input_shape,
                                    num_outputs=config.latent * (2 if config.variational else 1))
        layers: list[nn.Module] = []
        width = config.latent
        for h in config.decoder:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, math.prod(self.input_shape)))
        self.decoder = nn.Sequential(*layers)
        self.feature_dim = config.latent

    def gaussian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z|x), each (N, latent); variational models only."""
        out = self.encoder(x)
        return out[:, :self.latent], out[:, self.latent:]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code, (N, latent): the bottleneck's output (μ for a variational model)."""
        return self.gaussian(x)[0] if self.variational else self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).reshape(len(z), *self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of x (for a variational model: of its mean code, deterministic)."""
        return self.decode(self.encode(x))

    def sample_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction from z = μ + σ·ε, μ, log σ²) with ε ~ N(0, I) from torch's global generator
        (checkpointed, so a resumed run draws the same ε)."""
        mu, logvar = self.gaussian(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decode(z), mu, logvar

    @property
    def output_layer(self) -> nn.Linear:
        """The decoder's last layer."""
        return self.decoder[-1]
