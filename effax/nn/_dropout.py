"""`Dropout`: random zeroing that draws keys only when training."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from effax.effects import is_training, next_key
from effax.nn._fields import check_bools, check_rate
from effax.nn._module import Module


def dropout(x: jax.Array, rate: float, key: jax.Array, broadcast_dims: Sequence[int] = ()) -> jax.Array:
    """Zero each entry with probability `rate` and scale the rest by `1 / (1 - rate)`."""
    if rate == 1.0:
        return jnp.zeros_like(x)
    keep = 1.0 - rate
    if broadcast_dims:
        shape = tuple(1 if d in {b % x.ndim for b in broadcast_dims} else n for d, n in enumerate(x.shape))
        mask = jnp.broadcast_to(jax.random.bernoulli(key, keep, shape), x.shape)
    else:
        mask = jax.random.bernoulli(key, keep, x.shape)
    # Python scalars are weakly typed, so `x`'s dtype stands; and unlike `jnp.asarray(keep, x.dtype)` they make
    # no concrete array (an eager op) each time a model is traced
    return jnp.where(mask, x / keep, 0.0)


class Dropout(Module):
    """Zero entries with probability `rate` when training; the identity (and no key drawn) in eval.

    Keys come from the `stream` (`"dropout"`) at this layer's path, so each
    dropout layer and each call draws a different mask. `deterministic`
    (field or call argument) overrides the mode, as in Flax.

    >>> t = fx.transform(lambda x: fx.nn.Dropout(0.5)(x))
    >>> x = jnp.ones(4)
    >>> t.apply({}, x, training=False)          # eval: no rngs needed
    Array([1., 1., 1., 1.], dtype=float32)
    >>> y = t.apply({}, x, training=True, rngs={"dropout": jax.random.key(0)})
    >>> sorted(set(y.tolist())) in ([0.0, 2.0], [0.0], [2.0])
    True
    """

    rate: float
    broadcast_dims: Sequence[int] = ()
    deterministic: bool | None = None
    stream: str = "dropout"

    def __post_init__(self) -> None:
        rate, deterministic = self.rate, self.deterministic
        if type(rate) is not float or not 0.0 <= rate <= 1.0:  # a float in range is decided inline
            check_rate(self, "rate")
        if deterministic is not None and type(deterministic) is not bool:
            check_bools(self, optional=("deterministic",))

    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        if deterministic is None:
            deterministic = self.deterministic
        if self.rate == 0.0 or (not is_training() if deterministic is None else deterministic):
            return x
        x = jnp.asarray(x)
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        return dropout(x, self.rate, next_key(self.stream), self.broadcast_dims)
