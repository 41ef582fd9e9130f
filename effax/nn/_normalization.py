"""Normalization layers: `LayerNorm`, `RMSNorm`, `BatchNorm` (running stats as local state)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from effax.core import ShapeMismatchError, path_str
from effax.effects import is_initializing, is_training, local_state
from effax.nn._fields import check_bools, check_dtypes, check_layer
from effax.nn._linear import Initializer, check_axes
from effax.nn._module import Module
from effax.nn._partitioning import layer_param

ones: Initializer = jax.nn.initializers.ones
zeros: Initializer = jax.nn.initializers.zeros
_F32 = jnp.dtype(jnp.float32)
_F32_TYPE = jnp.float32


def _axes(axes: int | Sequence[int], ndim: int, kind: str, field: str = "reduction_axes") -> tuple[int, ...]:
    """`axes` of an input of rank `ndim`, non-negative and sorted; one out of range is refused."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    check_axes(axes, ndim, kind, field)
    return tuple(sorted(a % ndim for a in axes))


@functools.lru_cache(maxsize=1024)
def _layout(axis: Any, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], bool]:
    """`(reduced axes, feature sizes, broadcast shape, whether the features already line up last)` of an
    input to `BatchNorm`: a memo, read once per layer call, since eager calls pay for every Python step."""
    ndim = len(shape)
    feature_axes = _axes(axis, ndim, "BatchNorm", "axis")
    reduce = tuple(a for a in range(ndim) if a not in feature_axes)
    features = tuple(shape[a] for a in feature_axes)
    bshape = tuple(shape[a] if a in feature_axes else 1 for a in range(ndim))
    return reduce, features, bshape, feature_axes == tuple(range(ndim - len(features), ndim))


def _bcast(a: jax.Array, bshape: tuple[int, ...]) -> jax.Array:
    """`a.reshape(bshape)`, skipped when broadcasting already lines `a` up (features last): one op less per call."""
    shape = a.shape
    lead = len(bshape) - len(shape)
    if shape == bshape[lead:] and bshape[:lead].count(1) == lead:
        return a
    return a.reshape(bshape)


def _cast(x: jax.Array, dtype: Any) -> jax.Array:
    """`x.astype(dtype)`, skipped when `x` has that dtype already (eager calls pay for every op)."""
    return x if x.dtype == dtype else x.astype(dtype)


def _as_array(x: Any) -> jax.Array:
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def _scale_shift(
    module: Any, y: jax.Array, features: tuple[int, ...], bshape: tuple[int, ...]
) -> jax.Array:
    """Apply the learned `scale` and `bias` of shape `features`, broadcast as `bshape`."""
    if getattr(module, "use_scale", True):
        y = y * _bcast(layer_param("scale", module.scale_init, features, module.param_dtype), bshape)
    if getattr(module, "use_bias", False):
        y = y + _bcast(layer_param("bias", module.bias_init, features, module.param_dtype), bshape)
    return y


@functools.lru_cache(maxsize=256)
def _result_dtype(x_dtype: Any, param_dtype: Any) -> Any:
    """Flax's `canonicalize_dtype` of the input and the params (None: there are none), made inexact."""
    dtype = jnp.result_type(x_dtype) if param_dtype is None else jnp.result_type(x_dtype, param_dtype)
    return dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.promote_types(jnp.float32, dtype)


def _out_dtype(module: Any, x: jax.Array) -> Any:
    """The output dtype, as Flax's: `dtype`, else promoted from the input and only the params that exist."""
    if module.dtype is not None:
        return module.dtype
    has_params = getattr(module, "use_scale", True) or getattr(module, "use_bias", False)
    return _result_dtype(x.dtype, module.param_dtype if has_params else None)


def _feature_layout(feature_axes: Any, shape: tuple[int, ...], kind: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(feature sizes, broadcast shape)` of the `scale` and `bias` over `feature_axes`, as Flax's `_normalize`."""
    ndim = len(shape)
    if feature_axes == -1:  # the default, decided at once
        return shape[-1:], (1,) * (ndim - 1) + shape[-1:]
    axes = _axes(feature_axes, ndim, kind, "feature_axes")
    return tuple(shape[a] for a in axes), tuple(shape[a] if a in axes else 1 for a in range(ndim))


@functools.lru_cache(maxsize=256)
def _promoted(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def _stats_dtype(x: jax.Array) -> Any:
    return _promoted(x.dtype)  # statistics at least in float32, as Flax


def _canonical(dtype: Any) -> Any:
    try:
        return jax.dtypes.canonicalize_dtype(dtype)
    except TypeError:  # not a dtype JAX knows (a string array): shown as it is
        return dtype


def _moments(
    x: jax.Array, axes: tuple[int, ...], fast: bool, keepdims: bool = False, axis_name: Any = None
) -> tuple[jax.Array, jax.Array]:
    """`(mean, variance)` of `x` over `axes`, as Flax's `_compute_stats`, for every norm that centers.

    `fast` (Flax's default `use_fast_variance=True`) takes `E[x^2] - E[x]^2` in one pass, clipped at 0
    against round-off; otherwise `E[(x - mean)^2]`, slower but exact for inputs far from zero. `axis_name`
    averages the statistics over a mapped axis: both moments in one `pmean` when fast, else the mean
    first and the squared deviations from it after, as Flax does.
    """
    mean = x.mean(axes, keepdims=keepdims)
    if fast:
        mean2 = jnp.square(x).mean(axes, keepdims=keepdims)
        if axis_name is not None:
            mean, mean2 = jax.lax.pmean((mean, mean2), axis_name)
        return mean, jnp.maximum(0.0, mean2 - jnp.square(mean))
    if axis_name is None:  # Flax's mean of squared deviations, in one op (an eager call pays for each)
        return mean, x.var(axes, keepdims=keepdims)
    mean = jax.lax.pmean(mean, axis_name)
    centered = x - (mean if keepdims else jnp.expand_dims(mean, axes))
    return mean, jax.lax.pmean(jnp.square(centered).mean(axes, keepdims=keepdims), axis_name)


def _running(state: Any, features: tuple[int, ...], value: Any) -> jax.Array:
    """`value`, a running statistic as read from `state`, checked: stats of another shape or dtype name
    their path (not a reshape error deep inside, nor silently used at another precision)."""
    if isinstance(value, jax.Array) and (aval := value.aval).shape == features and aval.dtype == _F32:
        return value  # the usual case, decided at once (`aval` is read without a Python frame)
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and tuple(shape) == features and dtype is not None and _canonical(dtype) == jnp.float32:
        return value  # float64 read back from NumPy is float32 without x64, as everywhere in effax
    have = f"{jnp.dtype(dtype).name}{list(shape)}" if shape is not None and dtype is not None else type(value).__name__
    raise ShapeMismatchError(
        f"state `{path_str(state.path)}` in collection {state.collection!r} holds {have}, but this "
        f"BatchNorm needs float32{list(features)} (the size of its input's feature axes). The variables "
        "were made for another model or input width: re-run `t.init` for this model, or list every "
        "mismatch at once with `fx.check_variables(t, variables, x)`."
    )


class LayerNorm(Module):
    """Normalize each example over its last axis (or `reduction_axes`), then scale and shift.

    As Flax's: `scale` and `bias` are shaped over `feature_axes` (the last
    axis by default), and `use_fast_variance=True` (the default) takes the
    variance as `E[x^2] - E[x]^2` clipped at 0, in one pass; `False` takes
    `E[(x - mean)^2]`, slower but exact for inputs far from zero.

    >>> t = fx.transform(lambda x: fx.nn.LayerNorm()(x))
    >>> v = t.init(jax.random.key(0), jnp.ones((2, 3)))
    >>> jax.tree.map(jnp.shape, v["params"])
    {'LayerNorm_0': {'bias': (3,), 'scale': (3,)}}
    >>> t2 = fx.transform(lambda x: fx.nn.LayerNorm(reduction_axes=(1, 2), feature_axes=(1, 2))(x))
    >>> jax.tree.map(jnp.shape, t2.init(jax.random.key(0), jnp.ones((2, 3, 4)))["params"])
    {'LayerNorm_0': {'bias': (3, 4), 'scale': (3, 4)}}
    """

    epsilon: float = 1e-6
    use_bias: bool = True
    use_scale: bool = True
    reduction_axes: int | Sequence[int] = -1
    dtype: Any = None
    param_dtype: Any = jnp.float32
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    feature_axes: int | Sequence[int] = -1
    use_fast_variance: bool = True

    def __post_init__(self) -> None:
        if (  # the defaults, decided inline: a layer is built on every eager call
            type(self.use_bias) is not bool or type(self.use_scale) is not bool
            or type(self.use_fast_variance) is not bool or self.dtype is not None or self.param_dtype is not _F32_TYPE
        ):
            check_layer(self, ("use_bias", "use_scale", "use_fast_variance"))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _as_array(x)
        axes = _axes(self.reduction_axes, x.ndim, "LayerNorm")
        xs = _cast(x, _stats_dtype(x))
        mean, var = _moments(xs, axes, self.use_fast_variance, keepdims=True)
        y = (xs - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.feature_axes == -1:  # the default, inline: an eager call pays for each Python step
            features = x.shape[-1:]
            bshape = (1,) * (x.ndim - 1) + features
        else:
            features, bshape = _feature_layout(self.feature_axes, x.shape, "LayerNorm")
        y = _scale_shift(self, y, features, bshape)
        return _cast(y, _out_dtype(self, x))


class RMSNorm(Module):
    """Divide by the root mean square over the last axis (or `reduction_axes`), then scale; no centering.

    `scale` is shaped over `feature_axes` (the last axis by default), as in
    Flax. `use_fast_variance` is accepted for Flax's signature and changes
    nothing: without centering, the mean square is the only formula.

    >>> t = fx.transform(lambda x: fx.nn.RMSNorm()(x))
    >>> v = t.init(jax.random.key(0), jnp.ones((2, 3)))
    >>> t.apply(v, jnp.array([[3.0, 4.0, 0.0]])).round(2)   # rms = sqrt(25 / 3)
    Array([[1.04, 1.39, 0.  ]], dtype=float32)
    """

    epsilon: float = 1e-6
    use_scale: bool = True
    reduction_axes: int | Sequence[int] = -1
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Initializer = ones
    feature_axes: int | Sequence[int] = -1
    use_fast_variance: bool = True

    def __post_init__(self) -> None:
        check_layer(self, ("use_scale", "use_fast_variance"))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _as_array(x)
        axes = _axes(self.reduction_axes, x.ndim, "RMSNorm")
        xs = _cast(x, _stats_dtype(x))
        y = xs * jax.lax.rsqrt(jnp.square(xs).mean(axes, keepdims=True) + self.epsilon)
        features, bshape = _feature_layout(self.feature_axes, x.shape, "RMSNorm")
        y = _scale_shift(self, y, features, bshape)
        return _cast(y, _out_dtype(self, x))


class BatchNorm(Module):
    """Normalize over the batch: batch statistics (and a running-stats update) when training, running stats when not.

    The running `mean` and `var` live in the `batch_stats` collection, so a
    training step passes `mutable=["batch_stats"]` (or the `train` preset)
    and eval reads them frozen. `momentum` weights the old running value,
    as in Flax. `use_running_average` (field or call argument) overrides the mode.
    `axis_name` averages the statistics over a mapped axis (`jax.shard_map`,
    `fx.vmap(..., axis_name=...)`, `pmap`), so every device normalizes with
    the full batch's mean and variance (Flax's `axis_name`); under `init` it
    is not used, so a model can be initialized outside the mapped axis. Under
    `jax.jit` with a sharded batch no axis name is needed: the reduction
    already spans every device. The batch variance is `E[x^2] - E[x]^2`
    clipped at 0, in one pass (`use_fast_variance=True`, Flax's default), or
    `E[(x - mean)^2]` (`False`), slower but exact for features whose mean is
    large against their spread.

    >>> t = fx.transform(lambda x: fx.nn.BatchNorm()(x))
    >>> v = t.init(jax.random.key(0), jnp.ones((4, 3)))
    >>> sorted(v), sorted(v["batch_stats"]["BatchNorm_0"])
    (['batch_stats', 'params'], ['mean', 'var'])
    >>> y, upd = t.apply(v, jnp.arange(12.0).reshape(4, 3), training=True, mutable=["batch_stats"])
    >>> upd["batch_stats"]["BatchNorm_0"]["mean"]
    Array([0.045, 0.055, 0.065], dtype=float32)
    """

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    use_bias: bool = True
    use_scale: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    axis_name: Any = None
    use_fast_variance: bool = True

    def __post_init__(self) -> None:
        running = self.use_running_average
        if (  # the defaults, decided inline: a layer is built on every eager call
            type(self.use_bias) is not bool or type(self.use_scale) is not bool
            or type(self.use_fast_variance) is not bool
            or (running is not None and type(running) is not bool) or self.dtype is not None
            or self.param_dtype is not _F32_TYPE
        ):
            check_bools(self, "use_bias", "use_scale", "use_fast_variance", optional=("use_running_average",))
            check_dtypes(self, "dtype", "param_dtype")

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        aval = x.aval  # shape and dtype without a Python frame each
        # float32 in, float32 params, no `dtype`: no casts to decide (an eager call pays for each step)
        plain = self.dtype is None and self.param_dtype is jnp.float32 and aval.dtype == _F32
        try:
            reduce, features, bshape, last = _layout(self.axis, aval.shape)
        except TypeError:  # an unhashable `axis` (a list): no memo
            reduce, features, bshape, last = _layout.__wrapped__(self.axis, x.shape)
        mean_state = local_state("mean", lambda: jnp.zeros(features, jnp.float32), collection="batch_stats")
        var_state = local_state("var", lambda: jnp.ones(features, jnp.float32), collection="batch_stats")
        frozen = use_running_average if use_running_average is not None else self.use_running_average
        if frozen is None:
            frozen = not is_training()
        xs = x if plain else _cast(x, _stats_dtype(x))
        if frozen:
            mean, var = mean_state.get(), var_state.get()
            if not (  # float32 of the features' shape (the usual stats), decided here: read on every eager call
                isinstance(mean, jax.Array) and isinstance(var, jax.Array) and mean.aval.shape == var.aval.shape
                == features and mean.aval.dtype == var.aval.dtype == _F32
            ):
                mean, var = _running(mean_state, features, mean), _running(var_state, features, var)
        else:
            initializing = is_initializing()
            # init may run outside the mapped axis; and it does not step the running averages (Flax skips
            # the update too): init returns them at their initial values, and members of an `fx.vmap` that
            # broadcasts them would otherwise write different values
            mean, var = _moments(xs, reduce, self.use_fast_variance, axis_name=None if initializing else self.axis_name)
            if not initializing:
                m = self.momentum
                mean_state.set(m * _running(mean_state, features, mean_state.get()) + (1 - m) * mean)
                var_state.set(m * _running(var_state, features, var_state.get()) + (1 - m) * var)
        if not last:
            mean, var = mean.reshape(bshape), var.reshape(bshape)
        y = (xs - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale or self.use_bias:
            y = _scale_shift(self, y, features, bshape)
        return y if plain else _cast(y, _out_dtype(self, x))
