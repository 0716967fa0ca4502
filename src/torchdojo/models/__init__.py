"""Small registered models. Input shape and number of outputs come from the data, never the recipe."""
from .autoencoder import AutoEncoder
from .cnn import CNN
from .cnn1d import CNN1d
from .concat import Concat
from .gru import GRU
from .mlp import MLP
from .switch import MoEMLP, SwitchFFN

MODELS = {"mlp": MLP, "cnn": CNN, "cnn1d": CNN1d, "gru": GRU, "moe_mlp": MoEMLP}
# Models built from other models (encoders given in the recipe); registered like the ones above.
COMPOSITE_MODELS = {"concat": Concat, "autoencoder": AutoEncoder}

__all__ = ["MLP", "CNN", "CNN1d", "GRU", "MoEMLP", "SwitchFFN", "Concat", "AutoEncoder", "MODELS", "COMPOSITE_MODELS"]
