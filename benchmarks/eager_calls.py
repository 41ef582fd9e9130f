"""Python calls per eager apply: the noise-free side of the eager bar, to track effax's per-call work.

Run: python -m benchmarks.eager_calls [--model mlp | mlp_stateful | all] [--depth 8] [--top 0]

The eager ratio (`benchmarks/speed_of_light.py`, `benchmarks/trace_ab.py`)
moves by more than the 1.2x bar between runs on a shared 2-core machine: at
depth 8 the ops are small, so pure JAX's own time is dispatch and swings
from about 1.8 to 3.9 ms within an hour, and the same effax code reads 1.1x
in one run and 1.5x in the next. Counting is exact: `cProfile` counts every
function call (Python frames and C builtins) of one warm apply, for pure
JAX, the floor of `benchmarks.speed_of_light`, effax with raw effects and
`effax.nn`, on the same variables. The calls above pure JAX's are what
effax adds per call; a change to the request path should lower them, and
`--top N` lists the N functions that add the most. Python frames (calls
of functions written in Python, not builtins) are given apart. Counts are not time
(a builtin costs less than a frame), so bars are still checked with the
timed A/B; this says whether a change removed work, which timing here cannot.
`benchmarks/eager_python.py` times that work alone (JAX ops stubbed).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats

import jax

from benchmarks.common import Spec
from benchmarks.speed_of_light import eager_applies


def _profile(call) -> dict[tuple, int]:
    for _ in range(3):  # warm: caches, routes and lazily built objects are made before the counted call
        jax.block_until_ready(call())
    profile = cProfile.Profile()
    profile.enable()
    jax.block_until_ready(call())
    profile.disable()
    return {where: stats[1] for where, stats in pstats.Stats(profile).stats.items()}  # (file, line, name): calls


def _where(key: tuple) -> str:
    file, line, name = key
    return f"{file.rsplit('site-packages/', 1)[-1].split('/benchmarks/../', 1)[-1]}:{line}({name})"


def main(model: str = "mlp", depth: int = 8, top: int = 0) -> dict[str, int]:
    calls = eager_applies(Spec(model, depth))
    counted = {name: _profile(call) for name, call in calls.items()}
    totals = {name: sum(c.values()) for name, c in counted.items()}
    frames = {name: sum(n for k, n in c.items() if k[0] != "~") for name, c in counted.items()}  # not builtins
    base, base_frames = totals["pure JAX"], frames["pure JAX"]
    print(f"{model} depth {depth}, function calls of one warm eager apply (cProfile)")
    for name, total in totals.items():
        added = total - base
        print(f"  {name:9s} {total:7d} calls  {added:+6d} over pure JAX  ({added / depth:+.0f} a layer; "
              f"Python frames {frames[name] - base_frames:+d})")
    for name in ("effax", "effax.nn") if top else ():
        added = collections.Counter({k: n - counted["pure JAX"].get(k, 0) for k, n in counted[name].items()})
        print(f"  most added by {name}:")
        for where, n in added.most_common(top):
            print(f"    {n:5d}  {_where(where)}")
    return totals


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all", help="mlp, mlp_stateful, transformer, or all")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--top", type=int, default=0, help="list the N functions each effax row adds most")
    args = parser.parse_args()
    for model in ("mlp", "mlp_stateful", "transformer") if args.model == "all" else (args.model,):
        main(model, args.depth, args.top)
