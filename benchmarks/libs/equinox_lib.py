"""Equinox: `eqx.nn.Linear` (vmapped over the batch), `eqx.nn.StateIndex` for running stats,
dropout keys split by hand; jitted through `eqx.partition` / `eqx.combine`."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from benchmarks.common import Bench, Spec, attention, batch_norm_like, dropout, loss_of, sgd


class Layer(eqx.Module):
    linear: eqx.nn.Linear
    mean: eqx.nn.StateIndex | None
    var: eqx.nn.StateIndex | None

    def __init__(self, width: int, stateful: bool, key):
        self.linear = eqx.nn.Linear(width, width, key=key)
        self.mean = eqx.nn.StateIndex(jnp.zeros((width,))) if stateful else None
        self.var = eqx.nn.StateIndex(jnp.ones((width,))) if stateful else None

    def __call__(self, h, state, key, training):
        h = jax.vmap(self.linear)(h)
        if self.mean is None:
            return jax.nn.relu(h), state
        h, m, v = batch_norm_like(h, state.get(self.mean), state.get(self.var), training)
        if training:
            state = state.set(self.mean, m).set(self.var, v)
        h = jax.nn.relu(h)
        if training:
            h = dropout(key, h)
        return h, state


class MLP(eqx.Module):
    layers: list

    def __init__(self, spec: Spec, key):
        self.layers = [Layer(spec.width, spec.stateful, k) for k in jax.random.split(key, spec.depth)]

    def __call__(self, h, state=None, key=None, training=False):
        keys = jax.random.split(key, len(self.layers)) if training and key is not None else [None] * len(self.layers)
        for layer, k in zip(self.layers, keys, strict=False):
            h, state = layer(h, state, k, training)
        return h, state


def _per_token(layer, x):
    return jax.vmap(jax.vmap(layer))(x)


class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    ln2: eqx.nn.LayerNorm
    q: eqx.nn.Linear
    k: eqx.nn.Linear
    v: eqx.nn.Linear
    o: eqx.nn.Linear
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, spec: Spec, key):
        d, keys = spec.d_model, jax.random.split(key, 6)
        self.ln1, self.ln2 = eqx.nn.LayerNorm(d, eps=1e-6), eqx.nn.LayerNorm(d, eps=1e-6)
        self.q, self.k, self.v, self.o = (eqx.nn.Linear(d, d, key=k) for k in keys[:4])
        self.fc1 = eqx.nn.Linear(d, spec.mlp_dim, key=keys[4])
        self.fc2 = eqx.nn.Linear(spec.mlp_dim, d, key=keys[5])
        self.heads = spec.heads

    def __call__(self, x):
        h = _per_token(self.ln1, x)
        a = attention(_per_token(self.q, h), _per_token(self.k, h), _per_token(self.v, h), self.heads)
        x = x + _per_token(self.o, a)
        h = _per_token(self.ln2, x)
        return x + _per_token(self.fc2, jax.nn.gelu(_per_token(self.fc1, h)))


class Transformer(eqx.Module):
    blocks: list

    def __init__(self, spec: Spec, key):
        self.blocks = [Block(spec, k) for k in jax.random.split(key, spec.depth)]

    def __call__(self, x, state=None, key=None, training=False):
        for block in self.blocks:
            x = block(x)
        return x, state


def build(spec: Spec, variant=None) -> Bench:
    cls = Transformer if spec.model == "transformer" else MLP

    def make(key):
        if spec.stateful:
            model, state = eqx.nn.make_with_state(cls)(spec, key)
            return eqx.nn.delete_init_state(model), state
        return cls(spec, key), None

    static = eqx.partition(eqx.filter_eval_shape(make, jax.random.key(0))[0], eqx.is_inexact_array)[1]

    def init(key, x):
        model, state = make(key)
        return {"params": eqx.filter(model, eqx.is_inexact_array), "state": state}

    def abstract_init(key, x):
        return eqx.filter_eval_shape(lambda k, x: init(k, x), key, x)

    def apply(variables, x):
        return eqx.combine(variables["params"], static)(x, variables["state"])[0]

    def train_step(variables, x, key):
        def loss_fn(params):
            y, state = eqx.combine(params, static)(x, variables["state"], key, True)
            return loss_of(y), state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        return {"params": sgd(variables["params"], grads), "state": state}, loss

    return Bench(init, apply, train_step, abstract_init)
