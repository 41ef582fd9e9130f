"""Laws 9, 3 and 14 over generated Flax linen models (`strategies.flax_models`) run through `fx.from_flax`.

Law 9 (interop): on the variables Flax's own `module.init` makes, `t.apply` returns what `module.apply`
returns (outputs, updated collections and sown intermediates), in eval and in training; at the root, for a
module whose init draws from "params" only, `t.init_with_output` is Flax's. Law 3 (init/apply agreement):
`t.apply` on `t.init`'s variables reproduces `t.init_with_output`'s output with one key, in both modes (a
training-mode init draws its dropout stream as apply does). Law 14 (lifting): `fx.scan` of the module over
two layers equals two unrolled scopes on the restacked variables; and `lifting.check_lifting` (init, apply,
updates, keys per iteration) holds for `fx.scan`, `fx.vmap` and `fx.remat` of it, in both modes.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import effax as fx
from effax.testing import lifting
from effax.testing import strategies as s

SHAPE = (2, 3)  # generated models run on any (batch, features) input; a tiny one keeps each example fast
MODES = (False, True)


def inputs():
    return hnp.arrays(np.float32, SHAPE, elements=st.floats(-2, 2, width=32))


def assert_same(ours, theirs, what):
    """Equal structures, leaves equal to float32 rounding (both sides run the same Flax code)."""
    assert jax.tree.structure(ours) == jax.tree.structure(theirs), (
        f"{what}: the structures differ\n  effax: {jax.tree.structure(ours)}\n  flax:  {jax.tree.structure(theirs)}"
    )
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6,
                                   err_msg=f"{what} at {jax.tree_util.keystr(path)}")


def filled(variables):
    """The collections holding a variable: effax's init always has a "params" entry (`{}` for a module
    without params, as for any effax model), where Flax's init leaves it out."""
    return {c: v for c, v in variables.items() if jax.tree.leaves(v)}


def draws_dropout(module, train):
    """Whether the module draws from the "dropout" stream in this mode (Flax's rate-0 dropout draws nothing)."""
    layers = list(module.layers) + [spec for child in module.layers if child[0] == "child" for spec in child[1]]
    return train and any(kind == "Dropout" and rate > 0 for kind, *rest in layers for rate in rest[:1])


@settings(max_examples=6)
@given(s.flax_models(), inputs(), s.keys(), s.keys())
def test_law_9_from_flax_returns_what_module_apply_returns(module, x, key, dropout_key):
    variables = module.init(key, x, train=False)
    t = fx.transform(fx.from_flax(module))
    for train in MODES:
        options = dict(train=train, rngs={"dropout": dropout_key}, mutable=module.updated_collections(train) or False)
        ours, theirs = t.apply(variables, x, **options), module.apply(variables, x, **options)
        assert_same(ours, theirs, f"apply (train={train}, mutable={options['mutable']})")
        if not draws_dropout(module, train):  # documented: at the root, init is Flax's own init
            out, made = t.init_with_output(key, x, train=train)
            flax_out, flax_made = module.init_with_output(key, x, train=train)
            assert_same((out, filled(made)), (flax_out, filled(flax_made)), f"init_with_output (train={train})")


@settings(max_examples=12)
@given(s.flax_models(), inputs(), s.keys())
def test_law_3_apply_on_init_variables_reproduces_init_output(module, x, key):
    t = fx.transform(fx.from_flax(module))
    for train in MODES:
        out, variables = t.init_with_output(key, x, train=train)
        again, _ = t.apply(variables, x, rngs=key, mutable=True, train=train)
        assert_same(again, out, f"law 3 (train={train}): apply on init's variables vs init's output")


def restack(tree, n):
    """Variables of `fx.scan` (leading axis `n`) as the unrolled model's: `{"l<i>": slice i}` per collection."""
    return {c: {f"l{i}": jax.tree.map(lambda a, i=i: a[i], sub) for i in range(n)} for c, sub in tree.items()}


@settings(max_examples=6)
@given(s.flax_models(out_features=SHAPE[-1]), inputs(), s.keys())
def test_law_14_scan_of_a_flax_module_equals_the_unrolled_layers(module, x, key):
    f = fx.from_flax(module)
    layer = lambda h: f(h, train=False)  # noqa: E731

    def unrolled(h):
        for i in range(2):
            with fx.scope(f"l{i}"):
                h = layer(h)
        return h

    scanned = fx.transform(lambda h: fx.scan(lambda c, _: (layer(c), None), length=2)(h)[0])
    variables = scanned.init(key, x)
    # running statistics moved off their init values, unlike per layer, so a layer reading another's shows
    shift = lambda a: a + jnp.arange(1, 3, dtype=a.dtype).reshape((2,) + (1,) * (a.ndim - 1))  # noqa: E731
    variables = {c: jax.tree.map(shift, v) if c == "batch_stats" else v for c, v in variables.items()}
    # the reference compiled, as the scan body is: run eagerly it rounds otherwise, which LayerNorm's variance
    # (E[x^2] - E[x]^2) amplifies past float32 tolerance on rows with a large common offset (1e-5 apart on
    # child(BatchNorm), LayerNorm, Dense(3) at x = [[.25, 0, 0], [0, 0, 0]], where jit(unrolled) equals the scan)
    expected = jax.jit(fx.transform(unrolled).apply)(restack(variables, 2), x)
    assert_same(scanned.apply(variables, x), expected, "fx.scan over 2 layers vs the unrolled layers (eval apply)")


@settings(max_examples=5)
@given(s.flax_models(out_features=SHAPE[-1]), inputs(), s.keys(), st.sampled_from(lifting.CONTEXTS), st.booleans())
def test_law_14_lifted_flax_modules_pass_check_lifting(module, x, key, context, training):
    """The kit's law 14 on the module: init, apply, updates and sown values, dropout keys included (iteration
    `i` gets what the lifted transform gives it), `train` fed from `fx.is_training()`."""
    f = fx.from_flax(module)
    lifting.check_lifting(lambda h: f(h, train=fx.is_training()), x, key, context=context, training=training)
