"""Test-time augmentation (TTA): predict each input as it is and under several random augmentations, and
combine the predictions (Krizhevsky et al. 2012 averaged crops and flips; Simonyan & Zisserman 2014,
arXiv 1409.1556).

    tta = TestTimeAugmentation(model, Compose([Shift(max=3)]), views=8)   # any transform(batch, g)
    log_probs = tta(x)

The augmentation draws come from a generator seeded with `seed` at every call, so a prediction is
reproducible; label-mixing transforms (mixup, cutmix) make no sense without labels and are refused."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .ensemble import How, combine


class TestTimeAugmentation(nn.Module):
    """`model` on the identity view plus `views` augmented views of each batch, outputs combined with
    `ensemble.combine` (mean of probabilities by default; `mean` for regression)."""

    __test__ = False            # not a pytest test class, despite its name

    def __init__(self, model: nn.Module, transform: Callable[[dict, torch.Generator], dict], views: int = 8,
                 how: How = "mean_prob", seed: int = 0):
        super().__init__()
        if views < 0:
            raise ValueError("views must be >= 0")
        if getattr(transform, "mixes_labels", False) or any(getattr(t, "mixes_labels", False)
                                                            for t in getattr(transform, "transforms", [])):
            raise ValueError("test-time augmentation cannot use label-mixing transforms (mixup, cutmix)")
        self.model, self.transform, self.views, self.how, self.seed = model, transform, views, how, seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        dummy = torch.zeros(len(x), dtype=torch.long, device=x.device)   # transforms see a batch dict
        outputs = [self.model(x)]
        for _ in range(self.views):
            outputs.append(self.model(self.transform({"x": x, "y": dummy}, g)["x"]))
        return combine(outputs, self.how)
