"""Tasks: a model's objective and its metrics. `training_loss(model, batch, terms) -> (loss, parts)`,
`evaluate(model, loader, info) -> metrics`, `predict(model, x, info) -> columns`."""
from .base import LossTerm
from .classify import Classify
from .regress import Regress

TASKS = {"classify": Classify, "regress": Regress}

__all__ = ["TASKS", "Classify", "Regress", "LossTerm"]
