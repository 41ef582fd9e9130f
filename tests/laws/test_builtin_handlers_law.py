"""The built-in handlers, installed as users' own (innermost, `handlers=`), pass every law relevant to them."""

import jax
import pytest

import effax as fx
from effax.testing import assert_handler_laws

BUILTINS = {
    "SideInputs": (lambda: fx.handlers.SideInputs({"mask": 2.0, "ctx": 0.25}), ("side_input",)),
    "Mode": (lambda: fx.handlers.Mode(True), ("mode",)),
    "KeysFromRngs": (lambda: fx.handlers.KeysFromRngs(jax.random.key(1)), ("random",)),
    "CollectSown": (lambda: fx.handlers.CollectSown(True), ("sow",)),
    "InitParams": (lambda: fx.handlers.InitParams(jax.random.key(2)), ("param",)),
    "AbstractParams": (fx.handlers.AbstractParams, ("param",)),
    "FunctionalState": (lambda: fx.handlers.FunctionalState({}, True), ("state",)),
    "Handler": (fx.Handler, ()),
}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_handler_passes_its_laws(name):
    factory, effects = BUILTINS[name]
    assert_handler_laws(factory, effects, max_examples=4, seed=0)
