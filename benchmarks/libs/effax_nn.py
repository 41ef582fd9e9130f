"""effax with `effax.nn` layers (`Dense`, `BatchNorm`, `Dropout`, `LayerNorm`), auto-named like Flax linen."""

from __future__ import annotations

import jax

import effax as fx
from benchmarks.common import DROP_RATE, EPS, MOMENTUM, Bench, Spec, attention
from benchmarks.libs.effax_raw import build as build_raw


class Layer(fx.nn.Module):
    width: int
    stateful: bool

    def __call__(self, h):
        h = fx.nn.Dense(self.width)(h)
        if not self.stateful:
            return jax.nn.relu(h)
        h = fx.nn.BatchNorm(
            momentum=MOMENTUM, epsilon=EPS, use_scale=False, use_bias=False, use_fast_variance=False
        )(h)
        return fx.nn.Dropout(DROP_RATE)(jax.nn.relu(h))


class Block(fx.nn.Module):
    spec: Spec

    def __call__(self, x):
        d = self.spec.d_model
        h = fx.nn.LayerNorm(epsilon=1e-6, use_fast_variance=False)(x)
        a = attention(fx.nn.Dense(d)(h), fx.nn.Dense(d)(h), fx.nn.Dense(d)(h), self.spec.heads)
        x = x + fx.nn.Dense(d)(a)
        h = fx.nn.LayerNorm(epsilon=1e-6, use_fast_variance=False)(x)
        return x + fx.nn.Dense(d)(jax.nn.gelu(fx.nn.Dense(self.spec.mlp_dim)(h)))


def build(spec: Spec, variant=None) -> Bench:
    def model(x):
        for _ in range(spec.depth):
            x = Block(spec)(x) if spec.model == "transformer" else Layer(spec.width, spec.stateful)(x)
        return x

    return build_raw(spec, variant, fn=model, collection="batch_stats")
