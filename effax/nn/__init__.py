"""Layers written against effects: a light `Module` base and the usual layers, named and laid out as in Flax linen.

Each layer asks for its params, state, keys and mode through effect
operations, so `fx.transform` discharges it, and train vs eval is a handler
swap (`fx.handlers.train(...)` / `fx.handlers.eval()`).
"""

from effax.nn._attention import MultiHeadAttention
from effax.nn._combinators import MLP, Sequential
from effax.nn._dropout import Dropout
from effax.nn._group_norm import GroupNorm
from effax.nn._linear import Conv, ConvTranspose, Dense, DenseGeneral, Embed
from effax.nn._module import Module
from effax.nn._normalization import BatchNorm, LayerNorm, RMSNorm
from effax.nn._partitioning import LogicalInit, with_logical_partitioning
from effax.nn._pooling import avg_pool, max_pool, min_pool, pool
from effax.nn._recurrent import RNN, Bidirectional, GRUCell, LSTMCell, OptimizedLSTMCell, flip_sequences

__all__ = [
    "Module", "Dense", "Conv", "Embed", "LayerNorm", "RMSNorm", "BatchNorm", "Dropout",
    "MultiHeadAttention", "MLP", "Sequential",
    "DenseGeneral", "ConvTranspose", "GroupNorm", "pool", "max_pool", "avg_pool", "min_pool",
    "LSTMCell", "OptimizedLSTMCell", "GRUCell", "RNN", "Bidirectional", "flip_sequences",
    "with_logical_partitioning", "LogicalInit",
]
