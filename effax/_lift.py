"""Lifted transforms: `fx.scan`, `fx.vmap` and `fx.remat` over effectful code.

A raw `jax.lax.scan` around effect calls would leak tracers or repeat keys,
so each lifted transform works in three steps. It traces the body once
abstractly (`jax.eval_shape`) under a recording handler to learn which params,
state, keys and stream keys it uses. It requests those from the handlers
outside, in their own trace: a param that each iteration (or member) owns is
requested once, stacked along a new leading axis. Then it runs the body under
the JAX transform with inner handlers that answer from the slices, and hands
the results back outward as ordinary requests: a `set` per written variable,
a `sow` per sown value (stacked). Handlers outside (share passes, custom
handlers, `check_variables`) therefore see plain requests, never tracers of
the inner trace.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from effax.core import (
    MISSING,
    EffaxError,
    Handler,
    Path,
    PathTree,
    current_names,
    flatten_paths,
    get_path,
    handle,
    path_str,
    send,
)
from effax.effects import (
    GetStateRequest,
    LocalStateRequest,
    ParamRequest,
    RandomRequest,
    SetStateRequest,
    SideOutputRequest,
    StreamKeyRequest,
)
from effax.handlers import CollectSown, FunctionalState
from effax.handlers._params import _ParamRun

Slot = tuple[str, Path]  # (collection or stream, path)


# --- what a body needs, learned from one abstract trace


@dataclasses.dataclass
class _StateUse:
    declared: LocalStateRequest | None  # None: the LocalStateEffect was created outside the body
    written: bool = False


@dataclasses.dataclass
class _Needs:
    """What one trace of the body asked for: requests and counts, never arrays."""

    params: dict[Path, ParamRequest] = dataclasses.field(default_factory=dict)
    state: dict[Slot, _StateUse] = dataclasses.field(default_factory=dict)
    draws: dict[Slot, int] = dataclasses.field(default_factory=dict)
    bases: dict[Slot, None] = dataclasses.field(default_factory=dict)


class _Record:
    """Answer a body's requests abstractly and note what it needs (runs under `jax.eval_shape`)."""

    module_calls = False  # never looks at module calls: they skip it

    def __init__(self) -> None:
        self.needs = _Needs()
        self.values: dict[Slot, Any] = {}  # tracers of the abstract trace; dropped with the run

    def handle(self, request: Any, forward: Any) -> Any:
        kind, needs = type(request), self.needs
        if kind is ParamRequest:
            needs.params.setdefault(request.path, request)
            return jnp.zeros(request.shape, request.dtype)
        if kind is LocalStateRequest:
            slot = (request.collection, request.path)
            if slot not in needs.state:
                needs.state[slot] = _StateUse(request)
                self.values[slot] = request.init()
            return None
        if kind is GetStateRequest or kind is SetStateRequest:
            slot = (request.collection, request.path)
            if slot not in needs.state:  # a LocalStateEffect made outside the body: read it there
                needs.state[slot] = _StateUse(None)
                self.values[slot] = forward(GetStateRequest(request.path, request.collection))
            if kind is GetStateRequest:
                return self.values[slot]
            needs.state[slot].written = True
            self.values[slot] = request.value
            return None
        if kind is RandomRequest:
            slot = (request.stream, request.path)
            needs.draws[slot] = needs.draws.get(slot, 0) + 1
            return jax.random.key(0)
        if kind is StreamKeyRequest:
            needs.bases[(request.stream, request.path)] = None
            return jax.random.key(0)
        if kind is SideOutputRequest:
            return None
        return forward(request)


def _record(fn: Callable[..., Any], args: Any, kwargs: Any = None) -> _Needs:
    """Run `fn` under `_Record` in the current (abstract) trace; return what it asked for."""
    record = _Record()
    with handle(record):
        fn(*args, **(kwargs or {}))
    return record.needs


def _abstractly(
    make: Callable[..., _Needs], *args: Any, wrap: Callable[[Callable], Callable] | None = None
) -> tuple[_Needs, tuple[int, ...]]:
    """`make(*args)` under `jax.eval_shape` (and `wrap`, e.g. a `jax.vmap`): nothing is computed.

    Returns what the body needs and the shape of a scalar probe under `wrap`
    (a vmap's axis size, as JAX itself infers it). Module auto-names counted
    in this pass are rolled back, so the real pass names the layers it
    creates exactly as this one did (`Dense_0`, not `Dense_1`).
    """
    found: list[_Needs] = []

    def run(*args: Any) -> jax.Array:
        found.append(make(*args))
        return jnp.zeros(())

    names = current_names()
    counters = None if names is None else {parent: dict(c) for parent, c in names.frame.items()}
    try:
        probe = jax.eval_shape(run if wrap is None else wrap(run), *args)
    finally:
        if names is not None:
            names.frame.clear()
            names.frame.update(counters)
    return found[-1], probe.shape


# --- the inner handlers: answer the body from the values requested outside


def _retraced(request: Any, what: str) -> EffaxError:
    return EffaxError(
        f"{request.describe()} {what} when the lifted transform (fx.scan / fx.vmap / fx.remat) first "
        "traced its body: the body must make the same requests every time it is traced. Make the "
        "choice static (no Python state that changes between calls, no data-dependent requests)."
    )


class _Given(Handler):
    """Answer params and keys from values requested outside the transform, in the body's order."""

    def __init__(self, params: dict[Path, Any], draws: dict[Slot, list], bases: dict[Slot, Any]):
        self.params, self.draws, self.bases = params, draws, bases

    def begin(self) -> _GivenRun:
        return _GivenRun(self)


class _GivenRun(_ParamRun):
    __slots__ = ("given", "counts")

    def __init__(self, given: _Given):
        super().__init__()
        self.given = given
        self.counts: dict[Slot, int] = {}

    def check_tag(self, request: ParamRequest) -> None:
        """Nothing to check here: `shared=` tags are bound by the share passes outside, on the lifted requests."""

    def answer(self, request: ParamRequest) -> Any:
        value = self.given.params.get(request.path, MISSING)
        if value is MISSING:
            raise _retraced(request, "was not requested")
        return value

    def handle(self, request: Any, forward: Any) -> Any:
        kind = type(request)
        if kind is RandomRequest:
            slot = (request.stream, request.path)
            n = self.counts.get(slot, 0)
            keys = self.given.draws.get(slot, ())
            if n >= len(keys):
                raise _retraced(request, f"is draw #{n + 1}, but only {len(keys)} were made")
            self.counts[slot] = n + 1
            return keys[n]
        if kind is StreamKeyRequest:
            key = self.given.bases.get((request.stream, request.path))
            if key is None:
                raise _retraced(request, "was not requested")
            return key
        return super().handle(request, forward)


Given = tuple[list, list, list, list]  # params, state, draws (a list of keys per slot), stream keys


def _run_body(fn: Callable[..., Any], needs: _Needs, given: Given, args: Any, kwargs: Any) -> Any:
    """Run `fn` with its needs answered from `given`: a pure function of arrays (what JAX transforms).

    Returns `(out, state, sown)`: every state variable after the run (in
    `needs.state` order) and the sown values by collection.
    """
    params, state, draws, bases = given
    variables: dict[str, dict] = {}
    for (collection, path), value in zip(needs.state, state, strict=True):
        PathTree(f"collection {collection!r}", variables.setdefault(collection, {})).set(path, value)
    inner = _Given(
        dict(zip(needs.params, params, strict=True)),
        dict(zip(needs.draws, draws, strict=True)),
        dict(zip(needs.bases, bases, strict=True)),
    )
    with handle(FunctionalState(variables, True), CollectSown(True), inner) as (state_run, sown_run, _):
        out = fn(*args, **kwargs)
    current = state_run.updates()
    new_state = [get_path(current.get(c, {}), p) for c, p in needs.state]
    return out, new_state, sown_run.collections()


# --- asking the handlers outside, and answering them back


@dataclasses.dataclass(frozen=True)
class StackedInit:
    """Initialize independent copies along a new leading axis: copy `i` gets key `fold_in(key, i)`.

    A lifted param at path `p` is requested as one stacked param with this
    initializer, so under init copy `i` is `init(fold_in(fold(k_params,
    h_path(p)), i), shape, dtype)`: it depends only on the key, the path and
    `i` (locality holds per layer and per ensemble member).

    >>> init = fx.StackedInit(jax.nn.initializers.ones)
    >>> init(jax.random.key(0), (3, 2), jnp.float32).shape
    (3, 2)
    """

    init: Callable[[jax.Array, tuple[int, ...], Any], jax.Array]

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        def one(i: jax.Array) -> jax.Array:
            return self.init(jax.random.fold_in(key, i), tuple(shape[1:]), dtype)

        return jax.vmap(one)(jnp.arange(shape[0]))


@dataclasses.dataclass(frozen=True)
class _StackedState:
    """A state initializer making `n` equal copies along a new leading axis."""

    init: Callable[[], Any]
    n: int

    def __call__(self) -> Any:
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.n,) + jnp.shape(a)), self.init())


def _per_index(key: jax.Array, n: int) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def _request_outside(
    needs: _Needs,
    n: int | None,
    stack_params: bool,
    stack_state: Callable[[str], bool],
    split: Callable[[str], bool],
) -> tuple[Given, Given]:
    """Request what the body needs from the handlers outside; return the values and their axes (0 or None)."""
    params, params_axes = [], []
    for request in needs.params.values():
        if stack_params:
            axes = None if request.axes is None else (None,) + request.axes
            stacked = StackedInit(request.init)
            request = dataclasses.replace(request, init=stacked, shape=(n,) + request.shape, axes=axes)
        params.append(send(request))
        params_axes.append(0 if stack_params else None)
    state, state_axes = [], []
    for (collection, path), use in needs.state.items():
        stacked = use.declared is not None and stack_state(collection)
        if use.declared is not None:
            init = _StackedState(use.declared.init, n) if stacked else use.declared.init
            send(LocalStateRequest(path, collection, init))
        state.append(send(GetStateRequest(path, collection)))
        state_axes.append(0 if stacked else None)
    draws, draw_axes = [], []
    for (stream, path), count in needs.draws.items():
        keys = [send(RandomRequest(path, stream)) for _ in range(count)]
        draws.append([_per_index(k, n) for k in keys] if split(stream) else keys)
        draw_axes.append(0 if split(stream) else None)
    bases, base_axes = [], []
    for stream, path in needs.bases:
        key = send(StreamKeyRequest(path, stream))
        bases.append(_per_index(key, n) if split(stream) else key)
        base_axes.append(0 if split(stream) else None)
    return (params, state, draws, bases), (params_axes, state_axes, draw_axes, base_axes)


def _answer_outside(needs: _Needs, new_state: list, sown: dict[str, Any]) -> None:
    """Hand the body's results back outward: a `set` per written variable, a `sow` per sown value."""
    for ((collection, path), use), value in zip(needs.state.items(), new_state, strict=True):
        if use.written:
            send(SetStateRequest(path, collection, value))
    for collection, tree in sown.items():
        for path, values in flatten_paths(tree):
            for value in values:
                send(SideOutputRequest(path[:-1], path[-1], value, collection))


def _split_axes(values: Any, axes: Any) -> tuple[Any, Any]:
    """Split values into (mapped, unmapped) by an axes prefix tree; each holds None where the other has the value."""
    is_leaf = lambda x: x is None  # noqa: E731
    mapped = jax.tree.map(lambda ax, v: None if ax is None else v, axes, values, is_leaf=is_leaf)
    unmapped = jax.tree.map(lambda ax, v: v if ax is None else None, axes, values, is_leaf=is_leaf)
    return mapped, unmapped


def _join_axes(axes: Any, mapped: Any, unmapped: Any) -> Any:
    return jax.tree.map(lambda ax, m, u: u if ax is None else m, axes, mapped, unmapped, is_leaf=lambda x: x is None)


def _written_only(needs: _Needs, values: list) -> list:
    return [v if use.written else None for use, v in zip(needs.state.values(), values, strict=True)]


# --- options


def _choice(value: Any, allowed: tuple[str, ...], what: str, where: str) -> str:
    if value not in allowed:
        raise EffaxError(f"{where}: {what}={value!r} is not one of {', '.join(map(repr, allowed))}.")
    return value


def _state_modes(state: Any, default: str, allowed: tuple[str, ...], where: str) -> Callable[[str], str]:
    """`state` as a function collection -> mode: one mode for all, or a dict naming some collections."""
    if state is None or isinstance(state, str):
        mode = _choice(default if state is None else state, allowed, "state", where)
        return lambda collection: mode
    if isinstance(state, Mapping):
        modes = {c: _choice(m, allowed, f"state[{c!r}]", where) for c, m in state.items()}
        return lambda collection: modes.get(collection, default)
    raise EffaxError(f"{where}: state must be one of {allowed} or a dict {{collection: mode}}, got {state!r}.")


def _split_streams(split_rngs: Any, where: str) -> Callable[[str], bool]:
    if split_rngs is True or split_rngs is False:
        return lambda stream: split_rngs
    if isinstance(split_rngs, str):
        split_rngs = (split_rngs,)
    if isinstance(split_rngs, Iterable):
        names = frozenset(split_rngs)
        return lambda stream: stream in names
    raise EffaxError(f"{where}: split_rngs must be True, False or stream names, got {split_rngs!r}.")


# --- the transforms


def scan(
    fn: Callable[[Any, Any], tuple[Any, Any]],
    length: int | None = None,
    *,
    params: str = "stack",
    state: str | Mapping[str, str] | None = None,
    split_rngs: bool | Iterable[str] = True,
    reverse: bool = False,
    unroll: int | bool = 1,
) -> Callable[..., tuple[Any, Any]]:
    """`jax.lax.scan` over an effectful body: `fx.scan(fn, length)(carry, xs) -> (carry, ys)`.

    `fn(carry, x) -> (carry, y)` as in `jax.lax.scan`. Deep models compile a
    scan over layers in time flat in depth (Haiku's `layer_stack`, Flax's
    `nn.scan`). What each iteration owns:

    - `params="stack"` (layers): each param gets a leading axis of `length`
      and is requested once, stacked, at the body's path; under init layer
      `i` is initialized with `fold_in(key_of_path, i)` (see `StackedInit`).
      `"broadcast"` (an RNN cell over time): one param shared by every step.
    - `state`: `"stack"` (a variable per iteration, stacked) or `"carry"`
      (one variable threaded through the iterations); one mode or a dict
      `{collection: mode}`. By default it follows `params`: stacked layers
      stack their state, a broadcast cell carries it.
    - `split_rngs=True` gives every iteration its own keys (draw `n` in
      iteration `i` is `fold_in(k_n, i)`, `k_n` drawn outside); False, or
      the streams not named, repeat the same keys in every iteration.
    - sown values come back stacked, one `sow` per value the body sowed.

    >>> def block(x, _):
    ...     w = fx.param("w", jax.nn.initializers.normal(), (2, 2))
    ...     return jnp.tanh(x @ w), None
    >>> t = fx.transform(lambda x: fx.scan(block, length=4)(x)[0])
    >>> v = t.init(jax.random.key(0), jnp.ones(2))
    >>> v["params"]["w"].shape
    (4, 2, 2)
    >>> t.apply(v, jnp.ones(2)).shape
    (2,)
    """
    where = "fx.scan"
    stack_params = _choice(params, ("stack", "broadcast"), "params", where) == "stack"
    modes = _state_modes(state, "stack" if stack_params else "carry", ("stack", "carry"), where)
    split = _split_streams(split_rngs, where)

    @functools.wraps(fn)
    def scanned(carry: Any, xs: Any = None) -> tuple[Any, Any]:
        n = _scan_length(length, xs)
        x0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), xs)
        needs, _ = _abstractly(lambda c, x: _record(fn, (c, x)), carry, x0)
        given, axes = _request_outside(needs, n, stack_params, lambda c: modes(c) == "stack", split)
        mapped, unmapped = _split_axes(given, axes)
        closed = (unmapped[0], None, unmapped[2], unmapped[3])  # state that is not stacked is carried

        def step(c: Any, sliced: Any) -> Any:
            (user_carry, carried), (m, x) = c, sliced
            g = _join_axes(axes, m, (closed[0], carried, closed[2], closed[3]))
            out, new_state, sown = _run_body(fn, needs, g, (user_carry, x), {})
            if not (isinstance(out, tuple) and len(out) == 2):
                raise EffaxError(
                    f"the body given to fx.scan must return a pair (carry, y), like jax.lax.scan's; "
                    f"it returned {type(out).__name__}. Return `(new_carry, None)` when there is no y."
                )
            new_stacked, new_carried = _split_axes(new_state, axes[1])
            return (out[0], new_carried), (out[1], _written_only(needs, new_stacked), sown)

        (carry, carried), (ys, stacked, sown) = jax.lax.scan(
            step, (carry, unmapped[1]), (mapped, xs), length=n, reverse=reverse, unroll=unroll
        )
        new_state = _join_axes(axes[1], stacked, carried)
        _answer_outside(needs, new_state, sown)
        return carry, ys

    return scanned


def _scan_length(length: int | None, xs: Any) -> int:
    if length is not None:
        return int(length)
    leaves = jax.tree.leaves(xs)
    if not leaves or not jnp.shape(leaves[0]):
        raise EffaxError(
            "fx.scan needs `length=` when there are no xs to scan over: "
            "`fx.scan(body, length=n)(carry)` runs the body n times."
        )
    return jnp.shape(leaves[0])[0]


def vmap(
    fn: Callable[..., Any],
    in_axes: Any = 0,
    out_axes: Any = 0,
    axis_size: int | None = None,
    *,
    params: str = "stack",
    state: str | Mapping[str, str] | None = None,
    split_rngs: bool | Iterable[str] = True,
    axis_name: Any = None,
    spmd_axis_name: Any = None,
) -> Callable[..., Any]:
    """`jax.vmap` over an effectful function: ensembles, or a batch-free model mapped over examples.

    `in_axes`, `out_axes`, `axis_size`, `axis_name` and `spmd_axis_name` are
    `jax.vmap`'s. What each member owns:

    - `params="stack"` (an ensemble): each param gets a leading axis of the
      mapped size, requested once, stacked; member `i` is initialized
      independently with `fold_in(key_of_path, i)`. `"broadcast"`: every
      member uses the same params (a per-example model).
    - `state`: `"stack"` (a variable per member) or `"broadcast"` (one
      shared variable; a `set` must give every member the same value, e.g.
      reduced with `jax.lax.pmean` over `axis_name`). It follows `params`
      by default.
    - `split_rngs=True` gives every member its own keys; False, or the
      streams not named, give all members the same keys.
    - sown values come back stacked along axis 0.

    >>> def member(x):
    ...     return x @ fx.param("w", jax.nn.initializers.normal(), (2,))
    >>> t = fx.transform(fx.vmap(member, in_axes=None, axis_size=3))
    >>> v = t.init(jax.random.key(0), jnp.ones(2))
    >>> v["params"]["w"].shape
    (3, 2)
    >>> t.apply(v, jnp.ones(2)).shape
    (3,)
    """
    where = "fx.vmap"
    stack_params = _choice(params, ("stack", "broadcast"), "params", where) == "stack"
    modes = _state_modes(state, "stack" if stack_params else "broadcast", ("stack", "broadcast"), where)
    split = _split_streams(split_rngs, where)
    args_axes = tuple(in_axes) if isinstance(in_axes, list) else in_axes

    @functools.wraps(fn)
    def mapped(*args: Any) -> Any:
        wrap = functools.partial(
            jax.vmap, in_axes=args_axes, axis_size=axis_size, axis_name=axis_name, spmd_axis_name=spmd_axis_name
        )
        needs, (n,) = _abstractly(lambda *member_args: _record(fn, member_args), *args, wrap=wrap)
        given, axes = _request_outside(needs, n, stack_params, lambda c: modes(c) == "stack", split)

        def member(g: Any, member_args: Any) -> Any:
            out, new_state, sown = _run_body(fn, needs, g, member_args, {})
            return out, _written_only(needs, new_state), sown

        try:
            out, new_state, sown = jax.vmap(
                member,
                in_axes=(axes, args_axes),
                out_axes=(out_axes, axes[1], 0),
                axis_size=n,
                axis_name=axis_name,
                spmd_axis_name=spmd_axis_name,
            )(given, args)
        except ValueError as error:
            shared = [
                f"`{path_str(p)}` in {c!r}"
                for ((c, p), use), ax in zip(needs.state.items(), axes[1], strict=True)
                if use.written and ax is None
            ]
            if shared and "out_axes" in str(error):
                raise EffaxError(
                    f"fx.vmap: the members write different values to the shared state {', '.join(shared)} "
                    "(state='broadcast'), so there is no one value to keep. Give each member its own "
                    "copy with `state='stack'`, or reduce the value over the mapped axis before `set` "
                    "(`jax.lax.pmean(v, axis_name)` with `fx.vmap(..., axis_name=...)`)."
                ) from error
            raise
        _answer_outside(needs, new_state, sown)
        return out

    return mapped


def remat(
    fn: Callable[..., Any],
    *,
    policy: Callable[..., bool] | None = None,
    prevent_cse: bool = True,
    static_argnums: int | tuple[int, ...] = (),
) -> Callable[..., Any]:
    """`jax.checkpoint` over an effectful function: recompute its activations in the backward pass.

    Values and gradients are those of `fn` itself, keys included: the body's
    params, state and keys are requested outside exactly as `fn` would
    request them. `policy`, `prevent_cse` and `static_argnums` are
    `jax.checkpoint`'s (`policy=jax.checkpoint_policies.dots_saveable`, ...);
    keyword arguments are treated as static.

    >>> def layer(x):
    ...     return jnp.sin(x * fx.param("w", jax.nn.initializers.ones, ()))
    >>> t = fx.transform(fx.remat(layer))
    >>> v = t.init(jax.random.key(0), 1.0)
    >>> float(jax.grad(lambda v: t.apply(v, 1.0))(v)["params"]["w"])  # cos(1)
    0.5403...
    """
    static = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)

    @functools.wraps(fn)
    def rematted(*args: Any, **kwargs: Any) -> Any:
        needs, _ = _abstractly(lambda: _record(fn, args, kwargs))
        given, _ = _request_outside(needs, None, False, lambda c: False, lambda s: False)
        fixed = {i % len(args) for i in static} if args else set()
        dynamic = [a for i, a in enumerate(args) if i not in fixed]

        def pure(g: Given, dynamic: list) -> Any:
            rest = iter(dynamic)
            full = tuple(a if i in fixed else next(rest) for i, a in enumerate(args))
            out, new_state, sown = _run_body(fn, needs, g, full, kwargs)
            return out, _written_only(needs, new_state), sown

        out, new_state, sown = jax.checkpoint(pure, prevent_cse=prevent_cse, policy=policy)(given, dynamic)
        _answer_outside(needs, new_state, sown)
        return out

    return rematted
