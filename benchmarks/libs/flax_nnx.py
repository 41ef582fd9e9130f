"""Flax NNX: `nnx.Linear`, `nnx.BatchStat` for running stats, an `nnx.Rngs` stream for dropout;
jitted through the functional API (`nnx.split` / `nnx.merge` around `jax.jit`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import Bench, Spec, attention, batch_norm_like, dropout, loss_of, sgd


class Layer(nnx.Module):
    def __init__(self, width: int, stateful: bool, rngs: nnx.Rngs):
        self.linear = nnx.Linear(width, width, rngs=rngs)
        self.stateful = stateful
        if stateful:
            self.mean = nnx.BatchStat(jnp.zeros((width,)))
            self.var = nnx.BatchStat(jnp.ones((width,)))
            self.rngs = rngs

    def __call__(self, h, training: bool):
        h = self.linear(h)
        if not self.stateful:
            return jax.nn.relu(h)
        h, m, v = batch_norm_like(h, self.mean.value, self.var.value, training)
        if training:
            self.mean.value, self.var.value = m, v
        h = jax.nn.relu(h)
        if training:
            h = dropout(self.rngs.dropout(), h)
        return h


class MLP(nnx.Module):
    def __init__(self, spec: Spec, rngs: nnx.Rngs):
        self.layers = nnx.List([Layer(spec.width, spec.stateful, rngs) for _ in range(spec.depth)])

    def __call__(self, h, training: bool = False):
        for layer in self.layers:
            h = layer(h, training)
        return h


class Block(nnx.Module):
    def __init__(self, spec: Spec, rngs: nnx.Rngs):
        d = spec.d_model
        self.heads = spec.heads
        self.ln1 = nnx.LayerNorm(d, epsilon=1e-6, rngs=rngs)
        self.q, self.k, self.v, self.o = (nnx.Linear(d, d, rngs=rngs) for _ in range(4))
        self.ln2 = nnx.LayerNorm(d, epsilon=1e-6, rngs=rngs)
        self.fc1 = nnx.Linear(d, spec.mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(spec.mlp_dim, d, rngs=rngs)

    def __call__(self, x):
        h = self.ln1(x)
        x = x + self.o(attention(self.q(h), self.k(h), self.v(h), self.heads))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class Transformer(nnx.Module):
    def __init__(self, spec: Spec, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(spec, rngs) for _ in range(spec.depth)])

    def __call__(self, x, training: bool = False):
        for block in self.blocks:
            x = block(x)
        return x


def build(spec: Spec, variant=None) -> Bench:
    cls = Transformer if spec.model == "transformer" else MLP
    def make(key):
        return cls(spec, nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1)))

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(jax.random.key(0))))

    def init(key, x):
        model = make(key)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {"params": params, "rest": rest}

    def apply(variables, x):
        return nnx.merge(graphdef, variables["params"], variables["rest"])(x, training=False)

    def train_step(variables, x, key):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, variables["rest"], copy=True)
            y = model(x, training=True)
            return loss_of(y), nnx.split(model, nnx.Param, ...)[2]

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        return {"params": sgd(variables["params"], grads), "rest": rest}, loss

    return Bench(init, apply, train_step)
