"""What both interop bridges share: nested-dict walks under effax scopes, and state write-back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from effax.core import FrozenStateError, scope
from effax.effects import LocalStateEffect, sow


def request_tree(tree: Mapping[str, Any], leaf: Callable[[str, Any], Any]) -> dict[str, Any]:
    """Walk nested mappings under matching `fx.scope`s; `leaf(name, node)` requests each leaf.

    Returns the same nesting with each leaf replaced by what `leaf` returned,
    so Flax's own variable layout becomes effax paths one to one.
    """
    out: dict[str, Any] = {}
    for name, node in tree.items():
        if isinstance(node, Mapping):
            if node:
                with scope(name):
                    out[name] = request_tree(node, leaf)
        else:
            out[name] = leaf(name, node)
    return out


def sow_tree(tree: Mapping[str, Any], collection: str) -> None:
    """Re-sow Flax's sown values through `fx.sow`: a tuple is one sow per element, as `Module.sow` made it."""
    for name, node in tree.items():
        if isinstance(node, Mapping):
            with scope(name):
                sow_tree(node, collection)
        elif isinstance(node, tuple):
            for value in node:
                sow(name, value, collection=collection)
        else:
            sow(name, node, collection=collection)


def is_mutable(cell: LocalStateEffect, value: Any) -> bool:
    """Whether the run lets `cell`'s collection change, asked by writing back the value it holds.

    Writing a variable's own value changes nothing; a frozen collection
    refuses it with `FrozenStateError`. This keeps interop on the public
    `get`/`set` protocol, with no look at the handlers.
    """
    try:
        cell.set(value)
    except FrozenStateError:
        return False
    return True
