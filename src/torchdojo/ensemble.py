"""Combining the predictions of several models: snapshots of one run (Huang et al. 2017, arXiv
1704.00109), members of different initialisations, differently augmented models.

    probs = combine([m(x) for m in models], how="mean_prob")      # plain tensors, any loop
    ensemble = Ensemble(models, how="mean_prob")                   # an nn.Module for tasks and eval

For classification an Ensemble returns log-probabilities, so softmax, argmax and cross-entropy on its
output are those of the combined distribution."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

How = Literal["mean_prob", "mean_logprob", "mean"]


def combine(outputs: list[torch.Tensor], how: How = "mean_prob") -> torch.Tensor:
    """Combine per-model outputs (logits for classes, values for regression).

    mean_prob: log of the mean softmax probability (the usual ensemble);
    mean_logprob: log-softmax of the mean log-probability (a normalised geometric mean);
    mean: the plain mean (regression)."""
    if not outputs:
        raise ValueError("nothing to combine")
    stacked = torch.stack([o.float() for o in outputs])
    if how == "mean":
        return stacked.mean(0)
    logp = torch.log_softmax(stacked, dim=-1)
    if how == "mean_prob":
        return torch.logsumexp(logp, dim=0) - torch.log(torch.tensor(float(len(outputs))))
    if how == "mean_logprob":
        return torch.log_softmax(logp.mean(0), dim=-1)
    raise ValueError(f"unknown combination '{how}'; choose mean_prob, mean_logprob or mean")


class Ensemble(nn.Module):
    """Models evaluated together; forward returns `combine` of their outputs."""

    def __init__(self, models: list[nn.Module], how: How = "mean_prob"):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine([m(x) for m in self.members], self.how)


def default_how(task_type: str) -> How:
    return "mean_prob" if task_type == "classification" else "mean"
