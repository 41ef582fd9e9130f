"""examples/activation_patching.py: patching the positions the model uses moves its output; the others do not."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from example_loader import load

pytestmark = pytest.mark.slow  # an example run, seconds each: CI runs it (`--run-slow`)

patching = load("activation_patching")


def test_activation_patching_example_finds_the_used_positions():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = patching.main(steps=300)
    effect, expected = report["effect"], report["expected"]
    for used in patching.USED:
        np.testing.assert_allclose(effect[used], expected[used], rtol=0.1)
    for unused in (1, 3):
        assert effect[unused] < 0.05 * min(effect[u] for u in patching.USED)
    assert report["all_gap"] < 1e-4
    assert "patching every position turns B's output into A's" in out.getvalue()


def test_patch_touches_only_its_call_and_positions():
    variables = patching.T.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    a = jnp.array([[1, 2, 3, 4]])
    b = jnp.array([[5, 6, 7, 8]])
    _, captured = patching.T.apply(variables, a, capture_intermediates=True)
    act_a = captured["intermediates"]["Probe_0"]["Dense_0"]["__call__"][0]
    _, patched = patching.T.apply(
        variables, b, capture_intermediates=True, handlers=[patching.Patch(patching.LAYER, act_a, [1])]
    )
    _, clean = patching.T.apply(variables, b, capture_intermediates=True)
    layer = patched["intermediates"]["Probe_0"]["Dense_0"]["__call__"][0]  # capture records the patched output
    np.testing.assert_array_equal(layer[:, 1], act_a[:, 1])
    np.testing.assert_array_equal(
        layer[:, [0, 2, 3]], clean["intermediates"]["Probe_0"]["Dense_0"]["__call__"][0][:, [0, 2, 3]]
    )
    # the embedding before the patched call is untouched
    np.testing.assert_array_equal(
        patched["intermediates"]["Probe_0"]["Embed_0"]["__call__"][0],
        clean["intermediates"]["Probe_0"]["Embed_0"]["__call__"][0],
    )
