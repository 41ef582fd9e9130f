"""A tiny decoder-only transformer, trained character by character on ten Shakespeare sonnets.

Run: python examples/tiny_lm.py               (about 30 s on 2 CPU cores)
     python examples/tiny_lm.py --steps 200 --prompt "Shall I"

The input embedding and the output projection are one table (`Embed` and
`Embed.attend`), so the variables hold a single `embedding`. Training uses
`fx.handlers.train(key)` (dropout on); the held-out loss uses
`fx.handlers.eval()` on the same model. It prints the loss at the start and
the end, and a sample.

Sampling uses a KV cache: the same model with `decode=True` keeps each
attention layer's keys and values, and its own position, in the `"cache"`
collection, which `fx.handlers.eval(mutable=["cache"])` lets it write (eval
still draws no key and writes no training state). The whole sampler is one
jitted function: a prefill of the prompt, then a `jax.lax.fori_loop` of
one-token steps; when the cache is full it is refilled with the last half
window. It is timed against the same sampler without a cache, which re-runs
the whole window for every token, and both print their tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import effax as fx

TEXT = pathlib.Path(__file__).resolve().parent / "data" / "sonnets.txt"


class Block(fx.nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP, each on a residual."""

    heads: int
    dropout_rate: float
    decode: bool = False

    def __call__(self, x: jax.Array) -> jax.Array:
        h = fx.nn.MultiHeadAttention(self.heads, causal=True, decode=self.decode)(fx.nn.LayerNorm()(x))
        x = x + fx.nn.Dropout(self.dropout_rate)(h)
        h = fx.nn.MLP([4 * x.shape[-1], x.shape[-1]], activation=jax.nn.gelu)(fx.nn.LayerNorm()(x))
        return x + fx.nn.Dropout(self.dropout_rate)(h)


class TinyLM(fx.nn.Module):
    """Token + position embeddings, `depth` blocks, and logits through the tied token table.

    With `decode=True` each call continues the sequence held in the cache:
    the position of its first token is a counter in the `"cache"` collection.
    """

    vocab_size: int
    context: int = 64
    width: int = 64
    depth: int = 2
    heads: int = 4
    dropout_rate: float = 0.1
    decode: bool = False

    def __call__(self, tokens: jax.Array) -> jax.Array:
        init = jax.nn.initializers.normal(0.05)  # small: the first logits are near uniform
        embed = fx.nn.Embed(self.vocab_size, self.width, embedding_init=init, name="embed")
        positions = fx.nn.Embed(self.context, self.width, embedding_init=init, name="positions")
        start = 0
        if self.decode:
            position = fx.local_state("position", lambda: jnp.array(0, jnp.int32), collection="cache")
            start = position.get()
            position.set(start + tokens.shape[-1])
        x = embed(tokens) + positions(start + jnp.arange(tokens.shape[-1]))
        for _ in range(self.depth):
            x = Block(self.heads, self.dropout_rate, self.decode)(x)
        return embed.attend(fx.nn.LayerNorm()(x))  # tied output projection


def _model_params(params: dict) -> dict:
    """The model's params: under `TinyLM_0` when modules are nested in a scope, at the root otherwise."""
    return params.get("TinyLM_0", params)


def make_samplers(model: TinyLM, t: fx.Transformed, key: jax.Array, n_prompt: int, length: int, temperature: float):
    """Two jitted samplers `(params, prompt, key) -> tokens (1, n_prompt + length)`: with the KV cache, and without.

    Step `i` samples with `fold_in(key, i)` in both, so they agree token for
    token while the window fills (`temperature=0` is greedy).
    """
    context = model.context
    decoder = fx.transform(dataclasses.replace(model, decode=True))
    cache0 = jax.jit(decoder.init)(key, jnp.zeros((1, context), jnp.int32))["cache"]  # zeros, positions at 0
    keep = context // 2  # when the cache is full, refill it with the last half window

    def pick(logits: jax.Array, key: jax.Array, i: jax.Array) -> jax.Array:
        if temperature == 0:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.random.categorical(jax.random.fold_in(key, i), logits / temperature).astype(jnp.int32)

    def decode(params: dict, cache: dict, tokens: jax.Array) -> tuple[jax.Array, dict]:
        logits, updates = decoder.apply(
            {"params": params, "cache": cache}, tokens, handlers=fx.handlers.eval(mutable=["cache"])
        )
        return logits[0, -1], updates["cache"]

    @jax.jit
    def cached(params: dict, prompt: jax.Array, key: jax.Array) -> jax.Array:
        out = jnp.zeros((1, max(n_prompt + length, context)), jnp.int32).at[:, :n_prompt].set(prompt)
        logits, cache = decode(params, cache0, prompt if n_prompt <= context else prompt[:, -keep:])  # prefill

        def step(i: jax.Array, carry: tuple) -> tuple:
            out, cache, logits = carry
            n = n_prompt + i  # tokens known so far
            out = out.at[0, n].set(pick(logits, key, i))

            def refill(_: None) -> tuple[jax.Array, dict]:  # the cache is full: restart from the last half window
                window = jax.lax.dynamic_slice_in_dim(out, n + 1 - keep, keep, axis=1)
                return decode(params, cache0, window)

            def extend(_: None) -> tuple[jax.Array, dict]:
                return decode(params, cache, jax.lax.dynamic_slice_in_dim(out, n, 1, axis=1))

            if n_prompt + length <= context:  # the cache never fills: no refill branch to compile
                logits, cache = extend(None)
            else:
                logits, cache = jax.lax.cond(cache_position(cache) >= context, refill, extend, None)
            return out, cache, logits

        return jax.lax.fori_loop(0, length, step, (out, cache, logits))[0][:, : n_prompt + length]

    @jax.jit
    def uncached(params: dict, prompt: jax.Array, key: jax.Array) -> jax.Array:
        total = max(n_prompt + length, context)
        out = jnp.zeros((1, total), jnp.int32).at[:, :n_prompt].set(prompt)

        def step(i: jax.Array, out: jax.Array) -> jax.Array:
            n = n_prompt + i
            start = jnp.maximum(0, n - context)  # the last `context` tokens; causal, so later zeros are unseen
            window = jax.lax.dynamic_slice_in_dim(out, start, context, axis=1)
            logits = t.apply({"params": params}, window, handlers=fx.handlers.eval())
            last = jax.lax.dynamic_index_in_dim(logits[0], n - 1 - start, keepdims=False)
            return out.at[0, n].set(pick(last, key, i))

        return jax.lax.fori_loop(0, length, step, out)[:, : n_prompt + length]

    return {"cached": cached, "uncached": uncached}


def cache_position(cache: dict) -> jax.Array:
    """How many tokens the cache holds: the model's position counter."""
    return _model_params(cache)["position"]


def encode(text: str) -> tuple[np.ndarray, list[str]]:
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return np.array([index[c] for c in text], np.int32), chars


def windows(data: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return data[starts[:, None] + np.arange(length + 1)]  # inputs and next-char targets


def main(
    steps: int = 500,
    batch_size: int = 32,
    context: int = 64,
    width: int = 64,
    depth: int = 2,
    learning_rate: float = 5e-3,
    seed: int = 0,
    sample_length: int = 240,
    prompt: str = "Shall I compare thee",
    temperature: float = 0.7,
    progress: bool = True,
) -> dict:
    """Train for `steps` steps; return the report (losses at start and end, held-out loss, sample)."""
    start = time.perf_counter()
    data, chars = encode(TEXT.read_text())
    split = int(0.9 * len(data))
    train_data, heldout_data = data[:split], data[split:]
    model = TinyLM(vocab_size=len(chars), context=context, width=width, depth=depth)
    t = fx.transform(model)
    init_key, dropout_key, sample_key = jax.random.split(jax.random.key(seed), 3)
    params = jax.jit(t.init)(init_key, jnp.zeros((1, model.context), jnp.int32))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(50, steps // 5), max(steps, 1))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = optimizer.init(params)

    def loss_fn(params, batch, preset):
        logits = t.apply({"params": params}, batch[:, :-1], handlers=preset)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def train_step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, fx.handlers.train(key))
        changes, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), opt_state, loss

    heldout = windows(heldout_data, np.arange(0, len(heldout_data) - model.context - 1, 16), model.context)
    heldout_loss = jax.jit(lambda params: loss_fn(params, heldout, fx.handlers.eval()))

    rng = np.random.default_rng(seed)
    heldout_start = float(heldout_loss(params))
    losses = []
    bar = tqdm(range(1, steps + 1), desc="tiny_lm", disable=not progress)
    for step in bar:
        batch = windows(train_data, rng.integers(0, len(train_data) - model.context - 1, batch_size), model.context)
        params, opt_state, loss = train_step(params, opt_state, batch, jax.random.fold_in(dropout_key, step))
        losses.append(loss)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    losses = [float(v) for v in losses]
    heldout_end = float(heldout_loss(params))

    index = {c: i for i, c in enumerate(chars)}
    prompt_ids = jnp.array([[index[c] for c in prompt if c in index] or [0]], jnp.int32)
    samplers = make_samplers(model, t, init_key, prompt_ids.shape[1], sample_length, temperature)
    timed = {}
    for name, sampler in samplers.items():
        out = jax.block_until_ready(sampler(params, prompt_ids, sample_key))  # compiles
        seconds = []
        for _ in range(3):  # best of 3: one call is short, and a shared machine is noisy
            t0 = time.perf_counter()
            jax.block_until_ready(sampler(params, prompt_ids, sample_key))
            seconds.append(time.perf_counter() - t0)
        timed[name] = (np.asarray(out[0]).tolist(), sample_length / min(seconds))
    tokens, uncached = timed["cached"][0], timed["uncached"][0]
    sample = "".join(chars[i] for i in tokens)
    in_window = max(model.context, prompt_ids.shape[1])  # until the window is full, both see the same tokens

    report = {
        "loss_start": losses[0] if losses else float("nan"),
        "loss_end": float(np.mean(losses[-50:])) if losses else float("nan"),
        "heldout_loss_start": heldout_start,
        "heldout_loss_end": heldout_end,
        "sample": sample,
        "sample_uncached": "".join(chars[i] for i in uncached),
        "cached_matches_uncached": tokens[:in_window] == uncached[:in_window],
        "tokens_per_s_cached": timed["cached"][1],
        "tokens_per_s_uncached": timed["uncached"][1],
        "tied": sorted(_model_params(params)["embed"]) == ["embedding"],
        "seconds": time.perf_counter() - start,
    }
    n_params = sum(p.size for p in jax.tree.leaves(params))
    print(
        f"\ntiny_lm: {len(data):,} characters ({len(chars)} distinct), {n_params:,} params, "
        f"{steps} steps of {batch_size}x{model.context} in {report['seconds']:.1f}s\n"
        f"  training loss  {report['loss_start']:.3f} -> {report['loss_end']:.3f} (mean of last 50 steps; "
        f"uniform guess is {np.log(len(chars)):.3f})\n"
        f"  held-out loss  {heldout_start:.3f} -> {heldout_end:.3f} (eval preset)\n"
        f"  sampling {sample_length} tokens: {report['tokens_per_s_cached']:,.0f} tokens/s with the KV cache, "
        f"{report['tokens_per_s_uncached']:,.0f} tokens/s re-running the {model.context}-token window "
        f"({report['tokens_per_s_cached'] / report['tokens_per_s_uncached']:.1f}x); same tokens while the "
        f"window fills: {report['cached_matches_uncached']}\n"
        f"  sample (temperature {temperature}, cached):\n\n{sample}\n"
    )
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="Shall I compare thee")
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    main(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        prompt=args.prompt,
        temperature=args.temperature,
    )
