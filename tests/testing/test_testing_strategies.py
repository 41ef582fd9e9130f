"""effax.testing.strategies: generated models are valid, bounded, and come with matching data."""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import effax as fx
from effax.testing import strategies as s
from effax.testing.models import EFFECTS, Draw, Model, Param, Scope, State


def _depth(steps, depth=0):
    return max([depth] + [_depth(x.children, depth + 1) for x in steps if isinstance(x, Scope)])


@given(s.models(max_steps=4, max_depth=1, require=("state", "sow")))
def test_models_respect_their_bounds_and_requirements(model):
    assert len([step for _, step in model.walk()]) <= 4 + 2
    assert _depth(model.steps) <= 1
    assert {"state", "sow"} <= model.effects()


@given(s.models(effects=("param", "mode")))
def test_models_use_only_the_effects_asked_for(model):
    assert model.effects() <= {"param", "mode"}


@settings(max_examples=15)
@given(s.models_and_inputs(), s.keys())
def test_generated_models_run_and_init_makes_the_variables_they_describe(model_and_x, key):
    model, x = model_and_x
    assert x.shape == (model.in_size,) and x.dtype == jnp.float32
    variables = fx.transform(model).init(key, x)
    specs = model.variable_specs()
    assert jax.tree.structure(variables) == jax.tree.structure(specs)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), variables, specs)))


@settings(max_examples=15)
@given(st.data())
def test_variables_are_accepted_by_apply_and_reported_complete(data):
    model, x = data.draw(s.models_and_inputs())
    variables = data.draw(s.variables(model))
    t = fx.transform(model)
    assert fx.check_variables(t, variables, x, training=False).ok
    t.apply(variables, x, rngs=jax.random.key(0), training=False, mutable=True)


@given(st.data())
def test_removals_are_positions_of_the_model(data):
    model = data.draw(s.models())
    drop = data.draw(s.removals(model))
    assert all(0 <= i < len(model.walk()) for i in drop)


def _drops_one_before_a_kept_one(model, drop, effects):
    walk, kept = model.walk(), model.drop(drop)
    removed = [r for r in model.requests() if r not in kept.requests()]
    first_removed = next((i for i, r in enumerate(model.requests()) if r in removed and r.split()[0] in effects), None)
    return first_removed is not None and any(
        r not in removed and r.split()[0] in effects for r in model.requests()[first_removed + 1:]
    ) and len(walk) > 0


def test_most_removals_drop_a_request_before_one_that_stays():
    hits, total = [], 0

    @settings(max_examples=100, database=None)
    @given(st.data())
    def draw(data):
        nonlocal total
        model = data.draw(s.models(require=("param", "param")))
        drop = data.draw(s.removals(model, effects=("param",)))
        total += 1
        hits.append(_drops_one_before_a_kept_one(model, drop, ("param",)))

    draw()
    assert sum(hits) > total / 2


def test_states_reuse_names_across_collections_and_draws_repeat_at_a_path():
    found = {"twin names": 0, "repeated draws": 0}

    @settings(max_examples=100, database=None)
    @given(s.models(require=("state", "state", "random")))
    def draw(model):
        states = [(path + (step.name,), step.collection) for path, step in model.walk() if isinstance(step, State)]
        paths = [p for p, _ in states]
        found["twin names"] += any(paths.count(p) > 1 for p in paths)
        assert len(set(states)) == len(states)  # one name per collection and scope
        found["repeated draws"] += any(isinstance(step, Draw) and step.times > 1 for _, step in model.walk())

    draw()
    assert found["twin names"] >= 10 and found["repeated draws"] >= 30, found


@given(st.data())
def test_share_bindings_tie_params_of_one_spec_without_cycles(data):
    model = data.draw(s.models(effects=("param",), require=("param",), max_steps=6))
    bindings = data.draw(s.share_bindings(model))
    specs = {"/".join(p): spec for p, spec in model.param_specs().items()}
    for alias, canonical in bindings.items():
        assert specs[alias] == specs[canonical]
        assert alias != canonical
    for alias in bindings:  # following the chain ends at a canonical param
        seen = {alias}
        while alias in bindings:
            alias = bindings[alias]
            assert alias not in seen
            seen.add(alias)


def test_share_bindings_find_ties_when_params_agree():
    model = Model([Param("w0", (2,)), Scope("blk0", [Param("w1", (2,)), Param("w2", (3,))])])

    @given(s.share_bindings(model))
    def draws(bindings):
        assert bindings in ({}, {"blk0/w1": "w0"}, {"w0": "blk0/w1"})

    draws()


def test_sharing_cases_tie_params_in_at_least_half_the_examples():
    tied = []

    @settings(max_examples=100, database=None)
    @given(s.sharing_cases())
    def draw(case):
        model, x, bindings = case
        assert x.shape == (model.in_size,)
        tied.append(bool(bindings))

    draw()
    assert sum(tied) >= len(tied) / 2


@given(s.keys(), s.keys(raw=True))
def test_keys_are_typed_or_raw(typed, raw):
    assert jax.dtypes.issubdtype(typed.dtype, jax.dtypes.prng_key)
    assert raw.shape == (2,) and raw.dtype == jnp.uint32


def test_unknown_effects_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown effects \['params'\]; the kit knows \['param'"):
        s.models(require=("params",))
    assert set(EFFECTS) == {"param", "state", "random", "sow", "side_input", "mode"}


@settings(max_examples=25, deadline=None, database=None)
@given(s.models(require=("state",)))
def test_a_required_state_is_set_at_least_once(model):
    def states(steps):
        for step in steps:
            if isinstance(step, State):
                yield step
            yield from states(getattr(step, "children", ()))

    assert any(step.update != "none" for step in states(model.steps))


def test_one_effect_name_as_a_string_is_one_effect_not_its_letters():
    """`require="state"` is `require=("state",)`, as hypothesis and pytest take one name for a list of one."""
    from effax.testing.models import LawKitError

    @settings(max_examples=5, deadline=None, database=None)
    @given(s.models(effects="param", require="state"), s.sharing_cases(require="state"), st.data())
    def check(model, case, data):
        assert {"param", "state"} >= set(model.effects()) and "state" in model.effects()
        assert "state" in case[0].effects()
        assert data.draw(s.removals(model, effects="state")) <= set(range(len(model.walk())))

    check()
    with pytest.raises(LawKitError, match=r"unknown effects \['stat'\]; the kit knows .* Did you mean 'state'\?"):
        s.models(require="stat")
    assert issubclass(LawKitError, fx.EffaxError) and issubclass(LawKitError, ValueError)


def test_models_call_stream_key_and_make_int_bfloat16_and_dict_states():
    """So a key handler answering `fx.stream_key` wrongly, or a state handler changing a state's dtype or
    structure, meets such a request."""
    from hypothesis import find

    from effax.testing.models import StreamKey

    find(s.models(require=("random",)), lambda m: any(isinstance(x, StreamKey) for _, x in m.walk()))
    for dtype in ("int32", "bfloat16"):
        find(s.models(require=("state",)), lambda m, dtype=dtype: any(
            isinstance(x, State) and x.dtype == dtype and x.tree for _, x in m.walk()))
