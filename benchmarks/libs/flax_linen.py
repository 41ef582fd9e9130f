"""Flax linen: `nn.Dense`, `self.variable` for running stats, `make_rng` for dropout; variant `scan` uses `nn.scan`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import Bench, Spec, attention, batch_norm_like, dropout, loss_of, sgd


class Layer(nn.Module):
    width: int
    stateful: bool

    @nn.compact
    def __call__(self, h, training: bool = False):
        h = nn.Dense(self.width)(h)
        if self.stateful:
            mean = self.variable("batch_stats", "mean", jnp.zeros, (self.width,))
            var = self.variable("batch_stats", "var", jnp.ones, (self.width,))
            h, m, v = batch_norm_like(h, mean.value, var.value, training)
            if training and not self.is_initializing():
                mean.value, var.value = m, v
            h = jax.nn.relu(h)
            if training:
                h = dropout(self.make_rng("dropout"), h)
            return h
        return jax.nn.relu(h)


class MLP(nn.Module):
    depth: int
    width: int
    stateful: bool

    @nn.compact
    def __call__(self, h, training: bool = False):
        for _ in range(self.depth):
            h = Layer(self.width, self.stateful)(h, training)
        return h


class ScanCell(nn.Module):
    width: int

    @nn.compact
    def __call__(self, h, _):
        return jax.nn.relu(nn.Dense(self.width)(h)), None


class ScanMLP(nn.Module):
    depth: int
    width: int

    @nn.compact
    def __call__(self, h, training: bool = False):
        stack = nn.scan(
            ScanCell, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth
        )(self.width)
        return stack(h, None)[0]


class Block(nn.Module):
    spec: Spec

    @nn.compact
    def __call__(self, x, training: bool = False):
        d = self.spec.d_model
        h = nn.LayerNorm(epsilon=1e-6)(x)
        a = attention(nn.Dense(d)(h), nn.Dense(d)(h), nn.Dense(d)(h), self.spec.heads)
        x = x + nn.Dense(d)(a)
        h = nn.LayerNorm(epsilon=1e-6)(x)
        return x + nn.Dense(d)(jax.nn.gelu(nn.Dense(self.spec.mlp_dim)(h)))


class Transformer(nn.Module):
    spec: Spec

    @nn.compact
    def __call__(self, x, training: bool = False):
        for _ in range(self.spec.depth):
            x = Block(self.spec)(x)
        return x


def build(spec: Spec, variant=None) -> Bench:
    if spec.model == "transformer":
        module = Transformer(spec)
    elif variant == "scan":
        module = ScanMLP(spec.depth, spec.width)
    else:
        module = MLP(spec.depth, spec.width, spec.stateful)

    def init(key, x):
        return module.init(key, x)

    def apply(variables, x):
        return module.apply(variables, x)

    if not spec.stateful:

        def train_step(variables, x, key):
            params = variables["params"]
            loss, grads = jax.value_and_grad(lambda p: loss_of(module.apply({"params": p}, x)))(params)
            return {"params": sgd(params, grads)}, loss

        return Bench(init, apply, train_step)

    def train_step(variables, x, key):
        def loss_fn(params):
            y, updates = module.apply(
                {**variables, "params": params}, x, True, rngs={"dropout": key}, mutable=["batch_stats"]
            )
            return loss_of(y), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        return {"params": sgd(variables["params"], grads), **updates}, loss

    return Bench(init, apply, train_step)
