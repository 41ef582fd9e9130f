"""Layers written against effects: a light `Module` base and the usual layers, named and laid out as in Flax linen.

Each layer asks for its params, state, keys and mode through effect
operations, so `fx.transform` discharges it, and train vs eval is a handler
swap (`fx.handlers.train(...)` / `fx.handlers.eval()`).
"""

from effax.nn._attention import MultiHeadAttention
from effax.nn._combinators import MLP, Sequential
from effax.nn._dropout import Dropout
from effax.nn._linear import Conv, Dense, Embed
from effax.nn._module import Module
from effax.nn._normalization import BatchNorm, LayerNorm, RMSNorm

__all__ = [
    "Module", "Dense", "Conv", "Embed", "LayerNorm", "RMSNorm", "BatchNorm", "Dropout",
    "MultiHeadAttention", "MLP", "Sequential",
]
