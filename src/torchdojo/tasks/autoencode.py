"""Unsupervised objectives for pretraining: reconstruct the input (labels are ignored), with the
`autoencoder` model (torchdojo.models.autoencoder).

- `autoencode`: a (denoising) autoencoder. The input is corrupted by `noise`, a list of augmentations
  as in a phase's `augment` (e.g. `[{name: noise, std: 0.5}]`, `swap_noise` for tables, `token_mask`
  for text), and the phase's loss terms (default `mse`) compare the reconstruction with the clean
  input (Vincent et al. 2008, ICML). Without noise it is a plain autoencoder.
- `vae`: a variational autoencoder (Kingma & Welling 2013, arXiv 1312.6114; Doersch 2016, arXiv
  1606.05908). The loss is the negative ELBO per sample with a unit-variance Gaussian decoder, up to a
  constant: ½‖x − x̂‖² summed over the input's values, plus `beta` times
  KL(q(z|x) ‖ N(0, I)) = −½ Σ (1 + log σ² − μ² − σ²) (beta-VAE: Higgins et al. 2017, ICLR).

Metrics on val/test (no noise, deterministic): `mse` per input value of the reconstruction of the clean
input; with `noise`, also `denoise_mse`, the same for the corrupted input (a fixed generator, so
every evaluation corrupts alike); for `vae`, `recon` and `kl` per sample and `loss` = `recon` +
beta·`kl` at the mean code (ε = 0)."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import random_view, weighted_loss

_EVAL_NOISE_SEED = 1234


def _reconstructions(model, loader, corrupt=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean inputs, reconstructions) over a loader, in float32."""
    xs, outs = [], []
    generator = None
    with torch.no_grad():
        for batch in loader:
            x = batch["x"]
            if corrupt is not None:
                if generator is None:
                    generator = torch.Generator(device=x.device).manual_seed(_EVAL_NOISE_SEED)
                batch = corrupt(batch, generator)
            xs.append(x.float())
            outs.append(model(batch["x"]).float())
    return torch.cat(xs), torch.cat(outs)


class Autoencode:
    """A (denoising) autoencoder's objective: reconstruct the clean input from a corrupted one."""
    task_type = "any"
    default_losses = [{"name": "mse"}]

    def __init__(self, noise: list[dict] | None = None):
        self.noise = list(noise or [])
        self.corrupt = None      # the Compose of `noise`, built in `bind`

    def bind(self, trainer) -> None:
        """Build `noise`, checked against the data's kind like a phase's `augment`."""
        self.corrupt = trainer.build_augment(self.noise, "task.noise")

    def training_loss(self, model, batch, terms):
        return weighted_loss(model(random_view(self.corrupt, batch)["x"]), batch["x"], terms)

    def evaluate(self, model, loader, info) -> dict[str, float]:
        x, out = _reconstructions(model, loader)
        metrics = {"mse": torch.mean((out - x) ** 2).item()}
        metrics["loss"] = metrics["mse"]
        if self.corrupt is not None:
            x, out = _reconstructions(model, loader, self.corrupt)
            metrics["denoise_mse"] = torch.mean((out - x) ** 2).item()
        return metrics

    @torch.no_grad()
    def predict(self, model, x: torch.Tensor, info) -> dict[str, list]:
        """The code of each input (`z_0`, ...): what a downstream model uses."""
        z = model.encode(x).float()
        return {f"z_{i}": z[:, i].tolist() for i in range(z.shape[1])}


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over the latent dimensions, per sample: −½ Σ (1 + log σ² − μ² − σ²)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def half_squared_error(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """½‖x − x̂‖² per sample: the negative log-likelihood of a unit-variance Gaussian, up to a constant."""
    return 0.5 * (out - x).pow(2).reshape(len(x), -1).sum(1)


class VAE:
    """A variational autoencoder's objective, the negative ELBO: reconstruction + beta·KL (per sample)."""
    task_type = "any"
    default_losses = [{"name": "mse"}]       # not used: the ELBO is the loss (terms are logged as recon, kl)

    def __init__(self, beta: float = 1.0):
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = beta

    def training_loss(self, model, batch, terms):
        if not getattr(model, "variational", False):
            raise ConfigError("model.variational", "the vae task needs `model: {name: autoencoder, variational: true}`")
        out, mu, logvar = model.sample_forward(batch["x"])
        recon = half_squared_error(out, batch["x"]).mean()
        kl = kl_to_standard_normal(mu, logvar).mean()
        return recon + self.beta * kl, {"recon": recon.detach(), "kl": kl.detach()}

    def evaluate(self, model, loader, info) -> dict[str, float]:
        recon, kl, count, sq, values = 0.0, 0.0, 0, 0.0, 0
        with torch.no_grad():
            for batch in loader:
                x = batch["x"].float()
                mu, logvar = model.gaussian(batch["x"])
                out = model.decode(mu).float()
                recon += half_squared_error(out, x).sum().item()
                kl += kl_to_standard_normal(mu.float(), logvar.float()).sum().item()
                sq += (out - x).pow(2).sum().item()
                count, values = count + len(x), values + x.numel()
        metrics = {"recon": recon / count, "kl": kl / count}
        metrics["loss"] = metrics["recon"] + self.beta * metrics["kl"]
        metrics["mse"] = sq / values
        return metrics

    predict = Autoencode.predict
