"""Trace+compile time of a deep MLP train step: `fx.scan` vs an unrolled effax loop vs `flax.linen.scan`.

Run: python benchmarks/scan_vs_unrolled.py [--depths 64 256] [--repeats 3]
The model is the same everywhere: `depth` layers of `relu(h @ w + b)`, width
256, batch 32; the step is `value_and_grad` of a mean-square loss plus an SGD
update. A pure-JAX `jax.lax.scan` is the floor. Each measurement jits a fresh
function and times `lower` (trace) and `compile`; the variants take turns and
the best of `repeats` is printed, with the optimized HLO instruction count.
Not a test: timings belong here, not in assertions.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import effax as fx

WIDTH, BATCH, LR = 256, 32, 1e-3


def _step(loss: Callable[[Any, jax.Array], jax.Array]) -> Callable[[Any, jax.Array], Any]:
    def step(params: Any, x: jax.Array) -> Any:
        value, grads = jax.value_and_grad(loss)(params, x)
        return jax.tree.map(lambda p, g: p - LR * g, params, grads), value

    return step


def layer(h: jax.Array) -> jax.Array:
    w = fx.param("kernel", jax.nn.initializers.lecun_normal(), (WIDTH, WIDTH))
    b = fx.param("bias", jax.nn.initializers.zeros, (WIDTH,))
    return jax.nn.relu(h @ w + b)


def effax_unrolled(depth: int) -> tuple[Callable, Callable]:
    def model(h: jax.Array) -> jax.Array:
        for i in range(depth):
            with fx.scope(f"layer_{i}"):
                h = layer(h)
        return h

    t = fx.transform(model)
    return (lambda k, x: t.init(k, x)["params"]), _step(lambda p, x: jnp.mean(t.apply({"params": p}, x) ** 2))


def effax_scan(depth: int) -> tuple[Callable, Callable]:
    def model(h: jax.Array) -> jax.Array:
        with fx.scope("layers"):
            return fx.scan(lambda h, _: (layer(h), None), length=depth)(h)[0]

    t = fx.transform(model)
    return (lambda k, x: t.init(k, x)["params"]), _step(lambda p, x: jnp.mean(t.apply({"params": p}, x) ** 2))


class _Cell(nn.Module):
    @nn.compact
    def __call__(self, h: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return jax.nn.relu(nn.Dense(WIDTH)(h)), None


class _FlaxScan(nn.Module):
    depth: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        stack = nn.scan(_Cell, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth)
        return stack()(h, None)[0]


def flax_scan(depth: int) -> tuple[Callable, Callable]:
    m = _FlaxScan(depth)
    return (lambda k, x: m.init(k, x)["params"]), _step(lambda p, x: jnp.mean(m.apply({"params": p}, x) ** 2))


def jax_scan(depth: int) -> tuple[Callable, Callable]:
    def init(k: jax.Array, x: jax.Array) -> Any:
        keys = jax.random.split(k, depth)
        w = jax.vmap(lambda k: jax.nn.initializers.lecun_normal()(k, (WIDTH, WIDTH)))(keys)
        return {"kernel": w, "bias": jnp.zeros((depth, WIDTH))}

    def apply(p: Any, h: jax.Array) -> jax.Array:
        return jax.lax.scan(lambda h, p: (jax.nn.relu(h @ p["kernel"] + p["bias"]), None), h, p)[0]

    return init, _step(lambda p, x: jnp.mean(apply(p, x) ** 2))


VARIANTS = {
    "fx.scan": effax_scan,
    "effax unrolled": effax_unrolled,
    "flax.linen.scan": flax_scan,
    "jax.lax.scan": jax_scan,
}


def measure(make: Callable[[int], tuple[Callable, Callable]], depth: int) -> tuple[float, float, int]:
    """(trace seconds, compile seconds, optimized HLO instructions) of the train step, from a fresh function."""
    x = jnp.ones((BATCH, WIDTH))
    init, step = make(depth)
    params = jax.eval_shape(init, jax.random.key(0), x)
    start = time.perf_counter()
    lowered = jax.jit(step).lower(params, x)
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return traced - start, done - traced, len(_INSTRUCTION.findall(compiled.as_text()))


_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%\S+\s*=\s", re.MULTILINE)


def main(depths: tuple[int, ...] = (64, 256), repeats: int = 3, variants: tuple[str, ...] = tuple(VARIANTS)) -> dict:
    """Best of `repeats` per variant and depth; the variants take turns, so load drifts hit all alike."""
    best: dict[tuple[str, int], tuple[float, float, int]] = {}
    for _ in range(repeats):
        for depth in depths:
            for name in variants:
                trace, compile_, ops = measure(VARIANTS[name], depth)
                old = best.get((name, depth), (float("inf"), float("inf"), ops))
                best[(name, depth)] = (min(old[0], trace), min(old[1], compile_), ops)
    print(f"train step, width {WIDTH}, batch {BATCH}, backend {jax.default_backend()}, best of {repeats}")
    print(f"{'variant':<18}{'depth':>6}{'trace s':>10}{'compile s':>11}{'total s':>10}{'HLO ops':>9}")
    for depth in depths:
        for name in variants:
            trace, compile_, ops = best[(name, depth)]
            print(f"{name:<18}{depth:>6}{trace:>10.3f}{compile_:>11.3f}{trace + compile_:>10.3f}{ops:>9}")
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    main(tuple(args.depths), args.repeats, tuple(args.variants))
