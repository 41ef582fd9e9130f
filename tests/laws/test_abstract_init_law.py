"""Law 4, abstract init: `jax.eval_shape(t.init, k, x)` has the structure, shapes and dtypes of `t.init(k, x)`."""

from hypothesis import given

from effax.testing import laws
from effax.testing import strategies as s


@given(s.models_and_inputs(), s.keys(), s.trainings())
def test_eval_shape_of_init_matches_init(model_and_x, key, training):
    model, x = model_and_x
    laws.check_abstract_init(model, x, key, training=training)


@given(s.models_and_inputs(require=("param",)), s.keys(raw=True))
def test_eval_shape_of_init_matches_init_with_raw_keys(model_and_x, key):
    model, x = model_and_x
    laws.check_abstract_init(model, x, key)
