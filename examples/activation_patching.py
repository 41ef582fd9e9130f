"""Activation patching with two handlers: capture an activation on input A, patch it into the run on input B.

Run: python examples/activation_patching.py

A small model reads four digits and is trained to output the sum of the
first and the third; it has no idea which positions matter until it learns.
Each position's digit goes through the same per-position layer (`Dense_0`)
before a mixing MLP. We then ask the model which positions it uses:

1. run it on a batch of inputs A with `capture_intermediates=True`, which
   records the output of every module call (`Probe_0/Dense_0` included);
2. run it on inputs B with a `Patch` handler that intercepts the call of
   `Probe_0/Dense_0` and overwrites one position of its output with A's;
3. compare the patched output with B's own.

Patching positions 0 and 2 moves the output by A's digit minus B's there;
positions 1 and 3 move it by (almost) nothing; patching every position
turns B's output into A's. Neither the model nor its params change.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import effax as fx

SEQ, VOCAB = 4, 10
USED = (0, 2)  # the target is tokens[0] + tokens[2]
LAYER = ("Probe_0", "Dense_0")  # the per-position layer we patch


class Probe(fx.nn.Module):
    """Embed four digits, a per-position layer, then an MLP over all positions to one number."""

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = jax.nn.relu(fx.nn.Dense(16)(fx.nn.Embed(VOCAB, 16)(tokens)))  # (batch, 4, 16)
        h = h.reshape(h.shape[0], -1)
        return fx.nn.MLP([64, 1])(h)[:, 0]


class Patch(fx.Handler):
    """Overwrite `positions` of the output of the module call at `path` with `value`'s."""

    def __init__(self, path: tuple[str, ...], value: jax.Array, positions: Sequence[int]):
        self.path, self.value, self.positions = path, value, list(positions)

    def handle(self, request: Any, forward: Any) -> Any:
        out = forward(request)
        if isinstance(request, fx.ModuleCallRequest) and request.path == self.path:
            out = out.at[:, self.positions].set(self.value[:, self.positions])
        return out


T = fx.transform(lambda tokens: Probe()(tokens))


def target(tokens: jax.Array) -> jax.Array:
    return sum(tokens[:, p] for p in USED).astype(jnp.float32)


def train(steps: int, key: jax.Array) -> tuple[dict, float]:
    k_init, k_data = jax.random.split(key)
    variables = T.init(k_init, jnp.zeros((1, SEQ), jnp.int32))
    opt = optax.adam(3e-3)

    def loss(params: dict, tokens: jax.Array) -> jax.Array:
        return jnp.mean((T.apply({"params": params}, tokens) - target(tokens)) ** 2)

    @jax.jit
    def step(params: dict, opt_state: Any, key: jax.Array) -> tuple[dict, Any, jax.Array]:
        tokens = jax.random.randint(key, (256, SEQ), 0, VOCAB)
        value, grads = jax.value_and_grad(loss)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params, opt_state = variables["params"], opt.init(variables["params"])
    for k in jax.random.split(k_data, steps):
        params, opt_state, value = step(params, opt_state, k)
    return {"params": params}, float(value)


def main(steps: int = 600, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    say = print if verbose else (lambda *a, **k: None)
    k_train, k_a, k_b = jax.random.split(jax.random.key(seed), 3)
    variables, final_loss = train(steps, k_train)
    say(f"trained {steps} steps to output tokens[0] + tokens[2]: loss {final_loss:.3f}")

    a = jax.random.randint(k_a, (512, SEQ), 0, VOCAB)
    b = jax.random.randint(k_b, (512, SEQ), 0, VOCAB)
    out_a, captured = T.apply(variables, a, capture_intermediates=True)
    act_a = captured["intermediates"]["Probe_0"]["Dense_0"]["__call__"][0]  # Flax's layout: path, method, tuple
    out_b = T.apply(variables, b)

    report: dict[str, Any] = {"loss": final_loss, "effect": [], "expected": []}
    say("patch A's activation at Probe_0/Dense_0 into the run on B, one position at a time:")
    for pos in range(SEQ):
        patched = T.apply(variables, b, handlers=[Patch(LAYER, act_a, [pos])])
        effect = float(jnp.mean(jnp.abs(patched - out_b)))
        report["effect"].append(effect)
        if pos in USED:
            digits = float(jnp.mean(jnp.abs(a[:, pos] - b[:, pos])))
            report["expected"].append(digits)
            say(f"  position {pos} (used):   mean |output change| {effect:.3f}, mean |A - B| digit {digits:.3f}")
        else:
            report["expected"].append(0.0)
            say(f"  position {pos} (unused): mean |output change| {effect:.3f}")
    everything = T.apply(variables, b, handlers=[Patch(LAYER, act_a, range(SEQ))])
    report["all_gap"] = float(jnp.max(jnp.abs(everything - out_a)))
    say(f"patching every position turns B's output into A's: max |patched - out(A)| = {report['all_gap']:.1e}")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed)
