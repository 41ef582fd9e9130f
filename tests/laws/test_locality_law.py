"""Law 2, locality: a param's init value and a path's keys do not change when requests elsewhere come or go."""

import jax
import jax.numpy as jnp
from hypothesis import given
from hypothesis import strategies as st

from effax.testing import laws
from effax.testing import strategies as s
from effax.testing.models import Draw, Model, Param, Scope


@given(st.data(), s.keys(), s.trainings())
def test_removing_requests_at_other_paths_changes_no_param_or_key(data, key, training):
    model, x = data.draw(s.models_and_inputs(require=("param", "param", "random", "random")), label="model, x")
    drop = data.draw(s.removals(model, effects=("param", "random")), label="drop")
    laws.check_locality(model, x, key, drop=drop, training=training)


def test_inserting_a_layer_before_keeps_the_later_layers_weights_and_keys():
    later = Scope("blk1", [Param("w1", (2, 3)), Draw("dropout")])
    model = Model([Scope("blk0", [Param("w0", (3,)), Draw("dropout")]), later, Draw("dropout")])
    laws.check_locality(model, jnp.ones(2), jax.random.key(0), drop=[0])
