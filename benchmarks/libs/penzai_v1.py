"""Penzai v1 (`penzai.deprecated.v1`): a `pz.nn.Sequential` of `pz.nn.Affine` and `pz.nn.Elementwise`,
named axes, params initialized with `pz.nn.initialize_parameters`; plain MLP only."""

from __future__ import annotations

import jax
from penzai.deprecated.v1 import pz

from benchmarks.common import Bench, Spec, loss_of, sgd


def build(spec: Spec, variant=None) -> Bench:
    if spec.model != "mlp":
        raise ValueError("the Penzai v1 benchmark builds only the plain MLP")
    features = {"features": spec.width}

    def init(key, x):
        layers = []
        for i in range(spec.depth):
            affine = pz.nn.Affine.from_config(input_axes=features, output_axes=features)
            layers += [pz.nn.add_parameter_prefix(f"layer_{i}", affine), pz.nn.Elementwise(jax.nn.relu)]
        return pz.nn.initialize_parameters(pz.nn.Sequential(layers), key)

    def apply(model, x):
        return model(pz.nx.wrap(x).tag("batch", "features")).unwrap("batch", "features")

    def train_step(model, x, key):
        loss, grads = jax.value_and_grad(lambda m: loss_of(apply(m, x)))(model)
        return sgd(model, grads), loss

    return Bench(init, apply, train_step)
