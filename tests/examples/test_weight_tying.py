"""The weight-tying example runs, lists each tied weight once, and trains."""

import contextlib
import io

import jax
import numpy as np
import pytest
from example_loader import load

pytestmark = pytest.mark.slow  # an example run, seconds each: CI runs it (`--run-slow`)


def paths(tree):
    return {"/".join(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_weight_tying_example():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = load("weight_tying").main(steps=15, verbose=True)
    # Inox's WeightSharingMLP: no l2, no l4/weight
    assert paths(report["mlp_params"]) == {"l1/weight", "l1/bias", "l3/weight", "l3/bias", "l4/bias"}
    # tied embeddings: the decoder holds no table of its own
    assert paths(report["encdec_params"]) == {
        "encoder/embed/table",
        "encoder/hidden/weight",
        "encoder/hidden/bias",
        "decoder/hidden/weight",
        "decoder/hidden/bias",
    }
    assert paths(report["penzai_params"]) == {
        "embed",
        "encoder/hidden/weight",
        "encoder/hidden/bias",
        "decoder/hidden/weight",
        "decoder/hidden/bias",
    }
    np.testing.assert_allclose(report["grad_gap"], 0.0, atol=1e-5)
    assert report["loss_after"] < report["loss_before"]
    text = out.getvalue()
    assert "decoder/embed -> encoder/embed (asked at decoder/embed/table)" in text
    assert text.count("table  (16, 32)") == 1
