"""The floor of eager overhead for a Flax-style module system: how close to it effax is, same process, interleaved.

Run: python -m benchmarks.speed_of_light [--rounds 200] [--model mlp | mlp_stateful | all] [--sync-dispatch]

"Speed of light" is the least a module system that names layers where they
are built (`Dense_0`, as Flax and effax do) can do per eager call, written
here in about 60 lines: modules fill `__dict__` and take the next name from
a per-call counter; calling one sets a path context variable; a param or a
running statistic is a walk down the variables dict; the mode is an
attribute. It has no handlers, no requests, no validation and no
interception, so it is not a library, only the line below which effax's
eager overhead cannot go. It runs the benchmark's models (`benchmarks.common`)
on the variables `effax.nn` made, and checks it computes the same output.

A second row runs the floor's modules over effax's effects (`fx.param`,
`fx.local_state`, effax's path, under `t.apply`): the gap between it and
`effax.nn` is what effax's module system costs, the gap between it and the
floor what its effects and `t.apply` cost.

Each round calls pure JAX, the floor, the floor over effax's effects, effax
(raw effects) and `effax.nn` once each, in a shuffled order, each call waited
for; the table gives medians and ratios to pure JAX. `--sync-dispatch` turns
off JAX's asynchronous CPU dispatch, so each op runs in the calling thread
before Python goes on: the difference between the two tables is what the
Python between two ops costs through its interplay with the asynchronous
runtime, beyond its own time. Timing lives here, never in tests: the machines
are shared.
"""

from __future__ import annotations

import argparse
import contextvars
import gc
import random
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import effax as fx
from benchmarks.common import EPS, Spec
from benchmarks.libs import effax_nn, effax_raw, pure_jax
from effax.core import path_now, under_path

_RUN: contextvars.ContextVar = contextvars.ContextVar("sol_run", default=None)
_PATH: contextvars.ContextVar = contextvars.ContextVar("sol_path", default=())


_ZEROS = jax.nn.initializers.zeros


class _Run:
    """One floor run: its variables and this call's name counters."""

    __slots__ = ("variables", "counters")

    def __init__(self, variables: dict | None):
        self.variables, self.counters = variables, {}

    @staticmethod
    def path() -> tuple[str, ...]:
        return _PATH.get()

    @staticmethod
    def under(path: tuple[str, ...], fn, h):
        token = _PATH.set(path)
        try:
            return fn(h)
        finally:
            _PATH.reset(token)

    def lookup(self, collection: str, name: str, shape: tuple[int, ...]) -> jax.Array:
        node = self.variables[collection]
        for key in _PATH.get() + (name,):
            node = node[key]
        return node


class _EffaxRun(_Run):
    """The floor's modules over effax's effects: the path is effax's, a param is `fx.param`, a statistic
    `fx.local_state(...).get()`. It splits effax.nn's overhead into its module system and its effects."""

    __slots__ = ()
    path = staticmethod(path_now)
    under = staticmethod(under_path)

    def lookup(self, collection: str, name: str, shape: tuple[int, ...]) -> jax.Array:
        if collection == "params":
            return fx.param(name, _ZEROS, shape)
        return fx.local_state(name, lambda: jnp.zeros(shape), collection=collection).get()


class _Module:
    """Named where built, from a per-call counter; called under its path."""

    def __init__(self, **fields):
        run, base = _RUN.get(), type(self).__name__
        parent = run.path()
        counters = run.counters.setdefault(parent, {})
        n = counters.get(base, 0)
        counters[base] = n + 1
        self.__dict__.update(fields, path=parent + (f"{base}_{n}",))

    def __call__(self, h):
        run = _RUN.get()
        saved, run.counters = run.counters, {}
        try:
            return run.under(self.path, self.forward, h)
        finally:
            run.counters = saved


class Dense(_Module):
    def forward(self, h):
        run, n = _RUN.get(), self.width
        return h @ run.lookup("params", "kernel", (h.shape[-1], n)) + run.lookup("params", "bias", (n,))


class BatchNorm(_Module):
    def forward(self, h):
        run, n = _RUN.get(), h.shape[-1]
        mean, var = run.lookup("batch_stats", "mean", (n,)), run.lookup("batch_stats", "var", (n,))
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


def _layers(spec: Spec, x: jax.Array) -> jax.Array:
    for _ in range(spec.depth):
        x = Layer(width=spec.width, stateful=spec.stateful)(x)
    return x


def floor_apply(spec: Spec):
    def apply(variables, x):
        token = _RUN.set(_Run(variables))
        try:
            return _layers(spec, x)
        finally:
            _RUN.reset(token)

    return apply


def floor_modules_effax_effects(spec: Spec):
    """`apply` of the floor's modules over effax's effects, under `t.apply` (in eval, as the others)."""

    def model(x):
        token = _RUN.set(_EffaxRun(None))
        try:
            return _layers(spec, x)
        finally:
            _RUN.reset(token)

    t = fx.transform(model)
    return lambda variables, x: t.apply(variables, x, training=False)


def eager_applies(spec: Spec, hybrid: bool = False) -> dict[str, Callable[[], jax.Array]]:
    """The eager apply of each library on one input, as the eager benchmarks compare them: pure JAX, the floor
    (MLP models only; on `effax.nn`'s variables), with `hybrid` the floor's modules over effax's effects,
    then effax's raw effects and `effax.nn`. The floor rows are checked to compute `effax.nn`'s output."""
    key, x = jax.random.key(0), jnp.ones(spec.input_shape)
    nn, raw, pure = effax_nn.build(spec), effax_raw.build(spec), pure_jax.build(spec)
    v_nn, v_raw, v_pure = nn.init(key, x), raw.init(key, x), pure.init(key, x)
    calls: dict[str, Callable[[], jax.Array]] = {"pure JAX": lambda: pure.apply(v_pure, x)}
    if spec.model != "transformer":  # the floor has the MLP's layers only
        floor = floor_apply(spec)
        calls["floor"] = lambda: floor(v_nn, x)
    if hybrid:
        over_effax = floor_modules_effax_effects(spec)
        calls["floor modules, effax effects"] = lambda: over_effax(v_nn, x)
    calls["effax"], calls["effax.nn"] = lambda: raw.apply(v_raw, x), lambda: nn.apply(v_nn, x)
    for name in ("floor", "floor modules, effax effects"):
        if name in calls:
            assert jnp.allclose(calls[name](), calls["effax.nn"](), atol=1e-5), f"the {name} computes another model"
    return calls


def main(model: str = "mlp", depth: int = 8, rounds: int = 200) -> dict[str, float]:
    calls = eager_applies(Spec(model, depth), hybrid=True)
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
    dispatch = "async" if jax.config.values["jax_cpu_enable_async_dispatch"] else "sync"
    print(f"{model} depth {depth}, eager apply ({dispatch} dispatch), {rounds} shuffled rounds "
          "(median, ratio to pure JAX)")
    for name, m in medians.items():
        print(f"  {name:28s} {m * 1e6:7.0f} us  {m / base:.3f}x")
    return medians


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all", help="mlp, mlp_stateful, or all")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--sync-dispatch", action="store_true", help="turn off JAX's asynchronous CPU dispatch")
    args = parser.parse_args()
    if args.sync_dispatch:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    for model in ("mlp", "mlp_stateful") if args.model == "all" else (args.model,):
        main(model, args.depth, args.rounds)
