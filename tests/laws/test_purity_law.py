"""Law 8, purity: `jax.jit(t.apply)` equals `t.apply`, and no tracer leaks under `jax.checking_leaks()`."""

import jax
from hypothesis import given, settings
from hypothesis import strategies as st

import effax as fx
from effax.testing import laws, lifting
from effax.testing import strategies as s


@settings(max_examples=6)  # each example compiles
@given(s.models_and_inputs(), s.keys(), s.trainings())
def test_jit_of_apply_equals_apply_without_leaks(model_and_x, key, training):
    model, x = model_and_x
    laws.check_purity_under_jit(model, x, key, training=training)


@settings(max_examples=6)
@given(s.models_and_inputs(require=("module_call",)), s.trainings(), st.sampled_from(lifting.CONTEXTS))
def test_summary_of_a_lifted_model_leaks_no_tracer(model_and_x, training, context):
    # the abstract run's values (a lift's noted module calls, the values it made) must not reach the records
    model, x = model_and_x
    t = fx.transform(lifting.lifted(model, context, 2))
    with jax.checking_leaks():
        records = fx.effects_of(t, x, training=training, rngs=jax.random.key(0))
        fx.summary(t, x, training=training, rngs=jax.random.key(0))
    for r in records:
        assert not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(vars(r.request)))
