"""Classification: logits over K classes; metrics accuracy, macro-F1, NLL and per-class recall."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..calibration import brier_score, expected_calibration_error
from .base import collect_outputs, weighted_loss


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN); classes absent from both count 0."""
    confusion = torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, -1)
    tp = confusion.diag().double()
    denom = 2 * tp + (confusion.sum(0) - confusion.diag()) + (confusion.sum(1) - confusion.diag())
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return f1.mean().item()


def per_class_recall(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[list[float], list[bool]]:
    """Recall TP / (TP + FN) of each class, and whether the class occurs in `target` at all (a class
    that does not gets recall 0, as scikit-learn's recall_score(average=None) reports it)."""
    support = torch.bincount(target, minlength=num_classes)
    hits = torch.bincount(target[pred == target], minlength=num_classes)
    recall = torch.where(support > 0, hits.double() / support.clamp(min=1), torch.zeros(num_classes, dtype=torch.double))
    return recall.tolist(), (support > 0).tolist()


class Classify:
    """Multi-class classification with a softmax over the model's outputs. Metrics: accuracy, macro-F1,
    NLL (= loss), expected calibration error (15 bins), Brier score, the recall of each class
    (`recall/<class name>`) and `recall_min`, the lowest recall among the classes present in the split."""
    task_type = "classification"
    default_losses = [{"name": "cross_entropy"}]

    def training_loss(self, model, batch, terms):
        return weighted_loss(model(batch["x"]), batch["y"], terms)

    def evaluate(self, model, loader, info) -> dict[str, float]:
        logits, y = collect_outputs(model, loader)
        nll = F.cross_entropy(logits.float(), y).item()
        pred = logits.argmax(1)
        probs = torch.softmax(logits.float(), dim=1)
        metrics = {"loss": nll, "nll": nll, "accuracy": (pred == y).double().mean().item(),
                   "f1_macro": macro_f1(pred, y, info.num_outputs),
                   "ece": expected_calibration_error(probs, y), "brier": brier_score(probs, y)}
        recall, present = per_class_recall(pred, y, info.num_outputs)
        metrics["recall_min"] = min(r for r, p in zip(recall, present) if p)
        names = info.class_names or [str(c) for c in range(info.num_outputs)]
        for name, r in zip(names, recall):
            metrics[f"recall/{name}"] = r
        return metrics

    @torch.no_grad()
    def predict(self, model, x: torch.Tensor, info) -> dict[str, list]:
        probs = torch.softmax(model(x).float(), dim=1)
        names = info.class_names or [str(i) for i in range(probs.shape[1])]
        columns: dict[str, list] = {"prediction": [names[i] for i in probs.argmax(1).tolist()]}
        for i, name in enumerate(names):
            columns[f"prob_{name}"] = probs[:, i].tolist()
        return columns
