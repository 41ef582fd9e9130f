"""`fx.summary`: what a model holds and asks for, by path, computed without allocating anything.

Built on the inventory (`fx.effects_of`, one abstract run of the model under
`jax.eval_shape`): its requests are grouped by variable into rows, with sizes,
bytes and totals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from effax.core import path_str
from effax.handlers._tree import MISSING, PathTree, key_path_names
from effax.inspect._inventory import _transformed, dtype_name, inventory_of


@dataclasses.dataclass(frozen=True)
class Entry:
    """One thing a model asks for at one path: a row of `fx.summary`.

    `collection` is the params or state collection, the sow collection, or
    the random stream; `uses` counts requests (key draws for `random`, values
    for `sow`); `aliases` are the paths a `fx.share` pass tied to this param.
    `stored` is False for a param or state that one of the `handlers=` given
    answers itself (frozen weights it serves): `init` does not make it, so it
    counts in no total and is in no variables tree.

    >>> s = fx.summary(lambda x: fx.nn.Dense(2)(x), jnp.ones((1, 3)))
    >>> e = s.entries[0]
    >>> e.kind, e.path, e.shape, e.size, e.nbytes
    ('param', ('Dense_0', 'kernel'), (3, 2), 6, 24)
    """

    kind: str
    path: tuple[str, ...]
    collection: str | None = None
    shape: tuple[int, ...] | None = None
    dtype: Any = None
    axes: tuple[str | None, ...] | None = None
    uses: int = 1
    aliases: tuple[str, ...] = ()
    stored: bool = True

    @property
    def size(self) -> int:
        """Number of elements (0 for entries without an array)."""
        return 0 if self.shape is None else int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        if self.shape is None or self.dtype is None:
            return 0
        return self.size * getattr(self.dtype, "itemsize", 0)

    @property
    def shared(self) -> bool:
        """A param reached from more than one place: tied by `fx.share`, or one layer called twice."""
        return self.kind == "param" and (bool(self.aliases) or self.uses > 1)

    def note(self) -> str:
        if self.kind == "random":
            return f"{self.uses} draw{'s' * (self.uses != 1)}" if self.uses else "base key"
        if self.kind == "sow":
            return f"{self.uses} value{'s' * (self.uses != 1)}"
        notes = [] if self.stored else ["answered by a handler, not stored"]
        if self.aliases:
            notes.append("shared with " + ", ".join(self.aliases))
        if self.uses > 1:
            notes.append(f"{self.uses} uses")
        if self.axes is not None:
            notes.append("axes (" + ", ".join(str(a) for a in self.axes) + ")")
        return "; ".join(notes)


def entries_of(effects: Any) -> tuple[list[Entry], dict]:
    """Group an inventory (`fx.effects_of`) by variable; also return the abstract variables it implies.

    Params and state are one entry per array (a state variable holding a
    tree gives one per leaf), keys one per stream and path, sows one per tag.
    The variables are what `jax.eval_shape(t.init, ...)` gives.

    >>> def model(x):
    ...     fx.local_state("n", lambda: jnp.zeros((), jnp.int32))
    ...     return x * fx.param("w", jax.nn.initializers.ones, (3,))
    >>> entries, variables = fx.inspect.entries_of(fx.effects_of(model, jnp.ones(3)))
    >>> [(e.kind, e.path, e.shape) for e in entries]
    [('state', ('n',), ()), ('param', ('w',), (3,))]
    >>> variables
    {'params': {'w': ShapeDtypeStruct(shape=(3,), dtype=float32)},
     'state': {'n': ShapeDtypeStruct(shape=(), dtype=int32)}}
    """
    rows: dict[tuple, Entry] = {}
    params = PathTree("params")
    state: dict[str, PathTree] = {}
    for e in effects:
        if e.by_handler and e.kind in ("param", "state"):  # served by a handler: a row, no variable
            key = (e.kind, e.path, None)
            old = rows.get(key)
            rows[key] = Entry(e.kind, e.path, None, e.shape, e.dtype, getattr(e.request, "axes", None),
                              1 if old is None else old.uses + 1, stored=False)
        elif e.kind == "param":
            key = ("param", e.path, "params")
            old = rows.get(key)
            alias = () if e.origin is None or e.origin == e.path else (path_str(e.origin),)
            axes = getattr(e.request, "axes", None)
            if old is None:
                rows[key] = Entry("param", e.path, "params", e.shape, e.dtype, axes, 1, alias)
                params.set(e.path, e.structure)
            else:
                aliases = old.aliases + tuple(a for a in alias if a not in old.aliases)
                rows[key] = dataclasses.replace(old, uses=old.uses + 1, aliases=aliases, axes=old.axes or axes)
        elif e.kind == "state":
            tree = state.setdefault(e.collection, PathTree(f"collection {e.collection!r}"))
            if tree.get(e.path) is MISSING:
                tree.set(e.path, e.structure)
            axes = getattr(e.request, "axes", None)  # (an array variable's: its only leaf)
            for sub, leaf in jax.tree.leaves_with_path(e.structure):
                names = key_path_names(sub)
                key = ("state", e.path + names, e.collection)
                old = rows.get(key)
                uses, known = (1, axes) if old is None else (old.uses + 1, old.axes or axes)
                shape, dtype = tuple(leaf.shape), leaf.dtype
                rows[key] = Entry("state", e.path + names, e.collection, shape, dtype, known, uses)
        elif e.kind in ("key", "stream_key"):
            key = ("random", e.path, e.stream)
            old = rows.get(key)
            draws = (0 if old is None else old.uses) + (e.kind == "key")
            rows[key] = Entry("random", e.path, e.stream, None, None, None, draws)
        elif e.kind == "sow":
            key = ("sow", e.path + (e.tag,), e.collection)
            old = rows.get(key)
            rows[key] = Entry("sow", key[1], e.collection, e.shape, e.dtype, None, 1 if old is None else old.uses + 1)
        elif e.kind == "side_input":
            key = ("side_input", e.path + (e.tag,), None)
            rows[key] = Entry("side_input", key[1], None, e.shape, e.dtype)
    variables = {"params": params.root, **{c: tree.root for c, tree in state.items()}}
    return list(rows.values()), variables


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True, repr=False)
class Summary:
    """What `fx.summary` returns: the entries by path, totals, and the abstract variables.

    `str(summary)` is a text table; treescope renders it as an object;
    `variables` is the tree of params and state `jax.eval_shape(t.init, ...)`
    would give (sown values are rows, not variables, as for `fx.check_variables`), and
    `logical_axes()` the logical axes of every variable (for
    `fx.sharding.logical_to_mesh`).

    >>> s = fx.summary(lambda x: fx.nn.Dense(2)(x), jnp.ones((1, 3)))
    >>> s.param_count, s.param_bytes
    (8, 32)
    >>> [e.path for e in s.of_kind("param")]
    [('Dense_0', 'kernel'), ('Dense_0', 'bias')]
    >>> jax.tree.map(jnp.shape, s.variables)
    {'params': {'Dense_0': {'bias': (2,), 'kernel': (3, 2)}}}
    """

    entries: tuple[Entry, ...]
    variables: dict

    def of_kind(self, kind: str) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.kind == kind)

    def _stored(self, kind: str) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.kind == kind and e.stored)

    @property
    def param_count(self) -> int:
        """Parameters `init` makes, each tied param counted once."""
        return sum(e.size for e in self._stored("param"))

    @property
    def param_bytes(self) -> int:
        return sum(e.nbytes for e in self._stored("param"))

    @property
    def state_count(self) -> int:
        return sum(e.size for e in self._stored("state"))

    @property
    def state_bytes(self) -> int:
        return sum(e.nbytes for e in self._stored("state"))

    def totals(self) -> dict[str, tuple[int, int]]:
        """`{collection: (elements, bytes)}` for params and every state collection `init` makes."""
        out: dict[str, tuple[int, int]] = {}
        for e in self.entries:
            if e.kind in ("param", "state") and e.stored:
                count, nbytes = out.get(e.collection, (0, 0))
                out[e.collection] = (count + e.size, nbytes + e.nbytes)
        return out

    def logical_axes(self) -> dict:
        """A tree mirroring `variables`: each variable's logical `PartitionSpec` (replicated without axes)."""
        specs = {}
        for collection, tree in self.variables.items():
            specs[collection] = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), tree)
        for e in self.entries:
            if e.axes is not None and e.stored and e.kind in ("param", "state"):
                PathTree(e.collection, specs[e.collection]).set(e.path, jax.sharding.PartitionSpec(*e.axes),
                                                                replace=True)
        return specs

    def rows(self) -> list[tuple[str, ...]]:
        """The table's cells, header first."""
        rows = [("path", "kind", "collection", "shape", "dtype", "size", "bytes", "note")]
        for e in self.entries:
            array = e.shape is not None and e.kind in ("param", "state")
            rows.append((
                path_str(e.path),
                e.kind,
                e.collection or "",
                "" if e.shape is None else str(e.shape),
                dtype_name(e.dtype),
                f"{e.size:,}" if array else "",
                _fmt_bytes(e.nbytes) if array else "",
                e.note(),
            ))
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        right = {5, 6}
        lines = []
        for n, r in enumerate(rows):
            cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("")
        for collection, (count, nbytes) in self.totals().items():
            lines.append(f"total {collection}: {count:,} ({_fmt_bytes(nbytes)})")
        if not self.totals():
            lines.append("total params: 0 (0 B)")
        return "\n".join(lines)

    __repr__ = __str__

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        import treescope

        attributes = {
            "entries": {f"{e.kind} {path_str(e.path)}": e for e in self.entries},
            "totals": self.totals(),
        }
        return treescope.repr_lib.render_object_constructor(type(self), attributes, path, subtree_renderer)


def summary(
    t: Any,
    /,
    *args: Any,
    rngs: Any = None,
    training: bool = False,
    handlers: Any = (),
    mutable: Any = True,
    capture_intermediates: bool | Callable[[Any, str], bool] = False,
    method: Any = None,
    **kwargs: Any,
) -> Summary:
    """A table of everything a model holds and asks for, by path, computed abstractly.

    Each row is a param, state variable, key stream, sown value or side input
    with its shape, dtype, size and bytes; tied params are marked. Nothing is
    allocated (`jax.eval_shape`), so it works for models larger than memory,
    and array arguments may be `jax.ShapeDtypeStruct`s. `t` is a
    `fx.transform` or `fx.multi_transform` result, or the effectful function;
    the other arguments are those of `t.init` without the key, and the model
    runs as `t.init` runs it with them (see `fx.effects_of`: `mutable`
    defaults to True, so every sow is listed).

    >>> def model(x):
    ...     with fx.scope("dense"):
    ...         w = fx.param("kernel", jax.nn.initializers.lecun_normal(), (3, 4), axes=("in", "out"))
    ...         b = fx.param("bias", jax.nn.initializers.zeros, (4,))
    ...     return x @ w + b
    >>> s = fx.summary(fx.transform(model), jax.ShapeDtypeStruct((2, 3), jnp.float32))
    >>> print(s)
    path          kind   collection  shape   dtype    size  bytes  note
    ------------  -----  ----------  ------  -------  ----  -----  --------------
    dense/kernel  param  params      (3, 4)  float32    12   48 B  axes (in, out)
    dense/bias    param  params      (4,)    float32     4   16 B
    <BLANKLINE>
    total params: 16 (64 B)
    >>> s.param_count
    16
    """
    t = _transformed(t, "`fx.summary` and `fx.effects_of`", "fx.summary")
    effects = inventory_of(
        t, args, kwargs, "fx.summary", rngs=rngs, training=training, handlers=handlers, mutable=mutable,
        capture_intermediates=capture_intermediates, method=method,
    )
    entries, variables = entries_of(effects)
    return Summary(tuple(entries), variables)
