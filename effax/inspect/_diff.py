"""One tree diff: what a model expects against what a variables tree (or a checkpoint) holds."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from effax.core import path_str


@dataclasses.dataclass
class VariablesReport:
    """Every difference between expected and found variables at once, paths as `collection:a/b/c`.

    >>> expected = {"params": {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}}
    >>> print(fx.inspect.diff_variables(expected, {"params": {"w": jnp.zeros(3), "v": 1.0}}))
    unused: params:v
    mis-shaped: params:w: expected float32[2], found float32[3]
    """

    missing: list[str] = dataclasses.field(default_factory=list)
    unused: list[str] = dataclasses.field(default_factory=list)
    mis_shaped: list[str] = dataclasses.field(default_factory=list)
    mis_typed: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unused or self.mis_shaped or self.mis_typed)

    def __str__(self) -> str:
        if self.ok:
            return "variables match the model"
        parts = []
        for label, items in (
            ("missing", self.missing),
            ("unused", self.unused),
            ("mis-shaped", self.mis_shaped),
            ("mis-typed", self.mis_typed),
        ):
            parts.extend(f"{label}: {item}" for item in items)
        return "\n".join(parts)


def _is_box(x: Any) -> bool:
    """A Flax box (`nn.Partitioned`, `LogicallyPartitioned`): an object with `.unbox()` around the array."""
    return callable(getattr(x, "unbox", None)) and not isinstance(x, (jax.Array, jax.ShapeDtypeStruct))


def _spec(x: Any) -> str | None:
    """`float32[2, 3]` for an array-like leaf, None for anything else."""
    if isinstance(x, (bool, int, float, complex)):
        x = jnp.asarray(x)
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return None
    if not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        dtype = jax.dtypes.canonicalize_dtype(dtype)
    return f"{getattr(dtype, 'name', dtype)}[{', '.join(map(str, shape))}]"


def _leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """`(path, leaf)` pairs below a non-dict node (a tuple state, a custom pytree), boxes kept whole."""
    found = jax.tree.leaves_with_path(tree, is_leaf=_is_box)
    return [(tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p), v) for p, v in found]


def _compare(report: VariablesReport, name: str, expected: Any, found: Any) -> None:
    if _is_box(found):
        report.mis_typed.append(
            f"{name}: expected {_spec(expected)}, found a boxed Flax value ({type(found).__name__}); unbox the "
            "variables first: `flax.linen.meta.unbox(variables)`"
        )
        return
    want, got = _spec(expected), _spec(found)
    if got is None:
        report.mis_typed.append(f"{name}: expected {want}, found a {type(found).__name__}, not an array")
    elif tuple(expected.shape) != tuple(jnp.shape(found)):
        report.mis_shaped.append(f"{name}: expected {want}, found {got}")
    elif want != got:
        report.mis_typed.append(f"{name}: expected {want}, found {got}")


def _walk(report: VariablesReport, prefix: tuple[str, ...], expected: Any, found: Any, collection: str) -> None:
    name = f"{collection}:{path_str(prefix)}"
    if isinstance(expected, Mapping):
        if not isinstance(found, Mapping):
            report.mis_shaped.append(f"{name}: expected a scope {{{', '.join(map(str, expected))}}}, found "
                                     f"{_spec(found) or type(found).__name__}")
            return
        for key, sub in expected.items():
            if key in found:
                _walk(report, prefix + (str(key),), sub, found[key], collection)
            else:
                for path, leaf in _leaves(sub) if not isinstance(sub, Mapping) else _flat(sub):
                    report.missing.append(f"{collection}:{path_str(prefix + (str(key),) + path)} ({_spec(leaf)})")
        for key in found:
            if key not in expected:
                report.unused.append(f"{collection}:{path_str(prefix + (str(key),))}")
        return
    if isinstance(expected, jax.ShapeDtypeStruct) or hasattr(expected, "shape"):
        _compare(report, name, expected, found)
        return
    want, got = _leaves(expected), _leaves(found)
    if [p for p, _ in want] != [p for p, _ in got]:
        report.mis_shaped.append(
            f"{name}: expected {[_spec(v) for _, v in want]}, found {[_spec(v) or type(v).__name__ for _, v in got]}"
        )
        return
    for (path, e), (_, f) in zip(want, got, strict=True):
        _compare(report, f"{collection}:{path_str(prefix + path)}", e, f)


def _flat(tree: Mapping) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for key, sub in tree.items():
        if isinstance(sub, Mapping):
            out += [((str(key),) + p, v) for p, v in _flat(sub)]
        else:
            out += [((str(key),) + p, v) for p, v in _leaves(sub)]
    return out


def diff_variables(expected: Mapping[str, Any], found: Mapping[str, Any]) -> VariablesReport:
    """Compare a tree of expected shapes (`jax.eval_shape(t.init, ...)`) with stored variables, by collection.

    Reports every missing, unused, mis-shaped and mis-typed entry (a Flax box
    or a non-array leaf counts as mis-typed); nothing is run.
    """
    report = VariablesReport()
    for collection, tree in expected.items():
        if collection in found:
            _walk(report, (), tree, found[collection], collection)
        elif isinstance(tree, Mapping):
            report.missing += [f"{collection}:{path_str(p)} ({_spec(v)})" for p, v in _flat(tree)]
    for collection, tree in found.items():
        if collection not in expected:
            flat = _flat(tree) if isinstance(tree, Mapping) else [((), tree)]
            report.unused += [f"{collection}:{path_str(p)}" for p, _ in flat] or [f"{collection}:"]
    return report
