"""The local-state effect: a mutable variable in a named collection (`get`, `set`)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from effax.core import (
    EffaxError,
    InvalidNameError,
    Request,
    ShapeMismatchError,
    check_name,
    current_path,
    current_stack,
    path_now,
    path_str,
    send,
)
from effax.effects._param import NO_ANSWER, check_axes

# A state handler may answer a `LocalStateRequest` with `(READ_AHEAD, run, value)` when `value` is final for
# the run `run` (a collection it will not write): when `run` also answers this stack's `GetStateRequest`s
# first, the handle's `get()` under the same stack returns `value` without a request (an eager model reads
# each running statistic once per call, and a request per read was most of that). Any other answer is ignored.
READ_AHEAD = object()

_STATE_HINT = (
    "discharge the model with `fx.transform(fn)` (`t.init`, or `t.apply(..., mutable=[collection])`), "
    "or install `fx.handlers.FunctionalState(variables, mutable=...)`."
)


@dataclasses.dataclass(frozen=True)
class LocalStateRequest(Request):
    """Declare the variable at `path` in `collection`; `init()` makes it when it does not exist yet.

    A handler sees one per `fx.local_state` call, then a `GetStateRequest` or
    `SetStateRequest` per read and write of the variable:

    >>> class Log(fx.Handler):
    ...     answers = (fx.LocalStateRequest, fx.GetStateRequest, fx.SetStateRequest)
    ...     def handle(self, request, forward):
    ...         print(request.kind, request.describe())
    ...         return forward(request)
    >>> def f():
    ...     n = fx.local_state("n", lambda: 0)
    ...     n.set(n.get() + 1)
    >>> _ = fx.transform(f).init(None, handlers=[Log()])
    state state `n` in collection 'state'
    get read of state `n` in collection 'state'
    set write of state `n` in collection 'state'
    """

    kind: ClassVar[str] = "state"  # the one name of this request, in errors, tables and the testing kit
    effect: ClassVar[str] = "state"  # the effect (family of requests) it belongs to

    collection: str
    init: Callable[[], Any]
    origin: tuple[str, ...] | None = None  # where the model declared it, if a `fx.share` pass moved it
    via: tuple[Any, ...] = ()  # the share bindings that moved it
    axes: tuple[Any, ...] | None = None  # logical axes of an array variable, one per dimension, for `fx.sharding`

    hint: ClassVar[str] = _STATE_HINT

    def describe(self) -> str:
        return f"state `{path_str(self.path)}` in collection {self.collection!r}"

    def initialize(self) -> Any:
        """`init()`, checked: an `init` that takes arguments (Flax's `self.variable(c, n, init_fn, shape)`)
        and a value that is not a pytree of arrays (None from a forgotten `return`, a string) are refused
        by name; what creates state calls this, never `init()` itself."""
        try:
            value = self.init()
        except TypeError as e:
            try:
                inspect.signature(self.init).bind()
            except TypeError:
                name = getattr(self.init, "__name__", type(self.init).__name__)
                raise EffaxError(
                    f"{self.describe()}: its init {name} cannot be called as `init()`, as `fx.local_state` calls "
                    f"it ({e}). init() takes no arguments; close over the shape: `lambda: jnp.zeros(shape)`."
                ) from None
            except ValueError:  # no signature to read (a builtin): the error is the init's own
                pass
            raise
        for leaf in jax.tree.leaves(value, is_leaf=lambda x: x is None):
            if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, bool, int, float, complex)):
                what = "None (a forgotten `return`?)" if leaf is None else f"{type(leaf).__name__} {leaf!r:.40}"
                where = "" if leaf is value else " in its tree"
                raise EffaxError(
                    f"{self.describe()}: its init() returned {what}{where}, but state is a pytree of arrays "
                    "(or Python numbers). Return one, `lambda: jnp.zeros(())`; a value that never "
                    "changes (a string, a config) belongs in a closure or a module field, not in state."
                )
        if not isinstance(value, jax.Array):  # NumPy leaves become JAX arrays of the canonical dtype, as
            value = jax.tree.map(_canonical, value)  # `jit(t.init)` makes them (float64 is float32 without x64)
        if self.axes is not None:
            self.check_axes(value)
        return value

    def check_axes(self, value: Any) -> None:
        """`axes` name the dimensions of one array: a tree, or another number of dimensions, is refused."""
        leaves = jax.tree.leaves(value)
        if len(leaves) != 1 or leaves[0] is not value:
            raise EffaxError(
                f"{self.describe()} has axes={self.axes}, but its init() made a {type(value).__name__} of "
                f"{len(leaves)} array(s), not one array: axes name the dimensions of one array. Declare each "
                "array as its own `fx.local_state` with its axes, or drop axes=."
            )
        if np.ndim(value) != len(self.axes):
            raise ShapeMismatchError(
                f"{self.describe()} has {np.ndim(value)} dims {np.shape(value)} but {len(self.axes)} logical "
                f"axes {self.axes}: give one axis name (or None) per dimension."
            )


def _canonical(leaf: Any) -> Any:
    """A NumPy leaf of a state's `init()` as a JAX array; Python numbers stay (JAX canonicalizes them on use)."""
    return jnp.asarray(leaf) if isinstance(leaf, (np.ndarray, np.generic)) else leaf


@dataclasses.dataclass(frozen=True)
class GetStateRequest(Request):
    """Read the current value of the variable at `path` in `collection`.

    >>> r = fx.GetStateRequest(("bn", "mean"), "batch_stats")
    >>> r.kind, r.effect, r.describe()
    ('get', 'state', "read of state `bn/mean` in collection 'batch_stats'")
    """

    kind: ClassVar[str] = "get"  # the one name of this request, in errors, tables and the testing kit
    effect: ClassVar[str] = "state"  # the effect (family of requests) it belongs to

    collection: str

    hint: ClassVar[str] = _STATE_HINT

    def describe(self) -> str:
        return f"read of state `{path_str(self.path)}` in collection {self.collection!r}"


@dataclasses.dataclass(frozen=True, eq=False)
class SetStateRequest(Request):
    """Write a new value to the variable at `path` in `collection`.

    >>> class PrintWrites(fx.Handler):
    ...     answers = (fx.SetStateRequest,)
    ...     def handle(self, request, forward):
    ...         print(request.describe(), "<-", request.value)
    ...         return forward(request)
    >>> def f():
    ...     fx.local_state("n", lambda: 0).set(5)
    >>> _ = fx.transform(f).init(None, handlers=[PrintWrites()])
    write of state `n` in collection 'state' <- 5
    """

    kind: ClassVar[str] = "set"  # the one name of this request, in errors, tables and the testing kit
    effect: ClassVar[str] = "state"  # the effect (family of requests) it belongs to

    collection: str
    value: Any

    hint: ClassVar[str] = _STATE_HINT

    def describe(self) -> str:
        return f"write of state `{path_str(self.path)}` in collection {self.collection!r}"


@dataclasses.dataclass(frozen=True)
class LocalStateEffect:
    """A handle on one variable; it belongs to the path where it was created, wherever it is used.

    >>> def count():
    ...     n = fx.local_state("n", lambda: jnp.zeros((), jnp.int32))
    ...     n.set(n.get() + 1)
    ...     return n.get()
    >>> t = fx.transform(count)
    >>> v = t.init(None)
    >>> t.apply(v, mutable=True)
    (Array(1, dtype=int32), {'state': {'n': Array(1, dtype=int32)}})
    """

    path: tuple[str, ...]
    collection: str
    _ahead: ClassVar[tuple | None] = None  # `(stack, value)`: read ahead by `local_state` (see `READ_AHEAD`)

    def get(self) -> Any:
        ahead = self._ahead
        if ahead is not None and ahead[0] is current_stack():  # the stack that read it: the same answer
            return ahead[1]
        request = object.__new__(GetStateRequest)  # as `local_state` builds its objects: no frame per read
        fields = request.__dict__
        fields["path"], fields["collection"] = self.path, self.collection
        value = send(request)
        if value is None:  # state is a pytree of arrays (None is refused from `init()`): a handler's slip
            raise EffaxError(f"{request.describe()}: a handler answered None; {NO_ANSWER}")
        return value

    def set(self, value: Any) -> None:
        send(SetStateRequest(self.path, self.collection, value))


def check_collection(collection: str, what: str) -> str:
    check_name(collection, "collection")
    if collection == "params":
        examples = "'intermediates' or 'losses'" if what.startswith("sow") else "'state' or 'batch_stats'"
        raise InvalidNameError(
            f"{what} cannot use collection 'params': it is reserved for `fx.param`. "
            f"Pick another collection, e.g. collection={examples}."
        )
    return collection


def local_state(
    name: str,
    init: Callable[[], Any],
    *,
    collection: str = "state",
    axes: tuple[str | None, ...] | None = None,
) -> LocalStateEffect:
    """Request the mutable variable `name` at the current path in `collection`.

    `init()` returns its initial pytree of arrays (or Python numbers) and is
    called only when the variable does not exist yet (under init, or when its
    collection is mutable); it takes no arguments (close over a shape). A
    second declaration of the path in a run whose `init()` makes other shapes
    or dtypes raises `ParamConflictError`, as a param's does.

    `axes` names the dimensions of an array variable for `fx.sharding`, as
    `fx.param(axes=...)` does (a decode cache `("batch", "length", "heads",
    "kv")`); `fx.summary(...).logical_axes()` carries them, and a lift that
    stacks the variable prepends its `stack_axis` (or None).

    >>> def counter():
    ...     n = fx.local_state("n", lambda: jnp.zeros((), jnp.int32), collection="counts")
    ...     n.set(n.get() + 1)
    ...     return n.get()
    >>> t = fx.transform(counter)
    >>> variables = t.init(None)
    >>> variables["counts"]
    {'n': Array(0, dtype=int32)}
    >>> t.apply(variables, mutable="counts")
    (Array(1, dtype=int32), {'counts': {'n': Array(1, dtype=int32)}})
    """
    if type(name) is not str or not name or "/" in name:
        check_name(name, "state")  # raises
    if not callable(init):
        raise EffaxError(
            f"state `{path_str(current_path() + (name,))}`: `init` must be a function `init() -> "
            "initial value`, called only when the variable does not exist yet; got "
            f"{type(init).__name__} {init!r:.40}. Wrap the value: "
            f"`fx.local_state({name!r}, lambda: jnp.zeros(()))`."
        )
    if type(collection) is not str or not collection or "/" in collection or collection == "params":
        check_collection(collection, f"state {name!r}")  # raises
    if axes is not None:
        axes = check_axes(axes, None, f"state `{path_str(current_path() + (name,))}`")
    path = path_now() + (name,)
    # the request and the handle of checked fields, built without a frozen dataclass's `__init__` frame and
    # `object.__setattr__` per field: an eager model builds them per variable per call (a field left at its
    # default is not stored: it reads the class's default, as `fx.param`'s request does)
    request, effect = object.__new__(LocalStateRequest), object.__new__(LocalStateEffect)
    fields = request.__dict__
    fields["path"], fields["collection"], fields["init"] = path, collection, init
    if axes is not None:
        fields["axes"] = axes
    answer = send(request)
    fields = effect.__dict__
    fields["path"], fields["collection"] = path, collection
    if type(answer) is tuple and answer[0] is READ_AHEAD:  # a frozen variable, read by the run that stores it
        stack = current_stack()
        route = stack.routes[GetStateRequest]  # that run answers this stack's reads first: `get` may skip it
        if route and getattr(route[0], "__self__", None) is answer[1]:
            fields["_ahead"] = (stack, answer[2])
    return effect
