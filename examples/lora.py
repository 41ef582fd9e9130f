"""LoRA as a handler: low-rank adapters on chosen `Dense` layers, with no change to the model.

Run: python examples/lora.py

A `LoRA` handler intercepts the calls of `fx.nn.Dense` layers whose paths
match its patterns and adds `x @ a @ b * (alpha / rank)` to their output. It
asks for `a` and `b` through the ordinary param effect, inside a `lora` scope
under the layer, so `t.init(..., handlers=[lora])` creates them beside the
weights they adapt (`MLP_0/Dense_0/lora/a`). `split_lora` moves every `lora`
scope into its own `"lora"` collection: the optimizer sees only those, and
the base params are never updated. `b` starts at zero, so the adapted model
starts exactly at the base model.

The task: the base model is fine-tuned to match a teacher whose first two
layers differ from the base by a rank-1 update, the kind of change LoRA is
made for. The script prints the trainable-parameter count against the base
model's, the loss before and after, and checks the base params bit for bit.
"""

from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import effax as fx


class LoRA(fx.Handler):
    """Add a low-rank update to every `Dense` call whose path matches one of `targets` (glob patterns)."""

    def __init__(self, targets: Sequence[str], rank: int = 2, alpha: float = 4.0):
        self.targets, self.rank, self.scale = tuple(targets), rank, alpha / rank

    def handle(self, request: Any, forward: Any) -> Any:
        out = forward(request)
        if not (isinstance(request, fx.ModuleCallRequest) and isinstance(request.module, fx.nn.Dense)):
            return out
        if not any(fnmatch.fnmatchcase("/".join(request.path), p) for p in self.targets):
            return out
        (x,) = request.args
        with fx.scope("lora"):  # the request is handled at the layer's path: these land at <layer>/lora/...
            a = fx.param("a", jax.nn.initializers.normal(x.shape[-1] ** -0.5), (x.shape[-1], self.rank))
            b = fx.param("b", jax.nn.initializers.zeros, (self.rank, request.module.features))
        return out + (x @ a @ b) * self.scale


def split_lora(params: dict) -> tuple[dict, dict]:
    """`(base, lora)`: every `lora` scope moved out of `params` into its own tree, paths kept."""
    base, lora = {}, {}
    for name, node in params.items():
        if name == "lora":
            lora[name] = node
        elif isinstance(node, dict):
            base[name], inner = split_lora(node)
            if inner:
                lora[name] = inner
        else:
            base[name] = node
    return base, lora


def merge(base: dict, lora: dict) -> dict:
    """The inverse of `split_lora`: one params tree for `apply`."""
    out = dict(base)
    for name, node in lora.items():
        out[name] = merge(out[name], node) if name in out else node
    return out


def count(tree: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def model(x: jax.Array) -> jax.Array:
    return fx.nn.MLP([64, 64, 4])(x)


T = fx.transform(model)
ADAPT = LoRA(["MLP_0/Dense_0", "MLP_0/Dense_1"], rank=2)


def teacher_of(base: dict, key: jax.Array) -> dict:
    """The base params with a rank-1 update on the kernels of the first two layers."""
    teacher = jax.tree.map(jnp.asarray, base)  # a fresh tree of dicts, the same arrays
    for i, k in enumerate(jax.random.split(key)):
        layer = teacher["MLP_0"][f"Dense_{i}"]
        n_in, n_out = layer["kernel"].shape
        u, v = jax.random.normal(k, (2, max(n_in, n_out)))
        layer["kernel"] = layer["kernel"] + jnp.outer(u[:n_in], v[:n_out]) / n_in**0.5
    return teacher


def loss(adapters: dict, base: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error of the adapted model; differentiate it in `adapters` alone."""
    pred = T.apply({"params": merge(base, adapters)}, x, handlers=[ADAPT])
    return jnp.mean((pred - y) ** 2)


def main(steps: int = 300, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    say = print if verbose else (lambda *a, **k: None)
    k_init, k_data, k_teacher = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k_data, (256, 16))
    base = T.init(k_init, x)["params"]  # stands in for a pretrained model
    y = T.apply({"params": teacher_of(base, k_teacher)}, x)

    # the same init under the LoRA handler adds the adapters; split them into their own collection
    params, adapters = split_lora(T.init(k_init, x, handlers=[ADAPT])["params"])
    assert jax.tree.all(jax.tree.map(jnp.array_equal, params, base))  # same paths, same base weights
    variables = {"params": params, "lora": adapters}
    frozen = jax.tree.map(jnp.copy, params)

    adapted = T.apply({"params": merge(params, adapters)}, x, handlers=[ADAPT])
    report: dict[str, Any] = {
        "base_count": count(variables["params"]),
        "lora_count": count(variables["lora"]),
        "start_gap": float(jnp.abs(adapted - T.apply({"params": params}, x)).max()),
        "loss_before": float(loss(adapters, params, x, y)),
    }
    say("the 'lora' collection:", jax.tree.map(jnp.shape, variables["lora"]))
    say(
        f"trainable params: {report['lora_count']} LoRA vs {report['base_count']} in the base model "
        f"({100 * report['lora_count'] / report['base_count']:.1f}%)"
    )
    say(f"at init the adapted model is the base model: max |diff| = {report['start_gap']:.1e}")

    opt = optax.adam(1e-2)

    @jax.jit
    def step(adapters: dict, opt_state: Any, base: dict) -> tuple[dict, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss)(adapters, base, x, y)  # gradients for the adapters only
        updates, opt_state = opt.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, value

    opt_state = opt.init(variables["lora"])
    for _ in range(steps):
        adapters, opt_state, _ = step(adapters, opt_state, variables["params"])
    variables = {**variables, "lora": adapters}
    report["loss_after"] = float(loss(variables["lora"], variables["params"], x, y))
    report["base_unchanged"] = bool(jax.tree.all(jax.tree.map(jnp.array_equal, variables["params"], frozen)))
    report["variables"], report["data"] = variables, (x, y)
    say(f"loss {report['loss_before']:.4f} -> {report['loss_after']:.4f} in {steps} steps of LoRA fine-tuning")
    say(f"base params bit-identical after training: {report['base_unchanged']}")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed)
