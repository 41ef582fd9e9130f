"""Logical axes to mesh shardings: name each param's dimensions once, map them to any mesh by rules.

A model declares `fx.param(..., axes=("embed", "mlp"))`; the rules say which
mesh axis each logical name goes to (`("mlp", "model")`, `("embed", None)`),
as in Flax's logical partitioning. `logical_to_mesh` turns the abstract
variables into a tree of `NamedSharding` that `jax.jit(t.init,
out_shardings=...)` takes, so each device only ever holds its shard. JAX's own
SPMD partitioner does the rest.

A dimension split over several names is written as a `PartitionSpec` writes
one split over several mesh axes: a tuple entry, `axes=(("data", "model"),
None)`. The rules map it name by name and the results join into one tuple
entry of the mesh spec. That is how Flax spells `nn.with_partitioning(init,
(("data", "model"), None))`, so `fx.from_flax` keeps such names instead of
dropping them; for effax's own models, one logical name per dimension with a
rule to several mesh axes (`("batch", ("data", "model"))`) says the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from effax.core import EffaxError
from effax.handlers._tree import key_path_names

MeshAxes = str | tuple[str, ...] | None
Axis = str | tuple[str, ...] | None  # one dimension's logical name(s): a tuple splits it over several
Rules = Mapping[str, MeshAxes] | Sequence[tuple[str, MeshAxes]]

__all__ = ["ShardingError", "logical_axes", "logical_to_mesh", "logical_to_spec", "Rules"]


class ShardingError(EffaxError, ValueError):
    """A logical axis has no rule, a rule names a mesh axis the mesh lacks, or a dimension does not divide.

    >>> fx.sharding.logical_to_spec(("batch", "mlp"), None, [("batch", "data")])
    Traceback (most recent call last):
    effax.ShardingError: array with axes ('batch', 'mlp') has logical axis 'mlp', but no rule maps it ...
    """



_RULES_EXAMPLE = "`[('batch', 'data'), ('mlp', 'model'), ('embed', None)]` (or a dict)"


def _check_mesh(mesh: Any, optional: bool) -> None:
    if (mesh is None and optional) or isinstance(mesh, (Mesh, AbstractMesh)):
        return
    raise ShardingError(
        f"`mesh` must be a `jax.sharding.Mesh`, got {type(mesh).__name__}"
        + (" (None is allowed only in `logical_to_spec`)" if mesh is None else "")
        + ". Build one: `mesh = jax.make_mesh((4, 2), ('data', 'model'))`."
    )


def _rules_list(rules: Rules, mesh: Mesh | None) -> list[tuple[str, tuple[str, ...] | None]]:
    if isinstance(rules, Mapping):
        items: Any = rules.items()
    elif isinstance(rules, (list, tuple)) and not (len(rules) == 2 and isinstance(rules[0], str)):
        items = rules
    else:
        hint = f"; for one rule write `[{rules!r}]`" if isinstance(rules, tuple) else ""
        raise ShardingError(
            f"`rules` must be a list of (logical axis, mesh axes) pairs or a dict, got "
            f"{type(rules).__name__} {rules!r:.60}{hint}. Write rules like {_RULES_EXAMPLE}."
        )
    out = []
    for item in items:
        try:
            logical, target = item
        except (TypeError, ValueError):
            raise ShardingError(
                f"rule {item!r:.60} is not a pair (logical axis, mesh axes): write rules like {_RULES_EXAMPLE}."
            ) from None
        if type(logical) is not str or not logical:
            raise ShardingError(
                f"rule {item!r:.60}: the logical axis must be a non-empty str (the name given in "
                f"`fx.param(..., axes=...)`), got {type(logical).__name__} {logical!r:.40}. Write rules like "
                f"{_RULES_EXAMPLE}."
            )
        if target is not None:
            members = (target,) if isinstance(target, str) else target
            if not isinstance(members, (tuple, list)) or not members or not all(
                type(a) is str and a for a in members
            ):
                raise ShardingError(
                    f"rule {item!r:.60}: the mesh axes must be a mesh axis name, a tuple of them, or None "
                    f"to replicate, got {type(target).__name__} {target!r:.40}. Write e.g. "
                    f"`({logical!r}, 'model')` or `({logical!r}, ('data', 'model'))`."
                )
            target = tuple(members)
            once = tuple(dict.fromkeys(target))
            if len(once) != len(target):
                raise ShardingError(
                    f"rule {item!r:.60} names a mesh axis twice: a dimension is split over each mesh "
                    f"axis at most once. Write each once, e.g. "
                    f"`({logical!r}, {once[0] if len(once) == 1 else once!r})`."
                )
            if mesh is not None:
                for axis in target:
                    if axis not in mesh.axis_names:
                        raise ShardingError(
                            f"rule ({logical!r}, {item[1]!r}) names mesh axis {axis!r}, but the mesh has "
                            f"axes {tuple(mesh.axis_names)}. Use one of those, or None to replicate."
                        )
        out.append((logical, target))
    return out


def _is_axis(a: Any) -> bool:
    """One dimension's entry: None, a name, or a non-empty tuple of names (a dimension split over several)."""
    return a is None or (type(a) is str and a != "") or (
        isinstance(a, tuple) and len(a) > 0 and all(type(n) is str and n != "" for n in a)
    )


def _check_axes(axes: Any, where: str) -> tuple[Axis, ...]:
    if isinstance(axes, str) or not isinstance(axes, (tuple, list)):
        hint = f" (write `({axes!r},)` for one dimension)" if isinstance(axes, str) else ""
        raise ShardingError(
            f"{where}: logical axes must be a tuple with one entry per dimension, got "
            f"{type(axes).__name__} {axes!r:.60}{hint}. Write e.g. `('batch', 'embed')`."
        )
    bad = next((a for a in axes if not _is_axis(a)), _OK)
    if bad is not _OK:
        raise ShardingError(
            f"{where}: logical axes {tuple(axes)!r:.80} hold {type(bad).__name__} {bad!r:.40}; each entry is "
            "a non-empty name, None (replicated), or a tuple of names (a dimension split over several)."
        )
    return tuple(axes)


_OK = object()


def _resolve(
    axes: Sequence[Axis], rules: list[tuple[str, tuple[str, ...] | None]], where: str
) -> PartitionSpec:
    """Flax's rule order: each rule, in order, takes the dims of its logical name whose mesh axes are still free.

    A tuple entry (a dimension split over several names) is mapped name by name, in the same
    rule order; the mesh axes its names get join, in the entry's order, into one spec entry.
    """
    names = [(i, j, n) for i, a in enumerate(axes) if a is not None
             for j, n in enumerate((a,) if isinstance(a, str) else a)]
    known = {logical for logical, _ in rules}
    for _, _, name in names:
        if name not in known:
            raise ShardingError(
                f"{where} has logical axis {name!r}, but no rule maps it (rules name "
                f"{sorted(known)}). Add a rule: `({name!r}, 'model')` to shard it, or "
                f"`({name!r}, None)` to replicate it."
            )
    got: dict[tuple[int, int], tuple[str, ...]] = {}  # (dim, member) -> mesh axes; () replicated
    used: set[str] = set()
    for logical, target in rules:
        for i, j, name in names:
            if name != logical or (i, j) in got:
                continue
            if target is None:
                got[(i, j)] = ()
            elif used.isdisjoint(target):
                got[(i, j)] = target
                used.update(target)
    spec: list[Any] = []
    for i in range(len(axes)):
        mesh_axes = tuple(m for (d, _), t in sorted(got.items()) if d == i for m in t)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def logical_to_spec(axes: Sequence[Axis] | None, mesh: Mesh | None, rules: Rules) -> PartitionSpec:
    """The mesh `PartitionSpec` of one array with logical `axes` (for activations and batches too).

    The arguments come in `logical_to_mesh`'s order: what, on which mesh (None
    skips checking that the rules' mesh axes exist), by which rules.

    A logical name may have several rules; the first whose mesh axes are not
    yet used by another dimension wins, else the dimension is replicated.
    A name without any rule is an error, never a silent replication. A tuple
    entry splits one dimension over several names, each mapped by the rules.

    >>> fx.sharding.logical_to_spec(("batch", "embed"), None, [("batch", "data"), ("embed", None)])
    P('data', None)
    >>> fx.sharding.logical_to_spec((("batch", "seq"), None), None, [("batch", "data"), ("seq", "model")])
    P(('data', 'model'), None)
    """
    _check_mesh(mesh, optional=True)
    if axes is None:
        return PartitionSpec()
    axes = _check_axes(axes, "`logical_to_spec`")
    return _resolve(axes, _rules_list(rules, mesh), f"array with axes {axes}")


def _is_axes_leaf(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec) or (isinstance(x, tuple) and all(map(_is_axis, x)))


def _looks_like_axes(x: Any) -> bool:
    """An axes leaf, or a plain tuple of names and other scalars: meant as axes, checked as such."""
    return _is_axes_leaf(x) or (type(x) is tuple and len(x) > 0 and all(
        a is None or isinstance(a, (str, int)) or (type(a) is tuple and all(isinstance(n, (str, int)) for n in a))
        for a in x
    ))


def _as_summary(source: Any) -> Any:
    """An inventory (`fx.effects_of`) becomes the `Summary` it implies; anything else stays."""
    from effax.inspect._inventory import Inventory
    from effax.inspect._summary import Summary, entries_of

    if isinstance(source, Inventory):
        entries, variables = entries_of(source)
        return Summary(tuple(entries), variables)
    return source


def logical_axes(source: Any) -> Any:
    """A tree mirroring the variables whose leaves are logical `PartitionSpec`s (replicated without `axes=`).

    `source` is what `fx.summary(t, ...)` or `fx.effects_of(fn, ...)`
    returned, or such a tree already.

    >>> def model(x):
    ...     return x @ fx.param("w", jax.nn.initializers.ones, (2, 3), axes=("embed", "mlp"))
    >>> fx.sharding.logical_axes(fx.summary(fx.transform(model), jnp.ones((1, 2))))
    {'params': {'w': P('embed', 'mlp')}}
    """
    source = _as_summary(source)
    if callable(getattr(source, "logical_axes", None)):
        return source.logical_axes()
    _check_not_a_model(source)
    for path, leaf in jax.tree.leaves_with_path(source, is_leaf=_looks_like_axes):
        if type(leaf) is tuple and not _is_axes_leaf(leaf):
            _check_axes(leaf, _entry_where(path))  # raises, naming the bad entry
        if not _is_axes_leaf(leaf):
            raise ShardingError(
                f"logical axes must be PartitionSpecs, tuples of names or None, but {_entry_where(path)} "
                f"holds {_what(leaf)}. Variables and abstract arrays (`jax.eval_shape(t.init, ...)`) do "
                "not carry logical axes: pass `fx.summary(t, *args)` instead, which records the `axes=` "
                "of every `fx.param`."
            )
    return jax.tree.map(
        lambda a: PartitionSpec() if a is None else PartitionSpec(*a), source, is_leaf=_is_axes_leaf
    )


def _check_not_a_model(source: Any) -> None:
    """The model itself (a function, `fx.transform`'s pair) is not a source: its axes show only when it runs."""
    if callable(source) or (hasattr(source, "init") and hasattr(source, "apply")):
        kind = "an `fx.transform`ed model" if hasattr(source, "apply") else f"a callable ({type(source).__name__})"
        raise ShardingError(
            f"the source of logical axes is {kind}, but a model says its axes only when it runs. Pass "
            "`fx.summary(t, *args)` (it runs `t` abstractly, with the arguments of a call, and records the "
            "`axes=` of every `fx.param`), or a tree of logical axes that mirrors the variables."
        )


def _entry(path: Any) -> str:
    names = key_path_names(path)
    return names[0] if len(names) == 1 else f"{names[0]}:{'/'.join(names[1:])}"


def _entry_where(path: Any) -> str:
    """Where a leaf sits, for errors: `entry `params:dense/w``, or the source itself at the root."""
    return f"entry `{_entry(path)}`" if path else "the source (not a tree of variables)"


def _what(x: Any) -> str:
    """A leaf described in a few words: its type, and for arrays their dtype and shape, never their values."""
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    kind = "jax.Array" if isinstance(x, jax.Array) else type(x).__name__
    if shape is not None and dtype is not None:
        return f"{kind} {getattr(dtype, 'name', dtype)}{list(shape)}"
    return f"{kind} {x!r:.40}" if isinstance(x, (str, int, float, tuple)) else kind


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    paths = jax.tree.leaves_with_path(tree, is_leaf=_is_axes_leaf)
    return {key_path_names(p): leaf for p, leaf in paths}


def logical_to_mesh(source: Any, mesh: Mesh, rules: Rules) -> Any:
    """A tree of `NamedSharding` mirroring the variables, from each param's logical axes and `rules`.

    `source` is `fx.summary(t, *args)` (or `fx.effects_of(...)`), which also
    lets every sharded dimension be checked to divide by its mesh axes; or a
    tree of logical axes mirroring the variables. Pass the result as
    `jax.jit(t.init, out_shardings=...)` so no device ever holds the whole
    model. To restore a checkpoint onto these shardings, put them on the
    shapes (`like` takes shapes, not shardings):
    `like = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype,
    sharding=sh), jax.eval_shape(t.init, key, x), shardings)`.

    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> def model(x):
    ...     return x @ fx.param("w", jax.nn.initializers.ones, (2, 4), axes=("embed", "mlp"))
    >>> s = fx.sharding.logical_to_mesh(fx.summary(fx.transform(model), jnp.ones((1, 2))),
    ...                                 mesh, [("embed", None), ("mlp", "model")])
    >>> s["params"]["w"].spec
    P(None, 'model')
    """
    _check_mesh(mesh, optional=False)
    rules_list = _rules_list(rules, mesh)
    source = _as_summary(source)
    shapes = getattr(source, "variables", None)
    shapes = {} if shapes is None else {p: getattr(x, "shape", None) for p, x in _flat(shapes).items()}
    sizes = dict(mesh.shape)

    def one(path: Any, axes: PartitionSpec) -> NamedSharding:
        names = key_path_names(path)
        where = f"variable `{_entry(path)}`" if names else "the source's one entry"
        spec = _resolve(_check_axes(tuple(axes), where), rules_list, where)
        shape = shapes.get(names)
        for dim, (n, target) in enumerate(zip(shape or (), spec, strict=False)):
            if target is None:
                continue
            parts = int(np.prod([sizes[a] for a in ((target,) if isinstance(target, str) else target)]))
            if n % parts:
                raise ShardingError(
                    f"{where} has shape {shape}: dimension {dim} (logical axis {axes[dim]!r}) has size {n}, "
                    f"which mesh axes {target!r} cannot split into {parts} equal parts. Change the "
                    f"size or the mesh, or map {axes[dim]!r} to None to replicate it."
                )
        return NamedSharding(mesh, spec)

    return jax.tree.map_with_path(one, logical_axes(source), is_leaf=_is_axes_leaf)
