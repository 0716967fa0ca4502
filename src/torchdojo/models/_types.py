"""Constrained option types for model configs: a recipe with a zero or negative width, or a dropout
outside [0, 1), is a ConfigError naming the key, not a traceback from inside torch."""
from typing import Annotated

from pydantic import Field

Width = Annotated[int, Field(gt=0)]            # layer widths, channels, kernel sizes, layer counts
Dropout = Annotated[float, Field(ge=0, lt=1)]
