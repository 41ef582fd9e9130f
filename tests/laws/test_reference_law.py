"""Law 13, reference: a handler declared a drop-in for a built-in gives the built-in's answers."""

import jax.numpy as jnp

import effax as fx
from effax.testing import assert_handler_laws


class DictSideInputs(fx.Handler):
    """A user's own side-input handler, meant as a drop-in for `fx.handlers.SideInputs`."""

    def __init__(self, values):
        self.values = dict(values)

    def handle(self, request, forward):
        if isinstance(request, fx.SideInputRequest) and request.tag in self.values:
            return jnp.asarray(self.values[request.tag], jnp.float32)
        return forward(request)


class AlwaysTraining(fx.Handler):
    def handle(self, request, forward):
        return True if isinstance(request, fx.ModeRequest) else forward(request)


def test_a_correct_drop_in_for_side_inputs_passes():
    assert_handler_laws(
        lambda: DictSideInputs({"mask": 2.0}), ["side_input"], seed=0, only=["reference"],
        reference=lambda: fx.handlers.SideInputs({"mask": 2.0}),
    )


def test_a_correct_drop_in_for_mode_passes():
    assert_handler_laws(AlwaysTraining, ["mode"], seed=0, only=["reference"], reference=lambda: fx.handlers.Mode(True))
