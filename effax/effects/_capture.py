"""The capture effect: which module calls have their outputs captured (`capture_intermediates`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from effax.core import Request, path_now, path_str, send


@dataclasses.dataclass(frozen=True)
class CaptureRequest(Request):
    """Ask for the filter `filter(module, method_name) -> bool` of the calls being captured, or None.

    Answered by `fx.handlers.CaptureIntermediates` (what `capture_intermediates=`
    installs); unanswered, nothing is captured. Code that runs modules of
    another library (`fx.from_flax`) asks it to capture their calls too.

    >>> fx.effects.capture_filter() is None  # sends a CaptureRequest; nothing answers
    True
    >>> with fx.handle(fx.handlers.CaptureIntermediates(lambda module, method: method == "encode")):
    ...     pick = fx.effects.capture_filter()
    >>> pick(None, "encode"), pick(None, "__call__")
    (True, False)
    """

    kind: ClassVar[str] = "capture"  # the one name of this request, in errors, tables and the testing kit
    effect: ClassVar[str] = "capture"  # the effect (family of requests) it belongs to

    def describe(self) -> str:
        return f"capture filter at `{path_str(self.path)}`"

    def unhandled(self) -> None:
        return None


def capture_filter() -> Callable[[Any, str], bool] | None:
    """The filter of the module calls whose outputs this run captures, or None when none are.

    >>> fx.effects.capture_filter() is None
    True
    """
    return send(CaptureRequest(path_now()))
