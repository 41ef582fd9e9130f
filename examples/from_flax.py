"""Flax linen code inside effax: a ResNet-style block trained next to effax's own params, and
greedy decoding from a Flax Transformer with a KV cache under effax's eval preset.

Run: python examples/from_flax.py
The Flax block (two convs, BatchNorm, a shortcut, dropout) is brought in with
`fx.from_flax`; a raw effax head sits on top. Train and eval are a swap of
handlers: `training=True` with a dropout key and `mutable=["batch_stats"]`
(BatchNorm uses batch statistics and updates its running ones), then
`training=False` (running statistics, no keys, state frozen). The task:
tell horizontal bars from vertical ones in small noisy images.

Then a small decoder-only Flax Transformer, written as Flax's lm1b example
writes it (`decode=True` attention with a cache, a `cache_index` created under
`has_variable`), decodes greedily one token at a time: `t.init` runs Flax's own
init and so allocates the cache, and every step runs under
`fx.handlers.eval(mutable=["cache"])`, the eval preset that writes the cache
(inference state) and nothing else, inside one jitted `fori_loop`. The tokens
equal Flax's own decode loop.
"""

from __future__ import annotations

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import effax as fx


class ResBlock(nn.Module):
    """A plain Flax ResNet block; nothing in it knows about effax."""

    features: int = 8

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.Conv(self.features, (3, 3))(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(y))
        y = nn.Conv(self.features, (3, 3))(y)
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)
        y = nn.relu(y + nn.Conv(self.features, (1, 1), name="shortcut")(x))
        return nn.Dropout(0.1, deterministic=not train)(y)


block = fx.from_flax(ResBlock(), name="block")


def model(images: jax.Array) -> jax.Array:
    """Flax block -> global average pool -> an effax linear head; logits for 2 classes."""
    h = block(images, train=fx.is_training())  # the mode handler decides Flax's `train`
    h = h.mean(axis=(1, 2))
    with fx.scope("head"):
        w = fx.param("kernel", jax.nn.initializers.lecun_normal(), (h.shape[-1], 2))
        b = fx.param("bias", jax.nn.initializers.zeros, (2,))
    return h @ w + b


def make_data(key: jax.Array, n: int, size: int = 8) -> tuple[jax.Array, jax.Array]:
    """Images with one bright bar: label 0 for a row, 1 for a column, plus noise."""
    k_label, k_pos, k_noise = jax.random.split(key, 3)
    labels = jax.random.bernoulli(k_label, 0.5, (n,)).astype(jnp.int32)
    pos = jax.random.randint(k_pos, (n,), 0, size)
    grid = jnp.arange(size)
    rows = (grid[None, :, None] == pos[:, None, None]) & (labels[:, None, None] == 0)
    cols = (grid[None, None, :] == pos[:, None, None]) & (labels[:, None, None] == 1)
    images = (rows | cols).astype(jnp.float32) + 0.3 * jax.random.normal(k_noise, (n, size, size))
    return images[..., None], labels


def main(steps: int = 60, batch: int = 32, seed: int = 0, verbose: bool = True) -> dict[str, float]:
    t = fx.transform(model)
    k_data, k_test, k_init, k_drop = jax.random.split(jax.random.key(seed), 4)
    x_test, y_test = make_data(k_test, 256)
    variables = jax.jit(t.init)(k_init, x_test[:batch])  # {"params": {"block": ..., "head": ...}, "batch_stats": ...}
    params, stats = variables["params"], {"batch_stats": variables["batch_stats"]}
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    def loss_fn(params, stats, x, y, key):
        logits, updates = t.apply(
            {"params": params, **stats}, x, training=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    @jax.jit
    def step(params, stats, opt_state, x, y, key):
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, key)
        changes, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), updates, opt_state, loss

    @jax.jit
    def evaluate(params, stats):
        logits = t.apply({"params": params, **stats}, x_test, training=False)  # no keys, stats frozen
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean()
        return loss, (logits.argmax(-1) == y_test).mean()

    loss_before, acc_before = evaluate(params, stats)
    first_stats = stats
    for i in range(steps):
        x, y = make_data(jax.random.fold_in(k_data, i), batch)
        params, stats, opt_state, loss = step(params, stats, opt_state, x, y, jax.random.fold_in(k_drop, i))
        if verbose and i % 20 == 0:
            print(f"step {i:3d}  train loss {float(loss):.3f}")
    loss_after, acc_after = evaluate(params, stats)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), stats, first_stats))
    report = {
        "eval_loss_before": float(loss_before),
        "eval_loss_after": float(loss_after),
        "eval_accuracy_before": float(acc_before),
        "eval_accuracy_after": float(acc_after),
        "batch_stats_moved": max(moved),
    }
    if verbose:
        for name, value in report.items():
            print(f"{name:22s} {value:.3f}")
    return report


class Decoder(nn.Module):
    """A decoder-only Transformer in the style of Flax's lm1b; plain Flax, nothing about effax."""

    vocab: int = 32
    features: int = 32
    heads: int = 4
    layers: int = 2
    max_len: int = 24
    decode: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, self.features)(tokens)
        table = self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.features))
        if self.decode:  # one token per call: its position comes from the cache
            is_initialized = self.has_variable("cache", "cache_index")
            index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            if is_initialized:
                i = index.value
                index.value = i + 1
                x = x + jax.lax.dynamic_slice_in_dim(table, i, 1)[None]
            else:
                x = x + table[None, : tokens.shape[1]]
            mask = None  # the cache masks positions not yet written
        else:
            x = x + table[None, : tokens.shape[1]]
            mask = nn.make_causal_mask(tokens)
        for _ in range(self.layers):
            attention = nn.MultiHeadDotProductAttention(self.heads, qkv_features=self.features, decode=self.decode)
            x = x + attention(nn.LayerNorm()(x), mask=mask)
            x = x + nn.Dense(self.features)(nn.gelu(nn.Dense(4 * self.features)(nn.LayerNorm()(x))))
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def greedy_decode(step, variables: dict, prompt: jax.Array, length: int) -> jax.Array:
    """Feed `prompt`, then the argmax token, one position per `step(variables, token) -> (logits, cache)`."""

    def body(i, carry):
        variables, token, out = carry
        logits, cache = step(variables, token[:, None])
        forced = prompt[:, jnp.minimum(i + 1, prompt.shape[1] - 1)]
        token = jnp.where(i + 1 < prompt.shape[1], forced, jnp.argmax(logits[:, -1], axis=-1))
        return {**variables, "cache": cache}, token, out.at[:, i].set(token)

    out = jnp.zeros((prompt.shape[0], length), jnp.int32)
    return jax.lax.fori_loop(0, length, body, (variables, prompt[:, 0], out))[2]


def decode(length: int = 16, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Decode greedily from a Flax Transformer under effax's eval preset; compare with Flax's own loop."""
    decoder = Decoder(decode=True)
    t = fx.transform(fx.from_flax(decoder))
    k_init, k_prompt = jax.random.split(jax.random.key(seed))
    prompt = jax.random.randint(k_prompt, (2, 4), 0, decoder.vocab)
    # init runs Flax's init mode: it allocates the cache for `max_len` positions, as lm1b's initialize_cache
    variables = t.init(k_init, jnp.zeros((2, decoder.max_len), jnp.int32))
    preset = fx.handlers.eval(mutable=["cache"])  # no keys, no training state; the cache may be written

    def effax_step(variables, token):
        logits, updates = t.apply(variables, token, handlers=preset)
        return logits, updates["cache"]

    def flax_step(variables, token):
        logits, updates = decoder.apply(variables, token, mutable=["cache"])
        return logits, updates["cache"]

    run = jax.jit(greedy_decode, static_argnums=(0, 3))
    ours = run(effax_step, variables, prompt, length)
    theirs = run(flax_step, variables, prompt, length)
    report = {
        "tokens": ours.tolist(),
        "decode_matches_flax": bool(jnp.array_equal(ours, theirs)),
        "cache_entries": sorted(variables["cache"]),
    }
    if verbose:
        print(f"greedy tokens (effax, eval preset + cache): {report['tokens'][0]}")
        print(f"equal to Flax's own decode loop: {report['decode_matches_flax']}")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed)
    decode(seed=args.seed)
