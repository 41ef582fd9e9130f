"""Side inputs from a dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from effax.core import EffaxError, Handler, check_name
from effax.effects import SideInputRequest


class SideInputs(Handler):
    """Answer `fx.side_input(tag)` for each tag in `values`; other tags go outward.

    >>> with fx.handle(fx.handlers.SideInputs({"mask": None})):
    ...     fx.side_input("mask") is None
    True
    """

    answers = (SideInputRequest,)

    def __init__(self, values: Mapping[str, Any]):
        if not isinstance(values, Mapping):
            raise EffaxError(
                f"SideInputs takes a dict {{tag: value}}, got {type(values).__name__} {values!r:.60}: e.g. "
                "`fx.handlers.SideInputs({'mask': mask})`."
            )
        for tag in values:
            check_name(tag, "side input tag")
        self.values = dict(values)

    def handle(self, request: Any, forward: Any) -> Any:
        if type(request) is SideInputRequest and request.tag in self.values:
            return self.values[request.tag]
        return forward(request)
