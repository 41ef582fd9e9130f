"""Interop: Flax linen and NNX modules as effectful functions, through the public effect operations.

Flax is imported only when `from_flax` or `from_nnx` is called, so effax
itself does not depend on it.
"""

from effax.interop._flax import from_flax
from effax.interop._nnx import from_nnx

__all__ = ["from_flax", "from_nnx"]
