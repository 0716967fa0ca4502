"""Regression: the model predicts standardised targets; metrics MSE, MAE and R2 in original units."""
from __future__ import annotations

import torch

from .base import collect_outputs, weighted_loss


class Regress:
    """Regression of one or more real targets."""
    task_type = "regression"
    default_losses = [{"name": "mse"}]

    def training_loss(self, model, batch, terms):
        return weighted_loss(model(batch["x"]), batch["y"], terms)

    def evaluate(self, model, loader, info) -> dict[str, float]:
        out, y = collect_outputs(model, loader)
        out = out.reshape(y.shape).double()
        y = y.double()
        loss = torch.mean((out - y) ** 2).item()     # the training objective's units (standardised)
        pred, true = info.target_to_original(out), info.target_to_original(y)
        err = pred - true
        ss_res = (err ** 2).sum(0)
        ss_tot = ((true - true.mean(0)) ** 2).sum(0).clamp(min=1e-12)
        return {"loss": loss, "mse": (err ** 2).mean().item(), "mae": err.abs().mean().item(),
                "r2": (1 - ss_res / ss_tot).mean().item()}

    @torch.no_grad()
    def predict(self, model, x: torch.Tensor, info) -> dict[str, list]:
        out = info.target_to_original(model(x).double())
        if out.shape[1] == 1:
            return {"prediction": out[:, 0].tolist()}
        return {f"prediction_{i}": out[:, i].tolist() for i in range(out.shape[1])}
