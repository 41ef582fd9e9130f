"""Per-run auto-names (`Dense_0`, `Dense_1`, ...) for `fx.nn` modules, in a context variable.

A run (`hermetic()`, or the outermost `handle`) starts fresh counters, so
`t.init` and `t.apply` name modules alike. Each module call counts its
children afresh: calling one instance twice re-creates the same names.
"""

from __future__ import annotations

import contextvars
from typing import Any

_NAMES: contextvars.ContextVar[Names | None] = contextvars.ContextVar("effax_names", default=None)


class Names:
    """One run's names: `bound` instance -> path (keeping instances alive, so ids are never
    reused); `frame` the current call's counters by parent path; `owners` which call first
    auto-named a path, so two methods of one module never share by accident."""

    __slots__ = ("bound", "owners", "frame", "owner")

    def __init__(self) -> None:
        self.bound: dict[Any, tuple[str, ...]] = {}
        self.owners: dict[tuple[str, ...], Any] = {}
        self.frame: dict[tuple[str, ...], dict[str, int]] = {}
        self.owner: Any = None

    def auto_name(self, parent: tuple[str, ...], base: str) -> str:
        """The next free `base_<n>` under `parent` in the current call."""
        counters = self.frame.setdefault(parent, {})
        n = counters.get(base, 0)
        while self.owners.setdefault(parent + (f"{base}_{n}",), self.owner) != self.owner:
            n += 1
        counters[base] = n + 1
        return f"{base}_{n}"

    def enter(self, owner: Any) -> tuple[Any, Any]:
        """Start a module call with its own counters; returns what `leave` restores."""
        saved = self.frame, self.owner
        self.frame, self.owner = {}, owner
        return saved

    def leave(self, saved: tuple[Any, Any]) -> None:
        self.frame, self.owner = saved


def current_names() -> Names | None:
    """The run's `Names`, or None outside any run."""
    return _NAMES.get()


def push_names(fresh: bool) -> contextvars.Token | None:
    """Install new `Names` if `fresh` or none is active; returns the token to reset, or None."""
    return _NAMES.set(Names()) if fresh or _NAMES.get() is None else None


def pop_names(token: contextvars.Token | None) -> None:
    if token is not None:
        _NAMES.reset(token)
