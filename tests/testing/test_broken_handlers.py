"""Each law catches a deliberately broken handler: the kit is only as good as the bugs it finds.

Shrinking is off here (it only makes the failure smaller, and costs time);
`test_testing_laws.py` checks that a shrunk counterexample reads well.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import effax as fx
from effax.testing import laws
from effax.testing import strategies as s

no_shrink = settings(phases=[Phase.explicit, Phase.generate], max_examples=15)

_COUNTER = itertools.count()


class GlobalCounterKeys(fx.Handler):
    """Breaks determinism: draws keys from a process-wide counter, so two identical runs differ."""

    def handle(self, request, forward):
        if isinstance(request, fx.RandomRequest):
            return jax.random.key(next(_COUNTER))
        return forward(request)


class CallOrderInitParams(fx.Handler):
    """Breaks locality: initializes params from a per-run counter (keys split in call order), so a
    param added earlier shifts every later one. Deterministic, so only locality notices."""

    def begin(self):
        return _CallOrderRun()


class _CallOrderRun:
    def __init__(self):
        self.n = 0

    def handle(self, request, forward):
        if isinstance(request, fx.ParamRequest):
            self.n += 1
            return request.initialize(jax.random.fold_in(jax.random.key(0), self.n))
        return forward(request)


class CalibratesOnFirstRun(fx.Handler):
    """Breaks init/apply agreement: passes params through on its first run (calibration) and quantizes
    them afterwards, keeping that flag on the handler instead of a run."""

    def __init__(self):
        self.calibrated = False

    def begin(self):
        self.quantize, self.calibrated = self.calibrated, True
        return self

    def handle(self, request, forward):
        out = forward(request)
        if isinstance(request, fx.ParamRequest) and self.quantize:
            return jnp.round(out * 4) / 4
        return out


class PythonScaleQuantizer(fx.Handler):
    """Breaks abstract init: computes its scale with `float(...)`, which needs a concrete value."""

    def handle(self, request, forward):
        out = forward(request)
        if isinstance(request, fx.ParamRequest):
            scale = float(jnp.max(jnp.abs(out))) or 1.0
            return jnp.round(out / scale * 127) * scale / 127
        return out


class SwallowsSets(fx.Handler):
    """Breaks the state laws: a read cache that ignores writes."""

    def handle(self, request, forward):
        if isinstance(request, fx.SetStateRequest):
            return None
        return forward(request)


class DropsForwardedAnswers(fx.Handler):
    """Breaks forwarding identity: answers side inputs, and forgets to `return` what it forwards."""

    def handle(self, request, forward):
        if isinstance(request, fx.SideInputRequest):
            return 1.0
        forward(request)


class ParamsScalerThatAlsoMasks(fx.Handler):
    """Breaks commutation: a param handler that also answers side inputs it does not own."""

    def handle(self, request, forward):
        if isinstance(request, fx.ParamRequest):
            return forward(request) * 2
        if isinstance(request, fx.SideInputRequest):
            return 0.0
        return forward(request)


class ScaleReadAtBegin(fx.Handler):
    """Breaks associativity: reads its configuration from the ambient stack in `begin()`, so it
    depends on which handlers were installed before it rather than on where it sits."""

    def begin(self):
        return _ScaleRun(fx.side_input("scale", default=1.0))


class _ScaleRun:
    def __init__(self, scale):
        self.scale = scale

    def handle(self, request, forward):
        out = forward(request)
        return out * self.scale if isinstance(request, fx.ParamRequest) else out


class RemembersAnswers(fx.Handler):
    """Breaks purity: keeps every answer on the handler, which leaks tracers out of `jax.jit`."""

    def __init__(self):
        self.seen = []

    def handle(self, request, forward):
        out = forward(request)
        self.seen.append(out)
        return out


def caught(law):
    return pytest.raises(AssertionError, match=f"effax law `{law}` does not hold")


def test_determinism_catches_keys_from_a_global_counter():
    @no_shrink
    @given(s.models_and_inputs(require=("random",)), s.keys())
    def law(model_and_x, key):
        laws.check_determinism(*model_and_x, key, GlobalCounterKeys)

    with caught("determinism"):
        law()


def test_locality_catches_params_initialized_in_call_order():
    @no_shrink
    @given(st.data(), s.keys())
    def law(data, key):
        model, x = data.draw(s.models_and_inputs(require=("param",)))
        laws.check_locality(model, x, key, CallOrderInitParams, drop=data.draw(s.removals(model)))

    with caught("locality"):
        law()


def test_call_order_params_are_deterministic_so_only_locality_sees_them():
    @no_shrink
    @given(s.models_and_inputs(require=("param",)), s.keys())
    def law(model_and_x, key):
        laws.check_determinism(*model_and_x, key, CallOrderInitParams)

    law()


def test_init_apply_agreement_catches_a_handler_that_calibrates_on_its_first_run():
    @no_shrink
    @given(s.models_and_inputs(require=("param",)), s.keys())
    def law(model_and_x, key):
        laws.check_init_apply_agreement(*model_and_x, key, CalibratesOnFirstRun)

    with caught("init/apply agreement"):
        law()


def test_abstract_init_catches_a_quantizer_that_needs_concrete_values():
    @no_shrink
    @given(s.models_and_inputs(require=("param",)), s.keys())
    def law(model_and_x, key):
        laws.check_abstract_init(*model_and_x, key, PythonScaleQuantizer)

    with caught("abstract init") as e:
        law()
    assert "ConcretizationTypeError" in str(e.value)


def test_state_laws_catch_a_handler_that_swallows_sets():
    @no_shrink
    @given(s.models_and_inputs(require=("state",), state_updates=("once", "twice")), s.keys())
    def law(model_and_x, key):
        laws.check_state_laws(*model_and_x, key, SwallowsSets)

    with caught("state") as e:
        law()
    assert "after a `set` returned another value than the last set" in str(e.value)


def test_forwarding_identity_catches_a_handler_that_drops_forwarded_answers():
    @no_shrink
    @given(s.models_and_inputs(require=("param",)), s.keys())
    def law(model_and_x, key):
        laws.check_forwarding_identity(*model_and_x, key, DropsForwardedAnswers, effects=("side_input",))

    with caught("forwarding identity"):
        law()


def test_commutation_catches_a_handler_answering_an_effect_it_does_not_own():
    @no_shrink
    @given(s.models_and_inputs(require=("param", "side_input")), s.keys())
    def law(model_and_x, key):
        other = fx.handlers.SideInputs({"mask": 3.0, "ctx": -2.0})
        laws.check_commutes_with(*model_and_x, key, ParamsScalerThatAlsoMasks, other)

    with caught("commutation"):
        law()


def test_associativity_catches_a_handler_configured_from_the_stack_at_begin():
    @no_shrink
    @given(s.models_and_inputs(require=("param",)), s.keys())
    def law(model_and_x, key):
        outer = fx.handlers.SideInputs({"scale": 3.0})
        laws.check_associativity(*model_and_x, key, ScaleReadAtBegin, outer=outer)

    with caught("associativity"):
        law()


def test_purity_catches_a_handler_that_leaks_tracers():
    @settings(no_shrink, max_examples=3)
    @given(s.models_and_inputs(require=("param",)), s.keys())
    def law(model_and_x, key):
        laws.check_purity_under_jit(*model_and_x, key, RemembersAnswers)

    with caught("purity under jit") as e:
        law()
    assert "Leaked trace" in str(e.value)
