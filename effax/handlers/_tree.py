"""Storage for handlers: nested dicts keyed by path components, where a name is a leaf or a scope, never both."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from effax.core import ParamConflictError, Path, path_str

MISSING: Any = object()


def key_path_names(key_path: tuple) -> tuple[str, ...]:
    """The names of a `jax.tree` key path (dict keys, sequence indices, attribute names) as path components."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in key_path)


def _is_scope(node: Any) -> bool:
    return type(node) is dict or isinstance(node, Mapping)


def get_path(tree: Any, path: Path) -> Any:
    """The value at `path` in nested mappings, or `MISSING` (also when a leaf blocks the way)."""
    node = tree
    for key in path:
        if type(node) is dict:  # the usual scope, decided at once (`MISSING` then stays MISSING below)
            node = node.get(key, MISSING)
        elif node is not MISSING and isinstance(node, Mapping):
            node = node.get(key, MISSING)
        else:
            return MISSING
    return node


def flatten_paths(tree: Any, prefix: Path = ()) -> list[tuple[Path, Any]]:
    """Every `(path, leaf)` of nested mappings, in insertion order."""
    out: list[tuple[Path, Any]] = []
    for key, node in tree.items():
        if _is_scope(node) and node:
            out.extend(flatten_paths(node, prefix + (key,)))
        elif not _is_scope(node):
            out.append((prefix + (key,), node))
    return out


def nearest(path: Path, paths: Iterable[Path], n: int = 3) -> list[str]:
    """The paths among `paths` closest to `path`, written `a/b`, for 'did you mean' hints in errors."""
    names = list(dict.fromkeys("/".join(p) for p in paths))
    return difflib.get_close_matches("/".join(path), names, n=n, cutoff=0.5)


def nearest_paths(path: Path, tree: Any, n: int = 3) -> list[str]:
    """The stored paths closest to `path`, for 'did you mean' hints in errors."""
    if not _is_scope(tree):
        return []
    return nearest(path, (p for p, _ in flatten_paths(tree)), n)


class PathTree:
    """A growing nested dict that refuses to make one name both a leaf and a scope.

    `what` names the collection in errors (`"params"`, `"state 'batch_stats'"`).
    """

    __slots__ = ("root", "what")

    def __init__(self, what: str, root: dict | None = None):
        self.what = what
        self.root: dict = {} if root is None else root

    def get(self, path: Path) -> Any:
        return get_path(self.root, path)

    def set(
        self, path: Path, value: Any, describe: Callable[[], str] = lambda: "a value", replace: bool = False
    ) -> None:
        """Put `value` at `path`. `replace=True` overwrites a known variable whose value may itself be a dict."""
        node = self.root
        for i, key in enumerate(path[:-1]):
            child = node.get(key, MISSING)
            if child is MISSING:
                child = node[key] = {}
            elif not _is_scope(child):
                raise ParamConflictError(
                    f"`{path_str(path[: i + 1])}` in {self.what} is a leaf, but `{path_str(path)}` "
                    f"({describe()}) uses it as a scope. A name is either a variable or a scope at "
                    "one place: rename one of them."
                )
            elif type(child) is not dict:
                child = node[key] = dict(child)
            node = child
        existing = node.get(path[-1], MISSING)
        if existing is not MISSING and not replace and _is_scope(existing):
            raise ParamConflictError(
                f"`{path_str(path)}` in {self.what} is a scope holding "
                f"{sorted(existing)[:4]}, but {describe()} uses it as a leaf. A name is either a "
                "variable or a scope at one place: rename one of them."
            )
        node[path[-1]] = value


def copy_scopes(tree: Any) -> dict:
    """Copy the dict structure of nested mappings (leaves shared), so writes never touch the caller's tree."""
    return {k: copy_scopes(v) if _is_scope(v) else v for k, v in tree.items()}
