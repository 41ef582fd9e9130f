"""A decoder-only LM in `effax.nn`, with `decode=True` for KV-cached sampling (the decoding benchmark).

The layers are named explicitly so the hand-written twin (`pure_jax_decoder.py`) reads the same param tree.
The cache is `MultiHeadAttention`'s (`cached_key`, `cached_value`, `cache_index` per layer) plus the
model's own position counter, all in the `"cache"` collection, written under
`fx.handlers.eval(mutable=["cache"])`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

import effax as fx


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    vocab: int = 64
    d_model: int = 128
    heads: int = 4
    mlp_dim: int = 512
    depth: int = 2
    context: int = 256
    batch: int = 1


class Block(fx.nn.Module):
    heads: int
    mlp_dim: int
    decode: bool

    def __call__(self, x: jax.Array) -> jax.Array:
        h = fx.nn.LayerNorm(name="ln1", use_fast_variance=False)(x)
        x = x + fx.nn.MultiHeadAttention(self.heads, causal=True, decode=self.decode, name="attn")(h)
        h = fx.nn.LayerNorm(name="ln2", use_fast_variance=False)(x)
        h = fx.nn.Dense(self.mlp_dim, name="up")(h)
        return x + fx.nn.Dense(x.shape[-1], name="down")(jax.nn.gelu(h))


class Decoder(fx.nn.Module):
    spec: DecoderSpec
    decode: bool = False

    def __call__(self, tokens: jax.Array) -> jax.Array:
        s = self.spec
        embed = fx.nn.Embed(s.vocab, s.d_model, name="embed")
        if self.decode:  # the next position, kept beside the attention caches
            index = fx.local_state("index", lambda: jnp.array(0, jnp.int32), collection="cache")
            start = index.get()
            index.set(start + tokens.shape[-1])
        else:
            start = 0
        x = embed(tokens) + fx.nn.Embed(s.context, s.d_model, name="positions")(start + jnp.arange(tokens.shape[-1]))
        for i in range(s.depth):
            x = Block(s.heads, s.mlp_dim, self.decode, name=f"block_{i}")(x)
        return embed.attend(fx.nn.LayerNorm(name="ln_f", use_fast_variance=False)(x))


EVAL_CACHE = fx.handlers.eval(mutable=["cache"])


def build(spec: DecoderSpec) -> dict[str, Any]:
    """`init(key) -> (params, cache)`, `step(params, cache, tokens) -> (logits, cache)`, generators."""
    full, cached = fx.transform(Decoder(spec)), fx.transform(Decoder(spec, decode=True))
    template = jnp.zeros((spec.batch, spec.context), jnp.int32)

    def init(key: jax.Array) -> tuple[Any, Any]:
        v = cached.init(key, template)
        return v["params"], v["cache"]

    def step(params: Any, cache: Any, tokens: jax.Array) -> tuple[jax.Array, Any]:
        logits, updates = cached.apply({"params": params, "cache": cache}, tokens, handlers=EVAL_CACHE)
        return logits[:, -1], updates["cache"]

    def generate_cached(params: Any, cache: Any, prompt: jax.Array, steps: int) -> jax.Array:
        """Greedy: prefill the prompt in one call, then one token per `fori_loop` step."""
        logits, cache = step(params, cache, prompt)
        token = jnp.argmax(logits, -1).astype(jnp.int32)

        def body(i: Any, carry: Any) -> Any:
            cache, token, out = carry
            out = out.at[:, i].set(token)
            logits, cache = step(params, cache, token[:, None])
            return cache, jnp.argmax(logits, -1).astype(jnp.int32), out

        out = jnp.zeros((spec.batch, steps), jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (cache, token, out))[2]

    def generate_uncached(params: Any, prompt: jax.Array, steps: int) -> jax.Array:
        """Greedy without a cache: every step re-runs the whole `context`-long window (causal, so padding is unseen)."""
        n = prompt.shape[1]
        window = jnp.zeros((spec.batch, spec.context), jnp.int32).at[:, :n].set(prompt)

        def body(i: Any, window: Any) -> Any:
            logits = full.apply({"params": params}, window, handlers=fx.handlers.eval())
            last = jax.lax.dynamic_index_in_dim(logits, n + i - 1, axis=1, keepdims=False)
            return jax.lax.dynamic_update_index_in_dim(window, jnp.argmax(last, -1).astype(jnp.int32), n + i, 1)

        return jax.lax.fori_loop(0, steps, body, window)[:, n : n + steps]

    return {"init": init, "step": step, "generate_cached": generate_cached, "generate_uncached": generate_uncached}
