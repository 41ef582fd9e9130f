"""examples/lora.py: only the "lora" collection trains, the base stays bit-identical, and the loss goes down."""

import contextlib
import io

import jax
import jax.numpy as jnp
import pytest
from example_loader import load

pytestmark = pytest.mark.slow  # an example run, seconds each: CI runs it (`--run-slow`)

lora = load("lora")


def paths(tree):
    return sorted("/".join(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def test_lora_example_trains_only_the_adapters():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = lora.main(steps=60)
    variables = report["variables"]
    assert paths(variables["lora"]) == [
        "MLP_0/Dense_0/lora/a",
        "MLP_0/Dense_0/lora/b",
        "MLP_0/Dense_1/lora/a",
        "MLP_0/Dense_1/lora/b",
    ]
    assert "lora" not in str(paths(variables["params"]))
    assert report["lora_count"] == 16 * 2 + 2 * 64 + 64 * 2 + 2 * 64
    assert report["base_count"] == (16 * 64 + 64) + (64 * 64 + 64) + (64 * 4 + 4)
    assert report["start_gap"] == 0.0
    assert report["base_unchanged"]
    assert report["loss_after"] < 0.5 * report["loss_before"]
    text = out.getvalue()
    assert "trainable params: 416 LoRA vs 5508 in the base model" in text
    assert "base params bit-identical after training: True" in text

    # gradients flow to the adapters only: the loss is a function of them, and the base enters as a constant
    x, y = report["data"]
    grads = jax.grad(lora.loss)(variables["lora"], variables["params"], x, y)
    assert paths(grads) == paths(variables["lora"])
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


def test_the_handler_adapts_only_the_chosen_dense_layers():
    t = lora.T
    x = jnp.ones((2, 16))
    only_head = lora.LoRA(["*/Dense_2"], rank=3)
    params = t.init(jax.random.key(0), x, handlers=[only_head])["params"]
    base, adapters = lora.split_lora(params)
    assert paths(adapters) == ["MLP_0/Dense_2/lora/a", "MLP_0/Dense_2/lora/b"]
    assert adapters["MLP_0"]["Dense_2"]["lora"]["b"].shape == (3, 4)
    assert lora.merge(base, adapters) == params
    bumped = jax.tree.map(lambda a: a + 1.0, adapters)
    moved = t.apply({"params": lora.merge(base, bumped)}, x, handlers=[only_head])
    assert not jnp.allclose(moved, t.apply({"params": base}, x))
