"""The initializing effect: is this run creating variables (`t.init`) or using given ones (`t.apply`)?"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from effax.core import Request, path_now, path_str, send


@dataclasses.dataclass(frozen=True)
class InitializingRequest(Request):
    """Ask whether the run creates its params; answered by the params handler.

    `InitParams` and `AbstractParams` answer True, `LoadParams` False. Unanswered
    (no built-in params handler on the stack) it is False: nothing is being created.

    >>> fx.is_initializing()  # sends an InitializingRequest; nothing answers
    False
    >>> with fx.handle(fx.handlers.InitParams(jax.random.key(0))):
    ...     fx.is_initializing()
    True
    """

    kind: ClassVar[str] = "initializing"  # the one name of this request, in errors, tables and the testing kit
    effect: ClassVar[str] = "initializing"  # the effect (family of requests) it belongs to

    def describe(self) -> str:
        return f"`fx.is_initializing()` at `{path_str(self.path)}`"

    def unhandled(self) -> bool:
        return False


def is_initializing() -> bool:
    """True while `t.init` runs (also abstractly, under `jax.eval_shape` or `fx.summary`).

    Flax's `Module.is_initializing()` and Haiku's `hk.running_init()`: for the
    rare code that must act differently while variables are created (a cache
    that `init` only allocates). `fx.from_flax` asks it to run Flax's own init.

    >>> def f():
    ...     return fx.is_initializing()
    >>> t = fx.transform(f)
    >>> t.init_with_output(jax.random.key(0))[0], t.apply({})
    (True, False)
    """
    return send(InitializingRequest(path_now()))
