"""Law 8, purity: `jax.jit(t.apply)` equals `t.apply`, and no tracer leaks under `jax.checking_leaks()`."""

from hypothesis import given, settings

from effax.testing import laws
from effax.testing import strategies as s


@settings(max_examples=6)  # each example compiles
@given(s.models_and_inputs(), s.keys(), s.trainings())
def test_jit_of_apply_equals_apply_without_leaks(model_and_x, key, training):
    model, x = model_and_x
    laws.check_purity_under_jit(model, x, key, training=training)
