"""Per-run auto-names (`Dense_0`, `Dense_1`, ...) for `fx.nn` modules, kept as one of the core's run-local values.

A run (`hermetic()`, or the outermost `handle`) starts fresh counters, so
`t.init` and `t.apply` name modules alike. Each module call counts its
children afresh: calling one instance twice re-creates the same names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from effax.core import begin_run, end_run, run_local


class Names:
    """One run's names: `bound` instance -> path (keeping instances alive, so ids are never
    reused); `frame` the current call's counters by parent path; `owners` which call first
    auto-named a path, so two methods of one module never share by accident."""

    __slots__ = ("bound", "owners", "frame", "owner")

    def __init__(self) -> None:
        self.bound: dict[Any, tuple[str, ...]] = {}
        self.owners: dict[tuple[str, ...], Any] = {}
        self.frame: dict[tuple[str, ...], dict[str, int]] | None = None  # made when the call names a child
        self.owner: Any = None

    def auto_path(self, parent: tuple[str, ...], base: str) -> tuple[str, ...]:
        """`parent` + the next free `base_<n>` under it in the current call."""
        frame = self.frame
        if frame is None:
            frame = self.frame = {}
        counters = frame.get(parent)
        if counters is None:
            counters = frame[parent] = {}
        n, owner = counters.get(base, 0), self.owner
        path = parent + (f"{base}_{n}",)
        while self.owners.setdefault(path, owner) != owner:
            n += 1
            path = parent + (f"{base}_{n}",)
        counters[base] = n + 1
        return path

    def enter(self, path: tuple[str, ...], method: str) -> tuple[Any, Any]:
        """Start the call of `method` of the module at `path`, with its own counters; returns what `leave`
        restores. The call is its children's owner: `path` itself for `__call__` (no tuple to build)."""
        saved = self.frame, self.owner
        self.frame, self.owner = None, path if method == "__call__" else (path, method)
        return saved

    def leave(self, saved: tuple[Any, Any]) -> None:
        self.frame, self.owner = saved

    def snapshot(self) -> Callable[[], None]:
        """Put the current call's counters back later (a lifted transform's learning pass names layers too)."""
        frame = self.frame
        if frame is None:  # counters start now: made here, so `restore` empties the same dict
            frame = self.frame = {}
        counters = {parent: dict(c) for parent, c in frame.items()}

        def restore() -> None:
            frame.clear()
            frame.update(counters)

        return restore


# The run's `Names`, or None outside any run (a partial, not a function: one Python frame less per module).
current_names: Callable[[], Names | None] = functools.partial(run_local, Names)


def push_names(fresh: bool) -> Any:
    """Start a run (so a `Names`) if `fresh` or none is active; returns the token for `pop_names`."""
    return begin_run(fresh)


def pop_names(token: Any) -> None:
    end_run(token)
