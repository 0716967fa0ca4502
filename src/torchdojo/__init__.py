"""torchdojo: neural-network training methods for PyTorch, composable through YAML recipes."""
from .errors import ConfigError, DojoError
from .recipe import Recipe, load_recipe
from .trainer import Trainer, train

__version__ = "0.1.0"
__all__ = ["ConfigError", "DojoError", "Recipe", "Trainer", "load_recipe", "train", "__version__"]
