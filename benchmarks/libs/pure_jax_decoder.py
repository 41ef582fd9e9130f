"""The decoding benchmark's decoder written in pure JAX with a hand-written KV cache.

The same model as `effax_decoder.py` (pre-LN blocks, learned positions, tied output table) and the same
cache layout (Flax's: per layer `cached_key`, `cached_value` `(batch, max_length, heads, head_dim)` and
`cache_index`, plus the position counter), reading the same param tree, so one set of weights runs in
both and the sampled tokens can be compared.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.libs.effax_decoder import DecoderSpec

lecun = jax.nn.initializers.lecun_normal()


def init_params(spec: DecoderSpec, key: jax.Array) -> dict[str, Any]:
    d, h, k = spec.d_model, spec.heads, iter(jax.random.split(key, 8 * spec.depth + 2))
    ln = lambda: {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}
    proj = lambda: {"kernel": lecun(next(k), (d, d)).reshape(d, h, d // h), "bias": jnp.zeros((h, d // h))}
    params: dict[str, Any] = {
        "embed": {"embedding": jax.random.normal(next(k), (spec.vocab, d)) / jnp.sqrt(d)},
        "positions": {"embedding": jax.random.normal(next(k), (spec.context, d)) / jnp.sqrt(d)},
        "ln_f": ln(),
    }
    for i in range(spec.depth):
        out = {"kernel": lecun(next(k), (d, d)).reshape(h, d // h, d), "bias": jnp.zeros((d,))}
        params[f"block_{i}"] = {
            "ln1": ln(), "ln2": ln(),
            "attn": {"query": proj(), "key": proj(), "value": proj(), "out": out},
            "up": {"kernel": lecun(next(k), (d, spec.mlp_dim)), "bias": jnp.zeros((spec.mlp_dim,))},
            "down": {"kernel": lecun(next(k), (spec.mlp_dim, d)), "bias": jnp.zeros((d,))},
        }
    return params


def init_cache(spec: DecoderSpec) -> dict[str, Any]:
    shape = (spec.batch, spec.context, spec.heads, spec.d_model // spec.heads)
    layer = lambda: {"attn": {"cached_key": jnp.zeros(shape), "cached_value": jnp.zeros(shape),
                              "cache_index": jnp.array(0, jnp.int32)}}
    return {"index": jnp.array(0, jnp.int32), **{f"block_{i}": layer() for i in range(spec.depth)}}


def layer_norm(p: Any, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
    return y * p["scale"] + p["bias"]


def project(p: Any, x: jax.Array) -> jax.Array:
    """`x @ kernel` over the last axis into `(heads, head_dim)`, plus the bias."""
    return jax.lax.dot_general(x, p["kernel"], (((x.ndim - 1,), (0,)), ((), ()))) + p["bias"]


def attend(p: Any, cache: Any, x: jax.Array) -> tuple[jax.Array, Any]:
    q, k, v = project(p["query"], x), project(p["key"], x), project(p["value"], x)
    i, steps, length = cache["cache_index"], x.shape[1], cache["cached_key"].shape[1]
    keys = jax.lax.dynamic_update_slice(cache["cached_key"], k, (0, i, 0, 0))
    values = jax.lax.dynamic_update_slice(cache["cached_value"], v, (0, i, 0, 0))
    mask = jnp.arange(length)[None, :] <= (i + jnp.arange(steps))[:, None]
    mask = jnp.broadcast_to(mask, (x.shape[0], q.shape[2], steps, length))
    out = jax.nn.dot_product_attention(q, keys, values, mask=mask)
    y = jax.lax.dot_general(out, p["out"]["kernel"], (((2, 3), (0, 1)), ((), ()))) + p["out"]["bias"]
    return y, {"cached_key": keys, "cached_value": values, "cache_index": i + steps}


def forward(spec: DecoderSpec, params: Any, cache: Any, tokens: jax.Array) -> tuple[jax.Array, Any]:
    """Logits for `tokens` (batch, T) written at the cache's position, and the new cache."""
    table = params["embed"]["embedding"]
    start = cache["index"]
    positions = start + jnp.arange(tokens.shape[1])
    x = jnp.take(table, tokens, axis=0) + jnp.take(params["positions"]["embedding"], positions, axis=0)
    new_cache: dict[str, Any] = {"index": start + tokens.shape[1]}
    for i in range(spec.depth):
        p, name = params[f"block_{i}"], f"block_{i}"
        h, layer_cache = attend(p["attn"], cache[name]["attn"], layer_norm(p["ln1"], x))
        x = x + h
        h = layer_norm(p["ln2"], x) @ p["up"]["kernel"] + p["up"]["bias"]
        x = x + (jax.nn.gelu(h) @ p["down"]["kernel"] + p["down"]["bias"])
        new_cache[name] = {"attn": layer_cache}
    return layer_norm(params["ln_f"], x) @ table.T, new_cache


def build(spec: DecoderSpec) -> dict[str, Any]:
    """`init(key) -> (params, cache)`, `step(params, cache, tokens) -> (last logits, cache)`, `generate_cached`."""

    def init(key: jax.Array) -> tuple[Any, Any]:
        return init_params(spec, key), init_cache(spec)

    def step(params: Any, cache: Any, tokens: jax.Array) -> tuple[jax.Array, Any]:
        logits, cache = forward(spec, params, cache, tokens)
        return logits[:, -1], cache

    def generate_cached(params: Any, cache: Any, prompt: jax.Array, steps: int) -> jax.Array:
        logits, cache = step(params, cache, prompt)
        token = jnp.argmax(logits, -1).astype(jnp.int32)

        def body(i: Any, carry: Any) -> Any:
            cache, token, out = carry
            out = out.at[:, i].set(token)
            logits, cache = step(params, cache, token[:, None])
            return cache, jnp.argmax(logits, -1).astype(jnp.int32), out

        out = jnp.zeros((spec.batch, steps), jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (cache, token, out))[2]

    return {"init": init, "step": step, "generate_cached": generate_cached}
