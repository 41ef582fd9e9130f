"""Values an initializer or a state `init()` makes are stored as JAX arrays of canonical dtype: `t.init` stores
what `jit(t.init)` and `eval_shape(t.init)` say it does (DESIGN: float64 without x64 means float32 everywhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx

KEY = jax.random.key(0)


def numpy_made(x):
    w = fx.param("w", lambda key, shape, dtype: np.full(shape, 0.5), (2,))  # float64 from NumPy
    s = fx.local_state("s", lambda: {"m": np.zeros(2), "n": np.int64(3)}, collection="stats")
    return x * w + s.get()["m"] + s.get()["n"]


def kinds(tree):
    return jax.tree.map(lambda a: (isinstance(a, jax.Array), jnp.dtype(a.dtype).name), tree)


def test_numpy_values_are_stored_as_jax_arrays_of_the_canonical_dtype():
    t = fx.transform(numpy_made)
    v = t.init(KEY, 1.0)
    assert kinds(v) == kinds(jax.jit(t.init)(KEY, 1.0))
    assert jax.tree.map(lambda a: jnp.dtype(a.dtype), v) == jax.tree.map(
        lambda a: a.dtype, jax.eval_shape(t.init, KEY, 1.0)
    )
    assert kinds(v) == {
        "params": {"w": (True, "float32")}, "stats": {"s": {"m": (True, "float32"), "n": (True, "int32")}}
    }
    assert t.apply(v, 1.0).dtype == jax.jit(t.apply)(v, 1.0).dtype == jnp.float32


def test_state_created_in_apply_is_canonical_too():
    t = fx.transform(numpy_made)
    _, updates = t.apply({"params": {"w": jnp.ones(2)}}, 1.0, mutable=True)
    assert kinds(updates) == {"stats": {"s": {"m": (True, "float32"), "n": (True, "int32")}}}


def scalar_body(x):
    return x + fx.local_state("s", lambda: jnp.zeros(())).get() + fx.param("p", jax.nn.initializers.zeros, ())


@pytest.mark.parametrize("lift", ["plain", "remat"])
def test_scalar_variables_made_in_a_lifted_body_are_jax_arrays(lift):
    """`fx.remat` hands scalars made in its body back as JAX's literal type (a NumPy subclass), not arrays."""
    body = fx.remat(scalar_body) if lift == "remat" else scalar_body
    t = fx.transform(body)
    v = t.init(KEY, 1.0)
    assert kinds(v) == {"params": {"p": (True, "float32")}, "state": {"s": (True, "float32")}}
    _, updates = t.apply({"params": v["params"]}, 1.0, mutable=True)
    assert kinds(updates) == {"state": {"s": (True, "float32")}}
    jax.block_until_ready(v)
