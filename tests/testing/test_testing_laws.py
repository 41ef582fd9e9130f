"""effax.testing.laws and assert_handler_laws: readable failures, shrunk counterexamples, factories."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import effax as fx
from effax.testing import LAWS, assert_handler_laws, laws
from effax.testing import strategies as s
from effax.testing.models import Draw, Model, Param, Scope, SideInput, State

X, KEY = jnp.ones(2), jax.random.key(0)


class SwallowsSets(fx.Handler):
    def handle(self, request, forward):
        return None if isinstance(request, fx.SetStateRequest) else forward(request)


class FreshKeys(fx.Handler):
    """Draws every key from a counter kept on the handler: no two runs agree."""

    def __init__(self):
        self.n = 0

    def handle(self, request, forward):
        if isinstance(request, fx.RandomRequest):
            self.n += 1
            return jax.random.key(self.n)
        return forward(request)


def test_a_failure_names_the_law_shows_the_difference_the_requests_and_how_to_rebuild():
    model = Model([Scope("blk0", [State("s0", update="once")])], in_size=2)
    with pytest.raises(AssertionError) as e:
        laws.check_state_laws(model, X, KEY, SwallowsSets)
    message = str(e.value)
    assert message.startswith(
        "effax law `state` does not hold: `get` of `blk0/s0` in 'state' after a `set` returned another value"
    )
    assert "local_state  blk0/s0  in 'state', shape (), get, set, get" in message
    assert "handlers under test (innermost last): SwallowsSets()" in message
    assert "x = [1.0, 1.0], key data = [0, 0], training = False" in message
    assert "rebuild the model: Model([Scope(name='blk0'" in message


def test_an_error_raised_by_the_model_is_reported_as_a_law_failure():
    class Broken(fx.Handler):
        def handle(self, request, forward):
            raise RuntimeError("boom")

    with pytest.raises(AssertionError, match=r"(?s)`determinism` does not hold: `t.init_with_output` raised "
                                             r"RuntimeError\n  boom\nmodel: "):
        laws.check_determinism(Model([Param("w0")]), X, KEY, Broken)


def test_hypothesis_shrinks_a_counterexample_to_the_requests_that_matter():
    @settings(max_examples=25, phases=[Phase.generate, Phase.shrink])
    @given(s.models_and_inputs(), s.keys())
    def law(model_and_x, key):
        laws.check_determinism(*model_and_x, key, FreshKeys)

    with pytest.raises(AssertionError) as e:
        law()
    message = str(e.value)
    listing = message[message.index("model: ") : message.index("\nx = ")]
    assert "next_key" in listing
    assert len(listing.splitlines()) <= 3, listing  # the header and at most two requests


def test_a_factory_is_called_once_per_check_and_an_instance_is_reused():
    made = []

    def factory():
        made.append(fx.Handler())
        return made[-1]

    laws.check_determinism(Model([Param("w0")]), X, KEY, factory)
    assert len(made) == 1
    # an instance keeps what it holds across runs: FreshKeys passed as an instance still differs run to run
    with pytest.raises(AssertionError, match="`determinism` does not hold"):
        laws.check_determinism(Model([Draw()]), X, KEY, FreshKeys())


def test_handlers_may_be_a_sequence_outermost_first():
    masks = [fx.handlers.SideInputs({"mask": 1.0}), fx.handlers.SideInputs({"mask": 2.0})]
    model = Model([SideInput("mask")])
    laws.check_forwarding_identity(model, X, KEY, masks, effects=["side_input"])
    with pytest.raises(AssertionError, match="swapping the handler under test with SideInputs"):
        laws.check_commutes_with(model, X, KEY, masks[0], masks[1])


def test_the_partners_answer_one_effect_each():
    model = Model([Param("w0"), State("s0"), Draw(), SideInput("mask"), Scope("blk0", [])], in_size=1)
    for effect in ("param", "state", "random", "sow", "side_input", "mode"):
        laws.check_determinism(model, jnp.ones(1), KEY, laws.partner(effect))
    with pytest.raises(ValueError, match="unknown effect 'dropout'"):
        laws.partner("dropout")


def test_the_laws_refuse_what_is_not_a_model():
    with pytest.raises(TypeError, match="the laws run an `effax.testing.models.Model`, got function"):
        laws.check_determinism(lambda x: x, X, KEY)


class StopsGradientOfRepeats(fx.Handler):
    """Breaks sharing: a per-run param cache that detaches every use of a path after the first."""

    def begin(self):
        return _Repeats()


class _Repeats:
    def __init__(self):
        self.seen = set()

    def handle(self, request, forward):
        out = forward(request)
        if isinstance(request, fx.ParamRequest):
            if request.path in self.seen:
                out = jax.lax.stop_gradient(out)
            self.seen.add(request.path)
        return out


@settings(max_examples=10)
@given(st.data(), s.keys())
def test_fx_share_obeys_the_sharing_laws(data, key):
    model, x = data.draw(s.models_and_inputs(require=("param",), max_steps=8))
    laws.check_sharing_laws(model, x, key, data.draw(s.share_bindings(model)))


def test_the_sharing_law_catches_a_handler_that_detaches_repeated_uses():
    model = Model([Param("w0", (2,)), Scope("blk0", [Param("w1", (2,))])])
    laws.check_sharing_laws(model, X, KEY, {"blk0/w1": "w0"})
    with pytest.raises(AssertionError, match="the gradient of a tied param is not the sum of its per-use"):
        laws.check_sharing_laws(model, X, KEY, {"blk0/w1": "w0"}, StopsGradientOfRepeats)


def test_assert_handler_laws_runs_the_laws_for_the_effects_and_reports_the_first_failure():
    with pytest.raises(AssertionError, match="effax law `state` does not hold"):
        assert_handler_laws(SwallowsSets, ["state"], max_examples=5, only=["determinism", "state"])


def test_assert_handler_laws_refuses_unknown_effects_and_laws():
    with pytest.raises(ValueError, match=r"unknown effects \['params'\]"):
        assert_handler_laws(fx.Handler, ["params"])
    with pytest.raises(ValueError, match=r"unknown laws \['purity'\]; the laws are \['determinism'"):
        assert_handler_laws(fx.Handler, only=["purity"])
    assert "sharing" in LAWS and "purity under jit" in LAWS


def test_importing_effax_does_not_import_hypothesis():
    code = "import sys, effax; assert 'hypothesis' not in sys.modules and 'effax.testing' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
