"""State handlers: thread variables through a run functionally, or keep them frozen."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effax.core import (
    LATER,
    EffaxError,
    FrozenStateError,
    Handler,
    InvalidNameError,
    MissingVariableError,
    ParamConflictError,
    ShapeMismatchError,
    check_name,
    hermetic,
)
from effax.effects import READ_AHEAD, GetStateRequest, LocalStateRequest, SetStateRequest
from effax.handlers._random import refuse_handlers_as
from effax.handlers._trace import check_trace, trace_state
from effax.handlers._tree import MISSING, PathTree, copy_scopes, get_path, nearest_paths

ALL = True


def normalize_mutable(mutable: Any) -> frozenset[str] | bool:
    """`False`/`None` -> no collection, `True` -> all, a name or names -> those (never 'params')."""
    if mutable is None or mutable is False:
        return frozenset()
    if type(mutable) is frozenset and not mutable:  # normalized already (each handler normalizes again)
        return mutable
    if mutable is True:
        return ALL
    if isinstance(mutable, jax.core.Tracer):
        raise EffaxError(
            "`mutable` is a JAX tracer, but it changes which program runs, so it must be a Python "
            "value. Mark it static: `jax.jit(t.apply, static_argnames=('mutable',))` with a tuple."
        )
    if isinstance(mutable, str):
        names: tuple[Any, ...] = (mutable,)
    elif isinstance(mutable, (list, tuple, AbstractSet)):  # a set, frozenset, `dict.keys()`
        names = tuple(mutable)
    elif isinstance(mutable, np.bool_):
        return normalize_mutable(bool(mutable))
    else:
        refuse_handlers_as(mutable, "mutable")
        if isinstance(mutable, Mapping):
            chosen = [c for c, on in mutable.items() if on]
            fix = (
                "a dict would make every key mutable, whatever its value: name the collections, "
                f"`mutable={chosen if chosen else False!r}`"
            )
        else:
            fix = "`mutable=True` updates every collection, `mutable=['batch_stats']` just that one"
        raise EffaxError(
            f"`mutable={mutable!r:.60}` ({type(mutable).__name__}) is not an option: `mutable` takes True "
            f"(every collection but 'params'), False or None (none), a collection name, or a list of "
            f"names. {fix[0].upper()}{fix[1:]}."
        )
    for name in names:
        if type(name) is not str:
            refuse_handlers_as(mutable, "mutable")
        check_name(name, "collection")
        if name == "params":
            raise InvalidNameError(
                "mutable names 'params', but params are never mutable in a run: they change by "
                "your optimizer outside `apply`. Drop 'params' from `mutable`."
            )
    return frozenset(names)


def is_mutable(mutable: frozenset[str] | bool, collection: str) -> bool:
    return mutable is ALL or collection in mutable  # type: ignore[operator]


def value_phrase(x: Any) -> str:
    """A value in one short phrase for messages: `Array float32[3]`, `int 3`; never an array dump."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{'Array' if isinstance(x, jax.Array) else type(x).__name__} {_leaf_spec(x)}"
    return f"{type(x).__name__} {x!r:.40}"


def _leaf_spec(x: Any) -> str:
    shape = getattr(x, "shape", None)
    if shape is None:
        return type(x).__name__
    return f"{jnp.dtype(x.dtype).name}{list(shape)}"


def cast_like(new: Any, old: Any, describe: Any) -> Any:
    """Check `new` keeps `old`'s structure, shapes and dtypes; cast weakly typed scalars."""
    new_leaves, new_def = jax.tree.flatten(new)
    old_leaves, old_def = jax.tree.flatten(old)
    ok = new_def == old_def
    out = []
    if ok:
        for n, o in zip(new_leaves, old_leaves, strict=True):
            o_shape, o_dtype = jnp.shape(o), jnp.result_type(o)
            weak = isinstance(n, (int, float, complex, bool)) or getattr(
                getattr(n, "aval", None), "weak_type", False
            )
            n_shape = jnp.shape(n)
            if n_shape != o_shape or (not weak and jnp.result_type(n) != o_dtype):
                ok = False
                break
            out.append(jnp.asarray(n, dtype=o_dtype) if weak else n)
    if not ok:
        raise ShapeMismatchError(
            f"{describe()} would change it from {jax.tree.map(_leaf_spec, old)} to "
            f"{jax.tree.map(_leaf_spec, new)}. A `set` must keep the tree structure, shapes and "
            "dtypes of the variable: cast or reshape the value first (e.g. `x.astype(old.dtype)`)."
        )
    return jax.tree.unflatten(old_def, out)


_EMPTY: Mapping[str, Any] = {}  # a collection not stored: read only, never written through


def abstract_value_error(what: str, collection: str) -> MissingVariableError:
    """A `jax.ShapeDtypeStruct` stored where a value is read: the variables are `jax.eval_shape(t.init)`'s."""
    return MissingVariableError(
        f"{what}: variables[{collection!r}] holds abstract values (jax.ShapeDtypeStruct), as "
        "`jax.eval_shape(t.init, ...)` returns: they have a shape and dtype but no value. Restore or init real "
        "arrays (`fx.checkpoint.restore(path, like=abstract)`, or `t.init(key, x)`); inside `jax.eval_shape` "
        "they can be applied as they are: `jax.eval_shape(t.apply, abstract, x)`."
    )


class FunctionalState(Handler):
    """Thread local state through a run: read from `variables`, write to the mutable collections.

    A variable missing from `variables` is created with its `init()` when its
    collection is mutable; `set` in a frozen collection raises
    `FrozenStateError`. After the block, `run.updates()` is every mutable
    collection as the run left it, and `run.initial()` what `init()` made.

    >>> with fx.handle(fx.handlers.FunctionalState({}, mutable=True)) as (run,):
    ...     n = fx.local_state("n", lambda: 0.0)
    ...     n.set(n.get() + 1)
    >>> run.updates()
    {'state': {'n': Array(1., dtype=float32)}}
    """

    def __init__(self, variables: Mapping[str, Any] | None = None, mutable: Any = True):
        variables = {} if variables is None else variables
        if type(variables) is not dict and not isinstance(variables, Mapping):
            raise EffaxError(
                f"{type(self).__name__} takes the variables by collection, a dict like "
                f"{{'batch_stats': {{...}}}} (what `t.init` returned), got {value_phrase(variables)}."
            )
        self.variables = {c: v for c, v in variables.items() if c != "params"}
        for c, v in self.variables.items():  # a few collections: each is a dict of variables by path
            if type(v) is not dict and not isinstance(v, Mapping):
                raise EffaxError(
                    f"variables[{c!r}] is {value_phrase(v)}, not a dict of variables by path "
                    f"({{'BatchNorm_0': {{'mean': ...}}}}). Pass the variables `t.init` returned (merged with "
                    "the updates of earlier runs: `{**variables, **updates}`)."
                )
        self.mutable = normalize_mutable(mutable)

    def begin(self) -> _StateRun:
        return _StateRun(self.variables, self.mutable)


class FrozenState(FunctionalState):
    """Local state read-only: every `set` raises `FrozenStateError` (the eval-time guarantee).

    >>> with fx.handle(fx.handlers.FrozenState({"state": {"n": 1.0}})):
    ...     fx.local_state("n", lambda: 0.0).get()
    1.0
    """

    def __init__(self, variables: Mapping[str, Any] | None = None):
        super().__init__(variables, mutable=False)


def _check_concrete(value: Any, request: Any) -> None:
    """Refuse a stored state holding `jax.ShapeDtypeStruct`s (read outside `jax.eval_shape`, where they are
    tracers): the model would get a value without data."""
    if any(type(leaf) is jax.ShapeDtypeStruct for leaf in jax.tree.leaves(value)):
        raise abstract_value_error(request.describe(), request.collection)


def _made_by(init: Any) -> Any:
    """What `init()` makes, as a tree of `float32[2]` strings, computed abstractly with no handler installed
    (an `init` that draws a key counts no draw); None when it cannot be computed so."""
    try:
        with hermetic():
            shapes = jax.eval_shape(init)
    except (EffaxError, TypeError):  # an init that performs effects (draws, reads the mode): not compared
        return None
    return jax.tree.map(_leaf_spec, shapes)


def _simple(x: Any) -> bool:
    return isinstance(x, (int, float, str, type, np.dtype)) or x is None or (
        type(x) is tuple and all(_simple(a) for a in x)
    )


def _same_function(a: Any, b: Any) -> bool:
    """`a` and `b` are one function (the same code) capturing equal plain values (shapes, dtypes, numbers):
    they make the same value, so neither is traced to compare them. A layer called in a loop declares its
    state with a new closure per call: comparing by tracing took two `jax.eval_shape`s a call."""
    if getattr(a, "__code__", None) is None or a.__code__ is not getattr(b, "__code__", None):
        return False
    try:
        cells = zip(a.__closure__ or (), b.__closure__ or (), strict=True)  # (one code: as many cells)
        captured = [(x.cell_contents, y.cell_contents) for x, y in cells]
    except ValueError:  # an empty cell
        return False
    captured.append((a.__defaults__, b.__defaults__))
    return all(u is v or type(u) is type(v) and _simple(u) and u == v for u, v in captured)


def _check_same_init(first: Any, request: Any) -> None:
    """Two declarations of one variable in one run whose `init()`s make different shapes or dtypes would
    silently give the second the first's value: `ParamConflictError`, as `fx.param` raises for the same."""
    if (first.origin or first.path) != (request.origin or request.path):
        return  # two variables tied by a `fx.share` binding: its `state=` policy checks them, or not ('unsafe')
    if first.axes is not None and request.axes is not None and first.axes != request.axes:
        raise ParamConflictError(
            f"{request.describe()} is declared twice in one run with different logical axes: first "
            f"axes={first.axes}, now axes={request.axes}, so its sharding would depend on which ran first. "
            "Give both the same axes (or None on one of them)."
        )
    if _same_function(first.init, request.init):
        return
    a, b = _made_by(first.init), _made_by(request.init)
    if a is not None and b is not None and jax.tree.flatten(a) != jax.tree.flatten(b):
        raise ParamConflictError(
            f"{request.describe()} is declared twice in one run with `init()`s that disagree: first {a}, now "
            f"{b}. A path names one variable: give the second one another name or scope "
            "(`fx.local_state('count_b', ...)`), or make the two inits agree."
        )


class _StateRun:
    answers = (LocalStateRequest, GetStateRequest, SetStateRequest)

    __slots__ = (
        "mutable", "stored", "current", "owned", "created", "inits", "used", "declared", "noted", "layout", "trace",
    )

    def __init__(self, stored: dict[str, Any], mutable: frozenset[str] | bool):
        self.mutable = mutable
        self.stored = stored
        self.current: dict[str, Any] = dict(stored)
        self.owned: set[str] = set()
        self.created: dict[str, PathTree] = {}
        self.inits: dict[tuple[str, tuple[str, ...]], Any] = {}  # the request that created each variable
        self.used: set[str] = set()
        self.declared: set[tuple[str, tuple[str, ...]]] = set()
        self.noted: set[tuple[str, tuple[str, ...]]] = set()  # declarations of stored leaves, laid out lazily
        self.layout: dict[str, PathTree] = {}
        self.trace = trace_state()

    def _write(self, collection: str, path: tuple[str, ...], value: Any, describe: Any) -> None:
        if collection not in self.owned:
            self.current[collection] = copy_scopes(self.current.get(collection, {}))
            self.owned.add(collection)
        PathTree(f"collection {collection!r}", self.current[collection]).set(path, value, describe, replace=True)

    def _layout(self, collection: str) -> PathTree:
        layout = self.layout.get(collection)
        if layout is None:
            layout = self.layout[collection] = PathTree(f"collection {collection!r}")
        return layout

    def _declare(self, request: Any) -> None:
        """Record a declaration once per run, so one name is never both a variable and a scope. The
        declarations of stored leaves that `handle` only noted (while nothing of their collection was laid
        out) are laid out first: they form a tree already, as stored variables do, so only this one can
        clash with them; once a collection is laid out, every declaration of it comes here."""
        for c, path in self.noted:
            self._layout(c).set(path, True)
        self.noted.clear()
        slot = (request.collection, request.path)
        if slot not in self.declared:
            self._layout(request.collection).set(request.path, True, request.describe)
            self.declared.add(slot)

    def _missing(self, request: Any) -> MissingVariableError:
        tree = self.current.get(request.collection, {})
        near = nearest_paths(request.path, tree)
        return MissingVariableError(
            f"no {request.describe()} in variables[{request.collection!r}]"
            + (f"; nearest: {', '.join(repr(n) for n in near)}" if near else "")
            + f". It is created only when its collection is mutable: pass "
            f"`mutable=[{request.collection!r}]` to `t.apply`, or create the variables with `t.init`."
        )

    def answer_now(self, request: Any) -> Any:
        """The usual eager request answered in place (`send` calls this without a frame for `handle`): a read
        of a stored variable, or the declaration of a stored leaf while nothing is laid out; else LATER."""
        kind, c = type(request), request.collection
        # a write, or a declaration once its collection is laid out: `handle` (which declares it)
        if kind is not GetStateRequest and (kind is not LocalStateRequest or c in self.layout):
            return LATER
        value = self.current.get(c, _EMPTY)
        try:
            for key in request.path:
                value = value.get(key, MISSING)
        except AttributeError:  # MISSING, or a leaf, on the way: `handle` walks and explains
            return LATER
        if kind is GetStateRequest:
            return LATER if value is MISSING else value
        if not isinstance(value, jax.Array):
            return LATER
        self.used.add(c)
        self.noted.add((c, request.path))  # as `handle` does, and read ahead when this run never writes it
        return None if is_mutable(self.mutable, c) else (READ_AHEAD, self, value)

    def handle(self, request: Any, forward: Any) -> Any:
        # Sent only the three kinds of `answers` (the interpreter, and the wrappers that copy `answers`, see to it).
        c = request.collection
        value = root = self.current.get(c, _EMPTY)
        try:  # `get_path` inline, a read per variable: down dicts and other mappings by `get`
            for key in request.path:
                value = value.get(key, MISSING)
        except AttributeError:  # MISSING, or a leaf, on the way: the general walk says MISSING
            value = get_path(root, request.path)
        kind = type(request)
        if kind is GetStateRequest:
            if value is MISSING:
                raise self._missing(request)
            return value
        if kind is SetStateRequest:
            if not is_mutable(self.mutable, c):
                mutable = sorted(self.mutable)  # a typo (`'batch_stat'`) shows here
                raise FrozenStateError(
                    f"{request.describe()}: collection {c!r} is frozen in this run (mutable: "
                    f"{mutable or 'none'}), so `set` is not allowed. To update it, pass `mutable=[{c!r}]` to "
                    "`t.apply` (and use the returned updates), or name it in the preset, which holds `mutable` "
                    f"when one is given: `fx.handlers.train(rngs, mutable=[{c!r}])`. In eval, inference state "
                    f"such as a decode cache is written with `fx.handlers.eval(mutable=[{c!r}])`; training "
                    "state is not set."
                )
            check_trace(self.trace, request, "writes state")
            if value is MISSING:
                raise self._missing(request)
            value = cast_like(request.value, value, request.describe)
            self._write(c, request.path, value, request.describe)
            return None
        self.used.add(c)
        # an array first: `isinstance(value, Mapping)` is an abstract check, a Python frame per variable
        if value is MISSING:
            leaf = False
        elif isinstance(value, jax.Array):
            leaf = True
        else:  # a tree, a NumPy array, or an abstract value (`jax.eval_shape(t.init)`'s): refused
            _check_concrete(value, request)
            leaf = not isinstance(value, Mapping)
        if leaf and c not in self.layout:  # a stored leaf, nothing laid out yet (the usual case): noted only
            self.noted.add((c, request.path))  # and read ahead when this run never writes it (eval)
            return None if is_mutable(self.mutable, c) else (READ_AHEAD, self, value)
        self._declare(request)
        if value is not MISSING:
            first = self.inits.get((c, request.path)) if self.inits else None
            if first is not None and (first.init is not request.init or first.axes != request.axes):
                _check_same_init(first, request)  # made in this run, declared again (a `fx.share` tie: its
                # policy checks it)
            return None
        if not is_mutable(self.mutable, c):
            raise self._missing(request)
        check_trace(self.trace, request, "creates state")
        value = request.initialize()
        self.inits[(c, request.path)] = request
        tree = self.created.get(c)
        if tree is None:
            tree = self.created[c] = PathTree(f"collection {c!r}")
        tree.set(request.path, value, request.describe)
        self._write(c, request.path, value, request.describe)
        return None

    def initial(self) -> dict[str, Any]:
        """Every variable this run created, at its `init()` value, by collection."""
        return {c: tree.root for c, tree in self.created.items()}

    def updates(self) -> dict[str, Any]:
        """Every mutable collection after the run: stored values, created ones, and sets."""
        return {
            c: value
            for c, value in self.current.items()
            if is_mutable(self.mutable, c) and (c in self.used or c in self.stored)
        }


class InitState(FunctionalState):
    """What `t.init` installs: `FunctionalState` starting empty, whose errors speak of `t.init`'s `mutable`."""

    def begin(self) -> _StateRun:
        return _InitStateRun(self.variables, self.mutable)


class _InitStateRun(_StateRun):
    __slots__ = ()

    def _missing(self, request: Any) -> MissingVariableError:
        c = request.collection
        if is_mutable(self.mutable, c):  # created by this init, but never declared where it is read
            return MissingVariableError(
                f"{request.describe()}: no `fx.local_state` declared it at that path in this run, so there is "
                "nothing to read. Read it through the handle `fx.local_state(...)` returns (its path is where "
                "it was declared), after the declaration."
            )
        return MissingVariableError(
            f"{request.describe()} is not created: `t.init(..., mutable=...)` leaves collection "
            f"{c!r} out. Add it, `mutable=[..., {c!r}]`, or leave `mutable` out: by default "
            "`t.init` creates every state collection."
        )
