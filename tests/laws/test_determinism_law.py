"""Law 1, determinism: same variables, inputs and keys give the same outputs (and init the same variables)."""

from hypothesis import given
from hypothesis import strategies as st

from effax.testing import laws
from effax.testing import strategies as s


@given(s.models_and_inputs(), s.keys(), s.trainings())
def test_same_key_and_input_give_the_same_variables_and_outputs(model_and_x, key, training):
    model, x = model_and_x
    laws.check_determinism(model, x, key, training=training)


@given(st.data(), s.keys())
def test_same_stored_variables_give_the_same_outputs(data, key):
    model, x = data.draw(s.models_and_inputs(), label="model, x")
    laws.check_determinism(model, x, key, variables=data.draw(s.variables(model), label="variables"))


@given(s.models_and_inputs(require=("random",)), s.keys(raw=True))
def test_raw_prng_keys_are_deterministic_too(model_and_x, key):
    model, x = model_and_x
    laws.check_determinism(model, x, key)
