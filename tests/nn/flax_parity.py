"""One helper for the layer tests: run an effax layer on a Flax layer's weights and compare outputs."""

import flax.linen as nn  # noqa: F401  (imported so that a missing Flax fails here, once)
import jax
import jax.numpy as jnp
import numpy as np

import effax as fx

KEY = jax.random.key(0)


def rand(*shape, seed=1):
    """Test data from numpy: a `jax.random` call per new shape would compile a program each time."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def against_flax(layer, flax_layer, *args, atol=1e-5, **kwargs):
    """Init flax, run our layer on flax's weights (ours live under `<Class>_0`), compare outputs."""
    fv = jax.jit(flax_layer.init)(jax.random.key(7), *args, **kwargs)
    t = fx.transform(lambda *a, **k: layer(*a, **k))
    name = f"{type(layer).__name__}_0"
    ours = jax.eval_shape(t.init, KEY, *args, **kwargs)
    assert shapes(ours["params"][name]) == shapes(fv["params"])  # same names and layouts as Flax
    v = {c: {name: tree} for c, tree in fv.items()}
    out = jax.jit(t.apply)(v, *args, **kwargs)
    expected = jax.jit(flax_layer.apply)(fv, *args, **kwargs)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5), out, expected)
    return t, v
    return t, v
