"""The side-output effect: values a model reports (`sow`), collected only when asked."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from effax.core import Request, check_name, path_now, path_str, send
from effax.effects._state import check_collection


@dataclasses.dataclass(frozen=True, eq=False)
class SideOutputRequest(Request):
    """Report `value` under `tag` at `path` into `collection`; nothing collecting means a no-op.

    >>> class PrintSown(fx.Handler):
    ...     answers = (fx.SideOutputRequest,)
    ...     def handle(self, request, forward):
    ...         print(request.describe(), "=", request.value)
    ...         return forward(request)
    >>> with fx.handle(PrintSown()), fx.scope("mlp"):
    ...     fx.sow("h", 2.0)
    sow 'h' into 'intermediates' at `mlp` = 2.0
    """

    kind: ClassVar[str] = "sow"  # the one name of this request, in errors, tables and the testing kit
    effect: ClassVar[str] = "sow"  # the effect (family of requests) it belongs to

    tag: str
    value: Any
    collection: str

    def describe(self) -> str:
        return f"sow {self.tag!r} into {self.collection!r} at `{path_str(self.path)}`"

    def unhandled(self) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class SideOutputEffect:
    """A handle for telling values under `tag` at `path` into `collection`; `tell(value)` is `fx.sow`.

    >>> def f(x):
    ...     fx.SideOutputEffect(("probe",), "x").tell(x)
    ...     return x
    >>> fx.transform(f).apply({}, 1.0, mutable="intermediates")
    (1.0, {'intermediates': {'probe': {'x': (1.0,)}}})
    """

    path: tuple[str, ...]
    tag: str
    collection: str = "intermediates"

    def tell(self, value: Any) -> None:
        send(SideOutputRequest(self.path, self.tag, value, self.collection))


def sow(tag: str, value: Any, *, collection: str = "intermediates") -> None:
    """Report `value` under `tag`; collected into `updates[collection]` when that collection is mutable.

    >>> def f(x):
    ...     fx.sow("h", x * 2)
    ...     return x
    >>> fx.transform(f).apply({}, 1.0, mutable="intermediates")
    (1.0, {'intermediates': {'h': (2.0,)}})
    """
    check_name(tag, "sow tag")
    check_collection(collection, f"sow {tag!r}")
    send(SideOutputRequest(path_now(), tag, value, collection))
