"""The side-input effect: a value provided from outside the model (a mask, a context)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from effax.core import Request, UnhandledEffectError, check_name, path_now, path_str, send

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "<required>"})()


@dataclasses.dataclass(frozen=True, eq=False)
class SideInputRequest(Request):
    """Ask for the side input `tag`; answered by a handler, else `default`.

    A handler can compute the value from the request, here from where it was asked:

    >>> class ByPath(fx.Handler):
    ...     answers = (fx.SideInputRequest,)
    ...     def handle(self, request, forward):
    ...         return "/".join(request.path) if request.tag == "where" else forward(request)
    >>> with fx.handle(ByPath()), fx.scope("encoder"):
    ...     fx.side_input("where")
    'encoder'
    """

    kind: ClassVar[str] = "side_input"  # the one name of this request, in errors, tables and the testing kit
    effect: ClassVar[str] = "side_input"  # the effect (family of requests) it belongs to

    tag: str
    default: Any = REQUIRED

    hint: ClassVar[str] = (
        "provide it with `handlers=[fx.handlers.SideInputs({tag: value})]` in the call that runs the model "
        "(`t.apply`, `t.init`, `fx.summary`, `fx.check_variables`), or `fx.handle(fx.handlers.SideInputs(...))`, "
        "or give `fx.side_input` a default."
    )

    def describe(self) -> str:
        return f"side input {self.tag!r} at `{path_str(self.path)}`"

    def unhandled(self) -> Any:
        if self.default is REQUIRED:
            raise UnhandledEffectError(
                f"no handler answered {self.describe()} and it has no default. To fix: "
                + self.hint.replace("{tag: value}", f"{{{self.tag!r}: value}}")
            )
        return self.default


@dataclasses.dataclass(frozen=True, eq=False)
class SideInputEffect:
    """A handle on the side input `tag` at `path`; `ask()` sends the request.

    >>> e = fx.SideInputEffect(("attn",), "mask", default=None)
    >>> e.ask() is None
    True
    >>> with fx.handle(fx.handlers.SideInputs({"mask": 1})):
    ...     e.ask()
    1
    """

    path: tuple[str, ...]
    tag: str
    default: Any = REQUIRED

    def ask(self) -> Any:
        return send(SideInputRequest(self.path, self.tag, self.default))


def side_input(tag: str, default: Any = REQUIRED) -> Any:
    """The side input `tag`, as a handler provides it, else `default`.

    >>> fx.side_input("mask", default=None) is None
    True
    >>> with fx.handle(fx.handlers.SideInputs({"mask": 1})):
    ...     fx.side_input("mask")
    1
    """
    check_name(tag, "side input tag")
    return SideInputEffect(path_now(), tag, default).ask()
