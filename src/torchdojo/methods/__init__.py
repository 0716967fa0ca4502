"""Methods: small plug-ins with no-op hooks the trainer calls (see `Method`), each with a plain
function that works in any loop."""
from .base import HOOKS, Method
from .diagnostics import Diagnostics
from .early_stopping import EarlyStopping
from .ema import EMA, ema_update
from .grad_clip import GradClip
from .load_balance import LoadBalance, load_balancing_loss
from .snapshot import SnapshotEnsemble
from .swa import SWA, recompute_bn, swa_update

METHODS = {"grad_clip": GradClip, "ema": EMA, "early_stopping": EarlyStopping, "swa": SWA,
           "snapshot_ensemble": SnapshotEnsemble, "diagnostics": Diagnostics, "load_balance": LoadBalance}

__all__ = ["HOOKS", "METHODS", "Method", "Diagnostics", "EMA", "ema_update", "EarlyStopping", "GradClip", "SWA",
           "swa_update", "recompute_bn", "SnapshotEnsemble", "LoadBalance", "load_balancing_loss"]
