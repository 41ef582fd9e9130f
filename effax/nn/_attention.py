"""`MultiHeadAttention`, with the projections and param layout of Flax's `MultiHeadDotProductAttention`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effax.core import EffaxError, scope
from effax.effects import is_training, next_key, param, side_input
from effax.nn._dropout import dropout
from effax.nn._linear import Initializer, default_kernel_init, promote, zeros
from effax.nn._module import Module


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


class MultiHeadAttention(Module):
    """Multi-head dot-product attention: `query`, `key`, `value` and `out` projections, as in Flax.

    Kernels are `query/kernel: (in, heads, head_dim)` and `out/kernel:
    (heads, head_dim, out)`. The mask (True = attend) is the `mask`
    argument, the side input `mask_tag` (`"attention_mask"`; None to not
    ask) and the causal mask when `causal`, all combined. Attention dropout
    draws from `"dropout"` only when training.

    >>> def f(x):
    ...     return fx.nn.MultiHeadAttention(num_heads=2, causal=True)(x)
    >>> t = fx.transform(f)
    >>> x = jnp.ones((1, 5, 8))
    >>> v = t.init(jax.random.key(0), x)
    >>> v["params"]["MultiHeadAttention_0"]["query"]["kernel"].shape, t.apply(v, x).shape
    ((8, 2, 4), (1, 5, 8))
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

    def _dense(self, name: str, x: jax.Array, n_in: int, out_shape: tuple[int, ...]) -> jax.Array:
        """Flax's `DenseGeneral`: contract the last `n_in` axes; initializers see the flat 2-D shape."""
        in_shape = x.shape[x.ndim - n_in :]
        flat = (int(np.prod(in_shape)), int(np.prod(out_shape)))
        kernel_init = lambda key, shape, dtype: self.kernel_init(key, flat, dtype).reshape(shape)
        bias_init = lambda key, shape, dtype: self.bias_init(key, flat[1:], dtype).reshape(shape)
        with scope(name):
            kernel = param("kernel", kernel_init, in_shape + out_shape, self.param_dtype)
            bias = param("bias", bias_init, out_shape, self.param_dtype) if self.use_bias else None
        x, kernel, bias = promote(self.dtype, x, kernel, bias)
        y = jnp.tensordot(x, kernel, axes=n_in)
        return y if bias is None else y + bias

    def _mask(self, mask: Any, tq: int, tk: int) -> Any:
        masks = [] if mask is None else [jnp.asarray(mask, bool)]
        if self.mask_tag is not None:
            given = side_input(self.mask_tag, default=None)
            if given is not None:
                masks.append(jnp.asarray(given, bool))
        if self.causal:
            masks.append(jnp.tril(jnp.ones((tq, tk), bool), tk - tq))
        out = None
        for m in masks:
            out = m if out is None else jnp.logical_and(out, m)
        return out

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
        qkv = self.qkv_features or inputs_q.shape[-1]
        if qkv % self.num_heads:
            raise EffaxError(
                f"MultiHeadAttention: qkv_features={qkv} is not divisible by num_heads={self.num_heads}."
            )
        heads = (self.num_heads, qkv // self.num_heads)
        q = self._dense("query", inputs_q, 1, heads)
        k = self._dense("key", inputs_k, 1, heads)
        v = self._dense("value", inputs_v, 1, heads)
        mask = self._mask(mask, q.shape[-3], k.shape[-3])
        if deterministic is None:
            deterministic = self.deterministic
        if self.dropout_rate > 0.0 and (is_training() if deterministic is None else not deterministic):
            out = attention_with_dropout(
                q, k, v, mask, self.dropout_rate, next_key("dropout"), self.broadcast_dropout
            )
        else:
            out = _attention(q, k, v, mask)
        return self._dense("out", out, 2, (self.out_features or inputs_q.shape[-1],))
