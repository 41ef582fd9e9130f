"""Interleaved same-process A/B of trace time (and abstract init), the fairest ratio on a shared machine.

Run: python benchmarks/trace_ab.py [--depth 256] [--samples 5] [--model mlp]
Each sample lowers a fresh function (no trace cache hit); the libraries take
turns, so machine noise hits all of them alike. Prints medians and ratios to
pure JAX.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from benchmarks.common import Spec
from benchmarks.libs import effax_nn, effax_raw, pure_jax

LIBS = {"pure JAX": pure_jax, "effax": effax_raw, "effax.nn": effax_nn}


def main(depth: int = 256, samples: int = 5, model: str = "mlp") -> dict[str, dict[str, float]]:
    spec = Spec(model, depth)
    key = jax.random.key(0)
    x = jax.numpy.ones(spec.input_shape)
    benches = {name: lib.build(spec) for name, lib in LIBS.items()}
    variables = {name: b.init(key, x) for name, b in benches.items()}
    times: dict[str, dict[str, list[float]]] = {n: {"trace_train": [], "abstract_init": []} for n in LIBS}
    for i in range(samples + 1):
        for name, b in benches.items():
            t0 = time.perf_counter()
            jax.jit(lambda *a, b=b: b.train_step(*a)).lower(variables[name], x, key)
            t1 = time.perf_counter()
            b.eval_shape_init(key, x)
            t2 = time.perf_counter()
            if i:  # the first round warms up
                times[name]["trace_train"].append(t1 - t0)
                times[name]["abstract_init"].append(t2 - t1)
    medians = {n: {m: statistics.median(v) for m, v in ms.items()} for n, ms in times.items()}
    base = medians["pure JAX"]
    print(f"{model} depth {depth}, {samples} interleaved samples (median seconds, ratio to pure JAX)")
    for name, ms in medians.items():
        cells = "  ".join(f"{m} {v:.3f}s {v / base[m]:.2f}x" for m, v in ms.items())
        print(f"  {name:9s} {cells}")
    return medians


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depth", type=int, default=256)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--model", default="mlp")
    args = parser.parse_args()
    main(args.depth, args.samples, args.model)
