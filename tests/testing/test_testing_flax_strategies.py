"""effax.testing.strategies.flax_models: generated linen models are bounded, run, and say what apply writes."""

import jax
import jax.numpy as jnp
from hypothesis import given, settings
from hypothesis import strategies as st

from effax.testing import strategies as s

X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)


def _flat(layers):
    return [spec for spec in layers if spec[0] != "child"] + [
        inner for spec in layers if spec[0] == "child" for inner in spec[1]
    ]


@settings(max_examples=30)
@given(s.flax_models(max_layers=3, out_features=2))
def test_flax_models_respect_their_bounds_and_name_sows_and_counters_once(module):
    layers = module.layers
    assert layers[-1] == ("Dense", 2)
    assert len(layers) <= 3 + 2  # the drawn layers, the child, the appended Dense
    children = [spec for spec in layers if spec[0] == "child"]
    assert len(children) <= 1 and all(1 <= len(c[1]) <= 3 for c in children)
    assert all(inner[0] != "child" for c in children for inner in c[1])
    for kind in ("sow", "count"):
        names = [spec[1] for spec in _flat(layers) if spec[0] == kind]
        assert len(names) == len(set(names))


@given(s.flax_models(nested=False))
def test_flax_models_without_nesting_hold_no_child(module):
    assert all(spec[0] != "child" for spec in module.layers)


@settings(max_examples=10)
@given(s.flax_models(), st.booleans())
def test_updated_collections_are_what_apply_writes(module, train):
    """Flax refuses a write to an immutable collection: apply with exactly these as `mutable=` runs, and
    returns each of them."""
    variables = module.init(jax.random.key(0), X, train=False)
    mutable = module.updated_collections(train)
    out, updates = module.apply(variables, X, train=train, rngs={"dropout": jax.random.key(1)}, mutable=mutable)
    assert out.shape[0] == 2
    assert sorted(updates) == mutable
