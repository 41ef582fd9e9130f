"""Weight tying as a handler pass: the model is written once, untied; `fx.share` ties it.

Run: python examples/weight_tying.py
Three tied models, each printed as its params tree with every tied weight once:

1. Inox's WeightSharingMLP: layer `l2` is layer `l1` (a tied layer) and
   `l4/weight` is `l3/weight` (a tied param).
2. An encoder/decoder whose decoder reads the encoder's token embedding,
   transposed, as its output projection; trained for a few steps on a copy
   task. The gradient of the tied table is the sum of its two uses.
3. The same model, Penzai style: both uses are declared `shared="embed"` in the
   model, and `fx.share(fn, tags=True)` owns the one table.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import optax

import effax as fx

# --- 1. Inox's WeightSharingMLP, written with raw effects


def linear(name: str, x: jax.Array, out: int) -> jax.Array:
    with fx.scope(name):
        w = fx.param("weight", jax.nn.initializers.lecun_normal(), (x.shape[-1], out))
        b = fx.param("bias", jax.nn.initializers.zeros, (out,))
    return x @ w + b


def mlp(x: jax.Array) -> jax.Array:
    x = linear("l1", x, 64)
    x = linear("l2", jax.nn.relu(x), 64)
    x = linear("l3", jax.nn.relu(x), 64)
    return linear("l4", jax.nn.relu(x), 64)


weight_sharing_mlp = fx.share(mlp, {"l2": "l1", "l4/weight": "l3/weight"})

# --- 2. encoder/decoder with tied embeddings

VOCAB, WIDTH = 16, 32


def embedding(tokens_or_hidden: jax.Array, *, decode: bool, shared: str | None = None) -> jax.Array:
    """Look tokens up in `embed/table`, or (decode) project hidden states onto it, transposed."""
    with fx.scope("embed"):
        table = fx.param("table", jax.nn.initializers.normal(1.0), (VOCAB, WIDTH), shared=shared)
    return tokens_or_hidden @ table.T if decode else table[tokens_or_hidden]


def encoder_decoder(tokens: jax.Array, shared: str | None = None) -> jax.Array:
    with fx.scope("encoder"):
        h = embedding(tokens, decode=False, shared=shared)
        h = jnp.tanh(linear("hidden", h, WIDTH))
    with fx.scope("decoder"):
        h = jnp.tanh(linear("hidden", h, WIDTH))
        return embedding(h, decode=True, shared=shared)  # logits


tied_encoder_decoder = fx.share(encoder_decoder, {"decoder/embed": "encoder/embed"})

# --- 3. Penzai style: sharing declared in the model, bound by tag


def declared_encoder_decoder(tokens: jax.Array) -> jax.Array:
    return encoder_decoder(tokens, shared="embed")


penzai_encoder_decoder = fx.share(declared_encoder_decoder, tags=True)


def tree_lines(tree: Any, indent: str = "  ") -> list[str]:
    """A nested dict of arrays as indented lines, `name  shape dtype` at the leaves."""
    lines = []
    width = max((len(k) for k in tree), default=0)
    for name in sorted(tree):
        node = tree[name]
        if isinstance(node, dict):
            lines.append(f"{indent}{name}/")
            lines += tree_lines(node, indent + "  ")
        else:
            lines.append(f"{indent}{name.ljust(width)}  {tuple(node.shape)} {node.dtype}")
    return lines


def count(tree: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def copy_task_loss(t: fx.Transformed, params: Any, tokens: jax.Array) -> jax.Array:
    logits = t.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()


def main(steps: int = 200, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    say = print if verbose else (lambda *a, **k: None)
    key = jax.random.key(seed)
    report: dict[str, Any] = {}

    # 1. WeightSharingMLP
    t_mlp = fx.transform(weight_sharing_mlp)
    x = jnp.ones((2, 64))
    mlp_params = t_mlp.init(key, x)["params"]
    untied = fx.transform(mlp).init(key, x)["params"]
    say("WeightSharingMLP: l2 = l1 (tied layer), l4.weight = l3.weight (tied param)")
    say("params", *tree_lines(mlp_params), sep="\n")
    say(f"{count(mlp_params)} params tied vs {count(untied)} untied\n")
    report["mlp_params"] = mlp_params

    # 2. encoder/decoder with tied embeddings
    t = fx.transform(tied_encoder_decoder)
    tokens = jax.random.randint(jax.random.key(seed + 1), (64,), 0, VOCAB)
    params = t.init(key, tokens)["params"]
    say("Encoder/decoder: decoder/embed = encoder/embed (the decoder reads it transposed)")
    say("params", *tree_lines(params), sep="\n")
    say(f"{fx.effects_of(t, tokens).of_kind('param')}\n")

    # the tied table's gradient is the sum of the gradients of its two uses
    g_tied = jax.grad(copy_task_loss, argnums=1)(t, params, tokens)["encoder"]["embed"]["table"]
    untied_params = {**params, "decoder": {**params["decoder"], "embed": params["encoder"]["embed"]}}
    g_untied = jax.grad(copy_task_loss, argnums=1)(fx.transform(encoder_decoder), untied_params, tokens)
    g_sum = g_untied["encoder"]["embed"]["table"] + g_untied["decoder"]["embed"]["table"]
    report["grad_gap"] = float(jnp.abs(g_tied - g_sum).max())
    say(f"max |grad(tied) - (grad(encoder use) + grad(decoder use))| = {report['grad_gap']:.2e}")

    opt = optax.adam(3e-2)

    @jax.jit
    def step(params: Any, opt_state: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(lambda p: copy_task_loss(t, p, tokens))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = opt.init(params)
    report["loss_before"] = float(copy_task_loss(t, params, tokens))
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
    report["loss_after"] = float(copy_task_loss(t, params, tokens))
    report["encdec_params"] = params
    say(f"copy task: loss {report['loss_before']:.3f} -> {report['loss_after']:.3f} in {steps} steps\n")

    # 3. Penzai style
    t_penzai = fx.transform(penzai_encoder_decoder)
    penzai_params = t_penzai.init(key, tokens)["params"]
    report["penzai_params"] = penzai_params
    say('Penzai style: fx.param(..., shared="embed") in the model, fx.share(fn, tags=True) around it')
    say("params", *tree_lines(penzai_params), sep="\n")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed)
