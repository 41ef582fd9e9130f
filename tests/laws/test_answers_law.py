"""Law 10, answers match requests: the built-in handlers answer every param, state, key and mode request
with the request's shape, dtype and kind (under init and apply, raw keys too)."""

from hypothesis import given

from effax.testing import laws
from effax.testing import strategies as s


@given(s.models_and_inputs(), s.keys(), s.trainings())
def test_builtin_answers_match_their_requests(model_and_x, key, training):
    model, x = model_and_x
    laws.check_answers_match_requests(model, x, key, training=training)


@given(s.models_and_inputs(require=("random", "param")), s.keys(raw=True))
def test_answers_match_with_raw_keys(model_and_x, key):
    model, x = model_and_x
    laws.check_answers_match_requests(model, x, key)
