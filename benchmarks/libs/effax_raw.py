"""effax with raw effect calls (`fx.param`, `fx.local_state`, `fx.next_key`, `fx.scope`) and `fx.transform`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import effax as fx
from benchmarks.common import Bench, Spec, attention, batch_norm_like, dropout, layer_norm, loss_of, sgd

lecun = jax.nn.initializers.lecun_normal()
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def dense(name, x, n_out):
    with fx.scope(name):
        w = fx.param("kernel", lecun, (x.shape[-1], n_out))
        b = fx.param("bias", zeros, (n_out,))
    return x @ w + b


def norm(name, x):
    with fx.scope(name):
        scale = fx.param("scale", ones, (x.shape[-1],))
        bias = fx.param("bias", zeros, (x.shape[-1],))
    return layer_norm(x, scale, bias)


def mlp(spec: Spec):
    def model(x):
        h = x
        for i in range(spec.depth):
            with fx.scope(f"layer_{i}"):
                h = dense("dense", h, spec.width)
                if spec.stateful:
                    mean = fx.local_state("mean", lambda: jnp.zeros((spec.width,)), collection="stats")
                    var = fx.local_state("var", lambda: jnp.ones((spec.width,)), collection="stats")
                    training = fx.is_training()
                    h, m, v = batch_norm_like(h, mean.get(), var.get(), training)
                    if training:
                        mean.set(m)
                        var.set(v)
                    h = jax.nn.relu(h)
                    if training:
                        h = dropout(fx.next_key("dropout"), h)
                else:
                    h = jax.nn.relu(h)
        return h

    return model


def transformer(spec: Spec):
    def model(x):
        for i in range(spec.depth):
            with fx.scope(f"block_{i}"):
                h = norm("ln1", x)
                d = spec.d_model
                a = attention(dense("q", h, d), dense("k", h, d), dense("v", h, d), spec.heads)
                x = x + dense("o", a, d)
                h = norm("ln2", x)
                x = x + dense("fc2", jax.nn.gelu(dense("fc1", h, spec.mlp_dim)), d)
        return x

    return model


def build(spec: Spec, variant=None, fn=None, collection: str = "stats") -> Bench:
    """The `Bench` of `fn` (default: the raw-effect model of `spec`); `effax_nn` reuses it for its layers."""
    if fn is None:
        fn = transformer(spec) if spec.model == "transformer" else mlp(spec)
    t = fx.transform(fn)

    def init(key, x):
        return t.init(key, x)

    if not spec.stateful:

        def apply(variables, x):
            return t.apply(variables, x)

        def train_step(variables, x, key):
            loss, grads = jax.value_and_grad(lambda p: loss_of(t.apply({"params": p}, x)))(variables["params"])
            return {"params": sgd(variables["params"], grads)}, loss

        return Bench(init, apply, train_step)

    def apply(variables, x):
        return t.apply(variables, x, training=False)

    def train_step(variables, x, key):
        def loss_fn(params):
            y, updates = t.apply(
                {**variables, "params": params}, x, rngs={"dropout": key}, training=True, mutable=[collection]
            )
            return loss_of(y), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        return {"params": sgd(variables["params"], grads), **updates}, loss

    return Bench(init, apply, train_step)
