"""Effects cost nothing at run time: effax's jitted programs compile to as many HLO ops as pure JAX's.

The models are the benchmark ones (`benchmarks/libs/`), shrunk. A model with
no random draws must compile to the same op count as the hand-written one;
the dropout model's eval apply draws nothing, so it must match too (its train
step adds only the pinned key folds, docs/design.md's one allowed difference).
"""

import dataclasses
import functools

import jax
import pytest

# `benchmarks` imports as a package: the root conftest.py puts the repository root on sys.path.
from benchmarks.common import Spec, count_hlo_ops
from benchmarks.libs import build, missing_packages

EFFAX = ["effax"] + ([] if missing_packages("effax.nn") else ["effax.nn"])
SMALL = {"width": 16, "batch": 4, "seq": 8, "d_model": 16, "heads": 2, "mlp_dim": 32}


@functools.cache
def op_counts(label: str, spec: Spec) -> tuple[int, int]:
    bench = build(label, spec)
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), spec.input_shape)
    variables = bench.init(key, x)
    apply = count_hlo_ops(jax.jit(bench.apply).lower(variables, x).compile())
    train = count_hlo_ops(jax.jit(bench.train_step).lower(variables, x, key).compile())
    return apply, train


@pytest.mark.parametrize("label", EFFAX)
@pytest.mark.parametrize(
    "model,depth", [("mlp", 2), pytest.param("transformer", 1, marks=pytest.mark.slow)]  # slow: runs in CI
)
def test_apply_and_train_step_compile_to_pure_jax_op_count(label, model, depth):
    spec = Spec(model, depth, **SMALL)
    assert op_counts(label, spec) == op_counts("pure JAX", spec)


@pytest.mark.parametrize("label", EFFAX)
def test_eval_apply_of_stateful_model_compiles_to_pure_jax_op_count(label):
    spec = Spec("mlp_stateful", 2, **SMALL)
    assert op_counts(label, spec)[0] == op_counts("pure JAX", spec)[0]


def test_op_count_tells_programs_apart():
    """The counter itself: one more layer is more ops, so equal counts above are not vacuous."""
    spec = Spec("mlp", 2, **SMALL)
    deeper = dataclasses.replace(spec, depth=3)
    assert op_counts("effax", deeper)[0] > op_counts("effax", spec)[0]
