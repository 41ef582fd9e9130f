"""Law 6, handler algebra: forwarding is the identity, disjoint handlers commute, nesting is associative."""

from hypothesis import given
from hypothesis import strategies as st

from effax.testing import laws
from effax.testing import strategies as s
from effax.testing.models import EFFECTS

builtin = st.sampled_from(EFFECTS).map(laws.partner)


@given(s.models_and_inputs(), s.keys(), s.trainings())
def test_a_forwarding_handler_is_the_identity(model_and_x, key, training):
    model, x = model_and_x
    laws.check_forwarding_identity(model, x, key, training=training)


@given(s.models_and_inputs(), s.keys(), st.lists(st.sampled_from(EFFECTS), min_size=2, max_size=2, unique=True))
def test_builtin_handlers_of_disjoint_effects_commute(model_and_x, key, effects):
    model, x = model_and_x
    first, second = effects
    laws.check_commutes_with(model, x, key, laws.partner(first), laws.partner(second))


@given(s.models_and_inputs(), s.keys(), builtin, builtin, builtin)
def test_nesting_builtin_handlers_is_associative(model_and_x, key, outer, handler, inner):
    model, x = model_and_x
    laws.check_associativity(model, x, key, handler, outer=outer, inner=inner)
