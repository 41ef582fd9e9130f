"""One tree diff: what a model expects against what variables (or a checkpoint) hold.

`fx.check_variables` and `fx.checkpoint.restore` report through it, so a
mismatch reads the same wherever it is found: entries as `collection:a/b/c`,
arrays as `float32[3, 4]`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Container, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effax.core import path_str
from effax.handlers._tree import key_path_names


@dataclasses.dataclass
class VariablesReport:
    """Every difference between expected and found variables at once, entries as `collection:a/b/c`.

    >>> expected = {"params": {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}}
    >>> print(fx.inspect.diff_variables(expected, {"params": {"w": jnp.zeros(3), "v": 1.0}}))
    unused: params:v (float32[])
    mis-shaped: params:w: model float32[2], variables float32[3]
    """

    missing: list[str] = dataclasses.field(default_factory=list)
    unused: list[str] = dataclasses.field(default_factory=list)
    mis_shaped: list[str] = dataclasses.field(default_factory=list)
    mis_typed: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unused or self.mis_shaped or self.mis_typed)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.unused) + len(self.mis_shaped) + len(self.mis_typed)

    def lines(self, unused: str = "unused") -> list[str]:
        """One line per problem, labelled; `unused` names the unused entries (a checkpoint says "unexpected")."""
        out = []
        for label, items in (
            ("missing", self.missing),
            (unused, self.unused),
            ("mis-shaped", self.mis_shaped),
            ("mis-typed", self.mis_typed),
        ):
            out.extend(f"{label}: {item}" for item in items)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines()) if not self.ok else "variables match the model"


def _is_box(x: Any) -> bool:
    """A Flax box (`nn.Partitioned`, `LogicallyPartitioned`): an object with `.unbox()` around the array."""
    return callable(getattr(x, "unbox", None)) and not isinstance(x, (jax.Array, jax.ShapeDtypeStruct))


def _type(x: Any) -> str | None:
    """The dtype name of an array-like leaf (`float32`, `key<fry>`), None for anything else."""
    x = _as_array(x)
    dtype = getattr(x, "dtype", None)
    if getattr(x, "shape", None) is None or dtype is None:
        return None
    if not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        dtype = jax.dtypes.canonicalize_dtype(dtype)
    return str(getattr(dtype, "name", dtype))


def _as_array(x: Any) -> Any:
    """A Python number, or a (nested) list or tuple of numbers, as the array `apply` makes of it; else `x`."""
    if isinstance(x, (bool, int, float, complex)):
        return jnp.asarray(x)
    if type(x) in (list, tuple):  # (a NamedTuple is a node of its own, reported as it is)
        try:
            data = np.asarray(x)
        except ValueError:  # ragged
            return x
        return data.astype(jax.dtypes.canonicalize_dtype(data.dtype)) if data.dtype.kind in "biufc" else x
    return x


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(_as_array(x).shape)


def spec(x: Any, dtype: str | None = None) -> str:
    """`float32[3, 4]` for an array-like leaf (with `dtype` in place of its own), its type name otherwise."""
    name = dtype or _type(x)
    if name is None:
        return f"a boxed Flax value ({type(x).__name__})" if _is_box(x) else f"a {type(x).__name__}, not an array"
    shape = _shape(x)
    if name.startswith("key<") and not (_type(x) or "").startswith("key<"):
        shape = shape[:-1]  # keys stored as their data: one trailing dimension of words
    return f"{name}[{', '.join(map(str, shape))}]"


def flatten(
    tree: Mapping[str, Any], leaves: Container[str] = (), mappings: Container[str] = (), scopes: set | None = None
) -> dict[str, Any]:
    """`{"collection:a/b": leaf}` for a variables tree, walked as `apply` reads it: down mappings (keys of
    mixed types too), a Flax box or None one leaf. Any other value is one leaf at an entry named in `leaves`
    (a param stored as a nested list, which `apply` takes as an array) or in `mappings` (a NamedTuple or
    dataclass where the model keeps a dict, which `apply` cannot walk), so it is compared there; elsewhere
    its own leaves are entries below it (a state holding a tuple). `scopes`, when given, gets the entries
    where the tree holds a mapping (the `mappings` to read another tree against)."""
    out: dict[str, Any] = {}
    for collection, sub in tree.items():
        if isinstance(sub, Mapping):
            _walk(str(collection), (), sub, out, leaves, mappings, scopes)
        else:
            out[str(collection)] = sub
    return out


def _sorted(node: Mapping) -> list[tuple[Any, Any]]:
    """A mapping's items in `jax.tree`'s order (by key), keys of mixed types grouped by type."""
    return sorted(node.items(), key=lambda kv: (type(kv[0]).__name__, kv[0]) if isinstance(kv[0], str | int)
                  else (type(kv[0]).__name__, str(kv[0])))


def _walk(collection: str, path: tuple, x: Any, out: dict, leaves: Container[str], mappings: Container[str],
          scopes: set | None) -> None:
    entry = f"{collection}:{path_str(path)}"
    if isinstance(x, Mapping) and not _is_box(x):
        if scopes is not None and path:
            scopes.add(entry)
        for key, value in _sorted(x):
            _walk(collection, path + (str(key),), value, out, leaves, mappings, scopes)
        return
    if _is_box(x) or x is None or entry in leaves or entry in mappings:
        out[entry] = x
        return
    for key_path, leaf in jax.tree.leaves_with_path(x, is_leaf=lambda y: _is_box(y) or y is None):
        out[f"{collection}:{path_str(path + key_path_names(key_path))}"] = leaf


def _key_data_of(want: Any, have: Any) -> bool:
    """Whether `have` is the raw data (`jax.random.key_data`) of keys shaped like the key array `want`."""
    dtype = getattr(want, "dtype", None)
    if dtype is None or not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or _type(have) != "uint32":
        return False
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(_shape(want), dtype))
    return _shape(have) == tuple(data.shape)


def diff_specs(
    expected: Mapping[str, Any],
    found: Mapping[str, Any],
    *,
    labels: tuple[str, str] = ("expected", "found"),
    unused: bool = True,
    dtypes: tuple[Mapping[str, str], Mapping[str, str]] = ({}, {}),
) -> VariablesReport:
    """Compare two flat maps `entry -> leaf`: what is missing, unused, mis-shaped or mis-typed.

    `labels` say what each side is in the messages; `dtypes` override the
    dtype shown for some entries (a checkpoint stores keys as their data).
    """
    report = VariablesReport()
    want_label, have_label = labels
    extra = [n for n in found if n not in expected]
    for name, want in expected.items():
        if name not in found:
            near = difflib.get_close_matches(name, extra, n=1, cutoff=0.6)
            hint = f"; nearest in the {have_label}: {near[0]!r}" if near else ""
            report.missing.append(f"{name} ({spec(want, dtypes[0].get(name))}){hint}")
            continue
        have = found[name]
        want_type, have_type = dtypes[0].get(name, _type(want)), dtypes[1].get(name, _type(have))
        shown = f"{name}: {want_label} {spec(want, want_type)}, {have_label} {spec(have, have_type)}"
        if have_type is None or _is_box(have):
            report.mis_typed.append(shown + ("; unbox the variables first: `flax.linen.meta.unbox(variables)`"
                                             if _is_box(have) else ""))
        elif want_type != have_type and _key_data_of(want, have):
            continue  # a key stored as its data: `apply` takes it so (and a checkpoint stores keys so)
        elif _shape(want) != _shape(have):
            report.mis_shaped.append(shown)
        elif want_type != have_type:
            report.mis_typed.append(shown)
    if unused:
        report.unused = [f"{name} ({spec(found[name], dtypes[1].get(name))})" for name in extra]
    return report


def diff_variables(expected: Mapping[str, Any], found: Mapping[str, Any]) -> VariablesReport:
    """Compare a tree of expected shapes (`jax.eval_shape(t.init, ...)`) with stored variables.

    Reports every missing, unused, mis-shaped and mis-typed entry (a Flax box
    or a non-array leaf counts as mis-typed); nothing is run.

    >>> t = fx.transform(lambda x: fx.nn.Dense(2)(x))
    >>> expected = jax.eval_shape(t.init, jax.random.key(0), jnp.ones((1, 3)))
    >>> report = fx.inspect.diff_variables(expected, {"params": {"Dense_0": {"kernel": jnp.zeros((3, 2))}}})
    >>> report.ok, report.missing
    (False, ['params:Dense_0/bias (float32[2])'])
    """
    scopes: set[str] = set()
    want = flatten(expected, scopes=scopes)
    return diff_specs(want, flatten(found, leaves=want, mappings=scopes), labels=("model", "variables"))
