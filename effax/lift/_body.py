"""The stack a lifted body runs under, and the two ways it is answered: recorded, then given.

A lifted transform (`fx.scan`, `fx.vmap`, `fx.remat`) runs its body inside a
JAX transform, in a trace of its own, while the handlers around it live in
the trace outside. Inside the body the handler stack is rebuilt from the one
outside, one entry per installed run:

- a stateless handler (its `begin()` returned itself: an interceptor,
  `capture_intermediates`, `Mode`, `SideInputs`, a user's pure handler) runs
  again inside, as it is, so module calls and the effects it performs go on
  through the rebuilt stack, as in the unrolled loop;
- a run with state of its own (params, state, keys, sows, share passes, a
  user's stateful handler) stays outside and is stood for by a `_Proxy`. The
  requests that must cross the trace boundary (params, state, keys, stream
  keys, sows) stop at the innermost proxy and are *lifted*: learned once in
  an abstract pre-pass (`Recorder`), requested outside in the outer trace,
  at that run's depth (so every handler sees each request once, in the
  unrolled order), and answered in the body from the values passed in
  (`Answerer`). Other requests (mode, side inputs, module calls, requests
  of your own) go to the run itself, asked once per lifted call where its
  answer can be kept from the learning pass (`Recorder.reply`). A run that
  only watches what the handlers inside it answer (`passes_lifted_requests`,
  a summary's recorder) lets lifted requests pass to the next proxy out, so
  the stateless handlers outside it still run inside the body; it is shown
  (in each pass) the ones a handler inside the body answered itself.

Values computed from the body's inputs (a state `init` reading the input, an
initializer closing over it) are created inside the body: the request sent
outside carries a `Probe` initializer, which raises `Fresh` with the key if
the handler outside wants to create the variable; the body then creates it
in its own trace, and the created value is handed back outside afterwards
with a `Constant` initializer.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from effax.core import (
    EffaxError,
    FrozenStateError,
    MissingVariableError,
    TraceMismatchError,
    answers_of,
    current_stack,
    is_stateless,
    send,
    under_stack,
)
from effax.effects import (
    GetStateRequest,
    LocalStateRequest,
    ModuleCallRequest,
    ParamRequest,
    RandomRequest,
    SetStateRequest,
    SideOutputRequest,
    StreamKeyRequest,
)
from effax.handlers._params import spec_conflict
from effax.handlers._state import cast_like
from effax.handlers._trace import check_trace, trace_state
from effax.handlers._tree import MISSING
from effax.inspect import abstractly

LIFTED = frozenset(
    {ParamRequest, LocalStateRequest, GetStateRequest, SetStateRequest, RandomRequest, StreamKeyRequest,
     SideOutputRequest}
)


# --- initializers that carry creation across the trace boundary


class Fresh(Exception):  # noqa: N818 - a signal, not an error the user sees
    """Raised by a `Probe` when the handler outside wants the variable created; carries the key."""

    def __init__(self, probe: Probe, key: Any):
        super().__init__(
            "a lifted transform's probe initializer ran outside its probe: a handler called `init` of a "
            "request it passed on. Report this with the handler's code."
        )
        self.probe, self.key = probe, key


class Probe:
    """An initializer that does not run: calling it means "create this here", answered by raising `Fresh`.

    `made` is the initializer the probing lift runs in its body when the variable is created there (None if
    unknown): a lift around it learns from it what it would create (`Needs.param_inits`).
    """

    __hash__ = None  # type: ignore[assignment]  # never a static argument of a jitted initializer
    from_lifted_body = True  # what a `fx.share` pass outside reads: it refuses to tie state across the boundary

    def __init__(self, made: Any = None):
        self.made = made

    def __call__(self, *args: Any) -> Any:
        raise Fresh(self, args[0] if args else None)


class DrawingProbe(Probe):
    """A state's `Probe` that, when called (the variable is missing outside), first draws the keys its
    `init()` drew in the learning pass, there and then, so they are drawn only when the `init()` runs, in
    the unrolled order; `Fresh` carries them. Existing state draws nothing: eval needs no key for it."""

    def __init__(self, draws: list[tuple[str, int, str, tuple[str, ...]]]):
        super().__init__()
        self.draws = draws  # (kind, depth, stream, path) as recorded; kind "draw" or "base"

    def __call__(self, *args: Any) -> Any:
        keys = [
            send(RandomRequest(path, stream) if kind == "draw" else StreamKeyRequest(path, stream))
            for kind, _, stream, path in self.draws
        ]
        raise Fresh(self, keys)


class Constant:
    """An initializer returning a value created elsewhere (inside a lifted body); unhashable on purpose."""

    __hash__ = None  # type: ignore[assignment]
    from_lifted_body = True  # as `Probe`'s

    def __init__(self, value: Any):
        self.value = value

    def __call__(self, *args: Any) -> Any:
        return self.value


def _stripped(*args: Any) -> Any:
    raise EffaxError("internal: the initializer of a recorded request was dropped with its trace")


def probe(stack: tuple[Any, ...], depth: int, request: Any) -> tuple[bool, Any]:
    """Send `request` (whose init is a fresh `Probe`) at `depth`: `(True, key)` to create it, else `(False, answer)`."""
    try:
        return False, send_at(stack, depth, request)
    except Fresh as fresh:
        if fresh.probe is not request.init:
            raise
        return True, fresh.key


def send_at(stack: tuple[Any, ...], depth: int, request: Any) -> Any:
    """Send `request` to the runs `stack[:depth]`: where the body's request would have gone. A stateless
    handler of the user's among them, outside the run at `depth` (a run with state), is watched as it
    answers (`_Outside`): it was not rerun inside the body, so it sees the request once, stacked, here."""
    runs = stack[:depth]
    runs = tuple(_Outside(run, runs[-1]) if _users_interceptor(run) else run for run in runs[:-1]) + runs[-1:]
    return under_stack(runs, send, request)


def _users_interceptor(run: Any) -> bool:
    return is_stateless(run) and not type(run).__module__.startswith("effax.")


class _Outside:
    """A user's stateless handler that stands outside a run with state in a lifted transform's stack, as it
    answers a request the body lifted there. Changing the answer element by element is what the unrolled loop
    does too; making variables, drawing keys or sowing of its own is not (each would happen once, unstacked, at
    the lifted call's scope, not once per layer), so that is refused rather than made wrong."""

    __slots__ = ("run", "inner", "answers")

    def __init__(self, run: Any, inner: Any):
        self.run, self.inner, self.answers = run, inner, answers_of(run)

    def handle(self, request: Any, forward: Callable[[Any], Any]) -> Any:
        if type(request) not in LIFTED:
            return self.run.handle(request, forward)
        own = _OwnEffects(self, request)  # what it performs itself goes to the runs outside it, through `own`
        return under_stack(current_stack() + (own,), self.run.handle, request, forward)


class _OwnEffects:
    """Innermost while a `_Outside` handler answers: refuses the lifted requests it performs itself."""

    __slots__ = ("outside", "request")

    def __init__(self, outside: _Outside, request: Any):
        self.outside, self.request = outside, request

    def handle(self, request: Any, forward: Callable[[Any], Any]) -> Any:
        if type(request) not in LIFTED:
            return forward(request)
        run, inner = self.outside.run, _stood_for(self.outside.inner)
        name = type(run).__name__
        if getattr(inner, "moves_params", False):
            where = "the `fx.share` pass that wraps the lifted transform"
            fix = (f"install `{name}` inside the function `fx.share` wraps (`with fx.handle({name}(...)):` "
                   "around the lifted call), or tie inside the lifted function (`fx.share` of each layer)")
        else:
            where = f"`{type(inner).__name__}`, the run of a handler with per-run state"
            fix = f"list `{name}` after that handler in `handlers=` (the last is innermost), so it runs inside it"
        raise EffaxError(
            f"`{name}` performed {request.describe()} while answering {self.request.describe()}, which a "
            f"lifted transform (fx.scan / fx.vmap / fx.remat / fx.cond) sent it from outside its body: `{name}` "
            f"is installed outside {where}, so it is not rerun inside the body and sees the body's request "
            "once (stacked under fx.scan and fx.vmap), at the lifted call's scope. What it makes there would be "
            f"one variable, not one per layer as in the unrolled loop. To fix: {fix}; or intercept module "
            "calls (`fx.ModuleCallRequest`), which reach it inside the body."
        )


# --- what a body needs, learned from one abstract trace


@dataclasses.dataclass
class StateNeed:
    request: LocalStateRequest | None  # init stripped; None: the variable was declared outside the body
    struct: Any  # its abstract value
    written: bool = False
    read: bool = False  # the body reads it: a variable it makes is read once outside too (`fx.effects_of`)
    frozen: str | None = None  # a variable existing outside in a frozen collection: the refusal of a `set`


@dataclasses.dataclass
class Needs:
    """What one abstract trace of a body asked for, by slot `(depth, ...)`: requests and shapes, never tracers."""

    params: dict[tuple, ParamRequest] = dataclasses.field(default_factory=dict)  # (depth, path)
    state: dict[tuple, StateNeed] = dataclasses.field(default_factory=dict)  # (depth, collection, path)
    draws: dict[tuple, int] = dataclasses.field(default_factory=dict)  # (depth, stream, path)
    bases: dict[tuple, None] = dataclasses.field(default_factory=dict)  # (depth, stream, path)
    sows: dict[tuple, list] = dataclasses.field(default_factory=dict)  # (depth, collection, path, tag)
    # the keys a state's `init()` drew, by state slot, in order: `(kind, depth, stream, path)`, kind "draw"
    # or "base"; needed only where the variable is created (`DrawingProbe`), so not in `draws`/`bases`
    init_draws: dict[tuple, list] = dataclasses.field(default_factory=dict)
    # the second and later requests of a param, by slot: each use goes outside too (after the first), so a
    # summary counts them and a tie shows, as in the unrolled loop
    param_uses: dict[tuple, list] = dataclasses.field(default_factory=dict)
    # each param's initializer as the body passed it, by slot: run outside only where a run with state of
    # the user's own may change the answer (`_made_outside`); it may close over this abstract trace's values,
    # and then it is not run outside (the param is made inside the body, as without such a run)
    param_inits: dict[tuple, Any] = dataclasses.field(default_factory=dict)
    # the requests a run with state answered itself (not carried across: a side input, a request of the user's
    # own), in the order asked, as `[depth, request, answer]`: given again in the real pass, so the run is asked once
    replies: list[list] = dataclasses.field(default_factory=list)


def struct_of(value: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), value)


def _dummy_key() -> jax.Array:
    return jax.random.key(0)  # the recorder runs under `jax.eval_shape`: this costs nothing


class Recorder:
    """Answer a body's lifted requests abstractly and note what it needs (runs under `jax.eval_shape`).

    As in the unrolled loop, a variable's `init()` runs only when it is missing outside (it may draw keys, or
    need what this run lacks, such as a key under eval); one that exists is read outside whenever the body
    reads it, never kept: a nested lift asks while it learns, in a trace of its own that ends first.
    """

    def __init__(self, outer: tuple[Any, ...], view: Callable[[str, Any], Any] | None = None):
        self.outer = outer
        self.view = view  # (collection, a variable's value outside) -> what the body sees of it; None: all
        self.needs = Needs()
        self.values: dict[tuple, Any] = {}  # state made or set by the body, in this trace; dropped with it
        self.outside: set[tuple] = set()  # variables that exist outside: read there
        self.init_of: tuple | None = None  # the state slot whose `init()` is running
        self.asked: set[tuple] = set()  # outside variables whose writability was asked
        self.lifted = 0  # lifted requests answered so far (a watching run's proxy counts them)

    def _exists(self, depth: int, request: LocalStateRequest) -> bool:
        """Whether the variable exists outside: declared there with a `Probe` init, which a handler calls (or
        refuses to, from this trace, or in a frozen collection) only for a variable that does not."""
        try:
            fresh, _ = probe(self.outer, depth, dataclasses.replace(request, init=Probe()))
        except (TraceMismatchError, MissingVariableError):
            return False
        return not fresh

    def may_write(self, depth: int, slot: tuple) -> None:
        """Raise `FrozenStateError` where the unrolled loop's `set` of this variable would. A variable this
        body makes may be written; one outside is asked about once: of the lifted transform around this one,
        or of the storage, by writing its value back (refused in a frozen collection)."""
        need = self.needs.state.get(slot)
        if need is None or slot not in self.outside:
            return
        if slot not in self.asked:
            self.asked.add(slot)
            around = self.outer[depth - 1]
            try:
                if isinstance(around, _Proxy):
                    around.body.may_write(depth, slot)
                else:
                    send_at(self.outer, depth, SetStateRequest(slot[2], slot[1], self._outside_value(slot)))
            except FrozenStateError as e:
                need.frozen = str(e)
            except TraceMismatchError:
                pass  # writable, but not from this trace: the write is handed back outside after the body
        if need.frozen is not None:
            raise FrozenStateError(need.frozen)

    def _outside_value(self, slot: tuple) -> Any:
        depth, collection, path = slot
        return send_at(self.outer, depth, GetStateRequest(path, collection))

    def _seen(self, slot: tuple) -> Any:
        """The abstract value the body sees of a variable that exists outside (a slice of a stacked one)."""
        struct = struct_of(self._outside_value(slot))
        declared = self.needs.state[slot].request is not None
        return self.view(slot[1], struct) if declared and self.view is not None else struct

    def _read(self, slot: tuple) -> Any:
        """A variable as the body sees it: as the body made or set it, else zeros of its shape (this trace
        is abstract; nothing of the value outside is copied, nor kept)."""
        value = self.values.get(slot, MISSING)
        if value is not MISSING:
            return value
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.needs.state[slot].struct)

    def reply(self, depth: int, run: Any, request: Any, forward: Callable[[Any], Any]) -> Any:
        """Ask the run at `depth` itself, at compile time: an answer made of concrete values (a table the run
        caches) is concrete, so it is kept and given again in the real pass, and the run sees the request
        once, as in the unrolled loop. A module call runs the module's body, which reads the body's values:
        asked again in the real pass."""
        if type(request) is ModuleCallRequest:  # noted by kind only: its arguments are this trace's values,
            self.needs.replies.append([depth, ModuleCallRequest, _ASK])  # which must not outlive it (law 8)
            return run.handle(request, forward)
        entry = [depth, request, _ASK]  # noted before asking: what the run asks while answering comes after it
        self.needs.replies.append(entry)
        with jax.ensure_compile_time_eval():
            answer = run.handle(request, forward)
        if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(answer)):
            entry[2] = answer
        return answer

    def answer(self, depth: int, request: Any) -> Any:
        self.lifted += 1
        kind, needs = type(request), self.needs
        if kind is ParamRequest:
            slot = (depth, request.path)
            if slot not in needs.params:
                needs.params[slot] = dataclasses.replace(request, init=_stripped)
                init = request.init  # a nested lift's probe: what that lift would create in its body
                needs.param_inits[slot] = init.made if isinstance(init, Probe) else init
            else:
                first = needs.params[slot]
                if first.shape != request.shape or first.dtype != request.dtype:
                    raise spec_conflict(first, request)  # as the model unrolled says (the answer would mismatch)
                needs.param_uses.setdefault(slot, []).append(dataclasses.replace(request, init=_stripped))
            return jnp.zeros(request.shape, request.dtype)
        if kind is LocalStateRequest:
            slot = (depth, request.collection, request.path)
            if slot in needs.state:
                if slot not in self.outside and isinstance(request.init, Probe):
                    request.init()  # a nested lift asking about a variable this body makes: raises `Fresh`
                return None
            if self._exists(depth, request):
                needs.state[slot] = StateNeed(dataclasses.replace(request, init=_stripped), None)
                self.outside.add(slot)
                needs.state[slot].struct = self._seen(slot)
                return None
            outer_init, self.init_of = self.init_of, slot
            try:  # a `DrawingProbe` (a nested lift's) draws here too; a `Probe` raises `Fresh`
                value = request.initialize()
            finally:
                self.init_of = outer_init
            needs.state[slot] = StateNeed(dataclasses.replace(request, init=_stripped), struct_of(value))
            self.values[slot] = value
            return None
        if kind is GetStateRequest or kind is SetStateRequest:
            slot = (depth, request.collection, request.path)
            if slot not in needs.state:  # a LocalStateEffect made outside the body: read it there
                needs.state[slot] = StateNeed(None, None)
                self.outside.add(slot)
                needs.state[slot].struct = self._seen(slot)
            need = needs.state[slot]
            if kind is GetStateRequest:
                need.read = True
                return self._read(slot)
            if slot in self.outside:
                self.may_write(depth, slot)
            need.written = True
            self.values[slot] = request.value
            return None
        if kind is RandomRequest or kind is StreamKeyRequest:
            if self.init_of is not None:
                what = "draw" if kind is RandomRequest else "base"
                needs.init_draws.setdefault(self.init_of, []).append((what, depth, request.stream, request.path))
            elif kind is RandomRequest:
                slot = (depth, request.stream, request.path)
                needs.draws[slot] = needs.draws.get(slot, 0) + 1
            else:
                needs.bases[(depth, request.stream, request.path)] = None
            return _dummy_key()
        # a sow: its values come back from the real pass; remember their shapes for abstract runs
        needs.sows.setdefault((depth, request.collection, request.path, request.tag), []).append(
            struct_of(request.value)
        )
        return None


def retraced(request: Any, what: str) -> EffaxError:
    return EffaxError(
        f"{request.describe()} {what} when the lifted transform (fx.scan / fx.vmap / fx.remat / fx.cond) first "
        "traced its body: the body must make the same requests every time it is traced. Make the "
        "choice static (no Python state that changes between calls, no data-dependent requests)."
    )


# --- the plan: how each slot's value enters and leaves the body


@dataclasses.dataclass
class ParamPlan:
    request: ParamRequest  # as requested outside (stacked for stacked params)
    fresh: bool  # created inside the body, from the key at `index`; else the value at `index`
    index: int
    carry: int | None = None  # scan with broadcast params: the carried value made on the first step
    uses: list = dataclasses.field(default_factory=list)  # its later requests, as sent outside afterwards


@dataclasses.dataclass
class StatePlan:
    need: StateNeed
    fresh: bool  # `init()` runs inside the body
    index: int | None  # the value passed in (None for a fresh variable that is not carried)
    initial: int | None = None  # a carried fresh variable: its first step's `init()`, carried
    outside: LocalStateRequest | None = None  # a fresh variable's request as sent outside (stacked axes if mapped)


@dataclasses.dataclass
class Plan:
    """Static: where each requested value comes from (`inputs`, by index) and which values go back out.

    Each input and output says how it crosses: "mapped" (a slice per iteration or member), "unmapped"
    (one value for all) or "carried" (threaded through the iterations of a scan).
    """

    inputs: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    params: dict[tuple, ParamPlan] = dataclasses.field(default_factory=dict)
    state: dict[tuple, StatePlan] = dataclasses.field(default_factory=dict)
    draws: dict[tuple, list[int]] = dataclasses.field(default_factory=dict)
    bases: dict[tuple, int] = dataclasses.field(default_factory=dict)
    outputs: list[tuple[str, str, tuple]] = dataclasses.field(default_factory=list)  # (how, what, slot)
    replies: list[list] = dataclasses.field(default_factory=list)  # `Needs.replies`
    first: int | None = None  # input index of the iteration counter, when something is made on the first step

    def add(self, how: str, value: Any) -> int:
        self.inputs.append((how, value))
        return len(self.inputs) - 1


_ASK = object()  # a reply that could not be kept (it holds the learning pass's tracers): the run is asked again


def _same(a: Any, b: Any) -> bool:
    """Whether two requests are equal (one with array fields, which compare elementwise, is not); a request
    noted by its class alone (a module call) matches any of that class."""
    if isinstance(a, type):
        return type(b) is a
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - an array field: no truth value
        return False


def _select(first: Any, made: Any, carried: Any) -> Any:
    return jax.tree.map(lambda m, c: jnp.where(first, m, c), made, carried)


class Answerer:
    """Answer a body's lifted requests from the values passed in, and keep what goes back out."""

    def __init__(self, plan: Plan, ins: list[Any], first: Any = None):
        self.plan, self.ins, self.first = plan, ins, first
        self.params: dict[tuple, Any] = {}
        self.state: dict[tuple, Any] = {}
        self.initial: dict[tuple, Any] = {}
        self.counts: dict[tuple, int] = {}
        self.sown: dict[tuple, list] = {}
        self.trace = trace_state()
        self.replies = collections.deque(plan.replies)
        self.lifted = 0  # lifted requests answered so far (a watching run's proxy counts them)

    def reply(self, depth: int, run: Any, request: Any, forward: Callable[[Any], Any]) -> Any:
        """What the run at `depth` answered to `request` in the learning pass, if it could be kept; else ask it."""
        if self.replies and self.replies[0][0] == depth and _same(self.replies[0][1], request):
            _, _, answer = self.replies.popleft()
            if answer is not _ASK:
                return answer
        return run.handle(request, forward)

    def answer(self, depth: int, request: Any) -> Any:
        self.lifted += 1
        kind, plan = type(request), self.plan
        if kind is ParamRequest:
            slot = (depth, request.path)
            value = self.params.get(slot, MISSING)
            if value is not MISSING:
                return value
            p = plan.params.get(slot)
            if p is None:
                raise retraced(request, "was not requested")
            if p.fresh:
                check_trace(self.trace, request, "initializes a param")
                value = request.initialize(self.ins[p.index])  # a nested lift's probe raises through here
                if p.carry is not None:
                    value = _select(self.first, value, self.ins[p.carry])
            else:
                value = self.ins[p.index]
            self.params[slot] = value
            return value
        if kind is LocalStateRequest:
            slot = (depth, request.collection, request.path)
            if slot in self.state:
                return None
            s = plan.state.get(slot)
            if s is None:
                raise retraced(request, "was not requested")
            if s.fresh:
                check_trace(self.trace, request, "creates state")
                made = request.initialize()
                if s.initial is None:
                    self.initial[slot] = made
                    value = made
                else:  # carried: made on the first step, threaded after it
                    self.initial[slot] = _select(self.first, made, self.ins[s.initial])
                    value = _select(self.first, made, self.ins[s.index])
            else:
                value = self.ins[s.index]
            self.state[slot] = value
            return None
        if kind is GetStateRequest or kind is SetStateRequest:
            slot = (depth, request.collection, request.path)
            current = self.state.get(slot, MISSING)
            if current is MISSING:
                s = plan.state.get(slot)
                if s is None or s.index is None:
                    raise retraced(request, "was not requested")
                current = self.state[slot] = self.ins[s.index]
            if kind is GetStateRequest:
                return current
            frozen = plan.state[slot].need.frozen
            if frozen is not None:
                raise FrozenStateError(frozen)
            check_trace(self.trace, request, "writes state")
            self.state[slot] = cast_like(request.value, current, request.describe)
            return None
        if kind is RandomRequest:
            check_trace(self.trace, request, "draws a key")
            slot = (depth, request.stream, request.path)
            n = self.counts.get(slot, 0)
            keys = plan.draws.get(slot, ())
            if n >= len(keys):
                raise retraced(request, f"is draw #{n + 1}, but only {len(keys)} were made")
            self.counts[slot] = n + 1
            return self.ins[keys[n]]
        if kind is StreamKeyRequest:
            index = plan.bases.get((depth, request.stream, request.path))
            if index is None:
                raise retraced(request, "was not requested")
            return self.ins[index]
        check_trace(self.trace, request, "sows a value")
        self.sown.setdefault((depth, request.collection, request.path, request.tag), []).append(request.value)
        return None

    def may_write(self, depth: int, slot: tuple) -> None:
        """As `Recorder.may_write`, from what the learning pass found (a lift inside this one asks)."""
        s = self.plan.state.get(slot)
        if s is not None and s.need.frozen is not None:
            raise FrozenStateError(s.need.frozen)

    def outputs(self) -> list[Any]:
        """The values `plan.outputs` names, in its order."""
        return [self.output(what, slot) for _, what, slot in self.plan.outputs]

    def output(self, what: str, slot: tuple) -> Any:
        """One value going back out: a param made, a variable's initial or current value."""
        table = self.params if what == "param" else self.initial if what == "initial" else self.state
        value = table.get(slot, MISSING)
        if value is MISSING:
            p = self.plan.params.get(slot) if what == "param" else self.plan.state[slot].need.request
            raise retraced(p, "was not made") if p is not None else EffaxError("internal: lost a lifted value")
        return value


# --- the rebuilt stack


_CROSSING = (
    "{what} reached `{handler}`, a handler with per-run state that was entered outside this lifted "
    "transform (fx.scan / fx.vmap / fx.remat): its run lives in the trace outside, and only params, state, "
    "keys and sows are carried across. Install that handler inside the lifted function "
    "(`with fx.handle(...)` in the body), or make it stateless (`begin()` returns the handler itself)."
)


class _Proxy:
    """Stands inside a lifted body for one stateful run outside it (see the module docstring)."""

    __slots__ = ("run", "depth", "body", "answers", "passes_lifted_requests")

    def __init__(self, run: Any, depth: int, body: Recorder | Answerer):
        self.run, self.depth, self.body = run, depth, body
        # the run's own declaration: a request it never sees skips the proxy too
        self.answers = answers_of(run)
        # as the run it stands for: a nested lift's proxy of this one lets them pass too
        self.passes_lifted_requests = getattr(run, "passes_lifted_requests", False)

    def handle(self, request: Any, forward: Callable[[Any], Any]) -> Any:
        if type(request) in LIFTED:
            if not self.passes_lifted_requests:
                return self.body.answer(self.depth, request)
            body, before = self.body, self.body.lifted  # a run that only watches: lifted at the next proxy out,
            answer = forward(request)
            if body.lifted == before:  # or answered by a handler inside the body: shown to the run, answered
                self.run.handle(request, lambda _: answer)
            return answer
        try:
            return self.body.reply(self.depth, self.run, request, forward)
        except TraceMismatchError:
            raise EffaxError(_CROSSING.format(what=request.describe(), handler=type(self.run).__name__)) from None


def sow_keeper(outer: tuple[Any, ...], depth: int, collection: str) -> Any:
    """The innermost run that may keep a sow of `collection` handed back at `depth` of `outer` (a proxy: the
    run it stands for); None when every run from there outward that answers sows says it does not keep the
    collection (`keeps`, the sow collector's), so the sow does nothing. A run that cannot say (a user's
    handler that declares no `answers`) may keep it."""
    for run in reversed(outer[:depth]):
        answers = answers_of(run)
        if answers is not None and not issubclass(SideOutputRequest, answers):
            continue
        run = _stood_for(run)  # a nested lift's proxy: the run it stands for says
        keeps = getattr(run, "keeps", None)
        if keeps is None or keeps(collection):
            return run
    return None


def _stood_for(run: Any) -> Any:
    """The run itself, through the proxies of nested lifts that stand for it."""
    while isinstance(run, _Proxy):
        run = run.run
    return run


def lifted_stack(outer: tuple[Any, ...], body: Recorder | Answerer) -> tuple[Any, ...]:
    """The stack inside a lifted body: stateless runs as they are, a proxy for each stateful one."""
    return tuple(run if is_stateless(run) else _Proxy(run, i + 1, body) for i, run in enumerate(outer))


def run_lifted(outer: tuple[Any, ...], body: Recorder | Answerer, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Call `fn` under the rebuilt stack, answered by `body`."""
    with abstractly(isinstance(body, Recorder)):
        return under_stack(lifted_stack(outer, body), fn, *args, **kw)
