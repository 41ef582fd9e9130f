"""Linear layers: `Dense`, `Conv`, `Embed`; param names and layouts as in Flax linen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effax.core import EffaxError
from effax.effects import param
from effax.nn._module import Module

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
default_kernel_init: Initializer = jax.nn.initializers.lecun_normal()
zeros: Initializer = jax.nn.initializers.zeros


def promote(dtype: Any, *arrays: Any) -> tuple[jax.Array, ...]:
    """Cast `arrays` to `dtype`, or to their common type when `dtype` is None (Flax's rule)."""
    dtypes = {getattr(a, "dtype", None) for a in arrays if a is not None}
    if len(dtypes) == 1 and None not in dtypes and (dtype is None or dtypes.pop() == dtype):
        return arrays  # already one dtype: no cast, and no trace-time cost for the common case
    dtype = jnp.result_type(*arrays) if dtype is None else dtype
    return tuple(None if a is None else jnp.asarray(a, dtype) for a in arrays)


class Dense(Module):
    """`y = x @ kernel + bias` over the last axis; `kernel` is `(in, features)` as in Flax.

    >>> t = fx.transform(lambda x: fx.nn.Dense(3)(x))
    >>> v = t.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> jax.tree.map(jnp.shape, v["params"])
    {'Dense_0': {'bias': (3,), 'kernel': (4, 3)}}
    >>> t.apply(v, jnp.ones((2, 4))).shape
    (2, 3)
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = param("kernel", self.kernel_init, (jnp.shape(x)[-1], self.features), self.param_dtype)
        bias = param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = promote(self.dtype, x, kernel, bias)
        y = jnp.matmul(x, kernel)
        return y if bias is None else y + bias


def _tuple(value: int | Sequence[int], n: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise EffaxError(f"Conv: {what} {value} has {len(value)} entries, but kernel_size has {n}.")
    return value


def _padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> Any:
    if isinstance(padding, str):
        if padding.upper() == "CAUSAL":
            if len(kernel) != 1:
                raise EffaxError(f"Conv: padding='CAUSAL' is for 1-D convolutions; kernel_size is {kernel}.")
            return [((kernel[0] - 1) * dilation[0], 0)]
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * len(kernel)
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


class Conv(Module):
    """An N-D convolution over channels-last inputs `(batch..., *spatial, features)`, as Flax's `Conv`.

    `kernel_size` is a tuple: `(3,)` for 1-D, `(3, 3)` for 2-D. The kernel
    is `(*kernel_size, in_features // feature_group_count, features)`.
    `padding` is `'SAME'`, `'VALID'`, `'CAUSAL'` (1-D), an int, or per-dim ints or pairs.

    >>> t = fx.transform(lambda x: fx.nn.Conv(4, (3, 3))(x))
    >>> v = t.init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))
    >>> v["params"]["Conv_0"]["kernel"].shape, t.apply(v, jnp.ones((1, 8, 8, 2))).shape
    ((3, 3, 2, 4), (1, 8, 8, 4))
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: str | int | Sequence[Any] = "SAME"
    input_dilation: int | Sequence[int] = 1
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros

    def __call__(self, x: jax.Array) -> jax.Array:
        if isinstance(self.kernel_size, int):
            raise EffaxError(
                f"Conv: kernel_size must be a tuple, one entry per spatial dim, got {self.kernel_size}: "
                f"write `kernel_size=({self.kernel_size},)` for 1-D or `({self.kernel_size}, "
                f"{self.kernel_size})` for 2-D."
            )
        kernel_size = tuple(self.kernel_size)
        n = len(kernel_size)
        x = jnp.asarray(x)
        if x.ndim < n + 1:
            raise EffaxError(
                f"Conv with kernel_size {kernel_size} needs inputs (batch..., {n} spatial dims, "
                f"features), got shape {x.shape}."
            )
        in_features, groups = x.shape[-1], self.feature_group_count
        if in_features % groups:
            raise EffaxError(
                f"Conv: {in_features} input features are not divisible by feature_group_count={groups}."
            )
        kernel_shape = kernel_size + (in_features // groups, self.features)
        kernel = param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = promote(self.dtype, x, kernel, bias)
        batch = x.shape[: x.ndim - n - 1]
        x = x.reshape((int(np.prod(batch)),) + x.shape[len(batch) :])
        dilation = _tuple(self.kernel_dilation, n, "kernel_dilation")
        spec = (0, n + 1) + tuple(range(1, n + 1))  # N, C, spatial... of channels-last inputs
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=_tuple(self.strides, n, "strides"),
            padding=_padding(self.padding, kernel_size, dilation),
            lhs_dilation=_tuple(self.input_dilation, n, "input_dilation"),
            rhs_dilation=dilation,
            dimension_numbers=jax.lax.ConvDimensionNumbers(spec, (n + 1, n) + tuple(range(n)), spec),
            feature_group_count=groups,
        )
        if bias is not None:
            y = y + bias
        return y.reshape(batch + y.shape[1:])


class Embed(Module):
    """A lookup table `embedding` of shape `(num_embeddings, features)`; `attend` is the tied output layer.

    >>> def lm(tokens):
    ...     embed = fx.nn.Embed(10, 4)
    ...     return embed.attend(embed(tokens))   # logits over the 10 tokens, same table
    >>> t = fx.transform(lm)
    >>> v = t.init(jax.random.key(0), jnp.array([1, 2]))
    >>> v["params"]["Embed_0"]["embedding"].shape, t.apply(v, jnp.array([1, 2])).shape
    ((10, 4), (2, 10))
    """

    num_embeddings: int
    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    embedding_init: Initializer = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)

    def _table(self) -> jax.Array:
        shape = (self.num_embeddings, self.features)
        return param("embedding", self.embedding_init, shape, self.param_dtype)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        inputs = jnp.asarray(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise EffaxError(
                f"Embed takes integer ids, got {inputs.dtype}: cast them (`ids.astype(jnp.int32)`)."
            )
        (table,) = promote(self.dtype, self._table())
        return jnp.take(table, inputs, axis=0)

    def attend(self, query: jax.Array) -> jax.Array:
        """`query @ embedding.T`: logits over the table, sharing the input embedding's weights."""
        query, table = promote(self.dtype, query, self._table())
        return jnp.matmul(query, table.T)
