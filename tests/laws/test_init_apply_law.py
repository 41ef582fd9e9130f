"""Law 3, init/apply agreement: apply on what init made reproduces init's output."""

from hypothesis import given

from effax.testing import laws
from effax.testing import strategies as s


@given(s.models_and_inputs(), s.keys(), s.trainings())
def test_apply_on_init_variables_reproduces_init_output(model_and_x, key, training):
    model, x = model_and_x
    laws.check_init_apply_agreement(model, x, key, training=training)
