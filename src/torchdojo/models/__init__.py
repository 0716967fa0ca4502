"""Small registered models. Input shape and number of outputs come from the data, never the recipe."""
from .cnn import CNN
from .cnn1d import CNN1d
from .gru import GRU
from .mlp import MLP

MODELS = {"mlp": MLP, "cnn": CNN, "cnn1d": CNN1d, "gru": GRU}

__all__ = ["MLP", "CNN", "CNN1d", "GRU", "MODELS"]
