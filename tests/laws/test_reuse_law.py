"""Law 12, reuse: one instance of each built-in handler, entered for several runs, models and threads (and
inside its own run), gives what fresh instances give; no request is changed by handling it."""

import jax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import effax as fx
from effax.testing import laws
from effax.testing import strategies as s

BUILTINS = {
    "SideInputs": (lambda: fx.handlers.SideInputs({"mask": 2.0}), ("side_input",)),
    "Mode": (lambda: fx.handlers.Mode(True), ("mode",)),
    "KeysFromRngs": (lambda: fx.handlers.KeysFromRngs(jax.random.key(1)), ("random",)),
    "CollectSown": (lambda: fx.handlers.CollectSown(True), ("sow",)),
    "InitParams": (lambda: fx.handlers.InitParams(jax.random.key(2)), ("param",)),
    "FunctionalState": (lambda: fx.handlers.FunctionalState({}, True), ("state",)),
}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_a_builtin_handler_instance_can_be_reused(name):
    factory, effects = BUILTINS[name]

    @settings(max_examples=5)
    @given(st.data(), s.keys(), s.trainings())
    def law(data, key, training):
        model, x = data.draw(s.models_and_inputs(require=effects))
        other = data.draw(s.models(require=effects, in_sizes=(model.in_size,)))
        laws.check_reuse(model, x, key, factory(), other=other, training=training)

    law()
