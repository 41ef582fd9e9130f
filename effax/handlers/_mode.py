"""The mode handler: answer `fx.is_training()`."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from effax.core import LATER, EffaxError, Handler
from effax.effects import ModeRequest


def static_training(training: Any) -> bool:
    """`training` as a Python bool; a tracer or an array is refused with the fix."""
    if training is True or training is False:  # the usual argument, decided without a type check
        return training
    if isinstance(training, (bool, np.bool_)):
        return bool(training)
    if isinstance(training, jax.core.Tracer):
        raise EffaxError(
            "`training` is a JAX tracer, but it changes which program runs, so it must be a Python "
            "bool. jit the function that calls `apply` (the training step), or mark it static: "
            "`jax.jit(t.apply, static_argnames=('training',))`."
        )
    raise EffaxError(f"`training` must be True or False, got {type(training).__name__} {training!r}.")


class Mode(Handler):
    """Answer `fx.is_training()` with `training`.

    >>> with fx.handle(fx.handlers.Mode(training=False)):
    ...     fx.is_training()
    False
    """

    answers = (ModeRequest,)

    def __init__(self, training: bool):
        self.training = static_training(training)

    def handle(self, request: Any, forward: Any) -> Any:
        if type(request) is ModeRequest:
            return self.training
        return forward(request)

    def answer_now(self, request: Any) -> Any:  # `handle`'s answer, without a frame for it (asked per layer)
        return self.training if type(request) is ModeRequest else LATER
