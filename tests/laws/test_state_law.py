"""Law 5, state: get after set returns the set value, the last set wins, frozen equals mutable without sets."""

from hypothesis import given

from effax.testing import laws
from effax.testing import strategies as s


@given(s.models_and_inputs(require=("state",)), s.keys(), s.trainings())
def test_local_state_obeys_get_set_and_frozen_laws(model_and_x, key, training):
    model, x = model_and_x
    laws.check_state_laws(model, x, key, training=training)
