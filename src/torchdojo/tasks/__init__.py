"""Tasks: a model's objective and its metrics. `training_loss(model, batch, terms) -> (loss, parts)`,
`evaluate(model, loader, info) -> metrics`, `predict(model, x, info) -> columns`."""
from .base import LossTerm
from .classify import Classify
from .distill import Distill
from .regress import Regress

TASKS = {"classify": Classify, "regress": Regress, "distill": Distill}

__all__ = ["TASKS", "Classify", "Distill", "Regress", "LossTerm"]
