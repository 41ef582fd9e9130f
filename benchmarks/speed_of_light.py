"""The floor of eager overhead for a Flax-style module system: how close to it effax is, same process, interleaved.

Run: python -m benchmarks.speed_of_light [--rounds 200] [--model mlp | mlp_stateful | all]

"Speed of light" is the least a module system that names layers where they
are built (`Dense_0`, as Flax and effax do) can do per eager call, written
here in about 50 lines: modules fill `__dict__` and take the next name from
a per-call counter; calling one sets a path context variable; a param or a
running statistic is a walk down the variables dict; the mode is an
attribute. It has no handlers, no requests, no validation and no
interception, so it is not a library, only the line below which effax's
eager overhead cannot go. It runs the benchmark's models (`benchmarks.common`)
on the variables `effax.nn` made, and checks it computes the same output.

Each round calls pure JAX, the floor, effax (raw effects) and `effax.nn` once
each, in a shuffled order, each call waited for; the table gives medians and
ratios to pure JAX. Timing lives here, never in tests: the machines are shared.
"""

from __future__ import annotations

import argparse
import contextvars
import gc
import random
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.common import EPS, Spec
from benchmarks.libs import effax_nn, effax_raw, pure_jax

_RUN: contextvars.ContextVar = contextvars.ContextVar("sol_run", default=None)
_PATH: contextvars.ContextVar = contextvars.ContextVar("sol_path", default=())


class _Run:
    __slots__ = ("variables", "counters")

    def __init__(self, variables: dict):
        self.variables, self.counters = variables, {}


def _lookup(collection: str, name: str) -> jax.Array:
    node = _RUN.get().variables[collection]
    for key in _PATH.get() + (name,):
        node = node[key]
    return node


class _Module:
    """Named where built, from a per-call counter; called under its path."""

    def __init__(self, **fields):
        run, parent, base = _RUN.get(), _PATH.get(), type(self).__name__
        counters = run.counters.setdefault(parent, {})
        n = counters.get(base, 0)
        counters[base] = n + 1
        self.__dict__.update(fields, path=parent + (f"{base}_{n}",))

    def __call__(self, h):
        run, token = _RUN.get(), _PATH.set(self.path)
        saved, run.counters = run.counters, {}
        try:
            return self.forward(h)
        finally:
            run.counters = saved
            _PATH.reset(token)


class Dense(_Module):
    def forward(self, h):
        return h @ _lookup("params", "kernel") + _lookup("params", "bias")


class BatchNorm(_Module):
    def forward(self, h):
        mean, var = _lookup("batch_stats", "mean"), _lookup("batch_stats", "var")
        return (h - mean) * jax.lax.rsqrt(var + EPS)


class Dropout(_Module):
    def forward(self, h):
        return h  # eval: the identity


class Layer(_Module):
    def forward(self, h):
        h = Dense(width=self.width)(h)
        if not self.stateful:
            return jax.nn.relu(h)
        return Dropout()(jax.nn.relu(BatchNorm()(h)))


def floor_apply(spec: Spec):
    def apply(variables, x):
        token = _RUN.set(_Run(variables))
        try:
            for _ in range(spec.depth):
                x = Layer(width=spec.width, stateful=spec.stateful)(x)
            return x
        finally:
            _RUN.reset(token)

    return apply


def main(model: str = "mlp", depth: int = 8, rounds: int = 200) -> dict[str, float]:
    spec, key = Spec(model, depth), jax.random.key(0)
    x = jnp.ones(spec.input_shape)
    nn, raw, pure = effax_nn.build(spec), effax_raw.build(spec), pure_jax.build(spec)
    v_nn, v_raw, v_pure = nn.init(key, x), raw.init(key, x), pure.init(key, x)
    floor = floor_apply(spec)
    assert jnp.allclose(floor(v_nn, x), nn.apply(v_nn, x), atol=1e-5), "the floor computes another model"
    calls = {
        "pure JAX": lambda: pure.apply(v_pure, x),
        "floor": lambda: floor(v_nn, x),
        "effax": lambda: raw.apply(v_raw, x),
        "effax.nn": lambda: nn.apply(v_nn, x),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    order, rng = list(calls), random.Random(0)
    for i in range(rounds + 10):
        rng.shuffle(order)
        for name in order:
            gc.collect()
            gc.disable()
            start = time.perf_counter()
            jax.block_until_ready(calls[name]())
            elapsed = time.perf_counter() - start
            gc.enable()
            if i >= 10:  # the first rounds warm up
                times[name].append(elapsed)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians["pure JAX"]
    print(f"{model} depth {depth}, eager apply, {rounds} shuffled rounds (median, ratio to pure JAX)")
    for name, m in medians.items():
        print(f"  {name:9s} {m * 1e6:7.0f} us  {m / base:.3f}x")
    return medians


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all", help="mlp, mlp_stateful, or all")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    for model in ("mlp", "mlp_stateful") if args.model == "all" else (args.model,):
        main(model, args.depth, args.rounds)
