"""Pooling over spatial windows of channels-last inputs: `max_pool`, `avg_pool`, `min_pool`, as Flax's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effax.core import EffaxError, path_now, path_str


def _where() -> str:
    """Pooling is a function, not a layer: its errors name the module it runs in."""
    path = path_now()
    return f"pooling in `{path_str(path)}`" if path else "pooling"


def pool(
    inputs: jax.Array,
    init: Any,
    reduce_fn: Callable[[Any, Any], Any],
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """Reduce each window of `(batch..., *window dims, features)` with `reduce_fn`: `jax.lax.reduce_window`.

    Leading dims beyond the window's are batch dims (none is fine). `padding`
    is `'SAME'`, `'VALID'` or one `(low, high)` pair per window dim.

    >>> fx.nn.pool(jnp.arange(4.0).reshape(4, 1), 0.0, jax.lax.add, (2,), (2,))
    Array([[1.],
           [5.]], dtype=float32)
    """
    inputs = jnp.asarray(inputs)
    for field, value in (("window_shape", window_shape), ("strides", strides)):
        if isinstance(value, int):  # Flax takes tuples only (one entry per window dim), and so do we
            raise EffaxError(
                f"{_where()}: {field}={value} must be a tuple, one entry per window dim: write "
                f"`{field}=({value}, {value})` for a 2-D window or `({value},)` for a 1-D one."
            )
    window_shape = tuple(window_shape)
    n = len(window_shape)
    strides = (1,) * n if strides is None else tuple(strides)
    if len(strides) != n:
        raise EffaxError(f"{_where()}: strides {strides} need one entry per window dim of {window_shape}.")
    batch = inputs.ndim - n - 1
    if batch < 0:
        raise EffaxError(
            f"{_where()} with window {window_shape} needs inputs (batch..., {n} window dims, features), "
            f"got shape {inputs.shape}."
        )
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise EffaxError(
                f"{_where()}: padding={padding!r} is not one of 'SAME', 'VALID', 'SAME_LOWER'; for other padding "
                f"give one (low, high) pair per window dim, e.g. `padding=((1, 1), (1, 1))`."
            )
    else:
        padding = tuple(tuple(p) for p in padding)
        if len(padding) != n or any(len(p) != 2 for p in padding):
            raise EffaxError(
                f"{_where()}: padding {padding} needs one (low, high) pair per window dim of {window_shape}."
            )
        padding = ((0, 0),) * batch + padding + ((0, 0),)
    dims = (1,) * batch + window_shape + (1,)
    strides = (1,) * batch + strides + (1,)
    return jax.lax.reduce_window(inputs, init, reduce_fn, dims, strides, padding)


def max_pool(
    inputs: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """The maximum of each window, as Flax's `max_pool` (padding counts as -inf).

    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> fx.nn.max_pool(x, (2, 2), strides=(2, 2))[0, ..., 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
    """
    return pool(inputs, -jnp.inf, jax.lax.max, window_shape, strides, padding)


def min_pool(
    inputs: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """The minimum of each window, as Flax's `min_pool` (padding counts as +inf).

    >>> fx.nn.min_pool(jnp.array([[3.0], [1.0], [2.0]]), (2,))[:, 0]
    Array([1., 1.], dtype=float32)
    """
    return pool(inputs, jnp.inf, jax.lax.min, window_shape, strides, padding)


def avg_pool(
    inputs: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
    count_include_pad: bool = True,
) -> jax.Array:
    """The mean of each window, as Flax's `avg_pool`; `count_include_pad=False` divides by the real entries only.

    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> fx.nn.avg_pool(x, (2, 2), strides=(2, 2))[0, ..., 0]
    Array([[ 2.5,  4.5],
           [10.5, 12.5]], dtype=float32)
    """
    inputs = jnp.asarray(inputs)
    y = pool(inputs, 0.0, jax.lax.add, window_shape, strides, padding)
    if count_include_pad:
        return y / np.prod(window_shape)
    ones_shape = inputs.shape[:-1] + (1,)
    if len(ones_shape) - 2 == len(window_shape):  # one batch dim: the count is the same for every example
        ones_shape = (1,) + ones_shape[1:]
    return y / pool(jnp.ones(ones_shape, y.dtype), 0.0, jax.lax.add, window_shape, strides, padding)
