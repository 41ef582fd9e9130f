"""Params handlers: create them from keys (init), load them from a tree (apply), or fake them (shapes)."""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from effax.core import (
    LATER,
    EffaxError,
    Handler,
    MissingVariableError,
    ParamConflictError,
    ShapeMismatchError,
    TraceMismatchError,
    path_str,
    send,
)
from effax.effects import InitializingRequest, ParamRequest, StreamKeyRequest
from effax.handlers._random import as_typed_key, fold, h_path
from effax.handlers._state import abstract_value_error, value_phrase
from effax.handlers._trace import check_trace, trace_state
from effax.handlers._tree import MISSING, PathTree, get_path, nearest_paths


def _asked(request: ParamRequest) -> str:
    """Where the model asked for a param that a `fx.share` binding moved, for messages; "" if not moved."""
    if not request.via:
        return ""
    return f" (asked at `{path_str(request.original_path)}`, via `{request.via[-1]}`)"


def spec_conflict(first: ParamRequest, request: ParamRequest) -> ParamConflictError:
    """One path asked for with two shapes or dtypes in one run (by the model, or inside a lifted body)."""
    return ParamConflictError(
        f"param `{path_str(request.path)}` is requested twice with different specs: first "
        f"{first.spec()}, now {request.spec()}. A path names one variable: give the second "
        "one another name or scope." + stacked_hint(first, request)
    )


def stacked_hint(a: ParamRequest, b: ParamRequest) -> str:
    """When one request is the other stacked by a lift (a leading axis more), the likely cause: a param used
    both outside and inside a lifted body. Said only when a lift made one of them (a plain model asking for
    `(4, 4)` and `(4,)` at one path has no lift to blame)."""
    if not (getattr(a.init, "from_lifted_body", False) or getattr(b.init, "from_lifted_body", False)):
        return ""
    a, b = a.shape, b.shape
    if len(a) == len(b) + 1 and a[1:] == b or len(b) == len(a) + 1 and b[1:] == a:
        n = (a if len(a) > len(b) else b)[0]
        return (
            f" One has a leading axis of {n} more: `fx.scan`/`fx.vmap` stack the params their body makes "
            "(params='stack', the default), so a param used both outside and inside the lifted body has two "
            "shapes. Pass params='broadcast' to the lift (one copy for every iteration), or keep its uses on "
            "one side."
        )
    return ""


class _ParamRun:
    """What every params run shares: one path, one array, one spec within a run."""

    answers = (ParamRequest, InitializingRequest)
    creating: bool | None = None  # the answer to `fx.is_initializing()`; None forwards it

    __slots__ = ("seen", "trace", "tags")

    def __init__(self) -> None:
        self.seen: dict[tuple[str, ...], tuple[ParamRequest, Any]] = {}
        self.trace = trace_state()
        self.tags: dict[str, ParamRequest] = {}

    def check_tag(self, request: ParamRequest) -> None:
        """Two unbound uses of one `shared=` tag at different paths would silently be two params."""
        tag = request.unbound_tag
        first = self.tags.setdefault(tag, request) if tag is not None else request
        if first.path != request.path:
            raise ParamConflictError(
                f"params `{path_str(first.path)}` and `{path_str(request.path)}` are both declared "
                f"shared={tag!r}, but no `fx.share` pass binds that tag, so they would be two "
                f"separate params. Bind it around the model: `fx.share(fn, tags=[{tag!r}])` (or "
                "`tags=True`), or drop `shared=` from one of them."
            )

    def again(self, request: ParamRequest) -> Any:
        """The value already answered at this path, after checking the two specs agree; else MISSING."""
        hit = self.seen.get(request.path)
        if hit is None:
            return MISSING
        first, value = hit
        if first.shape != request.shape or first.dtype != request.dtype:
            raise spec_conflict(first, request)
        if first.axes != request.axes:  # None is unspecified: it takes the other's; two names disagree
            if first.axes is not None and request.axes is not None:
                raise ParamConflictError(
                    f"param `{path_str(request.path)}` is requested twice with different logical axes: first "
                    f"axes={first.axes}{_asked(first)}, now axes={request.axes}{_asked(request)}, so its sharding "
                    "would depend on which runs first. Give both requests the same `axes=` (or leave it out of "
                    "one: None takes the other's)."
                )
            if first.axes is None:
                self.seen[request.path] = (request, value)  # a third request is checked against these axes
        return value

    def handle(self, request: Any, forward: Any) -> Any:
        if type(request) is not ParamRequest:
            if type(request) is InitializingRequest and self.creating is not None:
                return self.creating
            return forward(request)
        if request.shared is not None:
            self.check_tag(request)
        if request.path in self.seen:
            return self.again(request)
        value = self.answer(request)
        self.seen[request.path] = (request, value)
        return value

    def answer(self, request: ParamRequest) -> Any:
        raise NotImplementedError


class InitParams(Handler):
    """Create each param as `init(fold(k_params, h_path(path)), shape, dtype)`.

    With no `key`, the `"params"` stream key at the param's path is requested
    from the handlers outside (what `t.init` does); the created tree is read
    from the run's `params`.

    >>> with fx.handle(fx.handlers.InitParams(jax.random.key(0))) as (run,):
    ...     w = fx.param("w", jax.nn.initializers.zeros, (2,))
    >>> run.params
    {'w': Array([0., 0.], dtype=float32)}
    """

    def __init__(self, key: Any = None):
        self.key = key

    def begin(self) -> _InitRun:
        return _InitRun(None if self.key is None else as_typed_key(self.key, "params"))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _jitted_init(init: Any, shape: tuple[int, ...], dtype: Any, key: Any) -> Any:
    return init(key, shape, dtype)


def _hashable(init: Any) -> bool:
    """Whether `init` can be a jit static argument: `isinstance(x, Hashable)` is not enough
    (a frozen dataclass holding an unhashable field claims to be hashable)."""
    if not isinstance(init, Hashable):
        return False
    try:
        hash(init)
    except TypeError:
        return False
    return True


def _initialize(request: ParamRequest, key: Any) -> Any:
    """`request.initialize(key)`; while tracing, as one cached jitted call.

    Layers that share an initializer, shape and dtype then trace it once,
    which makes `jax.eval_shape(t.init, ...)` of a deep model about twice as
    fast. XLA inlines the call, so values and compiled programs are unchanged.
    An unhashable initializer, or one that performs effects (which the inner
    trace refuses before anything is created), runs as a plain call.
    """
    if isinstance(key, jax.core.Tracer) and _hashable(request.init):
        try:
            value = _jitted_init(request.init, request.shape, request.dtype, key)
        except TraceMismatchError:
            return request.initialize(key)
        except TypeError as e:
            raise request.init_error(e) from None
        request._check(value, "its initializer returned", strict_dtype=True)
        return value
    return request.initialize(key)


class _InitRun(_ParamRun):
    __slots__ = ("key", "tree")
    creating = True

    def __init__(self, key: Any):
        super().__init__()
        self.key = key
        self.tree = PathTree("params")

    @property
    def params(self) -> dict:
        return self.tree.root

    def answer(self, request: ParamRequest) -> Any:
        check_trace(self.trace, request, "initializes a param")
        if self.key is None:
            key = send(StreamKeyRequest(request.path, "params"))
        else:
            key = fold(self.key, h_path(request.path))
        value = _initialize(request, key)
        self.tree.set(request.path, value, request.describe)
        return value


def _unboxed(value: Any, request: ParamRequest) -> Any:
    """A stored value without `shape`/`dtype`: a boxed Flax value (`nn.Partitioned`) is unboxed; a
    Python number becomes an array; anything else is refused in one line (never a dump of it)."""
    unbox = getattr(value, "unbox", None)
    if callable(unbox):  # Flax's `AxisMetadata` protocol: the array inside, its axis names aside
        value = unbox()
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            return value
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError):  # a str, None, an object
        raise ShapeMismatchError(
            f"param `{path_str(request.path)}`: variables['params'] holds a {type(value).__name__}, "
            f"not an array (the model asks for {request.spec()}). Store arrays; unbox Flax "
            "values first: `flax.linen.unbox(variables)`."
        ) from None


class LoadParams(Handler):
    """Answer each param from a nested dict, checking its shape and dtype.

    >>> with fx.handle(fx.handlers.LoadParams({"w": jnp.ones(2)})):
    ...     fx.param("w", jax.nn.initializers.zeros, (2,))
    Array([1., 1.], dtype=float32)
    """

    def __init__(self, params: Any):
        params = params if params is not None else {}
        if type(params) is not dict and not isinstance(params, Mapping):
            raise EffaxError(
                f"variables['params'] (what `LoadParams` answers from) is {value_phrase(params)}, not a nested dict of "
                "params by path (`{'Dense_0': {'kernel': ...}}`). Pass the variables `t.init` returned, "
                "`t.apply(variables, x)`; a lone array goes in under its name: `t.apply({'params': {'w': w}}, x)`."
            )
        self.params = params

    def begin(self) -> _LoadRun:
        return _LoadRun(self.params)


class _LoadRun(_ParamRun):
    __slots__ = ("params",)
    creating = False

    def __init__(self, params: Any):
        super().__init__()
        self.params = params

    def handle(self, request: Any, forward: Any) -> Any:
        answer = self.answer_now(request)
        return _ParamRun.handle(self, request, forward) if answer is LATER else answer

    def answer_now(self, request: Any) -> Any:
        # The usual param of an eager apply, answered in place (`send` calls this without a frame for `handle`):
        # first asked in this run, untagged, a walk down mappings (`get_path` inline) to an array of the asked
        # shape and dtype. Anything else (a repeat, a tag, a box, a mismatch, a missing name) is LATER, for
        # `_ParamRun.handle`, which checks and explains it.
        if type(request) is ParamRequest and request.shared is None and (path := request.path) not in self.seen:
            node = self.params
            try:
                for key in path:
                    node = node.get(key, MISSING)
            except AttributeError:  # MISSING, or a leaf, on the way
                node = MISSING
            if isinstance(node, jax.Array) and (aval := node.aval).shape == request.shape and (
                aval.dtype == request.dtype
            ):
                self.seen[path] = (request, node)
                return node
        return LATER

    def answer(self, request: ParamRequest) -> Any:
        value = get_path(self.params, request.path)
        if value is MISSING:
            near = nearest_paths(request.path, self.params)
            asked = f"no param `{path_str(request.path)}` in variables['params'] (asked for {request.spec()})"
            if not self.params:
                raise MissingVariableError(
                    f"{asked}; variables['params'] is empty or missing: pass the whole variables `t.init` "
                    "returned, `{'params': ..., <collection>: ...}` (a params tree alone goes in as "
                    "`t.apply({'params': params}, x)`)."
                )
            nearest = f"; nearest: {', '.join(repr(n) for n in near)}" if near else ""
            raise MissingVariableError(
                f"{asked}{nearest}. Check the name and scope, or create the variables with `t.init` for this model."
            )
        if isinstance(value, jax.Array):  # the usual case: an array's shape is a tuple (read off its aval, no frame)
            aval = value.aval
            shape, dtype = aval.shape, aval.dtype
        else:
            if type(value) is jax.ShapeDtypeStruct:  # an abstract value outside `jax.eval_shape` (a tracer there)
                raise abstract_value_error(f"param `{path_str(request.path)}`", "params")
            shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
            if shape is None or dtype is None:
                value = _unboxed(value, request)
                shape, dtype = value.shape, value.dtype
            shape = tuple(shape)
        if shape != request.shape or (
            dtype != request.dtype and jax.dtypes.canonicalize_dtype(dtype) != request.dtype
        ):
            raise ShapeMismatchError(
                f"param `{path_str(request.path)}`: the model asks for {request.spec()}, but "
                f"variables['params'] holds shape {shape}, {jnp.dtype(dtype).name}. "
                "The variables were made for another model or config: re-run `t.init`, or "
                "convert the stored value."
            )
        return value


class AbstractParams(Handler):
    """Answer each param with zeros of its declared shape and record `as_empty()`; for shape-only runs.

    Use it under `jax.eval_shape`, where the zeros cost nothing; the run's
    `params` is a tree of `jax.ShapeDtypeStruct`.

    >>> with fx.handle(fx.handlers.AbstractParams()) as (run,):
    ...     w = fx.param("w", jax.nn.initializers.normal(), (2, 3))
    >>> run.params
    {'w': ShapeDtypeStruct(shape=(2, 3), dtype=float32)}
    >>> w
    Array([[0., 0., 0.], [0., 0., 0.]], dtype=float32)
    """

    def begin(self) -> _AbstractRun:
        return _AbstractRun()


class _AbstractRun(_ParamRun):
    __slots__ = ("tree",)
    creating = True

    def __init__(self) -> None:
        super().__init__()
        self.tree = PathTree("params")

    @property
    def params(self) -> dict:
        return self.tree.root

    def answer(self, request: ParamRequest) -> Any:
        self.tree.set(request.path, request.as_empty(), request.describe)
        return jnp.zeros(request.shape, request.dtype)
