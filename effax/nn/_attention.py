"""`MultiHeadAttention`: the projections, param layout and decode cache of Flax's `MultiHeadDotProductAttention`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from effax.core import EffaxError
from effax.effects import is_training, local_state, next_key, side_input
from effax.nn._dropout import dropout
from effax.nn._linear import DenseGeneral, Initializer, default_kernel_init, zeros
from effax.nn._module import Module, where
from effax.nn._partitioning import LogicalInit, axes_of


def attention_with_dropout(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: Any, rate: float, key: jax.Array, broadcast: bool
) -> jax.Array:
    """Dot-product attention with dropout on the weights, which `jax.nn.dot_product_attention` lacks.

    Shapes `(batch..., length, heads, head_dim)`; `mask` broadcasts to
    `(batch..., heads, q_length, kv_length)`, True where attending.
    """
    q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32))).astype(q.dtype)
    weights = dropout(weights, rate, key, tuple(range(weights.ndim - 2)) if broadcast else ())
    return jnp.einsum("...hqk,...khd->...qhd", weights, v)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Any) -> jax.Array:
    """`jax.nn.dot_product_attention` over any number of batch dims (it takes one)."""
    batch, (tq, h, d), tk = q.shape[:-3], q.shape[-3:], k.shape[-3]
    flat = lambda a: a.reshape((-1,) + a.shape[-3:])
    if mask is not None:
        mask = jnp.broadcast_to(mask, batch + (h, tq, tk)).reshape((-1, h, tq, tk))
    out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=mask)
    return out.reshape(batch + (tq, h, d))


def _rotated(init: Initializer) -> Initializer:
    """The `out` kernel's initializer from `kernel_init`: axes `(in, heads, kv)` become `(heads, kv, in)`."""
    axes = axes_of(init)
    if axes is None or len(axes) != 3:
        return init
    return LogicalInit(init.init, axes[1:] + axes[:1])  # type: ignore[attr-defined]


class MultiHeadAttention(Module):
    """Multi-head dot-product attention: `query`, `key`, `value` and `out` projections, as in Flax.

    The projections are `DenseGeneral` layers: kernels `query/kernel: (in,
    heads, head_dim)` and `out/kernel: (heads, head_dim, out)`. The mask
    (True = attend) is the `mask` argument, the side input `mask_tag`
    (`"attention_mask"`; None to not ask) and the causal mask when `causal`,
    all combined. Attention dropout draws from `"dropout"` only when training.
    `out_kernel_init`/`out_bias_init` default to `kernel_init`/`bias_init`;
    logical axes on `kernel_init` name `(in, heads, head_dim)` and the `out`
    kernel takes them rotated, `(heads, head_dim, in)`.

    **Decoding** (`decode=True`, Flax's semantics): keys and values are kept
    in the `"cache"` collection (`cached_key`, `cached_value` of shape
    `(batch..., max_length, heads, head_dim)`, and `cache_index`, the
    position of the next token). `init` on a `max_length`-long input creates
    the cache; each call then writes its `T` tokens (one, or a whole prompt)
    at `cache_index`, attends causally over the cache, and advances the
    index. Writing the cache is inference state, so run the step with
    `fx.handlers.eval(mutable=["cache"])` and carry the returned cache to the
    next step. Stop at `max_length` tokens: the cache does not slide.

    >>> def f(x):
    ...     return fx.nn.MultiHeadAttention(num_heads=2, causal=True)(x)
    >>> t = fx.transform(f)
    >>> x = jnp.ones((1, 5, 8))
    >>> v = t.init(jax.random.key(0), x)
    >>> v["params"]["MultiHeadAttention_0"]["query"]["kernel"].shape, t.apply(v, x).shape
    ((8, 2, 4), (1, 5, 8))

    Decoding token by token gives what the full causal pass gives:

    >>> d = fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=2, decode=True)(x))
    >>> cache = d.init(jax.random.key(0), x)["cache"]          # max_length 5
    >>> jax.tree.map(jnp.shape, cache["MultiHeadAttention_0"])
    {'cache_index': (), 'cached_key': (1, 5, 2, 4), 'cached_value': (1, 5, 2, 4)}
    >>> xs = jax.random.normal(jax.random.key(1), (1, 5, 8))
    >>> for i in range(5):
    ...     y, upd = d.apply({**v, "cache": cache}, xs[:, i:i + 1], handlers=fx.handlers.eval(mutable=["cache"]))
    ...     cache = upd["cache"]
    >>> bool(jnp.allclose(y[:, 0], t.apply(v, xs)[:, 4], atol=1e-5))
    True
    """

    num_heads: int
    qkv_features: int | None = None
    out_features: int | None = None
    causal: bool = False
    dropout_rate: float = 0.0
    broadcast_dropout: bool = True
    deterministic: bool | None = None
    mask_tag: str | None = "attention_mask"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros
    out_kernel_init: Initializer | None = None
    out_bias_init: Initializer | None = None
    decode: bool = False

    def _dense(self, name: str, features: Any, axis: Any, kernel_init: Initializer, bias_init: Initializer) -> Any:
        return DenseGeneral(
            features, axis=axis, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=kernel_init, bias_init=bias_init, name=name,
        )

    def _mask(self, mask: Any, tq: int, tk: int) -> list[Any]:
        masks = [] if mask is None else [jnp.asarray(mask, bool)]
        if self.mask_tag is not None:
            given = side_input(self.mask_tag, default=None)
            if given is not None:
                masks.append(jnp.asarray(given, bool))
        if self.causal and not self.decode:  # a decode step's cache mask is causal already
            masks.append(jnp.tril(jnp.ones((tq, tk), bool), tk - tq))
        return masks

    def _cached(self, key: jax.Array, value: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Write this call's keys and values into the cache at `cache_index`; the keys, values and mask to use."""
        k_cache = local_state("cached_key", lambda: jnp.zeros(key.shape, key.dtype), collection="cache")
        v_cache = local_state("cached_value", lambda: jnp.zeros(value.shape, value.dtype), collection="cache")
        index = local_state("cache_index", lambda: jnp.array(0, jnp.int32), collection="cache")
        cached_key, cached_value, i = k_cache.get(), v_cache.get(), index.get()
        length, steps = cached_key.shape[-3], key.shape[-3]
        if cached_key.shape[:-3] != key.shape[:-3] or cached_key.shape[-2:] != key.shape[-2:] or steps > length:
            raise EffaxError(
                f"{where('MultiHeadAttention')} (decode=True): the cache holds keys of shape {cached_key.shape} "
                f"(batch..., max_length, heads, head_dim), but this call brings {key.shape}. Decode "
                "with the batch shape the cache was made with (`init` on a `(batch, max_length, "
                "features)` input), at most max_length tokens per call."
            )
        start = (0,) * (key.ndim - 3) + (i, 0, 0)
        cached_key = jax.lax.dynamic_update_slice(cached_key, key.astype(cached_key.dtype), start)
        cached_value = jax.lax.dynamic_update_slice(cached_value, value.astype(cached_value.dtype), start)
        k_cache.set(cached_key)
        v_cache.set(cached_value)
        index.set(i + steps)
        # the query at position i + q sees the cached positions j <= i + q
        mask = jnp.arange(length)[None, :] <= (i + jnp.arange(steps))[:, None]
        # a cache kept in another dtype (bfloat16 to halve its memory) is read back in the computation's
        return cached_key.astype(key.dtype), cached_value.astype(value.dtype), mask

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask: Any = None,
        deterministic: bool | None = None,
    ) -> jax.Array:
        inputs_q = jnp.asarray(inputs_q)
        inputs_k = inputs_q if inputs_k is None else jnp.asarray(inputs_k)
        inputs_v = inputs_k if inputs_v is None else jnp.asarray(inputs_v)
        if min(inputs_q.ndim, inputs_k.ndim, inputs_v.ndim) < 2:
            raise EffaxError(
                f"{where('MultiHeadAttention')} takes inputs (batch..., length, features), got shapes "
                f"{inputs_q.shape}, {inputs_k.shape}, {inputs_v.shape} (query, key, value): a single token "
                "is `x[None]`, of shape (1, features)."
            )
        qkv = self.qkv_features or inputs_q.shape[-1]
        if qkv % self.num_heads:
            raise EffaxError(
                f"{where('MultiHeadAttention')}: qkv_features={qkv} is not divisible by num_heads={self.num_heads}."
            )
        heads = (self.num_heads, qkv // self.num_heads)
        q = self._dense("query", heads, -1, self.kernel_init, self.bias_init)(inputs_q)
        k = self._dense("key", heads, -1, self.kernel_init, self.bias_init)(inputs_k)
        v = self._dense("value", heads, -1, self.kernel_init, self.bias_init)(inputs_v)
        masks = self._mask(mask, q.shape[-3], k.shape[-3])
        if self.decode:
            k, v, cache_mask = self._cached(k, v)
            masks.append(cache_mask)
        combined = None
        for m in masks:
            combined = m if combined is None else jnp.logical_and(combined, m)
        if deterministic is None:
            deterministic = self.deterministic
        if self.dropout_rate > 0.0 and (is_training() if deterministic is None else not deterministic):
            out = attention_with_dropout(
                q, k, v, combined, self.dropout_rate, next_key("dropout"), self.broadcast_dropout
            )
        else:
            out = _attention(q, k, v, combined)
        out_kernel_init = _rotated(self.kernel_init) if self.out_kernel_init is None else self.out_kernel_init
        out_bias_init = self.bias_init if self.out_bias_init is None else self.out_bias_init
        features = self.out_features or inputs_q.shape[-1]
        return self._dense("out", features, (-2, -1), out_kernel_init, out_bias_init)(out)
