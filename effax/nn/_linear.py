"""Linear layers: `Dense`, `DenseGeneral`, `Conv`, `ConvTranspose`, `Embed`; names and layouts as in Flax linen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effax.core import EffaxError
from effax.effects import param
from effax.nn._fields import (
    TRANSPOSE_PADDINGS,
    check_layer,
    check_padding,
    check_positive,
)
from effax.nn._module import Module, where
from effax.nn._partitioning import LogicalInit, axes_of, layer_param, output_axes

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
default_kernel_init: Initializer = jax.nn.initializers.lecun_normal()
zeros: Initializer = jax.nn.initializers.zeros
_F32 = jnp.float32


def check_sizes(module: Any, *fields: str, several: tuple[str, ...] = ()) -> None:
    """Refuse a layer size that is not a positive int (`Dense("4")`, `Dense(2.5)`); `several` may be sequences.

    Run once when the layer is built (`__post_init__`), never per call.
    """
    for field in fields + several:
        value = getattr(module, field)
        if type(value) is int and value > 0:  # the usual case, decided at once
            continue
        seq = field in several and not isinstance(value, (str, bytes)) and hasattr(value, "__iter__")
        dims = tuple(value) if seq else (value,)
        if dims and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in dims):
            continue
        kind = "a positive int" + (" or a sequence of them" if field in several else "")
        name = type(module).__name__
        raise EffaxError(
            f"{name}({field}={value!r}): `{field}` must be {kind}, got {type(value).__name__}. Write "
            f"e.g. `{name}({field}=4)`; a size read from a config file or a string needs `int(...)` first."
        )


def promote(dtype: Any, *arrays: Any) -> tuple[jax.Array, ...]:
    """Cast `arrays` to `dtype`, or to their common type when `dtype` is None (Flax's rule)."""
    dtypes = {getattr(a, "dtype", None) for a in arrays if a is not None}
    if len(dtypes) == 1 and None not in dtypes and (dtype is None or dtypes.pop() == dtype):
        return arrays  # already one dtype: no cast, and no trace-time cost for the common case
    dtype = jnp.result_type(*arrays) if dtype is None else dtype
    return tuple(None if a is None else jnp.asarray(a, dtype) for a in arrays)


class Dense(Module):
    """`y = x @ kernel + bias` over the last axis; `kernel` is `(in, features)` as in Flax.

    `precision` goes to the matmul (`jax.lax.Precision` or a string such as
    `"highest"`), as Flax's.

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
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros

    def __post_init__(self) -> None:
        if type(self.features) is not int or self.features <= 0:  # the usual size is decided inline
            check_sizes(self, "features")
        if type(self.use_bias) is not bool or self.dtype is not None or self.param_dtype is not _F32:  # not defaults
            check_layer(self, ("use_bias",))

    def __call__(self, x: jax.Array) -> jax.Array:
        array = isinstance(x, jax.Array)  # then shapes and dtypes are read off `aval`, without a Python frame
        try:
            n_in = x.aval.shape[-1] if array else jnp.shape(x)[-1]
        except IndexError:  # a scalar
            raise EffaxError(
                f"{where('Dense')} maps the last axis of its input, but got a scalar: give it at least one "
                "axis, `x[None]` or `x.reshape(1)`."
            ) from None
        init = self.kernel_init
        axes = init.axes if isinstance(init, LogicalInit) else None  # `axes_of` inline, as below
        kernel = param("kernel", init, (n_in, self.features), self.param_dtype, axes=axes)
        bias = None
        if self.use_bias:  # the bias takes its initializer's axes, else the kernel's output axis
            init = self.bias_init
            bias_axes = (init.axes if isinstance(init, LogicalInit) else None) or (None if axes is None else axes[-1:])
            bias = param("bias", init, (self.features,), self.param_dtype, axes=bias_axes)
        plain = array and isinstance(kernel, jax.Array) and (bias is None or isinstance(bias, jax.Array))
        if plain:
            dtype = kernel.aval.dtype
            plain = x.aval.dtype == dtype and (bias is None or bias.aval.dtype == dtype) and self.dtype in (None, dtype)
        if not plain:  # one dtype already (the usual case): no call
            x, kernel, bias = promote(self.dtype, x, kernel, bias)
        y = jnp.matmul(x, kernel, precision=self.precision)
        return y if bias is None else y + bias


def check_axes(axes: tuple[int, ...], ndim: int, kind: str, field: str) -> None:
    """Refuse an axis out of range for an input of rank `ndim`, as Flax does: wrapped round, it would silently
    act on another axis of an input of another rank."""
    if any(not -ndim <= a < ndim for a in axes):
        raise EffaxError(
            f"{where(kind)}: {field}={axes[0] if len(axes) == 1 else axes} is out of range for an input of "
            f"rank {ndim}: axes run from {-ndim} to {ndim - 1}. Count the axes of this layer's input (negative "
            "axes count from the end: -1 is the features)."
        )


def _as_tuple(value: int | Sequence[int]) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


class _Flattened:
    """Run `init` on the flat 2-D (or, for a bias, 1-D) shape of a param and reshape: Flax's `DenseGeneral` rule.

    Hashable by value, so layers with equal settings share one cached initializer trace.
    """

    __slots__ = ("init", "n_in")

    def __init__(self, init: Initializer, n_in: int | None):
        self.init, self.n_in = init, n_in

    def __eq__(self, other: object) -> bool:
        return type(other) is _Flattened and (self.init, self.n_in) == (other.init, other.n_in)

    def __hash__(self) -> int:
        return hash((_Flattened, self.init, self.n_in))

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        if self.n_in is None:
            flat: tuple[int, ...] = (int(np.prod(shape)),)
        else:
            flat = (int(np.prod(shape[: self.n_in])), int(np.prod(shape[self.n_in :])))
        return jnp.reshape(self.init(key, flat, dtype), shape)


def _flat_param(name: str, init: Initializer, shape: tuple[int, ...], dtype: Any, n_in: int | None, axes: Any) -> Any:
    """A `DenseGeneral` param: initialized on its flat shape, named with the axes of `init` (else `axes`)."""
    flat = (int(np.prod(shape)),) if n_in is None else (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))
    own = axes_of(init)
    axes = own if own is not None else (axes if axes is not None and len(axes) == len(shape) else None)
    return param(name, init if flat == shape else _Flattened(init, n_in), shape, dtype, axes=axes)


class DenseGeneral(Module):
    """A linear map over several axes at once (`axis`) to several output axes (`features`), as Flax's.

    The kernel is `(*batch_shape, *contracted input dims, *features)` and the
    bias `(*batch_shape, *features)`; initializers see the flat 2-D shape
    `(inputs, outputs)`, as in Flax, so `lecun_normal` has the right fan-in.
    `batch_dims` (leading axes, each with its own kernel) are Flax's too.
    `axis` is sorted, as Flax sorts it: `axis=(-1, -2)` is `(-2, -1)`.
    `precision` goes to the `dot_general`.

    >>> t = fx.transform(lambda x: fx.nn.DenseGeneral((2, 3), axis=(-2, -1))(x))
    >>> v = t.init(jax.random.key(0), jnp.ones((5, 4, 6)))
    >>> jax.tree.map(jnp.shape, v["params"])
    {'DenseGeneral_0': {'bias': (2, 3), 'kernel': (4, 6, 2, 3)}}
    >>> t.apply(v, jnp.ones((5, 4, 6))).shape
    (5, 2, 3)
    """

    features: int | Sequence[int]
    axis: int | Sequence[int] = -1
    batch_dims: Sequence[int] = ()
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros
    precision: Any = None

    def __post_init__(self) -> None:
        check_sizes(self, several=("features",))
        check_layer(self, ("use_bias",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        features, ndim = _as_tuple(self.features), x.ndim
        for field in ("axis", "batch_dims"):
            check_axes(_as_tuple(getattr(self, field)), ndim, "DenseGeneral", field)
        batch_dims = tuple(sorted(d % ndim for d in _as_tuple(self.batch_dims)))
        if batch_dims and batch_dims != tuple(range(len(batch_dims))):
            raise EffaxError(
                f"{where('DenseGeneral')}: batch_dims {tuple(self.batch_dims)} must be consecutive leading axes "
                f"starting from 0, e.g. `batch_dims=(0, 1)`."
            )
        axis = tuple(sorted(a % ndim for a in _as_tuple(self.axis)))  # sorted, as Flax's `_normalize_axes`
        if len(set(axis)) != len(axis):
            raise EffaxError(
                f"{where('DenseGeneral')}: axis={self.axis} names the same axis of this rank-{ndim} input twice "
                f"(as {axis}); list each contracted axis once, e.g. `axis=(-2, -1)`."
            )
        if set(axis) & set(batch_dims):
            raise EffaxError(f"{where('DenseGeneral')}: axis {self.axis} and batch_dims {self.batch_dims} overlap.")
        nb, na, nf = len(batch_dims), len(axis), len(features)
        batch_shape = tuple(x.shape[d] for d in batch_dims)
        kernel_shape = batch_shape + tuple(x.shape[a] for a in axis) + features
        kernel = _flat_param("kernel", self.kernel_init, kernel_shape, self.param_dtype, nb + na, None)
        bias = None
        if self.use_bias:
            bias_axes = output_axes(self.kernel_init, nf)
            if bias_axes is not None and nb:
                bias_axes = axes_of(self.kernel_init)[:nb] + bias_axes  # type: ignore[index]
            bias = _flat_param("bias", self.bias_init, batch_shape + features, self.param_dtype, None, bias_axes)
        x, kernel, bias = promote(self.dtype, x, kernel, bias)
        contract = tuple(range(nb, nb + na))
        y = jax.lax.dot_general(x, kernel, ((axis, contract), (batch_dims, tuple(range(nb)))), self.precision)
        if bias is None:
            return y
        expanded = tuple(x.shape[a] if a in batch_dims else 1 for a in range(ndim) if a not in axis)
        return y + jnp.reshape(bias, expanded + features)


def _kernel_size(value: int | Sequence[int]) -> tuple[int, ...]:
    """`kernel_size` as a tuple: an int `k` is `(k,)`, a 1-D kernel, as Flax reads it (not `(k,) * rank`)."""
    return (int(value),) if isinstance(value, (int, np.integer)) else tuple(value)


def _tuple(value: int | Sequence[int] | None, n: int, what: str, layer: str = "Conv") -> tuple[int, ...]:
    """A stride or dilation, one per spatial dim: an int (or None, Flax's old spelling of 1) is broadcast."""
    if value is None:
        value = 1
    if isinstance(value, (int, np.integer)):
        return (int(value),) * n
    value = tuple(value)
    if len(value) != n:
        raise EffaxError(f"{where(layer)}: {what} {value} has {len(value)} entries, but kernel_size has {n}.")
    return value


def _padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> Any:
    """`conv_general_dilated`'s padding; `'CIRCULAR'`/`'REFLECT'` stay strings (`Conv` pads the input itself)."""
    if isinstance(padding, str):
        if padding.upper() in ("CIRCULAR", "REFLECT"):
            return padding.upper()
        if padding.upper() == "CAUSAL":
            if len(kernel) != 1:
                raise EffaxError(f"{where('Conv')}: padding='CAUSAL' is for 1-D convolutions; kernel_size is {kernel}.")
            return [((kernel[0] - 1) * dilation[0], 0)]
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * len(kernel)
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


class Conv(Module):
    """An N-D convolution over channels-last inputs `(batch..., *spatial, features)`, as Flax's `Conv`.

    `kernel_size` is a tuple: `(3,)` for 1-D, `(3, 3)` for 2-D; an int `k`
    is `(k,)`, 1-D, as in Flax (strides and dilations given as one int are
    broadcast to every spatial dim; None is 1, as Flax's). The kernel
    is `(*kernel_size, in_features // feature_group_count, features)`.
    `padding` is `'SAME'`, `'VALID'`, `'CIRCULAR'` (periodic), `'REFLECT'`,
    `'CAUSAL'` (1-D), an int, or per-dim ints or pairs, as in Flax.
    `mask` (the kernel's shape) multiplies the kernel, as Flax's.
    `precision` goes to the convolution.

    >>> t = fx.transform(lambda x: fx.nn.Conv(4, (3, 3))(x))
    >>> v = t.init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))
    >>> v["params"]["Conv_0"]["kernel"].shape, t.apply(v, jnp.ones((1, 8, 8, 2))).shape
    ((3, 3, 2, 4), (1, 8, 8, 4))
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] | None = 1
    padding: str | int | Sequence[Any] = "SAME"
    input_dilation: int | Sequence[int] | None = 1
    kernel_dilation: int | Sequence[int] | None = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros
    mask: Any = None  # multiplies the kernel (Flax's `mask`): zeros cut connections, e.g. a causal 2-D kernel

    def __post_init__(self) -> None:
        check_sizes(self, "features", "feature_group_count", several=("kernel_size",))
        check_positive(self, optional=("strides", "input_dilation", "kernel_dilation"))
        check_padding(self)
        dilated = self.input_dilation not in (1, None) and set(_as_tuple(self.input_dilation)) != {1}
        if dilated and isinstance(self.padding, str) and self.padding.upper() != "CAUSAL":
            raise EffaxError(
                f"Conv(input_dilation={self.input_dilation!r}, padding={self.padding!r}): JAX's convolution takes "
                "no padding by name when the input is dilated; give it as ints, one `(low, high)` pair per "
                "spatial dim (`padding=((1, 1),)`), or upsample with `fx.nn.ConvTranspose`."
            )
        check_layer(self, ("use_bias",))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_size = _kernel_size(self.kernel_size)
        n = len(kernel_size)
        x = jnp.asarray(x)
        if x.ndim < n + 1:
            raise EffaxError(
                f"{where('Conv')} with kernel_size {kernel_size} needs inputs (batch..., {n} spatial dims, "
                f"features), got shape {x.shape}."
            )
        in_features, groups = x.shape[-1], self.feature_group_count
        if in_features % groups:
            raise EffaxError(
                f"{where('Conv')}: {in_features} input features are not divisible by feature_group_count={groups}."
            )
        kernel_shape = kernel_size + (in_features // groups, self.features)
        if self.mask is not None and tuple(self.mask.shape) != kernel_shape:
            raise EffaxError(
                f"{where('Conv')}: mask has shape {tuple(self.mask.shape)}, but the kernel is {kernel_shape}."
            )
        kernel = layer_param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        if self.mask is not None:
            kernel = kernel * self.mask
        bias = None
        if self.use_bias:
            bias_axes = output_axes(self.kernel_init, 1)
            bias = layer_param("bias", self.bias_init, (self.features,), self.param_dtype, bias_axes)
        x, kernel, bias = promote(self.dtype, x, kernel, bias)
        batch = x.shape[: x.ndim - n - 1]
        x = x.reshape((int(np.prod(batch)),) + x.shape[len(batch) :])
        dilation = _tuple(self.kernel_dilation, n, "kernel_dilation")
        padding = _padding(self.padding, kernel_size, dilation)
        if padding in ("CIRCULAR", "REFLECT"):  # Flax: pad the input (periodically or mirrored), then VALID
            spans = [(k - 1) * d for k, d in zip(kernel_size, dilation, strict=True)]
            pads = [(0, 0)] + [(span // 2, (span + 1) // 2) for span in spans] + [(0, 0)]
            x = jnp.pad(x, pads, mode="wrap" if padding == "CIRCULAR" else "reflect")
            padding = "VALID"
        spec = (0, n + 1) + tuple(range(1, n + 1))  # N, C, spatial... of channels-last inputs
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=_tuple(self.strides, n, "strides"),
            padding=padding,
            lhs_dilation=_tuple(self.input_dilation, n, "input_dilation"),
            rhs_dilation=dilation,
            dimension_numbers=jax.lax.ConvDimensionNumbers(spec, (n + 1, n) + tuple(range(n)), spec),
            feature_group_count=groups,
            precision=self.precision,
        )
        if bias is not None:
            y = y + bias
        return y.reshape(batch + y.shape[1:])


def _conv_padding(padding: Any, n: int) -> Any:
    """Flax's `canonicalize_padding`: a string, or `n` `(low, high)` pairs."""
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * n
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) == 1 and n > 1:
        pads = pads * n
    if len(pads) != n:
        raise EffaxError(f"{where('ConvTranspose')}: padding {padding!r} has {len(pads)} entries for {n} spatial dims.")
    return pads


class ConvTranspose(Module):
    """A transposed ("deconvolution") N-D convolution over channels-last inputs, as Flax's `ConvTranspose`.

    The kernel is `(*kernel_size, in_features, features)` (`(*kernel_size,
    features, in_features)` with `transpose_kernel=True`, which makes it the
    exact gradient of a `Conv` with the same kernel). Strides upsample:
    `'SAME'` padding with stride 2 doubles each spatial dim. `'CIRCULAR'`
    padding wraps the output periodically, as in Flax. `precision` goes to
    the convolution.

    >>> t = fx.transform(lambda x: fx.nn.ConvTranspose(3, (2, 2), strides=2)(x))
    >>> v = t.init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
    >>> v["params"]["ConvTranspose_0"]["kernel"].shape, t.apply(v, jnp.ones((1, 4, 4, 2))).shape
    ((2, 2, 2, 3), (1, 8, 8, 3))
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] | None = None
    padding: str | int | Sequence[Any] = "SAME"
    kernel_dilation: int | Sequence[int] | None = None
    use_bias: bool = True
    mask: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros
    transpose_kernel: bool = False

    def __post_init__(self) -> None:
        check_sizes(self, "features", several=("kernel_size",))
        check_positive(self, optional=("strides", "kernel_dilation"))
        check_padding(self, TRANSPOSE_PADDINGS)
        check_layer(self, ("use_bias", "transpose_kernel"))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_size = _kernel_size(self.kernel_size)
        n = len(kernel_size)
        x = jnp.asarray(x)
        if x.ndim < n + 1:
            raise EffaxError(
                f"{where('ConvTranspose')} with kernel_size {kernel_size} needs inputs (batch..., {n} spatial dims, "
                f"features), got shape {x.shape}."
            )
        batch = x.shape[: x.ndim - n - 1]
        x = x.reshape((int(np.prod(batch)),) + x.shape[len(batch) :])  # not -1: a zero-size axis is allowed
        strides = _tuple(self.strides, n, "strides", "ConvTranspose")
        dilation = _tuple(self.kernel_dilation, n, "kernel_dilation", "ConvTranspose")
        in_features = x.shape[-1]
        if self.transpose_kernel:
            kernel_shape = kernel_size + (self.features, in_features)
        else:
            kernel_shape = kernel_size + (in_features, self.features)
        if self.mask is not None and tuple(self.mask.shape) != kernel_shape:
            raise EffaxError(
                f"{where('ConvTranspose')}: mask has shape {tuple(self.mask.shape)}, but the kernel is {kernel_shape}."
            )
        kernel = layer_param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        if self.mask is not None:
            kernel = kernel * self.mask
        padding = _conv_padding(self.padding, n)
        circular = padding == "CIRCULAR"
        bias = None
        if self.use_bias:
            out_axes = output_axes(self.kernel_init, 2)
            bias_axes = None if out_axes is None else (out_axes[0 if self.transpose_kernel else 1],)
            bias = layer_param("bias", self.bias_init, (self.features,), self.param_dtype, bias_axes)
        x, kernel, bias = promote(self.dtype, x, kernel, bias)
        y = jax.lax.conv_transpose(
            x,
            kernel,
            strides,
            "VALID" if circular else padding,
            rhs_dilation=dilation,
            precision=self.precision,
            transpose_kernel=self.transpose_kernel,
        )
        if circular:
            y = _wrap_circular(y, x.shape[1:-1], strides, self.transpose_kernel)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y.reshape(batch + y.shape[1:])


def _wrap_circular(y: jax.Array, in_dims: tuple[int, ...], strides: tuple[int, ...], transposed: bool) -> jax.Array:
    """Flax's `'CIRCULAR'` transposed convolution: pad to whole periods, then fold each spatial dim."""
    periods = [d * s for d, s in zip(in_dims, strides, strict=True)]
    diffs = [-(yd - p) % (2 * p) for yd, p in zip(y.shape[1:-1], periods, strict=True)]
    if transposed:
        pads = [(d // 2, (d + 1) // 2) for d in diffs]
    else:
        pads = [((d + 1) // 2, d // 2) for d in diffs]
    y = jnp.pad(y, [(0, 0)] + pads + [(0, 0)])
    for i in range(1, y.ndim - 1):
        y = y.reshape(y.shape[:i] + (-1, periods[i - 1]) + y.shape[i + 1 :]).sum(axis=i)
    return y


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

    def __post_init__(self) -> None:
        check_sizes(self, "num_embeddings", "features")
        check_layer(self, ())

    def _table(self) -> jax.Array:
        shape = (self.num_embeddings, self.features)
        return layer_param("embedding", self.embedding_init, shape, self.param_dtype)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        inputs = jnp.asarray(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise EffaxError(
                f"{where('Embed')} takes integer ids, got {inputs.dtype}: cast them (`ids.astype(jnp.int32)`)."
            )
        (table,) = promote(self.dtype, self._table())
        return jnp.take(table, inputs, axis=0)

    def attend(self, query: jax.Array) -> jax.Array:
        """`query @ embedding.T`: logits over the table, sharing the input embedding's weights."""
        width = jnp.shape(query)[-1:]
        if width != (self.features,):
            raise EffaxError(
                f"{where('Embed')}.attend: the query's last axis must be the embedding width, features="
                f"{self.features}, but the query has shape {jnp.shape(query)}. Give it vectors of the table's "
                f"width (project them first, e.g. `fx.nn.Dense({self.features})(h)`)."
            )
        query, table = promote(self.dtype, query, self._table())
        return jnp.matmul(query, table.T)
