"""Hand-written JAX: params in lists of dicts, keys split by hand. The baseline every ratio divides by."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.common import Bench, Spec, attention, batch_norm_like, dropout, layer_norm, loss_of, sgd

lecun = jax.nn.initializers.lecun_normal()


def dense_init(key, n_in, n_out):
    return {"kernel": lecun(key, (n_in, n_out), jnp.float32), "bias": jnp.zeros((n_out,), jnp.float32)}


def dense(p, x):
    return x @ p["kernel"] + p["bias"]


def mlp_init(spec: Spec, key):
    keys = jax.random.split(key, spec.depth)
    params = [dense_init(k, spec.width, spec.width) for k in keys]
    if not spec.stateful:
        return {"params": params}
    stats = [{"mean": jnp.zeros((spec.width,)), "var": jnp.ones((spec.width,))} for _ in range(spec.depth)]
    return {"params": params, "stats": stats}


def mlp_forward(spec: Spec, params, stats, x, key, training):
    keys = jax.random.split(key, spec.depth) if training and spec.stateful else None
    new_stats = []
    h = x
    for i, p in enumerate(params):
        h = dense(p, h)
        if spec.stateful:
            h, mean, var = batch_norm_like(h, stats[i]["mean"], stats[i]["var"], training)
            new_stats.append({"mean": mean, "var": var})
        h = jax.nn.relu(h)
        if spec.stateful and training:
            h = dropout(keys[i], h)
    return h, new_stats


def block_init(spec: Spec, key):
    d, k = spec.d_model, jax.random.split(key, 6)
    ln = lambda: {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}
    return {
        "ln1": ln(), "q": dense_init(k[0], d, d), "k": dense_init(k[1], d, d), "v": dense_init(k[2], d, d),
        "o": dense_init(k[3], d, d), "ln2": ln(),
        "fc1": dense_init(k[4], d, spec.mlp_dim), "fc2": dense_init(k[5], spec.mlp_dim, d),
    }


def block(spec: Spec, p, x):
    h = layer_norm(x, p["ln1"]["scale"], p["ln1"]["bias"])
    x = x + dense(p["o"], attention(dense(p["q"], h), dense(p["k"], h), dense(p["v"], h), spec.heads))
    h = layer_norm(x, p["ln2"]["scale"], p["ln2"]["bias"])
    return x + dense(p["fc2"], jax.nn.gelu(dense(p["fc1"], h)))


def build(spec: Spec, variant=None) -> Bench:
    if spec.model == "transformer":

        def init(key, x):
            return {"params": [block_init(spec, k) for k in jax.random.split(key, spec.depth)]}

        def forward(params, x):
            for p in params:
                x = block(spec, p, x)
            return x

        def apply(variables, x):
            return forward(variables["params"], x)

        def train_step(variables, x, key):
            loss, grads = jax.value_and_grad(lambda p: loss_of(forward(p, x)))(variables["params"])
            return {"params": sgd(variables["params"], grads)}, loss

        return Bench(init, apply, train_step)

    def init(key, x):
        return mlp_init(spec, key)

    def apply(variables, x):
        return mlp_forward(spec, variables["params"], variables.get("stats"), x, None, False)[0]

    def train_step(variables, x, key):
        def loss_fn(params):
            y, stats = mlp_forward(spec, params, variables.get("stats"), x, key, True)
            return loss_of(y), stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        out = {"params": sgd(variables["params"], grads)}
        if spec.stateful:
            out["stats"] = stats
        return out, loss

    return Bench(init, apply, train_step)
