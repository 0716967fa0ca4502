"""Methods: small plug-ins with no-op hooks the trainer calls (see `Method`), each with a plain
function that works in any loop."""
from .base import HOOKS, Method
from .early_stopping import EarlyStopping
from .ema import EMA, ema_update
from .grad_clip import GradClip

METHODS = {"grad_clip": GradClip, "ema": EMA, "early_stopping": EarlyStopping}

__all__ = ["HOOKS", "METHODS", "Method", "EMA", "ema_update", "EarlyStopping", "GradClip"]
