"""`GroupNorm`: normalize each example over groups of channels, as Flax's `GroupNorm`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from effax.core import EffaxError
from effax.nn._fields import check_layer
from effax.nn._linear import Initializer
from effax.nn._module import Module, where
from effax.nn._normalization import _axes, _moments, _out_dtype, _scale_shift, _stats_dtype, ones, zeros


class GroupNorm(Module):
    """Split the channels (last axis) into `num_groups` groups and normalize each over its group and `reduction_axes`.

    Statistics do not depend on the batch, so train and eval agree and no
    state is kept. By default they are taken over every axis but the first
    (the batch), as in Flax; give `group_size` instead of `num_groups` with
    `num_groups=None`. `scale` and `bias` are per channel. The variance is
    `E[x^2] - E[x]^2` clipped at 0 (`use_fast_variance=True`, Flax's
    default) or `E[(x - mean)^2]` (`False`).

    >>> t = fx.transform(lambda x: fx.nn.GroupNorm(num_groups=2)(x))
    >>> x = jnp.arange(16.0).reshape(1, 2, 2, 4)
    >>> v = t.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, v["params"])
    {'GroupNorm_0': {'bias': (4,), 'scale': (4,)}}
    >>> y = t.apply(v, x)                    # channels 0-1 and 2-3 normalized apart
    >>> bool(jnp.allclose(y[..., :2].mean(), 0.0, atol=1e-6)), bool(jnp.allclose(y[..., :2].std(), 1.0, atol=1e-3))
    (True, True)
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    reduction_axes: int | Sequence[int] | None = None
    use_fast_variance: bool = True

    def __post_init__(self) -> None:
        check_layer(self, ("use_bias", "use_scale", "use_fast_variance"))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        if self.reduction_axes is None:
            axes = tuple(range(1, x.ndim - 1)) + (x.ndim - 1,)
        else:
            axes = _axes(self.reduction_axes, x.ndim, "GroupNorm")
        if not axes or axes[-1] != x.ndim - 1:
            raise EffaxError(
                f"{where('GroupNorm')}: reduction_axes {self.reduction_axes} must include the last axis, the "
                "channels: e.g. `reduction_axes=(1, 2, -1)` for images."
            )
        channels = x.shape[-1]
        if (self.num_groups is None) == (self.group_size is None):
            raise EffaxError(
                f"{where('GroupNorm')} takes one of `num_groups` or `group_size`: for groups of a fixed size write "
                "`GroupNorm(num_groups=None, group_size=16)`."
            )
        if self.group_size is not None:
            if channels % self.group_size:
                raise EffaxError(
                    f"{where('GroupNorm')}: {channels} channels are not a multiple of group_size={self.group_size}."
                )
            groups = channels // self.group_size
        else:
            groups = self.num_groups
        if groups <= 0 or channels % groups:
            raise EffaxError(f"{where('GroupNorm')}: num_groups={groups} does not divide the {channels} channels.")
        size = channels // groups
        xs = x.astype(_stats_dtype(x))
        grouped = xs.reshape(x.shape[:-1] + (groups, size))
        stat_axes = axes[:-1] + (grouped.ndim - 1,)
        mean, var = _moments(grouped, stat_axes, self.use_fast_variance)
        mean = jnp.expand_dims(jnp.repeat(mean, size, axis=-1), axes[:-1])
        var = jnp.expand_dims(jnp.repeat(var, size, axis=-1), axes[:-1])
        y = (xs - mean) * jax.lax.rsqrt(var + self.epsilon)
        features = (channels,)
        y = _scale_shift(self, y, features, (1,) * (x.ndim - 1) + features)
        return y.astype(_out_dtype(self, x))
