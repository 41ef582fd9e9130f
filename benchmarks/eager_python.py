"""The eager ratio split in two: each library's own Python per apply (JAX ops stubbed), and its cost among real ops.

Run: python -m benchmarks.eager_python [--model mlp | mlp_stateful | all] [--rounds 100]

An eager apply is the model's Python plus JAX's dispatch of each op. Each
round times every library's apply twice over, interleaved: as it is, and
with every JAX op the MLP models call (`@`, `+`, `-`, `*`, `rsqrt`, `relu`)
stubbed to return its first argument, so that what is left is Python (the
layers, effax's requests and handlers; the outputs are wrong and unused).
It prints medians over pure JAX: the real extra time, the stubbed extra time
(effax's own Python, far steadier than the ratio), and their quotient, what
one microsecond of that Python costs among real ops.

The control row is pure JAX's own apply with a plain loop of known length
(`--control-us`, about 10 us) run before each layer: Python that is neither
effax nor a module system, among the same ops. On a 2-core machine its
quotient was 2 to 4, as the floor's and effax's were, and it stayed so with
synchronous dispatch and single-threaded XLA (`--sync-dispatch`,
`XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`): what a microsecond of Python
costs between eager ops is a property of the machine (caches and interpreter
state that JAX's dispatch Python and the model's evict from each other), not
of the runtime's threads or of whose Python it is. So an eager ratio moves
with the Python per apply times that quotient, which the control measures.
MLP models only: the transformer's ops do not keep shapes when stubbed.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import timeit

import jax
import jax.numpy as jnp
from jax._src.array import ArrayImpl

from benchmarks.common import Spec, batch_norm_like
from benchmarks.libs import pure_jax
from benchmarks.speed_of_light import eager_applies

_OPERATORS = ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__matmul__", "__rmatmul__")


def _first(a, *rest, **kwargs):
    return a


def _stubbed(on: bool, real: dict) -> None:
    """Stub the MLP's ops (`on`) or put the real ones back."""
    for name in _OPERATORS:
        setattr(ArrayImpl, name, _first if on else real[name])
    jax.nn.relu, jnp.matmul, jax.lax.rsqrt = (_first,) * 3 if on else real["functions"]


def _loop(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def control_apply(spec: Spec, n: int):
    """Pure JAX's eager MLP apply (eval) with `_loop(n)` before each layer: known Python among the same ops."""

    def apply(variables, x):
        h = x
        for i, p in enumerate(variables["params"]):
            _loop(n)
            h = pure_jax.dense(p, h)
            if spec.stateful:
                h = batch_norm_like(h, variables["stats"][i]["mean"], variables["stats"][i]["var"], False)[0]
            h = jax.nn.relu(h)
        return h

    return apply


def main(
    model: str = "mlp_stateful", depth: int = 8, rounds: int = 100, control_us: float = 10.0
) -> dict[str, dict[str, float]]:
    spec = Spec(model, depth)
    calls = eager_applies(spec)
    n = max(1, round(control_us / (timeit.timeit(lambda: _loop(1000), number=200) / 200 * 1e6) * 1000))
    control, x = control_apply(spec, n), jnp.ones(spec.input_shape)
    variables = pure_jax.build(spec).init(jax.random.key(0), x)
    calls["control"] = lambda: control(variables, x)
    real = {name: getattr(ArrayImpl, name) for name in _OPERATORS}
    real["functions"] = (jax.nn.relu, jnp.matmul, jax.lax.rsqrt)
    times: dict[tuple[bool, str], list[float]] = {(s, n): [] for s in (False, True) for n in calls}
    order, rng = list(calls), random.Random(0)
    try:
        for i in range(rounds + 5):
            gc.collect()  # once a round, then paused, as `timeit` does: a collection in a call would decide it
            gc.disable()
            for stub in (False, True):
                _stubbed(stub, real)
                rng.shuffle(order)
                for name in order:
                    start = time.perf_counter()
                    jax.block_until_ready(calls[name]())
                    if i >= 5:  # the first rounds warm up
                        times[(stub, name)].append(time.perf_counter() - start)
            gc.enable()
    finally:
        gc.enable()
        _stubbed(False, real)
    median = {k: statistics.median(ts) * 1e6 for k, ts in times.items()}
    base, base_py = median[(False, "pure JAX")], median[(True, "pure JAX")]
    dispatch = "async" if jax.config.values["jax_cpu_enable_async_dispatch"] else "sync"
    print(f"{model} depth {depth}, eager apply ({dispatch} dispatch), {rounds} interleaved rounds (median; pure JAX "
          f"{base:.0f} us)")
    out = {}
    for name in list(calls)[1:]:
        extra, python = median[(False, name)] - base, median[(True, name)] - base_py
        out[name] = {"ratio": median[(False, name)] / base, "extra_us": extra, "python_us": python}
        print(f"  {name:9s} {median[(False, name)] / base:.3f}x  +{extra:5.0f} us real, +{python:4.0f} us of its own "
              f"Python (ops stubbed): {extra / python:.1f} us per us")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all", help="mlp, mlp_stateful, or all")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--control-us", type=float, default=10.0, help="the control's plain Python per layer")
    parser.add_argument("--sync-dispatch", action="store_true", help="turn off JAX's asynchronous CPU dispatch")
    args = parser.parse_args()
    if args.sync_dispatch:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    for model in ("mlp", "mlp_stateful") if args.model == "all" else (args.model,):
        main(model, args.depth, args.rounds, args.control_us)
