"""`fx.scan`, `fx.vmap` and `fx.remat`: JAX transforms over effectful code.

Each lifted call works in three steps (see `_body.py` for the stack the body
runs under):

1. learn: trace the body once abstractly (`jax.eval_shape`) to learn which
   params, state, keys and stream keys cross into it (`Needs`);
2. request those from the handlers outside, in their own trace: a param that
   each iteration (or member) owns is requested once, stacked along a new
   leading axis; a variable that does not exist yet is created inside the
   body instead (`Plan`);
3. run the body under the JAX transform, then hand the results back outward
   as ordinary requests: the created variables, a `set` per written
   variable, a `sow` per sown value (stacked).

Inside another lifted transform's learning pass (abstract mode) step 3 is
skipped: the lifted call only says what it needs and returns zeros of the
right shapes, so k nested levels trace the innermost body k + 1 times.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from effax.core import EffaxError, ShapeMismatchError, current_path, current_stack, is_stateless, path_str, run_values
from effax.effects import (
    GetStateRequest,
    LocalStateRequest,
    ParamRequest,
    RandomRequest,
    SetStateRequest,
    SideOutputRequest,
    StreamKeyRequest,
)
from effax.inspect import abstract_mode, run_abstractly
from effax.lift._body import (
    Answerer,
    Constant,
    DrawingProbe,
    Needs,
    ParamPlan,
    Plan,
    Probe,
    Recorder,
    StatePlan,
    probe,
    run_lifted,
    send_at,
)

# --- step 1: learn what the body needs


def _learn(
    outer: tuple[Any, ...],
    body: Callable[..., Any],
    args: tuple,
    wrap: Callable[[Callable], Callable] | None = None,
    rollback: bool = True,
    state_how: Callable[[str, bool], str] | None = None,
) -> tuple[Needs, Any, tuple[int, ...]]:
    """`body(*args)` under a `Recorder` and `jax.eval_shape` (and `wrap`, e.g. a `jax.vmap`): nothing is computed.

    `state_how` is the transform's crossing of state: a variable that exists
    outside, stacked, is seen by the body one slice at a time (as a shape).
    Returns what the body needs, its output's shapes, and the shape of a
    scalar probe under `wrap` (a vmap's axis size, as JAX infers it). Module
    auto-names counted here are rolled back (unless `rollback=False`) when
    the real pass follows, so it names the layers it creates as this one did.
    """
    found: list[Needs] = []
    view = None if state_how is None else functools.partial(_sliced, state_how)


    def run(*args: Any) -> Any:
        recorder = Recorder(outer, view)
        out = run_lifted(outer, recorder, body, *args)
        found.append(recorder.needs)
        return out, jnp.zeros(())

    restore = _names_snapshot() if rollback else None
    try:
        out, size = run_abstractly(run, *args, wrap=wrap, learn_only=True)
    finally:
        if restore is not None:
            restore()
    return found[-1], out, size.shape


def _sliced(state_how: Callable[[str, bool], str], collection: str, struct: Any) -> Any:
    """The shapes the body sees of a variable of `collection` that exists outside: one slice of a stacked one."""
    if state_how(collection, True) != "mapped":
        return struct
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), struct)


def _names_snapshot() -> Callable[[], None] | None:
    """A function putting the run's bookkeeping (module auto-names) back as it is now, dropping values made
    since; None in abstract mode, where no real pass follows, so the learning pass's names stand. A run-local
    value with a `snapshot()` method (`fx.nn`'s names) restores itself."""
    if abstract_mode():
        return None
    run = run_values()
    run = {} if run is None else run  # not `or`: an empty run is falsy but must be the one restored
    kept, restores = set(run), [v.snapshot() for v in run.values() if hasattr(v, "snapshot")]

    def restore() -> None:
        for kind in [k for k in run if k not in kept]:
            del run[kind]
        for r in restores:
            r()

    return restore


# --- step 2: request what it needs from the handlers outside


@dataclasses.dataclass(frozen=True)
class _Crossing:
    """How one lifted transform passes values into its body."""

    n: int | None  # iterations or members; None for remat
    stack_params: bool  # a param per iteration/member (stacked), else one for all
    carry_params: bool  # an unstacked param not existing yet is made on the first step and carried (scan)
    state_how: Callable[[str, bool], str]  # (collection, declared in the body) -> mapped / unmapped / carried
    split: Callable[[str], bool]  # whether a stream gives each iteration/member its own keys
    stack_axis: str | None = None  # the logical axis name of the stacked dimension of params


def _per_index(key: jax.Array, n: int) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


# Each iteration's (member's) base key is `fold_in(fold_in(base, _BASES), i)`: `fold_in(base, i)` itself is
# the i-th `next_key` drawn at the same path outside (DESIGN's draw formula), which would repeat it.
_BASES = 0xFFFF_FFFF  # a draw index no run reaches (4e9 draws at one path)


def _bases_of(key: jax.Array) -> jax.Array:
    return jax.random.fold_in(key, _BASES)


def _zeros(struct: Any, n: int | None = None) -> Any:
    lead = () if n is None else (n,)
    return jax.tree.map(lambda s: jnp.zeros(lead + tuple(s.shape), s.dtype), struct)


def _stacked_axes(axes: tuple | None, ndim: int | None, stack_axis: str | None) -> tuple | None:
    """The logical axes of a stacked variable (param or state): the stacked dimension's name (`stack_axis`,
    or None) in front of its own; without axes of its own, a named stacked dimension gives the others None
    (when its rank is known: one array)."""
    if axes is not None:
        return (stack_axis,) + axes
    return None if stack_axis is None or ndim is None else (stack_axis,) + (None,) * ndim


def _stacked_state(request: LocalStateRequest, struct: Any, stack_axis: str | None) -> LocalStateRequest:
    """A stacked variable's request outside, its axes those of `_stacked_axes`."""
    ndim = len(struct.shape) if isinstance(struct, jax.ShapeDtypeStruct) else None
    axes = _stacked_axes(request.axes, ndim, stack_axis)
    return request if axes is None else dataclasses.replace(request, axes=axes)


def _check_stacked(value: Any, how: _Crossing, collection: str, path: tuple[str, ...]) -> None:
    """A stacked variable holds one slice per iteration (member): another leading size is refused by path
    here, where JAX's own error would name only the lift's internal arguments."""
    sizes = {(getattr(leaf, "shape", None) or (None,))[0] for leaf in jax.tree.leaves(value)}
    if sizes - {how.n}:
        found = " and ".join("none" if s is None else str(s) for s in sorted(sizes - {how.n}, key=str))
        lift, size = ("fx.scan", "length") if how.carry_params else ("fx.vmap", "axis size")
        raise ShapeMismatchError(
            f"state `{path_str(path)}` in collection {collection!r} is stacked by {lift} at "
            f"`{path_str(current_path())}`, whose {size} is {how.n}, but the stored value's leading axis is "
            f"{found}: it was made for another {size} (a decode cache made for another batch, a stack of "
            f"another number of layers). Create it again with `t.init` on inputs of this {size}, or pass "
            "variables made for it."
        )


def _plan(needs: Needs, outer: tuple[Any, ...], how: _Crossing) -> Plan:
    """Request the body's needs outside (step 2); return where each value enters the body."""
    plan, n = Plan(replies=needs.replies), how.n

    def outside(request: ParamRequest) -> ParamRequest:  # a param as requested outside: stacked, or as is
        if not how.stack_params:
            return request
        axes = _stacked_axes(request.axes, len(request.shape), how.stack_axis)
        return dataclasses.replace(request, shape=(n,) + request.shape, axes=axes)

    for slot, request in needs.params.items():
        depth = slot[0]
        request = outside(request)
        uses = [outside(use) for use in needs.param_uses.get(slot, ())]
        init = needs.param_inits.get(slot)  # the body's initializer, as this lift would run it per iteration
        init = StackedInit(init) if how.stack_params and init is not None else init
        fresh, found = probe(outer, depth, dataclasses.replace(request, init=Probe(init)))
        crossing = "mapped" if how.stack_params else "unmapped"
        if not fresh:
            plan.params[slot] = ParamPlan(request, False, plan.add(crossing, found), uses=uses)
            continue
        made = _made_outside(outer, depth, request, init)
        if made is not None:
            plan.params[slot] = ParamPlan(request, False, plan.add(crossing, made), uses=uses)
            continue
        key = _per_index(found, n) if how.stack_params else found
        carry = None
        if how.carry_params and not how.stack_params:
            carry = plan.add("carried", _zeros(request.as_empty()))
            crossing = "carried"
        index = plan.add("mapped" if how.stack_params else "unmapped", key)
        plan.params[slot] = ParamPlan(request, True, index, carry, uses)
        plan.outputs.append((crossing, "param", slot))
    init_keys: dict[tuple, list] = {}  # draws and bases of the `init()`s of fresh state, by slot, in order
    for slot, need in needs.state.items():
        depth, collection, path = slot
        crossing = how.state_how(collection, need.request is not None)
        fresh, request = False, need.request
        if request is not None:
            if crossing == "mapped":
                request = _stacked_state(request, need.struct, how.stack_axis)
            draws = needs.init_draws.get(slot)
            init = DrawingProbe(draws) if draws else Probe()
            fresh, keys = probe(outer, depth, dataclasses.replace(request, init=init))
            if fresh:  # the keys its `init()` draws (for one that exists, the answer is its declaration's, not keys)
                for (kind, *at), key in zip(draws or (), keys or (), strict=True):
                    init_keys.setdefault((kind, tuple(at)), []).append(key)
        if not fresh:
            value = send_at(outer, depth, GetStateRequest(path, collection))
            if crossing == "mapped" and n is not None:
                _check_stacked(value, how, collection, path)
            plan.state[slot] = StatePlan(need, False, plan.add(crossing, value))
            if crossing == "carried" or need.written:
                plan.outputs.append((crossing, "state", slot))
        elif crossing == "carried":  # made on the first step, threaded after it
            placeholder = _zeros(need.struct)
            carried = plan.add("carried", placeholder)
            plan.state[slot] = StatePlan(need, True, carried, plan.add("carried", placeholder), outside=request)
            plan.outputs += [("carried", "state", slot), ("carried", "initial", slot)]
        else:
            plan.state[slot] = StatePlan(need, True, None, outside=request)
            plan.outputs.append((crossing, "initial", slot))
            if need.written:
                plan.outputs.append((crossing, "state", slot))
    if any(p.carry is not None for p in plan.params.values()) or any(
        s.initial is not None for s in plan.state.values()
    ):
        plan.first = plan.add("mapped", jnp.arange(n))
    # keys drawn by fresh state's `init()` come first: they were drawn first outside, in the probes above
    for slot in dict.fromkeys([at for kind, at in init_keys if kind == "draw"] + list(needs.draws)):
        depth, stream, path = slot
        split = how.split(stream) and n is not None
        keys = init_keys.get(("draw", slot), [])
        keys += [send_at(outer, depth, RandomRequest(path, stream)) for _ in range(needs.draws.get(slot, 0))]
        plan.draws[slot] = [plan.add("mapped", _per_index(k, n)) if split else plan.add("unmapped", k) for k in keys]
    for slot in dict.fromkeys([at for kind, at in init_keys if kind == "base"] + list(needs.bases)):
        depth, stream, path = slot
        found = init_keys.get(("base", slot))
        key = found[0] if found else send_at(outer, depth, StreamKeyRequest(path, stream))
        split = how.split(stream) and n is not None
        plan.bases[slot] = plan.add("mapped", _per_index(_bases_of(key), n)) if split else plan.add("unmapped", key)
    return plan


# --- step 3: hand the results back outward


def _hand_back(plan: Plan, outer: tuple[Any, ...], values: list[Any], sown: list[tuple[tuple, list]]) -> None:
    """Create what the body made, `set` what it wrote, `sow` what it sowed: as requests outside."""
    for (_, what, slot), value in zip(plan.outputs, values, strict=True):
        if what == "param":
            request = plan.params[slot].request
            value = value if isinstance(value, jax.Array) else jnp.asarray(value, request.dtype)
            if send_at(outer, slot[0], dataclasses.replace(request, init=Constant(value))) is not value:
                raise _changed_answer(request, outer[: slot[0]])
        elif what == "initial":
            send_at(outer, slot[0], dataclasses.replace(plan.state[slot].outside, init=Constant(value)))
            if plan.state[slot].need.read:  # as a variable found outside is read there (`_plan`): once per call
                send_at(outer, slot[0], GetStateRequest(slot[2], slot[1]))
    for slot, p in plan.params.items():  # a param's later uses, now that it exists: a summary counts them
        for use in p.uses:
            send_at(outer, slot[0], use)
    for (_, what, slot), value in zip(plan.outputs, values, strict=True):
        if what == "state" and plan.state[slot].need.written:
            depth, collection, path = slot
            send_at(outer, depth, SetStateRequest(path, collection, value))
    for (depth, collection, path, tag), sown_values in sown:
        for value in sown_values:
            send_at(outer, depth, SideOutputRequest(path, tag, value, collection))


def _made_outside(outer: tuple[Any, ...], depth: int, request: ParamRequest, init: Any) -> Any:
    """A new param created outside, through the runs there, where a run with state of the user's own or a
    `fx.share` pass (a run that `moves_params`: it answers a tied param with another's value) stands among
    them; None (create it inside the body) elsewhere, or when its initializer reads the body's values.

    Such a run sees the request outside only, and may change the answer (`forward(request) * 2`): created
    inside, the body would run on the unchanged value, unlike the unrolled loop. Created outside (stacked
    params by `StackedInit`, the values the body makes), the body gets the answer the run gave. An
    initializer that reads the body's values cannot run outside (those exist only in its trace): it is
    created inside, and a changed answer is refused when it is handed back (`_changed_answer`).
    """
    if init is None or not any(_owned(run) or getattr(run, "moves_params", False) for run in outer[:depth]):
        return None
    try:
        return send_at(outer, depth, dataclasses.replace(request, init=init))
    except jax.errors.UnexpectedTracerError:
        return None


def _owned(run: Any) -> bool:
    """Whether an installed run is one with state of the user's own (not effax's built-ins or proxies)."""
    return not is_stateless(run) and not type(run).__module__.startswith("effax.")


def _changed_answer(request: ParamRequest, runs: tuple[Any, ...]) -> EffaxError:
    """A handler outside changed the answer to a param the body made: the body already ran on its own value.

    The body creates a new param in its own trace (its initializer may read the body's values), so a run with
    state outside (`begin()` returned a run object) sees the creation only afterwards, and an answer it changes
    (`forward(request) * 2`) cannot reach the body: the lifted result would differ from the unrolled loop.
    """
    stateful = [type(r).__name__ for r in runs if _owned(r)]
    who = f" ({', '.join(stateful)})" if stateful else ""
    return EffaxError(
        f"{request.describe()} is made inside a lifted transform (fx.scan / fx.vmap / fx.remat / fx.cond), and "
        f"a handler with per-run state around it{who} answered its creation with another value. Inside a lift "
        "such a run sees a new param only after the body made it, so the body cannot use the changed value. Make the "
        "handler stateless (`begin()` returns self: it then runs inside the body, as in the unrolled loop), "
        "or create the variables first (`t.init` without the handler) and pass the handler to `t.apply`."
    )


def _abstract_results(plan: Plan, needs: Needs, n: int | None) -> tuple[list[Any], list[tuple[tuple, list]]]:
    """Zeros in place of what the body would make: what a lifted call returns in abstract mode."""
    values = []
    for crossing, what, slot in plan.outputs:
        if what == "param":
            values.append(_zeros(plan.params[slot].request.as_empty()))
        else:
            values.append(_zeros(plan.state[slot].need.struct, n if crossing == "mapped" else None))
    sown = [(key, [_zeros(s, n) for s in structs]) for key, structs in needs.sows.items()]
    return values, sown


def _pick(crossings: list[str], values: list[Any], crossing: str) -> list[Any]:
    """The values whose crossing is `crossing`, in order (`crossings[i]` says how `values[i]` crosses)."""
    return [v for c, v in zip(crossings, values, strict=True) if c == crossing]


def _merge(crossings: list[str], by_crossing: dict[str, list[Any]]) -> list[Any]:
    """The inverse of `_pick`: one list in `crossings`' order from the lists of each crossing."""
    iters = {c: iter(vs) for c, vs in by_crossing.items()}
    return [next(iters[c]) for c in crossings]


class _Sown:
    """The keys of the sown values, learned while the body is traced; the values travel as a list."""

    def __init__(self) -> None:
        self.keys: list[tuple] = []

    def values(self, answerer: Answerer) -> list[list[Any]]:
        self.keys = list(answerer.sown)
        return list(answerer.sown.values())

    def pairs(self, values: list[list[Any]]) -> list[tuple[tuple, list]]:
        return list(zip(self.keys, values, strict=True))


# --- options


def _per_instance(cls: type, lift: Callable[[Any], Any], prefix: str) -> Callable[..., Any]:
    """A module class lifted as Flax's `nn.remat(Block)` lifts it: `fx.remat(Block)(features=3)` builds
    `Block(features=3)` and returns it lifted, to be called on the inputs (`fx.remat(Block(features=3))`).

    As in Flax, the class built is a subclass named `<prefix><Block>` (`CheckpointBlock`, `ScanBlock`,
    `VmapBlock`), so an auto-named instance is `CheckpointBlock_0`, where a linen checkpoint has it; the
    lifted function carries the instance (`_effax_module`), so `setup()` names it after its attribute.
    """
    made = _renamed(cls, prefix)

    @functools.wraps(cls, updated=())
    def build(*args: Any, **kwargs: Any) -> Any:
        module = made(*args, **kwargs)
        lifted = lift(module)
        lifted._effax_module = module
        return lifted

    return build


@functools.lru_cache(maxsize=256)
def _renamed(cls: type, prefix: str) -> type:
    """`cls`'s subclass `<prefix><cls>`, made once; `cls` itself when it cannot be subclassed."""
    try:
        return type(prefix + cls.__name__, (cls,), {"__module__": cls.__module__})
    except TypeError:
        return cls


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


def _split_streams(split_rngs: Any, where: str, stack_params: bool) -> Callable[[str], bool]:
    """Whether a stream's keys differ per iteration. With `params="broadcast"` the `"params"` stream never
    does: one param is made for every iteration, so what makes it (a `fx.from_flax` module's own init, which
    draws that stream, as Flax's `nn.scan` needs `split_rngs={"params": False}` beside a broadcast) must
    see one key, as `fx.nn`'s params do."""
    if split_rngs is True or split_rngs is False:
        names = None
    elif isinstance(split_rngs, str):
        names = frozenset((split_rngs,))
    elif isinstance(split_rngs, Iterable):
        names = frozenset(split_rngs)
    else:
        raise EffaxError(f"{where}: split_rngs must be True, False or stream names, got {split_rngs!r}.")
    return lambda stream: (split_rngs if names is None else stream in names) and (stack_params or stream != "params")


def _brief(value: Any) -> str:
    """A value named in an error without dumping it: an array by its shape and dtype, else type and repr."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array {_type_of(value)}"
    return f"{type(value).__name__} {_shown(value)}"


def _shown(value: Any) -> str:
    """A value as written after `name=` in an error: its repr, an array as `<array float32[2]>`."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"<array {_type_of(value)}>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_of(value: Any) -> str:
    """`float32[2,3]`: the shape and dtype JAX sees (a `ShapeDtypeStruct`, an array or a Python scalar)."""
    if not hasattr(value, "shape"):
        value = jax.typeof(value)
    return f"{jnp.dtype(value.dtype).name}[{','.join(map(str, value.shape))}]"


class _Shown(str):
    """A string shown bare inside a container's repr: `(float32[2], float32[2])`."""

    __repr__ = str.__str__


def _types(tree: Any) -> str:
    return str(jax.tree.map(lambda v: _Shown(_type_of(v)), tree))


def _here(what: str) -> str:
    return f"{what} at `{path_str(current_path())}`"


def _check_fn(fn: Any, where: str, usage: str) -> None:
    """Refuse what cannot be lifted when the transform is made, not when JAX first calls it."""
    if not callable(fn):
        raise EffaxError(
            f"{where} takes the function to lift (a function, a module, or a module class), got "
            f"{_brief(fn)}: {usage}."
        )


def _check_stack_axis(stack_axis: Any, stack_params: bool, where: str) -> str | None:
    """`stack_axis=`: the logical name of the stacked dimension of params and stacked state (Flax's
    `metadata_params={nn.PARTITION_NAME: "layers"}`), so sharding rules can map it."""
    if stack_axis is None:
        return None
    if type(stack_axis) is not str or not stack_axis:
        raise EffaxError(
            f"{where}: stack_axis={_shown(stack_axis)} is not a logical axis name: give a non-empty str, "
            "e.g. `stack_axis='layers'`, and map it with a sharding rule (`('layers', None)` to replicate it)."
        )
    if not stack_params:
        raise EffaxError(
            f"{where}: stack_axis={stack_axis!r} names the stacked dimension of params, but params='broadcast' "
            "stacks none: drop stack_axis, or use params='stack'."
        )
    return stack_axis


def _check_length(length: Any) -> int | None:
    """`length=` as an int >= 0 (numpy and concrete JAX ints too); refused, never truncated."""
    if length is None:
        return None
    try:
        n = None if isinstance(length, bool) else operator.index(length)
    except TypeError:
        n = None
    if n is None or n < 0:
        raise EffaxError(
            f"fx.scan: length={_shown(length)} is not a "
            "non-negative int: it is how many times the body runs (`fx.scan(body, length=3)`); leave it "
            "out to run once per slice of xs."
        )
    return n


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
    stack_axis: str | None = None,
) -> Callable[..., tuple[Any, Any]]:
    """`jax.lax.scan` over an effectful body: `fx.scan(fn, length)(carry, xs) -> (carry, ys)`.

    `fn(carry, x) -> (carry, y)` as in `jax.lax.scan`; a module class is lifted
    per instance, as Flax's `nn.scan(Block, ...)`: `fx.scan(Block, 4)(features=8)`
    is `fx.scan(Block(features=8), 4)`. Deep models compile a
    scan over layers in time flat in depth (Haiku's `layer_stack`, Flax's
    `nn.scan`). Every request the body makes, by model code or by a handler
    answering there (an interceptor's params, `capture_intermediates`), is
    answered as in the unrolled loop. What each iteration owns:

    - `params="stack"` (layers): each param gets a leading axis of `length`
      and is requested once, stacked, at the body's path; under init layer
      `i` is initialized with `fold_in(key_of_path, i)` (see `StackedInit`),
      inside the loop, so an initializer may read the body's values.
      `"broadcast"` (an RNN cell over time): one param shared by every step,
      made on the first step.
    - `state`: `"stack"` (a variable per iteration, stacked) or `"carry"`
      (one variable threaded through the iterations, made on the first step
      by its `init()`, which may read the body's input); one mode or a dict
      `{collection: mode}`. By default it follows `params`.
    - `split_rngs=True` gives every iteration its own keys (draw `n` in
      iteration `i` is `fold_in(k_n, i)`, `k_n` drawn outside); False, or
      the streams not named, repeat the same keys in every iteration. With
      `params="broadcast"` the `"params"` stream is never split (one param
      for every iteration; a `fx.from_flax` module's init draws it).
    - sown values come back stacked, one `sow` per value the body sowed.
    - `stack_axis="layers"` names the stacked dimension of params as a
      logical axis (Flax's `metadata_params={nn.PARTITION_NAME: "layers"}`):
      a param with `axes=("embed", "mlp")` is stacked with axes
      `("layers", "embed", "mlp")`, one without with `("layers", None, ...)`,
      so sharding rules can map it (by default it is None: replicated);
      stacked state with `axes=` (`fx.local_state`) gains it the same way.

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
    _check_fn(fn, "fx.scan", "`fx.scan(body, length=n)(carry, xs)`, with `body(carry, x) -> (carry, y)`")
    length = _check_length(length)
    if isinstance(fn, type):
        return _per_instance(fn, functools.partial(
            scan, length=length, params=params, state=state, split_rngs=split_rngs, reverse=reverse, unroll=unroll,
            stack_axis=stack_axis,
        ), "Scan")
    where = "fx.scan"
    stack_params = _choice(params, ("stack", "broadcast"), "params", where) == "stack"
    stack_axis = _check_stack_axis(stack_axis, stack_params, where)
    modes = _state_modes(state, "stack" if stack_params else "carry", ("stack", "carry"), where)
    split = _split_streams(split_rngs, where, stack_params)

    def state_how(collection: str, declared: bool) -> str:
        return "mapped" if declared and modes(collection) == "stack" else "carried"

    def body(carry: Any, x: Any) -> tuple[Any, Any]:
        out = fn(carry, x)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise EffaxError(
                f"the body given to fx.scan must return a pair (carry, y), like jax.lax.scan's; "
                f"it returned {type(out).__name__}. Return `(new_carry, None)` when there is no y."
            )
        return out

    @functools.wraps(fn)
    def scanned(carry: Any, xs: Any = None) -> tuple[Any, Any]:
        outer = current_stack()
        n = _scan_length(length, xs)
        _check_carry_leaves(carry)
        x0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), xs)
        needs, (carry_struct, y_struct), _ = _learn(outer, body, (carry, x0), state_how=state_how)
        _check_carry(carry, carry_struct)
        plan = _plan(needs, outer, _Crossing(n, stack_params, True, state_how, split, stack_axis))
        if abstract_mode():
            values, sown = _abstract_results(plan, needs, n)
            _hand_back(plan, outer, values, sown)
            return _zeros(carry_struct), _zeros(y_struct, n)
        ins_by, outs_by = [c for c, _ in plan.inputs], [c for c, _, _ in plan.outputs]
        inputs = [v for _, v in plan.inputs]
        unmapped, sown_keys = _pick(ins_by, inputs, "unmapped"), _Sown()

        def step(c: Any, sliced: Any) -> Any:
            (user_carry, carried), (x, mapped) = c, sliced
            ins = _merge(ins_by, {"mapped": mapped, "carried": carried, "unmapped": unmapped})
            first = None
            if plan.first is not None:
                first = ins[plan.first] == (n - 1 if reverse else 0)
            answerer = Answerer(plan, ins, first)
            out = run_lifted(outer, answerer, body, user_carry, x)
            values = answerer.outputs()
            return (out[0], _pick(outs_by, values, "carried")), (
                out[1],
                _pick(outs_by, values, "mapped"),
                sown_keys.values(answerer),
            )

        (carry, carried), (ys, mapped, sown) = jax.lax.scan(
            step,
            (carry, _pick(ins_by, inputs, "carried")),
            (xs, _pick(ins_by, inputs, "mapped")),
            length=n,
            reverse=reverse,
            unroll=unroll,
        )
        _hand_back(plan, outer, _merge(outs_by, {"carried": carried, "mapped": mapped}), sown_keys.pairs(sown))
        return carry, ys

    return scanned


def _scan_length(length: int | None, xs: Any) -> int:
    """The number of iterations: `length`, which every leaf of xs must agree with, or xs's leading axis."""
    sizes = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(xs)[0]:
        name = "xs" + jax.tree_util.keystr(key_path)
        if not jnp.shape(leaf):
            raise EffaxError(
                f"{_here('fx.scan')}: `{name}` is {_brief(leaf)}, without a leading axis to scan over; "
                "each iteration gets one slice of every leaf of xs. Give it a leading axis of the number "
                "of iterations (`jnp.stack`), or pass a value every iteration uses whole in the carry or "
                "by closing over it."
            )
        sizes.append((name, jnp.shape(leaf)[0], jnp.shape(leaf)))
    if len({size for _, size, _ in sizes}) > 1:
        raise EffaxError(
            f"{_here('fx.scan')}: the leaves of xs disagree on their leading axis "
            f"({', '.join(f'`{name}`: {size}' for name, size, _ in sizes)}); each iteration takes one slice of "
            "every leaf, so they must all have the same length."
        )
    if length is not None:
        if sizes and sizes[0][1] != length:
            raise EffaxError(
                f"{_here('fx.scan')}: length={length}, but xs has {sizes[0][1]} slices (`{sizes[0][0]}` "
                f"has shape {sizes[0][2]}); each iteration takes one slice of xs. Leave `length=` out "
                f"(xs says how many), or pass length={sizes[0][1]}."
            )
        return length
    if not sizes:
        raise EffaxError(
            "fx.scan needs `length=` when there are no xs to scan over: "
            "`fx.scan(body, length=n)(carry)` runs the body n times."
        )
    return sizes[0][1]


def _check_carry_leaves(carry: Any) -> None:
    """The carry holds only what JAX traces: `jax.lax.scan` threads it from step to step as arrays (a Python
    number or flag there is traced, as in jax.lax.scan); anything else (a string, an object) is refused."""
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(carry)[0]:
        if not (_is_array(leaf) or isinstance(leaf, (bool, int, float, complex))):
            raise EffaxError(
                f"{_here('fx.scan')}: `carry{jax.tree_util.keystr(key_path)}` is {_brief(leaf)}, which the "
                "carry cannot hold: jax.lax.scan threads the carry from step to step as arrays. Close over "
                f"a value every step uses as it is: `fx.scan(lambda c, x: body(c, x, {_shown(leaf)}), ...)`."
            )


def _check_carry(carry: Any, out: Any) -> None:
    """The body's carry keeps its structure, shapes and dtypes from step to step (as `jax.lax.scan`
    requires; a weakly typed input, a Python scalar, takes the dtype the body returns, as there)."""
    if jax.tree.structure(carry) != jax.tree.structure(out):
        raise EffaxError(
            f"{_here('fx.scan')}: the body returns a carry of another structure than the one it takes: "
            f"it takes {_types(carry)} and returns {_types(out)}. The carry keeps one structure, shapes "
            "and dtypes from step to step, as in jax.lax.scan: return `(new_carry, y)` with new_carry "
            "built like the carry given, and anything else per step in y."
        )
    differ = []
    given_leaves = jax.tree_util.tree_flatten_with_path(carry)[0]
    for (key_path, given), made in zip(given_leaves, jax.tree.leaves(out), strict=True):
        aval = jax.typeof(given)
        if aval.shape != made.shape or (aval.dtype != made.dtype and not aval.weak_type):
            differ.append(f"`carry{jax.tree_util.keystr(key_path)}`: {_type_of(aval)} -> {_type_of(made)}")
    if differ:
        raise EffaxError(
            f"{_here('fx.scan')}: the body changes the carry's shape or dtype in one step "
            f"({', '.join(differ)}); the carry keeps one structure, shapes and dtypes from step to step, "
            "as in jax.lax.scan. Return it as it came (cast with `.astype(c.dtype)`, keep its shape), or "
            "start from a carry of the shape and dtype the body returns."
        )


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
    stack_axis: str | None = None,
) -> Callable[..., Any]:
    """`jax.vmap` over an effectful function: ensembles, or a batch-free model mapped over examples.

    `in_axes`, `out_axes`, `axis_size`, `axis_name` and `spmd_axis_name` are
    `jax.vmap`'s, and arguments are taken as there: keyword arguments are
    mapped along axis 0 (in_axes covers the positional ones), and what
    in_axes leaves unmapped (None) reaches the body unchanged, a Python
    flag still a flag. A module class is lifted per instance, as with
    `fx.scan`. What each member owns:

    - `params="stack"` (an ensemble): each param gets a leading axis of the
      mapped size, requested once, stacked; member `i` is initialized
      independently with `fold_in(key_of_path, i)`. `"broadcast"`: every
      member uses the same params (a per-example model).
    - `state`: `"stack"` (a variable per member) or `"broadcast"` (one
      shared variable; a `set` must give every member the same value, e.g.
      reduced with `jax.lax.pmean` over `axis_name`). It follows `params`
      by default.
    - `split_rngs=True` gives every member its own keys; False, or the
      streams not named, give all members the same keys. With
      `params="broadcast"` the `"params"` stream is never split.
    - sown values come back stacked along axis 0.
    - `stack_axis="ensemble"` names the members' dimension of stacked
      params and state as a logical axis, as in `fx.scan` (`axis_name` is
      JAX's collective axis name, a different thing).

    >>> def member(x):
    ...     return x @ fx.param("w", jax.nn.initializers.normal(), (2,))
    >>> t = fx.transform(fx.vmap(member, in_axes=None, axis_size=3))
    >>> v = t.init(jax.random.key(0), jnp.ones(2))
    >>> v["params"]["w"].shape
    (3, 2)
    >>> t.apply(v, jnp.ones(2)).shape
    (3,)
    """
    _check_fn(fn, "fx.vmap", "`fx.vmap(fn, in_axes=0)(x)`")
    args_axes = _check_in_axes(in_axes)
    if isinstance(fn, type):
        return _per_instance(fn, functools.partial(
            vmap, in_axes=in_axes, out_axes=out_axes, axis_size=axis_size, params=params, state=state,
            split_rngs=split_rngs, axis_name=axis_name, spmd_axis_name=spmd_axis_name, stack_axis=stack_axis,
        ), "Vmap")
    where = "fx.vmap"
    stack_params = _choice(params, ("stack", "broadcast"), "params", where) == "stack"
    stack_axis = _check_stack_axis(stack_axis, stack_params, where)
    modes = _state_modes(state, "stack" if stack_params else "broadcast", ("stack", "broadcast"), where)
    split = _split_streams(split_rngs, where, stack_params)

    def state_how(collection: str, declared: bool) -> str:
        return "mapped" if declared and modes(collection) == "stack" else "unmapped"

    @functools.wraps(fn)
    def mapped(*args: Any, **kwargs: Any) -> Any:
        outer = current_stack()
        call = _MappedCall(args, kwargs, args_axes, axis_size)
        wrap = functools.partial(
            jax.vmap,
            in_axes=(call.axes,),
            out_axes=(out_axes, 0),
            axis_size=axis_size,
            axis_name=axis_name,
            spmd_axis_name=spmd_axis_name,
        )
        try:
            needs, out_struct, (n,) = _learn(outer, call.bind(fn), (call.mapped,), wrap=wrap, state_how=state_how)
        except ValueError as error:  # JAX's, from the learning pass: an `out_axes` the output does not have
            if "out of bounds" not in str(error):
                raise
            raise EffaxError(
                f"{_here('fx.vmap')}: out_axes={_shown(out_axes)} does not fit the body's output ({error}): an "
                "output axis counts the output's dimensions with the mapped one put in, so it runs from -(rank + "
                "1) to rank. Give an axis in that range (0, or -1 for the last), or one per output leaf."
            ) from None
        plan = _plan(needs, outer, _Crossing(n, stack_params, False, state_how, split, stack_axis))
        if abstract_mode():
            values, sown = _abstract_results(plan, needs, n)
            _hand_back(plan, outer, values, sown)
            return _zeros(out_struct)
        sown_keys = _Sown()

        def member(ins: list[Any], mapped: list[Any]) -> Any:
            answerer = Answerer(plan, list(ins))
            out = run_lifted(outer, answerer, call.bind(fn), mapped)
            return out, answerer.outputs(), sown_keys.values(answerer)

        def run(shared: Callable[[tuple], bool]) -> Any:  # the vmap, keeping the outputs of `shared` slots shared
            return jax.vmap(
                member,
                in_axes=([0 if c == "mapped" else None for c, _ in plan.inputs], call.axes),
                out_axes=(out_axes, [0 if c == "mapped" or not shared(s) else None for c, _, s in plan.outputs], 0),
                axis_size=n,
                axis_name=axis_name,
                spmd_axis_name=spmd_axis_name,
            )([v for _, v in plan.inputs], call.mapped)

        restore = _names_snapshot()  # the error path traces the body again, named as the first time
        try:
            out, values, sown = run(lambda slot: True)
        except ValueError as error:
            slots = list(dict.fromkeys(slot for c, _, slot in plan.outputs if c == "unmapped"))
            if not slots or "out_axes" not in str(error):
                raise
            raise EffaxError(
                f"fx.vmap: the members make or write different values for the shared variable(s) "
                f"{', '.join(f'`{path_str(s[-1])}`' for s in _differing(run, slots, restore))} (params='broadcast' / "
                "state='broadcast'), so there is no one value to keep. Give each member its own copy with "
                "`params='stack'` / `state='stack'`, make the initializer independent of the member's inputs, "
                "or reduce the value over the mapped axis before `set` (`jax.lax.pmean(v, axis_name)` with "
                "`fx.vmap(..., axis_name=...)`)."
            ) from error
        _hand_back(plan, outer, values, sown_keys.pairs(sown))
        return out

    return mapped


class _Part(tuple):
    """`(key path, axis, part of the argument)`: one leaf of in_axes over the argument (not a pytree node)."""


def _check_in_axes(in_axes: Any) -> Any:
    """`in_axes` as `jax.vmap` takes it (an int, None, or a tuple with an entry per positional argument,
    each an int, None, or a container of them); a list is a tuple."""
    axes = tuple(in_axes) if isinstance(in_axes, list) else in_axes
    leaves = jax.tree.leaves(axes, is_leaf=lambda a: a is None) if isinstance(axes, tuple) else [axes]
    if not all(a is None or (isinstance(a, int) and not isinstance(a, bool)) for a in leaves):
        raise EffaxError(
            f"fx.vmap: in_axes={_shown(in_axes)} is not an axis spec: give an int (map every argument "
            "along that axis), None (share it), or a tuple with one entry per positional argument, each "
            "an int, None, or a container of the argument's structure holding them (`in_axes=(0, None)`)."
        )
    return axes


class _MappedCall:
    """One call of a `fx.vmap`-ed function as `jax.vmap` takes it: `in_axes` over the positional arguments,
    axis 0 over every keyword argument (`in_axes` covers positional arguments only).

    The leaves mapped (`mapped`, along `axes`) cross into the vmap; every other leaf (in_axes None) reaches
    the body unchanged, as `jax.vmap` passes it, in the learning pass too: a Python flag, number or string
    stays one, so the body may branch on it or hand it to a layer (`Dropout(deterministic=flag)`).
    Checks that the arguments fit `in_axes` and that every mapped axis has one size (`axis_size` if given).
    """

    def __init__(self, args: tuple, kwargs: dict[str, Any], axes: Any, axis_size: int | None) -> None:
        if isinstance(axes, tuple) and len(axes) != len(args):
            raise EffaxError(
                f"{_here('fx.vmap')}: in_axes={axes!r} has {len(axes)} entries, but the function was called "
                f"with {len(args)} positional argument(s); give one entry per argument (None for one every "
                f"member shares whole), or one int for all: `in_axes={(0,) + (None,) * (len(args) - 1)!r}`."
                + (" Keyword arguments take no entry: they are mapped along axis 0, as in jax.vmap." if kwargs else "")
            )
        leaves: list[_Leaf] = []  # in the order the arguments flatten
        for i, arg in enumerate(args):
            entry = axes[i] if isinstance(axes, tuple) else axes
            try:  # (where in the argument, its axis, the part it maps)
                parts = jax.tree.leaves(
                    jax.tree_util.tree_map_with_path(lambda *p: _Part(p), entry, arg, is_leaf=lambda a: a is None)
                )
            except (ValueError, TypeError):
                raise EffaxError(
                    f"{_here('fx.vmap')}: in_axes entry {i} ({entry!r}) does not fit argument {i}, "
                    f"{_types(arg)}: an entry is an int or None for the whole argument, or a container of the "
                    "argument's own structure with an int or None at each part."
                ) from None
            for key_path, axis, sub in parts:
                for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
                    leaves.append(_Leaf(f"args[{i}]" + jax.tree_util.keystr(key_path + leaf_path), leaf, axis))
        for (key, *rest), leaf in jax.tree_util.tree_flatten_with_path(kwargs)[0]:
            leaves.append(_Leaf(key.key + jax.tree_util.keystr(tuple(rest)), leaf, 0, key.key))
        self._treedef = jax.tree.structure((args, kwargs))
        self._leaves = [leaf.value for leaf in leaves]
        self._at = [i for i, leaf in enumerate(leaves) if leaf.axis is not None]
        self.mapped = [self._leaves[i] for i in self._at]
        self.axes = [leaves[i].axis for i in self._at]
        _check_sizes([leaves[i] for i in self._at], axis_size)

    def bind(self, fn: Callable[..., Any]) -> Callable[[list[Any]], Any]:
        """`fn` on the call's arguments, taking the mapped leaves (or one member's slices of them)."""

        def call(mapped: list[Any]) -> Any:
            leaves = list(self._leaves)
            for i, value in zip(self._at, mapped, strict=True):
                leaves[i] = value
            args, kwargs = jax.tree.unflatten(self._treedef, leaves)
            return fn(*args, **kwargs)

        return call


class _Leaf(NamedTuple):
    """One leaf of a `fx.vmap`-ed call's arguments: its name in errors, its value, its axis (None: unmapped),
    and the keyword naming its argument (None for a positional one)."""

    name: str
    value: Any
    axis: int | None
    keyword: str | None = None


def _check_sizes(mapped: list[_Leaf], axis_size: int | None) -> None:
    """Each mapped leaf has its axis, and every mapped axis has one size (`axis_size` when given)."""
    sizes = []
    for name, leaf, axis, keyword in mapped:
        rank = len(np.shape(leaf))  # np: a string or an object is of rank 0 too
        if not -rank <= axis < rank:
            shown = "v" if _is_array(leaf) else _shown(leaf)
            raise EffaxError(
                f"{_here('fx.vmap')}: "
                + (f"the keyword argument `{name}` is mapped along axis 0, as jax.vmap maps every keyword "
                   "argument (in_axes covers positional arguments only)" if keyword else
                   f"in_axes maps `{name}` along axis {axis}")
                + f", but it is {_type_of(leaf) if _is_array(leaf) else _brief(leaf)}, of rank {rank}; "
                + (f"pass it positionally with an in_axes entry None to give every member the whole value "
                   f"(`fx.vmap(fn, in_axes=(0, None))(x, {shown})`), or bind it: "
                   f"`fx.vmap(functools.partial(fn, {keyword}={shown}))(x)`." if keyword else
                   "name an axis it has" + (f" (from {-rank} to {rank - 1})" if rank else "")
                   + ", or None to give every member the whole value.")
            )
        sizes.append((name, np.shape(leaf)[axis]))
    if not sizes and axis_size is None:
        raise EffaxError(
            f"{_here('fx.vmap')}: in_axes maps no argument (every entry is None), so the number of members "
            "is unknown: pass `axis_size=n` (`fx.vmap(fn, in_axes=None, axis_size=3)`), or map an argument."
        )
    known = {size for _, size in sizes} | ({axis_size} if axis_size is not None else set())
    if len(known) > 1:
        said = [f"`{name}`: {size}" for name, size in sizes]
        said += [f"axis_size={axis_size}"] if axis_size is not None else []
        raise EffaxError(
            f"{_here('fx.vmap')}: the mapped axes disagree on the number of members ({', '.join(said)}); "
            "every mapped axis has one entry per member. Fix the shapes or in_axes, or the axis_size."
        )


def _is_array(x: Any) -> bool:
    """An array JAX traces (jax and numpy arrays, numpy scalars); Python numbers, flags and strings are not."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _differing(run: Callable[[Callable[[tuple], bool]], Any], slots: list[tuple], restore: Any) -> list[tuple]:
    """The shared variables whose members differ: each one kept shared alone (abstractly, on the error path
    only), the others mapped; all of them when none fails alone."""
    found = []
    for slot in slots:
        if restore is not None:
            restore()
        try:
            jax.eval_shape(functools.partial(run, slot.__eq__))
        except ValueError:
            found.append(slot)
    return found or slots


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
    keyword arguments are treated as static, and so are the leaves of the
    others that are not arrays (Python flags, numbers, strings: the body
    may branch on them, as `fn` could; `jax.checkpoint` would trace them
    unless named in `static_argnums`). A module class is lifted per
    instance, as Flax's `nn.remat(Block)`: `fx.remat(Block)(features=8)(x)`.

    >>> def layer(x):
    ...     return jnp.sin(x * fx.param("w", jax.nn.initializers.ones, ()))
    >>> t = fx.transform(fx.remat(layer))
    >>> v = t.init(jax.random.key(0), 1.0)
    >>> float(jax.grad(lambda v: t.apply(v, 1.0))(v)["params"]["w"])  # cos(1)
    0.5403...
    """
    _check_fn(fn, "fx.remat", "`fx.remat(fn)(x)`")
    if isinstance(fn, type):
        return _per_instance(fn, functools.partial(
            remat, policy=policy, prevent_cse=prevent_cse, static_argnums=static_argnums
        ), "Checkpoint")
    static = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    crossing = _Crossing(None, False, False, lambda collection, declared: "unmapped", lambda stream: False)

    @functools.wraps(fn)
    def rematted(*args: Any, **kwargs: Any) -> Any:
        outer = current_stack()
        needs, out_struct, _ = _learn(outer, lambda: fn(*args, **kwargs), ())
        plan = _plan(needs, outer, crossing)
        if abstract_mode():
            values, sown = _abstract_results(plan, needs, None)
            _hand_back(plan, outer, values, sown)
            return _zeros(out_struct)
        fixed = {i % len(args) for i in static} if args else set()
        leaves, treedef = jax.tree.flatten([None if i in fixed else a for i, a in enumerate(args)])
        traced = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]  # the rest is static, as fixed ones
        sown_keys = _Sown()

        def pure(ins: list[Any], dynamic: list) -> Any:
            given = list(leaves)
            for i, value in zip(traced, dynamic, strict=True):
                given[i] = value
            rest = jax.tree.unflatten(treedef, given)
            full = tuple(a if i in fixed else rest[i] for i, a in enumerate(args))
            answerer = Answerer(plan, list(ins))
            out = run_lifted(outer, answerer, fn, *full, **kwargs)
            return out, answerer.outputs(), sown_keys.values(answerer)

        out, values, sown = jax.checkpoint(pure, prevent_cse=prevent_cse, policy=policy)(
            [v for _, v in plan.inputs], [leaves[i] for i in traced]
        )
        _hand_back(plan, outer, values, sown_keys.pairs(sown))
        return out

    return rematted


@dataclasses.dataclass(frozen=True)
class StackedInit:
    """Initialize independent copies along a new leading axis: copy `i` gets key `fold_in(key, i)`.

    This is the key derivation of stacked params in `fx.scan` and `fx.vmap`:
    under init, layer (or member) `i` of the param at path `p` is
    `init(fold_in(fold(k_params, h_path(p)), i), shape, dtype)`, so it depends
    only on the key, the path and `i` (locality holds per layer and per
    ensemble member). Lifted transforms run the initializer inside the loop;
    this class gives the same values in one call, for code that stacks its
    own params. It hashes (for jit caches) only when `init` does.

    >>> init = fx.StackedInit(jax.nn.initializers.ones)
    >>> init(jax.random.key(0), (3, 2), jnp.float32).shape
    (3, 2)
    """

    init: Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
    from_lifted_body = True  # not a field: a stacked param's spec conflict names the lift (`stacked_hint`)

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        def one(i: jax.Array) -> jax.Array:
            return self.init(jax.random.fold_in(key, i), tuple(shape[1:]), dtype)

        return jax.vmap(one)(jnp.arange(shape[0]))
