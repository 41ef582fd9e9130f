"""Haiku: `hk.Linear`, `hk.get_state`/`set_state` for running stats, `hk.next_rng_key` for dropout;
variant `layer_stack` stacks the MLP layers with `hk.layer_stack`."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from benchmarks.common import Bench, Spec, attention, batch_norm_like, dropout, loss_of, sgd


def mlp(spec: Spec, variant):
    def model(h, training: bool = False):
        if variant == "layer_stack":

            @hk.layer_stack(spec.depth)
            def stack(h):
                return jax.nn.relu(hk.Linear(spec.width)(h))

            return stack(h)
        for i in range(spec.depth):
            with hk.name_scope(f"layer_{i}"):
                h = hk.Linear(spec.width)(h)
                if spec.stateful:
                    mean = hk.get_state("mean", (spec.width,), init=jnp.zeros)
                    var = hk.get_state("var", (spec.width,), init=jnp.ones)
                    h, m, v = batch_norm_like(h, mean, var, training)
                    if training:
                        hk.set_state("mean", m)
                        hk.set_state("var", v)
                    h = jax.nn.relu(h)
                    if training:
                        h = dropout(hk.next_rng_key(), h)
                else:
                    h = jax.nn.relu(h)
        return h

    return model


def transformer(spec: Spec):
    def model(x, training: bool = False):
        d = spec.d_model
        for i in range(spec.depth):
            with hk.name_scope(f"block_{i}"):
                ln = lambda: hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-6)
                h = ln()(x)
                a = attention(hk.Linear(d)(h), hk.Linear(d)(h), hk.Linear(d)(h), spec.heads)
                x = x + hk.Linear(d)(a)
                h = ln()(x)
                x = x + hk.Linear(d)(jax.nn.gelu(hk.Linear(spec.mlp_dim)(h)))
        return x

    return model


def build(spec: Spec, variant=None) -> Bench:
    fn = transformer(spec) if spec.model == "transformer" else mlp(spec, variant)
    if not spec.stateful:
        t = hk.without_apply_rng(hk.transform(fn))

        def init(key, x):
            return {"params": t.init(key, x)}

        def apply(variables, x):
            return t.apply(variables["params"], x)

        def train_step(variables, x, key):
            params = variables["params"]
            loss, grads = jax.value_and_grad(lambda p: loss_of(t.apply(p, x)))(params)
            return {"params": sgd(params, grads)}, loss

        return Bench(init, apply, train_step)

    t = hk.transform_with_state(fn)

    def init(key, x):
        params, state = t.init(key, x)
        return {"params": params, "state": state}

    def apply(variables, x):
        return t.apply(variables["params"], variables["state"], None, x)[0]

    def train_step(variables, x, key):
        def loss_fn(params):
            y, state = t.apply(params, variables["state"], key, x, True)
            return loss_of(y), state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        return {"params": sgd(variables["params"], grads), "state": state}, loss

    return Bench(init, apply, train_step)
