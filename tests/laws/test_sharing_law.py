"""Law 7, sharing: a tied param is stored once, its gradient is the sum of its per-use gradients, sharing
twice equals sharing once; and a shared model's init and gradients are the same under `jax.jit`.

One generator, `strategies.sharing_cases()`, draws the models and bindings here and in
`assert_handler_laws`: param-level ties (chains included) in at least half the examples.
"""

import jax
import jax.numpy as jnp
from hypothesis import given, settings

import effax as fx
from effax.testing import laws
from effax.testing import strategies as s


@given(s.sharing_cases(), s.keys(), s.trainings())
def test_fx_share_obeys_the_sharing_laws(case, key, training):
    model, x, bindings = case
    laws.check_sharing_laws(model, x, key, bindings, training=training)


@settings(max_examples=4)  # each example compiles
@given(s.sharing_cases(), s.keys())
def test_sharing_commutes_with_jit(case, key):
    model, x, bindings = case
    t = fx.transform(fx.share(model, bindings))

    def everything(key, x):
        v = t.init(key, x)
        loss = lambda p: jnp.sum(t.apply({**v, "params": p}, x, rngs=key, mutable=True, training=False)[0])
        return v, jax.value_and_grad(loss)(v["params"])

    eager, jitted = everything(key, x), jax.jit(everything)(key, x)
    rtol, atol = laws.tolerance(*(d for _, d in model.param_specs().values()))
    assert laws.difference(eager, jitted, names=("eager", "jit"), rtol=rtol, atol=atol) is None
