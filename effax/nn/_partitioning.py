"""Logical axes on layer params: an initializer that carries the names of its param's dimensions.

Why an initializer wrapper, not `kernel_axes=` fields: it is Flax's own
spelling (`nn.with_logical_partitioning`, used by Flax's lm1b), so ported
code keeps its shape; one mechanism reaches every param of every layer,
nested sub-layers included (an `LSTMCell`'s eight `Dense`s take their axes
from the cell's `kernel_init` and `recurrent_kernel_init`), where fields
would need one per param per layer; and the variables stay plain arrays
(the names go to `fx.param(..., axes=...)`, so `fx.summary` shows them and
`fx.sharding.logical_to_mesh` uses them), never boxed values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from effax.effects import param

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
Axes = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class LogicalInit:
    """An initializer with the logical `axes` of the param it makes; calls `init` unchanged.

    Made by `fx.nn.with_logical_partitioning`. It is hashable when `init`
    is, so layers sharing it still share one cached initializer trace.

    >>> init = fx.nn.with_logical_partitioning(jax.nn.initializers.ones, ("embed", "mlp"))
    >>> init.axes, init(jax.random.key(0), (1, 2), jnp.float32)
    (('embed', 'mlp'), Array([[1., 1.]], dtype=float32))
    """

    init: Initializer
    axes: Axes

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return self.init(key, shape, dtype)


def with_logical_partitioning(init: Initializer, axes: Sequence[str | None]) -> LogicalInit:
    """Name the dimensions of the params `init` makes: the `fx.nn` spelling of Flax's wrapper.

    Every `fx.nn` layer passes these names as `fx.param(..., axes=...)`, so
    `fx.summary` lists them and `fx.sharding.logical_to_mesh` maps them to a
    mesh. A bias whose initializer names no axes takes the output axes of
    its layer's kernel (`Dense` with kernel axes `("embed", "mlp")` gets a
    bias on `("mlp",)`); wrap `bias_init` to choose otherwise.

    >>> lecun = jax.nn.initializers.lecun_normal()
    >>> layer = fx.nn.Dense(4, kernel_init=fx.nn.with_logical_partitioning(lecun, ("embed", "mlp")))
    >>> s = fx.summary(fx.transform(lambda x: layer(x)), jnp.ones((1, 2)))
    >>> fx.sharding.logical_axes(s)["params"]["Dense_0"]
    {'bias': P('mlp',), 'kernel': P('embed', 'mlp')}
    """
    return LogicalInit(init, tuple(axes))


def axes_of(init: Any) -> Axes | None:
    """The logical axes an initializer carries (`with_logical_partitioning`), else None."""
    return init.axes if isinstance(init, LogicalInit) else None


def layer_param(
    name: str, init: Initializer, shape: tuple[int, ...], dtype: Any, default_axes: Axes | None = None
) -> jax.Array:
    """`fx.param` with the axes `init` carries, else `default_axes` (a bias's from its kernel)."""
    axes = axes_of(init)
    if axes is None and default_axes is not None and len(default_axes) == len(shape):
        axes = default_axes
    return param(name, init, shape, dtype, axes=axes)


def output_axes(init: Any, n: int) -> Axes | None:
    """The last `n` axes of a kernel's initializer: what its bias inherits."""
    axes = axes_of(init)
    return None if axes is None or n > len(axes) else axes[len(axes) - n :]
