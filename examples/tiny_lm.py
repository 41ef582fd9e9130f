"""A tiny decoder-only transformer, trained character by character on ten Shakespeare sonnets.

Run: python examples/tiny_lm.py               (about 30 s on 2 CPU cores)
     python examples/tiny_lm.py --steps 200 --prompt "Shall I"

The input embedding and the output projection are one table (`Embed` and
`Embed.attend`), so the variables hold a single `embedding`. Training uses
`fx.handlers.train(key)` (dropout on); the held-out loss and the sampling
use `fx.handlers.eval()` on the same model. It prints the loss at the start
and the end, and a sample.
"""

from __future__ import annotations

import argparse
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

    def __call__(self, x: jax.Array) -> jax.Array:
        h = fx.nn.MultiHeadAttention(self.heads, causal=True)(fx.nn.LayerNorm()(x))
        x = x + fx.nn.Dropout(self.dropout_rate)(h)
        h = fx.nn.MLP([4 * x.shape[-1], x.shape[-1]], activation=jax.nn.gelu)(fx.nn.LayerNorm()(x))
        return x + fx.nn.Dropout(self.dropout_rate)(h)


class TinyLM(fx.nn.Module):
    """Token + position embeddings, `depth` blocks, and logits through the tied token table."""

    vocab_size: int
    context: int = 64
    width: int = 64
    depth: int = 2
    heads: int = 4
    dropout_rate: float = 0.1

    def __call__(self, tokens: jax.Array) -> jax.Array:
        init = jax.nn.initializers.normal(0.05)  # small: the first logits are near uniform
        embed = fx.nn.Embed(self.vocab_size, self.width, embedding_init=init, name="embed")
        positions = fx.nn.Embed(self.context, self.width, embedding_init=init, name="positions")
        x = embed(tokens) + positions(jnp.arange(tokens.shape[-1]))
        for _ in range(self.depth):
            x = Block(self.heads, self.dropout_rate)(x)
        return embed.attend(fx.nn.LayerNorm()(x))  # tied output projection


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

    @jax.jit
    def next_logits(params, window, last):
        logits = t.apply({"params": params}, window[None], handlers=fx.handlers.eval())
        return logits[0, last]

    index = {c: i for i, c in enumerate(chars)}
    tokens = [index[c] for c in prompt if c in index] or [0]
    for i in range(sample_length):
        context = tokens[-model.context :]
        window = jnp.array(context + [0] * (model.context - len(context)), jnp.int32)  # causal: padding is unseen
        logits = next_logits(params, window, len(context) - 1)
        tokens.append(int(jax.random.categorical(jax.random.fold_in(sample_key, i), logits / temperature)))
    sample = "".join(chars[i] for i in tokens)

    report = {
        "loss_start": losses[0] if losses else float("nan"),
        "loss_end": float(np.mean(losses[-50:])) if losses else float("nan"),
        "heldout_loss_start": heldout_start,
        "heldout_loss_end": heldout_end,
        "sample": sample,
        "tied": sorted(params["TinyLM_0"]["embed"]) == ["embedding"],
        "seconds": time.perf_counter() - start,
    }
    n_params = sum(p.size for p in jax.tree.leaves(params))
    print(
        f"\ntiny_lm: {len(data):,} characters ({len(chars)} distinct), {n_params:,} params, "
        f"{steps} steps of {batch_size}x{model.context} in {report['seconds']:.1f}s\n"
        f"  training loss  {report['loss_start']:.3f} -> {report['loss_end']:.3f} (mean of last 50 steps; "
        f"uniform guess is {np.log(len(chars)):.3f})\n"
        f"  held-out loss  {heldout_start:.3f} -> {heldout_end:.3f} (eval preset)\n"
        f"  sample (temperature {temperature}):\n\n{sample}\n"
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
