"""Measure one library on one model in this (fresh) process; print the samples as one JSON line.

Run by `run.py` as `python -m benchmarks.worker LIB MODEL DEPTH [--reps N]` from the repository
root. The first thing measured is the first `init` call, so it pays what a user's first call pays.
Every traced measurement wraps the step in a fresh Python function, so no jit cache is hit, and
drops one warm-up sample, so one-time costs of JAX itself (first use of a primitive) do not land on
whichever library happens to go first.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

from benchmarks.common import Spec, count_hlo_ops
from benchmarks.libs import build

EAGER_DEPTH = 8


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds `fn()` takes, results ready, with the garbage collector paused (as `timeit` does)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        return time.perf_counter() - start, out
    finally:
        gc.enable()


def samples(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        timed(fn)
    return [timed(fn)[0] for _ in range(reps)]


def lower_fresh(fn: Callable[..., Any], *args: Any) -> Any:
    """`jax.jit(step).lower(...)` of a new function object, so nothing is served from a trace cache."""
    return jax.jit(lambda *a: fn(*a)).lower(*args)


def measure(label: str, spec: Spec, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), spec.input_shape)
    jax.block_until_ready(x)

    bench = build(label, spec)
    if spec.depth <= EAGER_DEPTH:  # a small model traces in tens of milliseconds, where noise weighs most
        reps = max(reps, 6)
    seconds, variables = timed(lambda: bench.init(key, x))
    out["init"] = [seconds]
    out["abstract_init"] = samples(lambda: bench.eval_shape_init(key, x), reps)

    out["abstract_apply"] = samples(lambda: bench.eval_shape_apply(variables, x), reps)
    out["trace_apply"] = samples(lambda: lower_fresh(bench.apply, variables, x), reps)
    out["trace_train"] = samples(lambda: lower_fresh(bench.train_step, variables, x, key), reps)

    lowered = lower_fresh(bench.train_step, variables, x, key)
    seconds, compiled = timed(lambda: lowered.compile())
    out["compile_train"] = [seconds]
    out["hlo_train"] = count_hlo_ops(compiled)
    out["hlo_apply"] = count_hlo_ops(lower_fresh(bench.apply, variables, x).compile())

    # steady state: thread the variables through the compiled step, as a training loop does
    state = {"v": variables}

    def step():
        state["v"], loss = compiled(state["v"], x, key)
        return loss

    first, _ = timed(step)
    calls = max(3, min(50, int(0.25 / max(first, 1e-6))))
    out["step"] = [timed(lambda: [step() for _ in range(calls)][-1])[0] / calls for _ in range(max(3, reps))]

    if spec.depth == EAGER_DEPTH and spec.model != "transformer":
        # a call costs milliseconds: many samples, so the median is not one noisy call's
        out["eager_apply"] = samples(lambda: bench.apply(variables, x), max(40, 20 * reps), warmup=3)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("label")
    parser.add_argument("model")
    parser.add_argument("depth", type=int)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    result = measure(args.label, Spec(args.model, args.depth), args.reps)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
