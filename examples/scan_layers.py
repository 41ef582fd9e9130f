"""A deep residual MLP written once as a Python loop and once with `fx.scan`.

Run: python examples/scan_layers.py [--depth 64]
Both versions share the block code. The scanned one keeps each param once,
stacked along a leading layer axis (`params/layers/mlp/w1` has shape
`(depth, width, 4 * width)`), so XLA compiles one layer instead of `depth`.
The script initializes the scanned model, restacks its weights into the
loop's layout, checks that both give the same outputs and gradients, and
prints how long each takes to trace and compile (forward and gradients).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp

import effax as fx


def block(h: jax.Array) -> jax.Array:
    """One pre-norm residual MLP layer; its params live under `mlp/`."""
    width = h.shape[-1]
    with fx.scope("mlp"):
        w1 = fx.param("w1", jax.nn.initializers.lecun_normal(), (width, 4 * width))
        b1 = fx.param("b1", jax.nn.initializers.zeros, (4 * width,))
        w2 = fx.param("w2", jax.nn.initializers.normal(0.02), (4 * width, width))
    z = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-5)
    return h + jax.nn.gelu(z @ w1 + b1) @ w2


def looped(x: jax.Array, depth: int) -> jax.Array:
    """The deep model as a Python loop: `depth` copies of the layer in the program."""
    for i in range(depth):
        with fx.scope(f"layer_{i}"):
            x = block(x)
    return x


def scanned(x: jax.Array, depth: int) -> jax.Array:
    """The same model as a scan over layers: one copy of the layer in the program."""
    with fx.scope("layers"):
        x, _ = fx.scan(lambda h, _: (block(h), None), length=depth)(x)
    return x


def unstack(params: dict, depth: int) -> dict:
    """The scanned layout `layers/...[i]` as the loop's `layer_i/...`."""
    return {f"layer_{i}": jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(depth)}


def forward_and_grads(t: fx.Transformed, params: dict, x: jax.Array, depth: int) -> tuple[Any, float]:
    """Outputs and loss gradients, jitted; also the seconds spent tracing and compiling them."""

    def run(params: dict, x: jax.Array) -> tuple[jax.Array, dict]:
        y = t.apply({"params": params}, x, depth)
        return y, jax.grad(lambda p: jnp.mean(t.apply({"params": p}, x, depth) ** 2))(params)

    start = time.perf_counter()
    compiled = jax.jit(run).lower(params, x).compile()
    seconds = time.perf_counter() - start
    return compiled(params, x), seconds


def main(depth: int = 64, width: int = 128, batch: int = 16, seed: int = 0, verbose: bool = True) -> dict:
    """Check the loop and the scan agree on restacked weights; time both compilations."""
    t_loop, t_scan = fx.transform(looped), fx.transform(scanned)
    key_init, key_x = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(key_x, (batch, width))
    params = t_scan.init(key_init, x, depth)["params"]
    params_loop = unstack(params, depth)

    (y_scan, g_scan), compile_scan = forward_and_grads(t_scan, params, x, depth)
    (y_loop, g_loop), compile_loop = forward_and_grads(t_loop, params_loop, x, depth)
    g_diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(unstack(g_scan, depth)), jax.tree.leaves(g_loop), strict=True)
    )
    report = {
        "depth": depth,
        "max_abs_diff": float(jnp.max(jnp.abs(y_scan - y_loop))),
        "max_abs_grad_diff": g_diff,
        "compile_s_loop": compile_loop,
        "compile_s_scan": compile_scan,
    }
    if verbose:
        print(f"{depth}-layer residual MLP, width {width}")
        print(f"  stacked kernel params/layers/mlp/w1: {params['layers']['mlp']['w1'].shape}")
        print(f"  outputs   max |scan - loop| = {report['max_abs_diff']:.2e}")
        print(f"  gradients max |scan - loop| = {report['max_abs_grad_diff']:.2e}")
        print(
            f"  forward+gradients trace+compile: loop {compile_loop:.2f}s, fx.scan {compile_scan:.2f}s"
        )
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    main(**vars(parser.parse_args()))
