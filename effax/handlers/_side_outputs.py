"""Collect sown values into tuples by collection and path."""

from __future__ import annotations

from typing import Any

from effax.core import Handler
from effax.effects import SideOutputRequest
from effax.handlers._state import is_mutable, normalize_mutable
from effax.handlers._trace import check_trace, trace_state
from effax.handlers._tree import PathTree


class CollectSown(Handler):
    """Collect `fx.sow` values of the named collections (`True`: all); others go outward.

    Each run starts empty; `run.collections()` is
    `{collection: {...path: {tag: (v1, v2, ...)}}}`.

    >>> with fx.handle(fx.handlers.CollectSown("intermediates")) as (run,):
    ...     fx.sow("h", 1.0); fx.sow("h", 2.0)
    >>> run.collections()
    {'intermediates': {'h': (1.0, 2.0)}}
    """

    def __init__(self, collections: Any = True):
        self.collections = normalize_mutable(collections)

    def begin(self) -> _SownRun:
        return _SownRun(self.collections)


class _SownRun:
    answers = (SideOutputRequest,)

    __slots__ = ("wanted", "trees", "trace")

    def __init__(self, wanted: Any):
        self.wanted = wanted
        self.trees: dict[str, PathTree] = {}
        self.trace = trace_state()

    def handle(self, request: Any, forward: Any) -> Any:
        if type(request) is not SideOutputRequest:
            return forward(request)
        # checked whether or not this run keeps it: a sow in a raw `jax.checkpoint`/`jit` that `init` (which keeps
        # none) let pass would be cached by JAX, and vanish from every later apply that asks for it
        check_trace(self.trace, request, "sows a value")
        if not is_mutable(self.wanted, request.collection):
            return forward(request)
        tree = self.trees.get(request.collection)
        if tree is None:
            tree = self.trees[request.collection] = PathTree(f"collection {request.collection!r}")
        path = request.path + (request.tag,)
        previous = tree.get(path)
        tree.set(path, (previous if type(previous) is tuple else ()) + (request.value,), request.describe)
        return None

    def keeps(self, collection: str) -> bool:
        """Whether this run keeps sows of `collection` (else it passes them outward): `fx.cond` asks, as a sow
        nothing keeps does nothing, so its branches need not agree on it."""
        return is_mutable(self.wanted, collection)

    def collections(self) -> dict[str, Any]:
        return {c: tree.root for c, tree in self.trees.items()}
