"""Interleaved same-process A/B of trace time (and abstract init and apply), the fairest ratio on a shared machine.

Run: python -m benchmarks.trace_ab [--depth 256] [--samples 5] [--model mlp | mlp_stateful | transformer | all]
Each sample lowers a fresh function (no trace cache hit); the libraries take
turns, so machine noise hits all of them alike. Samples are timed as
`benchmarks/worker.py` times them (and so RESULTS.md): after a collection,
with the garbage collector paused, as `timeit` does. Otherwise whether a full
collection (about 0.1 s at depth 256, over the tracer's millions of objects)
lands inside a sample decides a ratio more than the library does. Prints
medians and ratios to pure JAX.

The MLP models' eager apply is also timed for `benchmarks/speed_of_light.py`'s
floor (a 60-line module system with no effects, on `effax.nn`'s variables), a
reference row: on a 2-core machine every microsecond of Python between eager
JAX ops costs several of wall time, the floor's too, so its ratio is what no
module system that names layers and reads variables in Python gets under.
"""

from __future__ import annotations

import argparse
import statistics

import jax

from benchmarks.common import Spec
from benchmarks.libs import effax_nn, effax_raw, pure_jax
from benchmarks.speed_of_light import eager_applies
from benchmarks.worker import timed

LIBS = {"pure JAX": pure_jax, "effax": effax_raw, "effax.nn": effax_nn}


def main(depth: int = 256, samples: int = 5, model: str = "mlp", eager_depth: int = 8) -> dict[str, dict[str, float]]:
    spec, small = Spec(model, depth), Spec(model, eager_depth)
    key = jax.random.key(0)
    x = jax.numpy.ones(spec.input_shape)
    benches = {name: lib.build(spec) for name, lib in LIBS.items()}
    eager = eager_applies(small)  # the libraries' and, for the MLP models, the floor's (checked there)
    variables = {name: b.init(key, x) for name, b in benches.items()}
    metrics = ("trace_train", "abstract_init", "abstract_apply", "eager_apply")
    times: dict[str, dict[str, list[float]]] = {n: {m: [] for m in metrics} for n in LIBS}
    if "floor" in eager:
        times["floor"] = {"eager_apply": []}
    for i in range(samples + 1):
        for name, b in benches.items():
            train, _ = timed(lambda b=b, name=name: jax.jit(lambda *a: b.train_step(*a)).lower(variables[name], x, key))
            abstract, _ = timed(lambda b=b: b.eval_shape_init(key, x))
            forward, _ = timed(lambda b=b, name=name: b.eval_shape_apply(variables[name], x))
            # eager apply of the small model, 10 calls each waited for (as the worker times it): the
            # per-call cost of effects without jit
            eager_apply = [timed(eager[name])[0] for _ in range(10)]
            if i:  # the first round warms up
                times[name]["trace_train"].append(train)
                times[name]["abstract_init"].append(abstract)
                times[name]["abstract_apply"].append(forward)
                times[name]["eager_apply"].extend(eager_apply)
        if "floor" in eager:  # eager only, the floor's turn after the libraries'
            eager_apply = [timed(eager["floor"])[0] for _ in range(10)]
            if i:
                times["floor"]["eager_apply"].extend(eager_apply)
    medians = {n: {m: statistics.median(v) for m, v in ms.items()} for n, ms in times.items()}
    base = medians["pure JAX"]
    print(f"{model} depth {depth} (eager apply: depth {eager_depth}), {samples} interleaved samples "
          "(median seconds, ratio to pure JAX)")
    for name, ms in medians.items():
        cells = "  ".join(f"{m} {v:.3f}s {v / base[m]:.2f}x" for m, v in ms.items())
        print(f"  {name:9s} {cells}")
    return medians


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depth", type=int, default=256)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--model", default="mlp", help="mlp, mlp_stateful, transformer, or all")
    parser.add_argument("--eager-depth", type=int, default=8)
    args = parser.parse_args()
    for model in ("mlp", "mlp_stateful", "transformer") if args.model == "all" else (args.model,):
        main(args.depth if model != "transformer" else max(1, args.depth // 64), args.samples, model, args.eager_depth)
