"""Autoencoders for pretraining: the `autoencoder` model, the `autoencode` (denoising) and `vae` tasks
against reference formulas, a measured denoising effect, and a classifier starting from the encoder."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from torchdojo import ConfigError, Trainer, load_recipe
from torchdojo.registry import MODELS
from torchdojo.tasks.autoencode import VAE, half_squared_error, kl_to_standard_normal

from helpers import final_weights, fit, read_metrics


def autoencoder(input_shape, encoder: dict, variational=False, latent=4) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS.build({"name": "autoencoder", "encoder": encoder, "latent": latent, "decoder": [16],
                         "variational": variational}, "model", input_shape=input_shape, num_outputs=10)


@pytest.mark.parametrize("input_shape, encoder", [
    ((8,), {"name": "mlp", "hidden": [16]}),
    ((1, 40), {"name": "cnn1d", "channels": [8], "hidden": 16}),
    ((1, 8, 8), {"name": "cnn", "channels": [8], "hidden": 16}),
    ((1, 40), {"name": "gru", "hidden": 8}),
])
@pytest.mark.parametrize("variational", [False, True])
def test_the_output_has_the_input_shape_and_the_code_is_latent(input_shape, encoder, variational):
    model = autoencoder(input_shape, encoder, variational)
    x = torch.randn(5, *input_shape)
    assert model(x).shape == x.shape and model.encode(x).shape == (5, 4) and model.feature_dim == 4
    # The bottleneck is the encoder's own output layer: 4 (or 8: mean and log-variance) outputs.
    assert model.encoder.output_layer.out_features == (8 if variational else 4)
    assert all(n.startswith(("encoder.", "decoder.")) for n, _ in model.named_parameters())
    if variational:
        out, mu, logvar = model.sample_forward(x)
        assert out.shape == x.shape and mu.shape == logvar.shape == (5, 4)
        torch.testing.assert_close(model(x), model.decode(mu))          # forward: the mean code


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    reference = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(kl_to_standard_normal(mu, logvar), reference)


def test_vae_loss_is_the_negative_elbo_of_a_unit_variance_gaussian_decoder():
    """loss = E_q[-log p(x|z)] + beta KL, per sample; -log N(x; x̂, I) = ½‖x − x̂‖² + (D/2) log 2π, so the
    task's reconstruction term is the NLL up to that constant. One sample of ε, as in training."""
    model = autoencoder((1, 40), {"name": "cnn1d", "channels": [8], "hidden": 16}, variational=True)
    x = torch.randn(7, 1, 40)
    task = VAE(beta=0.7)
    torch.manual_seed(3)
    loss, parts = task.training_loss(model, {"x": x, "y": torch.zeros(7)}, [])
    torch.manual_seed(3)
    out, mu, logvar = model.sample_forward(x)
    nll = -Normal(out, 1.0).log_prob(x).reshape(7, -1).sum(1) - 0.5 * 40 * math.log(2 * math.pi)
    kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(loss, (nll + 0.7 * kl).mean())
    torch.testing.assert_close(parts["recon"], half_squared_error(out, x).mean().detach())
    loss.backward()          # the reparameterisation: gradients reach the encoder through μ and σ
    assert model.encoder.output_layer.weight.grad.abs().sum() > 0


def _ae_recipe(task: dict, variational=False, **data) -> dict:
    return {"name": "ae", "seed": 0, "data": {"name": "mnist1d", "num_samples": 3000, **data},
            "model": {"name": "autoencoder", "encoder": {"name": "cnn1d", "channels": [16, 32], "hidden": 64},
                      "latent": 16, "decoder": [64], "variational": variational},
            "task": task, "log": {"every_steps": 50}, "checkpoint": {"every_epochs": None},
            "phases": [{"epochs": 8, "batch_size": 64, "optimizer": {"name": "adamw", "lr": 3e-3}}]}


@pytest.fixture(scope="module")
def dae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dae") / "run"
    fit(_ae_recipe({"name": "autoencode", "noise": [{"name": "noise", "std": 0.5}]}), run)
    return run


def test_a_denoising_autoencoder_removes_noise(dae_run):
    """Measured: the reconstruction of a noisy input (noise std 0.5: the noisy input is off by 0.25 per
    value) is closer to the clean input than the noisy input is (0.21 when written), though the small
    code (16 numbers for 40 values) limits it: the clean input itself comes back at 0.16. Both are far
    better than predicting the mean signal."""
    import json
    trainer = Trainer.from_run_dir(dae_run, quiet=True)
    metrics = json.loads((dae_run / "summary.json").read_text())["metrics"]
    assert metrics["test/denoise_mse"] < 0.9 * 0.25, metrics
    assert metrics["test/mse"] < metrics["test/denoise_mse"]
    x = trainer.state.data.test.x
    baseline = float(((x - trainer.state.data.train.x.mean(0)) ** 2).mean())
    assert metrics["test/denoise_mse"] < 0.5 * baseline, (metrics, baseline)
    losses = [e["train/loss"] for e in read_metrics(dae_run) if "train/loss" in e]
    assert losses[-1] < 0.8 * losses[0]


def test_a_classifier_starts_from_the_autoencoder_encoder(dae_run, tmp_path):
    r = {"name": "ft", "seed": 0, "data": {"name": "mnist1d", "num_samples": 3000, "train_size": 100},
         "model": {"name": "cnn1d", "channels": [16, 32], "hidden": 64},
         "init": {"run": str(dae_run), "prefix": "encoder."},
         "phases": [{"epochs": 2, "batch_size": 25, "freeze": ["features"], "optimizer": {"name": "adamw", "lr": 1e-3}}]}
    fit(r, tmp_path / "ft")
    ae, clf = final_weights(dae_run), final_weights(tmp_path / "ft")
    features = [k for k in clf if k.startswith("features.")]
    assert features
    for k in features:
        assert torch.equal(clf[k], ae["encoder." + k]), k
    # the bottleneck (the encoder's output layer, 16 outputs) is the classifier's output layer: left new
    assert clf["head.4.weight"].shape == (10, 64) and ae["encoder.head.4.weight"].shape == (16, 64)


def test_autoencode_runs_on_tables_and_predict_gives_codes(tmp_path):
    r = {"name": "tab", "seed": 0, "data": {"name": "wine"},
         "model": {"name": "autoencoder", "encoder": {"name": "mlp", "hidden": [16]}, "latent": 3, "decoder": [16]},
         "task": {"name": "autoencode", "noise": [{"name": "swap_noise", "p": 0.15}]},
         "phases": [{"epochs": 3, "batch_size": 16, "optimizer": {"name": "adam", "lr": 1e-3}}]}
    _, summary = fit(r, tmp_path / "run")
    assert {"test/mse", "test/denoise_mse"} <= set(summary["metrics"])
    from sklearn.datasets import load_wine
    np.savez(tmp_path / "in.npz", x=load_wine().data[:5].astype(np.float32))
    out = subprocess.run([sys.executable, "-m", "torchdojo", "predict", str(tmp_path / "run"), "--input",
                          str(tmp_path / "in.npz"), "--output", str(tmp_path / "codes.csv")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / "codes.csv").read_text().splitlines()
    assert lines[0].split(",") == ["z_0", "z_1", "z_2"] and len(lines) == 6


def test_vae_trains_and_logs_its_terms(tmp_path):
    _, summary = fit(_ae_recipe({"name": "vae", "beta": 1.0}, variational=True, num_samples=1000), tmp_path / "vae")
    m = summary["metrics"]
    assert m["test/loss"] == pytest.approx(m["test/recon"] + m["test/kl"]) and m["test/kl"] > 0
    train = [e for e in read_metrics(tmp_path / "vae") if "train/loss/kl" in e]
    assert train and train[-1]["train/loss"] < train[0]["train/loss"]


@pytest.mark.parametrize("change, path", [
    (lambda r: r.update(task={"name": "vae"}), "model.variational"),
    (lambda r: r["task"].update(noise=[{"name": "hflip"}]), "task.noise.0"),
    (lambda r: r.update(eval={"tta": {"views": 2}}), "eval.tta"),
    (lambda r: r.update(ensemble={"members": 2}), "ensemble"),
])
def test_configuration_errors(change, path, tmp_path):
    r = _ae_recipe({"name": "autoencode"}, num_samples=500)
    r["phases"][0]["epochs"] = 1
    change(r)
    with pytest.raises(ConfigError) as info:
        Trainer(load_recipe(r), tmp_path / "run", quiet=True).fit()
    assert info.value.path == path, info.value
