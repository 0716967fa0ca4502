"""Semi-supervised classification: a few labelled rows plus many unlabelled ones (`data.unlabeled`).

FixMatch (Sohn et al. 2020, arXiv 2001.07685): for each unlabelled row, the model's prediction on a
weakly augmented view becomes a pseudo-label when its confidence reaches `threshold`, and the model is
trained to predict that label on a strongly augmented view. Without `strong` augmentations this is
pseudo-labelling with a confidence threshold (Lee 2013, "Pseudo-Label", ICML workshop).

loss = supervised loss terms on the labelled batch (default cross-entropy)
     + weight · mean over μ·B unlabelled rows of 1[max p(weak) ≥ threshold] · CE(model(strong), argmax p(weak))

The labelled rows and the strong views go through the model in one forward pass, so BatchNorm sees both
(as FixMatch does); the weak views' predictions are taken without gradient. Unlabelled rows and their
augmentations are drawn from torch's global generator (checkpointed: a resumed run is bit-identical).
Evaluation and prediction are classification's."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import random_view, weighted_loss
from .classify import Classify


class SemiSupervised(Classify):
    """FixMatch / thresholded pseudo-labelling over `data.unlabeled` (see the module docstring)."""

    def __init__(self, threshold: float = 0.95, weight: float = 1.0, unlabeled_ratio: int = 7,
                 weak: list[dict] | None = None, strong: list[dict] | None = None):
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if unlabeled_ratio < 1:
            raise ValueError(f"unlabeled_ratio must be at least 1, got {unlabeled_ratio}")
        self.threshold, self.weight, self.unlabeled_ratio = threshold, weight, unlabeled_ratio
        self.weak_specs, self.strong_specs = list(weak or []), list(strong or [])
        self.unlabeled: torch.Tensor | None = None
        self.weak = self.strong = None
        # Logged by the trainer on log steps: the share of unlabelled rows confident enough for a pseudo-label.
        self.step_logs: dict[str, torch.Tensor] = {}

    def bind(self, trainer) -> None:
        """Take the unlabelled rows and build the augmentations (checked against the data's kind)."""
        data = trainer.state.data
        if data.unlabeled is None:
            raise ConfigError("data.unlabeled", "the semisup task needs unlabelled rows: set data.train_size "
                                                "and data.unlabeled: true")
        self.unlabeled = data.unlabeled.x
        self.weak = trainer.build_augment(self.weak_specs, "task.weak")
        self.strong = trainer.build_augment(self.strong_specs, "task.strong")

    @staticmethod
    def _view(transform, x: torch.Tensor) -> torch.Tensor:
        """A random view of unlabelled rows (their label field is a placeholder)."""
        return random_view(transform, {"x": x, "y": torch.zeros(len(x), dtype=torch.long, device=x.device)})["x"]

    def unlabeled_loss(self, logits_strong: torch.Tensor, logits_weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean masked cross-entropy to the confident pseudo-labels, share of rows above the threshold)."""
        probs = torch.softmax(logits_weak.detach().float(), dim=1)
        confidence, pseudo = probs.max(dim=1)
        mask = (confidence >= self.threshold).float()
        per_row = F.cross_entropy(logits_strong.float(), pseudo, reduction="none")
        return (per_row * mask).mean(), mask.mean()

    def training_loss(self, model, batch, terms):
        x, y = batch["x"], batch["y"]
        rows = torch.randint(len(self.unlabeled), (self.unlabeled_ratio * len(x),))
        u = self.unlabeled[rows.to(self.unlabeled.device)].to(x.device)
        with torch.no_grad():
            logits_weak = model(self._view(self.weak, u))
        logits = model(torch.cat([x, self._view(self.strong, u)]))
        supervised, parts = weighted_loss(logits[:len(x)], y, terms)
        unsupervised, mask_rate = self.unlabeled_loss(logits[len(x):], logits_weak)
        self.step_logs["train/semisup/mask_rate"] = mask_rate
        parts = {**parts, "unlabeled": (self.weight * unsupervised).detach()}
        return supervised + self.weight * unsupervised, parts
