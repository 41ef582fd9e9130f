"""The mode effect: is this run training or evaluating?"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from effax.core import EffaxError, Request, path_now, send
from effax.effects._param import NO_ANSWER


@dataclasses.dataclass(frozen=True)
class ModeRequest(Request):
    """Ask whether this run trains.

    `fx.is_training()` sends it; unanswered, it fails and says how to choose a mode.

    >>> fx.is_training()
    Traceback (most recent call last):
    effax.UnhandledEffectError: no handler answered `fx.is_training()` at `<root>`. To fix: say which mode ...
    >>> class AlwaysTrain(fx.Handler):
    ...     answers = (fx.ModeRequest,)
    ...     def handle(self, request, forward):
    ...         return True
    >>> with fx.handle(AlwaysTrain()):
    ...     fx.is_training()
    True
    """

    kind: ClassVar[str] = "mode"  # the one name of this request, in errors, tables and the testing kit
    effect: ClassVar[str] = "mode"  # the effect (family of requests) it belongs to

    hint: ClassVar[str] = (
        "say which mode the run is in: `t.apply(..., training=True)` (or False), a preset "
        "(`handlers=fx.handlers.train(rngs)`), or `fx.handle(fx.handlers.Mode(training=True))`."
    )

    def describe(self) -> str:
        return f"`fx.is_training()` at `{'/'.join(self.path) or '<root>'}`"


def is_training() -> bool:
    """True when the run trains; answered by `training=` or the `Mode` handler.

    >>> with fx.handle(fx.handlers.Mode(training=True)):
    ...     fx.is_training()
    True
    """
    request = object.__new__(ModeRequest)  # no `__init__` frame: layers ask on every call
    request.__dict__["path"] = path_now()
    mode = send(request)
    if type(mode) is not bool:  # law 10: the answer's kind; a layer branches on it in Python
        what = f"None; {NO_ANSWER}" if mode is None else (
            f"{type(mode).__name__} {mode!r:.40}, not a Python bool. The mode picks code in Python, so it is "
            "static: answer True or False (a traced flag cannot choose a layer's code; keep it out of `jax.jit`'s "
            "arguments, or pass it as `static_argnames`).")
        raise EffaxError(f"{request.describe()}: a handler answered {what}")
    return mode
