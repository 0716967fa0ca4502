"""Tasks: a model's objective and its metrics. `training_loss(model, batch, terms) -> (loss, parts)`,
`evaluate(model, loader, info) -> metrics`, `predict(model, x, info) -> columns`, and optionally
`bind(trainer)`, called once the data is loaded (unlabelled rows, augmentations checked against the data).
`task_type` is the data's ("classification", "regression") or "any" for tasks that ignore labels."""
from .autoencode import VAE, Autoencode
from .base import LossTerm
from .classify import Classify
from .distill import Distill
from .regress import Regress
from .semisup import SemiSupervised

TASKS = {"classify": Classify, "regress": Regress, "distill": Distill, "autoencode": Autoencode, "vae": VAE,
         "semisup": SemiSupervised}

__all__ = ["TASKS", "Autoencode", "Classify", "Distill", "Regress", "LossTerm", "SemiSupervised", "VAE"]
