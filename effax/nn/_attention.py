"""`MultiHeadAttention`: the projections, param layout and decode cache of Flax's `MultiHeadDotProductAttention`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effax.core import EffaxError
from effax.effects import is_training, local_state, next_key, side_input, sow
from effax.nn._dropout import dropout
from effax.nn._fields import check_bools, check_dtypes, check_rate
from effax.nn._linear import DenseGeneral, Initializer, check_sizes, default_kernel_init, zeros
from effax.nn._module import Module, where
from effax.nn._normalization import LayerNorm
from effax.nn._partitioning import LogicalInit, axes_of


def attention_with_dropout(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Any,
    rate: float,
    key: jax.Array | None,
    broadcast: bool,
    *,
    precision: Any = None,
    force_fp32_for_softmax: bool = False,
    sow_weights: bool = False,
) -> jax.Array:
    """Dot-product attention with dropout on the weights, which `jax.nn.dot_product_attention` lacks.

    Shapes `(batch..., length, heads, head_dim)`; `mask` broadcasts to
    `(batch..., heads, q_length, kv_length)`, True where attending.
    `sow_weights` sows the weights (before dropout) as `attention_weights`,
    and `force_fp32_for_softmax` keeps them in float32, as Flax's.
    """
    q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, precision=precision)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    if force_fp32_for_softmax and logits.dtype != jnp.float32:  # Flax: the weights stay in float32
        weights = jax.nn.softmax(logits.astype(jnp.float32))
    else:
        weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32))).astype(q.dtype)
    if sow_weights:
        sow("attention_weights", weights)
    if rate > 0.0:
        weights = dropout(weights, rate, key, tuple(range(weights.ndim - 2)) if broadcast else ())
    return jnp.einsum("...hqk,...khd->...qhd", weights, v, precision=precision)


class _Sower:
    """The `module` a Flax `attention_fn` sows its weights through (`module.sow(collection, name, value)`)."""

    def sow(self, collection: str, name: str, value: Any, *args: Any, **kwargs: Any) -> bool:
        sow(name, value, collection=collection)
        return True


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Any) -> jax.Array:
    """`jax.nn.dot_product_attention` over any number of batch dims (it takes one)."""
    batch, (tq, h, d), tk = q.shape[:-3], q.shape[-3:], k.shape[-3]
    if not (tq and tk and np.prod(batch, dtype=int)):  # an empty axis: nothing to attend over (Flax's zeros)
        return jnp.zeros(batch + (tq, h, d), jnp.result_type(q, k, v))
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
    next step. Stop at `max_length` tokens: the cache does not slide. An
    eager call that would write past it raises `EffaxError`; under `jax.jit`,
    and inside `fx.scan`/`fx.vmap`/`fx.remat` (they trace their body, eager
    or not), the index is traced, so the loop must stop there itself (JAX
    would clip the write into the last slots, as Flax's cache does).

    >>> def f(x):
    ...     return fx.nn.MultiHeadAttention(num_heads=2, causal=True)(x)
    >>> t = fx.transform(f)
    >>> x = jnp.ones((1, 5, 8))
    >>> v = t.init(jax.random.key(0), x)
    >>> v["params"]["MultiHeadAttention_0"]["query"]["kernel"].shape, t.apply(v, x).shape
    ((8, 2, 4), (1, 5, 8))

    Flax's options: `normalize_qk` normalizes queries and keys with a
    `LayerNorm` each (`query_ln`, `key_ln`, scale only); `force_fp32_for_softmax`
    keeps the attention weights in float32; `precision` goes to every
    product; `attention_fn` replaces the attention core with a function of
    Flax's `dot_product_attention` signature (it gets the keyword arguments
    it names); the call argument `sow_weights=True` sows the weights as
    `attention_weights` in `"intermediates"` at the layer's path:

    >>> w = fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=2, normalize_qk=True)(x, sow_weights=True))
    >>> vw = w.init(jax.random.key(0), x)
    >>> sorted(vw["params"]["MultiHeadAttention_0"])
    ['key', 'key_ln', 'out', 'query', 'query_ln', 'value']
    >>> _, sown = w.apply(vw, x, mutable="intermediates")
    >>> sown["intermediates"]["MultiHeadAttention_0"]["attention_weights"][0].shape   # (batch, heads, q, k)
    (1, 2, 5, 5)

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
    precision: Any = None
    attention_fn: Callable[..., jax.Array] | None = None
    normalize_qk: bool = False
    force_fp32_for_softmax: bool = False

    def __post_init__(self) -> None:
        check_sizes(self, "num_heads", *(f for f in ("qkv_features", "out_features") if getattr(self, f) is not None))
        check_bools(self, "causal", "broadcast_dropout", "use_bias", "decode", "normalize_qk", "force_fp32_for_softmax",
                    optional=("deterministic",))
        check_dtypes(self, "dtype", "param_dtype")
        if self.dropout_rate != 0.0:
            check_rate(self, "dropout_rate")

    def _dense(self, name: str, features: Any, axis: Any, kernel_init: Initializer, bias_init: Initializer) -> Any:
        return DenseGeneral(
            features, axis=axis, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=kernel_init, bias_init=bias_init, precision=self.precision, name=name,
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

    def _check_mask(self, m: jax.Array, want: tuple[int, ...], given: bool) -> None:
        """Refuse a mask that does not broadcast to `want`, `(batch..., heads, q_length, kv_length)`."""
        try:
            fits = np.broadcast_shapes(m.shape, want) == want
        except ValueError:
            fits = False
        if not fits:
            what = "mask" if given else f"the side input {self.mask_tag!r}"
            raise EffaxError(
                f"{where('MultiHeadAttention')}: {what} of shape {m.shape} does not broadcast to (batch..., heads, "
                f"q_length, kv_length) = {want}. Give it one entry per query and key position, e.g. a key "
                "padding mask `keep` of shape (batch, kv_length) as `mask=keep[:, None, None, :]`."
            )

    def _custom_attention(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: Any, dropout_on: bool, sow_weights: bool
    ) -> jax.Array:
        """Call `attention_fn` as Flax does: the keyword arguments of `dot_product_attention` it takes."""
        kwargs = dict(
            mask=mask, dropout_rng=next_key("dropout") if dropout_on else None, dropout_rate=self.dropout_rate,
            broadcast_dropout=self.broadcast_dropout, deterministic=not dropout_on, dtype=self.dtype,
            precision=self.precision, force_fp32_for_softmax=self.force_fp32_for_softmax,
        )
        takes = inspect.signature(self.attention_fn).parameters  # type: ignore[arg-type]
        kwargs = {name: value for name, value in kwargs.items() if name in takes}
        if sow_weights:
            kwargs["module"] = _Sower()
        return self.attention_fn(q, k, v, **kwargs)  # type: ignore[misc]

    def _cached(self, key: jax.Array, value: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Write this call's keys and values into the cache at `cache_index`; the keys, values and mask to use."""
        k_cache = local_state("cached_key", lambda: jnp.zeros(key.shape, key.dtype), collection="cache")
        v_cache = local_state("cached_value", lambda: jnp.zeros(value.shape, value.dtype), collection="cache")
        index = local_state("cache_index", lambda: jnp.array(0, jnp.int32), collection="cache")
        cached_key, cached_value, i = k_cache.get(), v_cache.get(), index.get()
        length, steps = cached_key.shape[-3], key.shape[-3]
        if jnp.shape(i) != () or not jnp.issubdtype(jnp.result_type(i), jnp.integer):
            raise EffaxError(
                f"{where('MultiHeadAttention')} (decode=True): the cache's `cache_index` (in collection 'cache') "
                f"is {jnp.result_type(i).name}{list(jnp.shape(i))}, but it is the number of positions filled: an "
                "int scalar (int32[] as `init` makes it). Pass the cache `init` made, or fix the stored value: "
                "`jnp.asarray(index, jnp.int32)`."
            )
        if cached_key.shape[:-3] != key.shape[:-3] or cached_key.shape[-2:] != key.shape[-2:] or steps > length:
            raise EffaxError(
                f"{where('MultiHeadAttention')} (decode=True): the cache holds keys of shape {cached_key.shape} "
                f"(batch..., max_length, heads, head_dim), but this call brings {key.shape}. Decode "
                "with the batch shape the cache was made with (`init` on a `(batch, max_length, "
                "features)` input), at most max_length tokens per call."
            )
        if not isinstance(i, jax.core.Tracer) and int(i) + steps > length:  # eager: the index is known
            raise EffaxError(
                f"{where('MultiHeadAttention')} (decode=True): the cache holds {length} positions (max_length), "
                f"{int(i)} are filled, and this call brings {steps} more: it would write past the end (JAX clips "
                "such a write into the last slots, overwriting earlier keys). Stop at max_length tokens, or make "
                "a longer cache (`init` on a `(batch, longer_length, features)` input); a new sequence starts "
                "from the cache `init` made."
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
        sow_weights: bool = False,
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
        if inputs_q.shape[:-2] != inputs_k.shape[:-2] or inputs_k.shape[:-1] != inputs_v.shape[:-1]:
            raise EffaxError(
                f"{where('MultiHeadAttention')}: query, key and value must share their batch dims, and key and "
                f"value their length too; got shapes {inputs_q.shape}, {inputs_k.shape}, {inputs_v.shape} "
                "(batch..., length, features). Pair each query sequence with its own keys and values."
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
        if self.normalize_qk:  # Flax's QK normalization (arxiv.org/abs/2302.05442), same names
            ln = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
            q, k = LayerNorm(name="query_ln", **ln)(q), LayerNorm(name="key_ln", **ln)(k)
        masks = self._mask(mask, q.shape[-3], k.shape[-3])
        if self.decode:
            k, v, cache_mask = self._cached(k, v)
            masks.append(cache_mask)
        want = q.shape[:-3] + (self.num_heads, q.shape[-3], k.shape[-3])
        for i, m in enumerate(masks[: (mask is not None) + (self.mask_tag is not None)]):
            self._check_mask(m, want, given=i == 0 and mask is not None)
        combined = None
        for m in masks:
            combined = m if combined is None else jnp.logical_and(combined, m)
        if deterministic is None:
            deterministic = self.deterministic
        dropout_on = self.dropout_rate > 0.0 and (is_training() if deterministic is None else not deterministic)
        if self.attention_fn is not None:
            out = self._custom_attention(q, k, v, combined, dropout_on, sow_weights)
        elif dropout_on or sow_weights or self.force_fp32_for_softmax or self.precision is not None:
            out = attention_with_dropout(
                q, k, v, combined, self.dropout_rate if dropout_on else 0.0,
                next_key("dropout") if dropout_on else None, self.broadcast_dropout, precision=self.precision,
                force_fp32_for_softmax=self.force_fp32_for_softmax, sow_weights=sow_weights,
            )
        else:
            out = _attention(q, k, v, combined)
        out_kernel_init = _rotated(self.kernel_init) if self.out_kernel_init is None else self.out_kernel_init
        out_bias_init = self.bias_init if self.out_bias_init is None else self.out_bias_init
        features = self.out_features or inputs_q.shape[-1]
        return self._dense("out", features, (-2, -1), out_kernel_init, out_bias_init)(out)
