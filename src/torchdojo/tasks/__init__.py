"""Tasks: a model's objective and its metrics. `training_loss(model, batch, terms) -> (loss, parts)`,
`evaluate(model, loader, info) -> metrics`, `predict(model, x, info) -> columns`."""
from .autoencode import VAE, Autoencode
from .base import LossTerm
from .classify import Classify
from .distill import Distill
from .regress import Regress
from .semisup import SemiSupervised

TASKS = {"classify": Classify, "regress": Regress, "distill": Distill, "autoencode": Autoencode, "vae": VAE,
         "semisup": SemiSupervised}

__all__ = ["TASKS", "Autoencode", "Classify", "Distill", "Regress", "LossTerm", "SemiSupervised", "VAE"]
