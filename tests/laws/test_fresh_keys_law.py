"""Law 11, fresh keys: no two `next_key` draws of one run are equal, across paths, streams and draws."""

from hypothesis import given

from effax.testing import laws
from effax.testing import strategies as s


@given(s.models_and_inputs(require=("random", "random", "random")), s.keys(), s.trainings())
def test_no_two_draws_of_a_run_repeat(model_and_x, key, training):
    model, x = model_and_x
    laws.check_fresh_keys(model, x, key, training=training)
