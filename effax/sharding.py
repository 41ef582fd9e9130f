"""Logical axes to mesh shardings: name each param's dimensions once, map them to any mesh by rules.

A model declares `fx.param(..., axes=("embed", "mlp"))`; the rules say which
mesh axis each logical name goes to (`("mlp", "model")`, `("embed", None)`),
as in Flax's logical partitioning. `logical_to_mesh` turns the abstract
variables into a tree of `NamedSharding` that `jax.jit(t.init,
out_shardings=...)` takes, so each device only ever holds its shard. JAX's own
SPMD partitioner does the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from effax.core import EffaxError
from effax.handlers._tree import key_path_names

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes] | Sequence[tuple[str, MeshAxes]]

__all__ = ["ShardingError", "logical_axes", "logical_to_mesh", "logical_to_spec", "Rules"]


class ShardingError(EffaxError, ValueError):
    """A logical axis has no rule, a rule names a mesh axis the mesh lacks, or a dimension does not divide.

    >>> fx.sharding.logical_to_spec(("batch", "mlp"), None, [("batch", "data")])
    Traceback (most recent call last):
    effax.ShardingError: array with axes ('batch', 'mlp') has logical axis 'mlp', but no rule maps it ...
    """



def _rules_list(rules: Rules, mesh: Mesh | None) -> list[tuple[str, tuple[str, ...] | None]]:
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for item in items:
        try:
            logical, target = item
        except (TypeError, ValueError):
            raise ShardingError(
                f"rule {item!r} is not a pair (logical axis, mesh axes): write rules like "
                "`[('batch', 'data'), ('mlp', 'model'), ('embed', None)]` or a dict."
            ) from None
        if target is not None:
            target = (target,) if isinstance(target, str) else tuple(target)
            if mesh is not None:
                for axis in target:
                    if axis not in mesh.axis_names:
                        raise ShardingError(
                            f"rule ({logical!r}, {item[1]!r}) names mesh axis {axis!r}, but the mesh has "
                            f"axes {tuple(mesh.axis_names)}. Use one of those, or None to replicate."
                        )
        out.append((logical, target))
    return out


def _resolve(
    axes: Sequence[str | None], rules: list[tuple[str, tuple[str, ...] | None]], where: str
) -> PartitionSpec:
    """Flax's rule order: each rule, in order, takes the dims of its logical name whose mesh axes are still free."""
    known = {logical for logical, _ in rules}
    for name in axes:
        if name is not None and name not in known:
            raise ShardingError(
                f"{where} has logical axis {name!r}, but no rule maps it (rules name "
                f"{sorted(known)}). Add a rule: `({name!r}, 'model')` to shard it, or "
                f"`({name!r}, None)` to replicate it."
            )
    result: list[Any] = [False] * len(axes)  # False: not assigned yet
    used: set[str] = set()
    for logical, target in rules:
        for i, name in enumerate(axes):
            if name != logical or result[i] is not False:
                continue
            if target is None:
                result[i] = None
            elif used.isdisjoint(target):
                result[i] = target[0] if len(target) == 1 else target
                used.update(target)
    return PartitionSpec(*(None if r is False else r for r in result))


def logical_to_spec(axes: Sequence[str | None] | None, mesh: Mesh | None, rules: Rules) -> PartitionSpec:
    """The mesh `PartitionSpec` of one array with logical `axes` (for activations and batches too).

    The arguments come in `logical_to_mesh`'s order: what, on which mesh (None
    skips checking that the rules' mesh axes exist), by which rules.

    A logical name may have several rules; the first whose mesh axes are not
    yet used by another dimension wins, else the dimension is replicated.
    A name without any rule is an error, never a silent replication.

    >>> fx.sharding.logical_to_spec(("batch", "embed"), None, [("batch", "data"), ("embed", None)])
    P('data', None)
    """
    if axes is None:
        return PartitionSpec()
    return _resolve(tuple(axes), _rules_list(rules, mesh), f"array with axes {tuple(axes)}")


def _is_axes_leaf(x: Any) -> bool:
    return (
        x is None
        or isinstance(x, PartitionSpec)
        or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))
    )


def _as_summary(source: Any) -> Any:
    """An inventory (`fx.effects_of`) becomes the `Summary` it implies; anything else stays."""
    from effax.inspect._inventory import Inventory
    from effax.inspect._summary import Summary, entries_of

    if isinstance(source, Inventory):
        entries, variables = entries_of(source)
        return Summary(tuple(entries), variables)
    return source


def logical_axes(source: Any) -> Any:
    """A tree mirroring the variables whose leaves are logical `PartitionSpec`s (state is replicated).

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
    bad = [
        leaf
        for leaf in jax.tree.leaves(source, is_leaf=_is_axes_leaf)
        if not _is_axes_leaf(leaf)
    ]
    if bad:
        raise ShardingError(
            f"logical axes must be PartitionSpecs, tuples of names or None, but the tree holds "
            f"{type(bad[0]).__name__} {bad[0]!r}. Abstract arrays (`jax.eval_shape(t.init, ...)`) do "
            "not carry logical axes: pass `fx.summary(t, *args)` instead, which records the `axes=` "
            "of every `fx.param`."
        )
    return jax.tree.map(
        lambda a: PartitionSpec() if a is None else PartitionSpec(*a), source, is_leaf=_is_axes_leaf
    )


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    paths = jax.tree.leaves_with_path(tree, is_leaf=_is_axes_leaf)
    return {key_path_names(p): leaf for p, leaf in paths}


def logical_to_mesh(source: Any, mesh: Mesh, rules: Rules) -> Any:
    """A tree of `NamedSharding` mirroring the variables, from each param's logical axes and `rules`.

    `source` is `fx.summary(t, *args)` (or `fx.effects_of(...)`), which also
    lets every sharded dimension be checked to divide by its mesh axes; or a
    tree of logical axes mirroring the variables. Pass the result as
    `jax.jit(t.init, out_shardings=...)` so no device ever holds the whole
    model, or to `fx.checkpoint.restore` through `like`.

    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> def model(x):
    ...     return x @ fx.param("w", jax.nn.initializers.ones, (2, 4), axes=("embed", "mlp"))
    >>> s = fx.sharding.logical_to_mesh(fx.summary(fx.transform(model), jnp.ones((1, 2))),
    ...                                 mesh, [("embed", None), ("mlp", "model")])
    >>> s["params"]["w"].spec
    P(None, 'model')
    """
    rules_list = _rules_list(rules, mesh)
    source = _as_summary(source)
    shapes = getattr(source, "variables", None)
    shapes = {} if shapes is None else {p: getattr(x, "shape", None) for p, x in _flat(shapes).items()}
    sizes = dict(mesh.shape)

    def one(path: Any, axes: PartitionSpec) -> NamedSharding:
        names = key_path_names(path)
        where = f"variable `{names[0]}:{'/'.join(names[1:])}`"
        spec = _resolve(tuple(axes), rules_list, where)
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
