"""Law 7 (DESIGN.md): a tied param appears once, its gradient is the sum of the per-use
gradients, sharing twice equals sharing once, and sharing commutes with jit.

Models and bindings are generated here: a few same-width layers (`L0`, `L1`, ...),
each with `w`, `b` and sometimes a nested `sub/g`, run in a generated order (a
layer may run twice); bindings tie a later layer to an earlier one, whole
(a tied layer) or param by param (tied params), so chains occur but cycles do not.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import effax as fx

D = 3
INIT = jax.nn.initializers.normal(0.5)
KEY = jax.random.key(0)
X = jnp.linspace(-1.0, 1.0, D)


@st.composite
def models(draw):
    n = draw(st.integers(2, 4))
    has_sub = [draw(st.booleans()) for _ in range(n)]
    order = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=6))
    order = sorted(set(range(n))) + order  # every layer runs at least once
    bindings = {}
    for i in range(1, n):
        j = draw(st.integers(0, i - 1))
        how = draw(st.sampled_from(["none", "layer", "params"]))
        if how == "layer":
            bindings[f"L{i}"] = f"L{j}"
        elif how == "params":
            names = ["w", "b"] + (["sub/g"] if has_sub[i] and has_sub[j] else [])
            for name in draw(st.lists(st.sampled_from(names), min_size=1, unique=True)):
                bindings[f"L{i}/{name}"] = f"L{j}/{name}"
    return has_sub, order, bindings


def make_fn(has_sub, order):
    def layer(i, x):
        with fx.scope(f"L{i}"):
            w = fx.param("w", INIT, (D, D))
            b = fx.param("b", INIT, (D,))
            y = jnp.tanh(x @ w + b)
            if has_sub[i]:
                with fx.scope("sub"):
                    y = y * fx.param("g", INIT, (D,))
        return y

    def fn(x):
        for i in order:
            x = layer(i, x)
        return jnp.sum(x**2)

    return fn


def resolve(path, bindings):
    """Reference resolution: rewrite by the longest alias prefix until none applies."""
    table = {tuple(a.split("/")): tuple(c.split("/")) for a, c in bindings.items()}
    while True:
        for i in range(len(path), 0, -1):
            if path[:i] in table:
                path = table[path[:i]] + path[i:]
                break
        else:
            return path


def leaves(tree):
    return {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat):
    out = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


@given(models())
def test_a_tied_param_appears_once(model):
    has_sub, order, bindings = model
    fn = make_fn(has_sub, order)
    untied_paths = set(leaves(fx.transform(fn).init(KEY, X)["params"]))
    tied = leaves(fx.transform(fx.share(fn, bindings)).init(KEY, X)["params"])
    assert set(tied) == {resolve(p, bindings) for p in untied_paths}
    aliases = [tuple(a.split("/")) for a in bindings]
    assert not any(p[: len(a)] == a for p in tied for a in aliases)


@given(models())
def test_gradient_is_the_sum_of_per_use_gradients(model):
    has_sub, order, bindings = model
    fn = make_fn(has_sub, order)
    tied_t, untied_t = fx.transform(fx.share(fn, bindings)), fx.transform(fn)
    tied = tied_t.init(KEY, X)["params"]
    tied_flat = leaves(tied)
    untied_paths = leaves(untied_t.init(KEY, X)["params"])
    untied = unflatten({p: tied_flat[resolve(p, bindings)] for p in untied_paths})

    # equal weights give equal outputs
    np.testing.assert_allclose(tied_t.apply({"params": tied}, X), untied_t.apply({"params": untied}, X), rtol=1e-5)
    g_tied = leaves(jax.grad(lambda p: tied_t.apply({"params": p}, X))(tied))
    g_untied = leaves(jax.grad(lambda p: untied_t.apply({"params": p}, X))(untied))
    summed = {}
    for p, g in g_untied.items():
        c = resolve(p, bindings)
        summed[c] = summed.get(c, 0.0) + g
    assert set(summed) == set(g_tied)
    for c in g_tied:
        np.testing.assert_allclose(g_tied[c], summed[c], rtol=1e-4, atol=1e-6)


@given(models())
def test_sharing_twice_equals_sharing_once(model):
    has_sub, order, bindings = model
    fn = make_fn(has_sub, order)
    once = fx.transform(fx.share(fn, bindings))
    twice = fx.transform(fx.share(fx.share(fn, bindings), bindings))
    v1, v2 = once.init(KEY, X), twice.init(KEY, X)
    assert jax.tree.structure(v1) == jax.tree.structure(v2)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), v1, v2)))
    np.testing.assert_array_equal(once.apply(v1, X), twice.apply(v1, X))


@settings(max_examples=6)  # each example compiles (about 1.5 s of CPU); 6 keep this law short
@given(models())
def test_sharing_commutes_with_jit(model):
    has_sub, order, bindings = model
    t = fx.transform(fx.share(make_fn(has_sub, order), bindings))

    def everything(key, x):
        v = t.init(key, x)
        loss, g = jax.value_and_grad(lambda p: t.apply({"params": p}, x))(v["params"])
        return v, loss, g

    eager, jitted = everything(KEY, X), jax.jit(everything)(KEY, X)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
