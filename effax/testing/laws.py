"""The laws of DESIGN.md as checks on one model, input and key, for the handlers you write.

Each `check_*` runs a model (see `effax.testing.models`) through
`fx.transform` with your handler innermost (`handlers=`), the way users run
it, and raises `AssertionError` when the law does not hold. The message names
the law, shows what differed, and lists the model's requests, so the smallest
counterexample hypothesis finds reads as a short list of requests. Any error
raised while the model runs is reported the same way.

`handler` is a handler, a class or zero-argument factory (called once per
check, so state a buggy handler keeps on itself shows up within the check),
`None` (the built-in handlers alone), or a sequence of those (outermost
first).

>>> from effax.testing import laws
>>> from effax.testing.models import Model, Param, SideInput
>>> model = Model([Param("w0", (2,)), SideInput("mask")])
>>> laws.check_determinism(model, jnp.ones(2), jax.random.key(0))
>>> class NoMask(fx.Handler):  # answers side inputs ...
...     def handle(self, request, forward):
...         return 0.0 if isinstance(request, fx.SideInputRequest) else forward(request)
>>> laws.check_forwarding_identity(model, jnp.ones(2), jax.random.key(0), handler=NoMask)
Traceback (most recent call last):
AssertionError: effax law `forwarding identity` does not hold: the handler under test claims no effect, ...
>>> # ... so say so: then it must leave every other effect alone
>>> laws.check_forwarding_identity(model, jnp.ones(2), jax.random.key(0), handler=NoMask, effects=["side_input"])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import effax as fx
from effax.core import MISSING, get_path
from effax.testing.models import EFFECTS, Model

__all__ = [
    "check_determinism", "check_locality", "check_init_apply_agreement", "check_abstract_init",
    "check_state_laws", "check_forwarding_identity", "check_commutes_with", "check_associativity",
    "check_sharing_laws", "check_purity_under_jit", "partner",
]

HandlerLike = Any
"""A handler, a handler class or factory, `None`, or a sequence of those."""


# --- handlers under test -------------------------------------------------------------------------


def resolve(handler: HandlerLike) -> tuple[Any, ...]:
    """The handler instances `handler` stands for; factories are called here, once.

    >>> [type(h).__name__ for h in resolve([fx.Handler, None, (fx.handlers.Mode(True),)])]
    ['Handler', 'Mode']
    """
    if handler is None:
        return ()
    if isinstance(handler, (list, tuple)):
        return tuple(h for item in handler for h in resolve(item))
    if isinstance(handler, type) or not callable(getattr(handler, "handle", None)):
        if not callable(handler):
            raise TypeError(f"{handler!r} is neither a handler nor a factory of handlers.")
        return resolve(handler())
    return (handler,)


def _name(h: Any) -> str:
    if type(h).__repr__ is not object.__repr__:
        return repr(h)
    return f"{type(h).__name__}()"


# --- comparing results ---------------------------------------------------------------------------


def _spec(x: Any) -> tuple[tuple[int, ...], str]:
    dtype = getattr(x, "dtype", None)
    dtype = np.asarray(x).dtype if dtype is None else dtype
    is_key = jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    return tuple(np.shape(x)), str(dtype) if is_key else jnp.dtype(dtype).name


def _leaf(x: Any) -> np.ndarray:
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def _where(path: Any) -> str:
    return jax.tree_util.keystr(path) or "<the whole value>"


def _paths(leaves: Sequence[Any]) -> str:
    names = [_where(p) for p, _ in leaves]
    return ", ".join(names[:8]) + (f", ... ({len(names)} leaves)" if len(names) > 8 else "") or "(no leaves)"


def difference(
    a: Any,
    b: Any,
    *,
    names: tuple[str, str] = ("first", "second"),
    rtol: float = 0.0,
    atol: float = 0.0,
    values: bool = True,
) -> str | None:
    """Where two pytrees of arrays differ (structure, shape, dtype, or values), or None when they agree.

    >>> from effax.testing.laws import difference
    >>> difference({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, names=("init", "apply"))
    "at ['w']: [0.0, 0.0] (init) vs [1.0, 1.0] (apply)"
    """
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    if ta != tb:
        return f"the structures differ:\n    {names[0]}: {_paths(la)}\n    {names[1]}: {_paths(lb)}"
    for (path, x), (_, y) in zip(la, lb, strict=True):
        sx, sy = _spec(x), _spec(y)
        if sx != sy:
            return f"at {_where(path)}: shape {sx[0]} {sx[1]} ({names[0]}) vs shape {sy[0]} {sy[1]} ({names[1]})"
        if not values:
            continue
        x, y = _leaf(x), _leaf(y)
        if x.dtype.kind == "V" or jnp.issubdtype(x.dtype, jnp.floating):
            x, y = x.astype(np.float64), y.astype(np.float64)
        if not np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
            return f"at {_where(path)}: {x.tolist()} ({names[0]}) vs {y.tolist()} ({names[1]})"
    return None


# --- running a model and reporting a failure -----------------------------------------------------


class _Case:
    """One model, input, key and mode, run with the handlers under test; failures raise AssertionError."""

    def __init__(self, law: str, model: Model, x: Any, key: Any, handlers: tuple[Any, ...], training: bool):
        self.law, self.model, self.x, self.key = law, model, x, key
        self.handlers, self.training = handlers, training

    def transform(self, fn: Callable[..., Any] | None = None) -> fx.Transformed:
        return fx.transform(self.model if fn is None else fn)

    def init(self, handlers: Any = None, fn: Any = None) -> tuple[Any, dict]:
        hs = self.handlers if handlers is None else handlers
        return self.transform(fn).init_with_output(self.key, self.x, training=self.training, handlers=hs)

    def apply(self, variables: Any, mutable: Any = True, handlers: Any = None, fn: Any = None) -> Any:
        hs = self.handlers if handlers is None else handlers
        return self.transform(fn).apply(
            variables, self.x, rngs=self.key, mutable=mutable, training=self.training, handlers=hs
        )

    def fail(self, what: str, detail: str | None = None) -> AssertionError:
        key = _leaf(self.key).tolist() if self.key is not None else None
        handlers = ", ".join(_name(h) for h in self.handlers) or "none (the built-in handlers alone)"
        lines = [
            f"effax law `{self.law}` does not hold: {what}",
            *([f"  {detail}"] if detail else []),
            f"model: {self.model!r}".replace("\n", "\n  "),
            f"x = {np.asarray(self.x).tolist()}, key data = {key}, training = {self.training}",
            f"handlers under test (innermost last): {handlers}",
            f"rebuild the model: {self.model.code()}",
        ]
        return AssertionError("\n".join(lines))

    @contextlib.contextmanager
    def running(self, what: str) -> Iterator[None]:
        """Report an error raised while running the model as a failure of this law."""
        try:
            yield
        except AssertionError:
            raise
        except Exception as e:
            raise self.fail(f"{what} raised {type(e).__name__}", "\n  ".join(str(e).splitlines()[:6])) from e

    def expect_same(self, a: Any, b: Any, what: str, names: tuple[str, str], **tolerance: Any) -> None:
        diff = difference(a, b, names=names, **tolerance)
        if diff is not None:
            raise self.fail(what, diff)


def _case(law: str, model: Model, x: Any, key: Any, handler: HandlerLike, training: bool) -> _Case:
    if not isinstance(model, Model):
        raise TypeError(f"the laws run an `effax.testing.models.Model`, got {type(model).__name__}.")
    return _Case(law, model, jnp.asarray(x, jnp.float32), key, resolve(handler), bool(training))


# --- law 1: determinism --------------------------------------------------------------------------


def check_determinism(
    model: Model, x: Any, key: Any, handler: HandlerLike = None, *, variables: Any = None, training: bool = False
) -> None:
    """Same keys and inputs give the same variables; same variables, inputs and keys give the same outputs.

    `variables` defaults to what `t.init` makes; pass `strategies.variables(model)`
    to also check arbitrary stored values.

    >>> from effax.testing.models import Draw, Param
    >>> check_determinism(Model([Param("w0"), Draw()]), jnp.ones(2), jax.random.key(0), fx.Handler)
    """
    case = _case("determinism", model, x, key, handler, training)
    with case.running("`t.init_with_output`"):
        first, second = case.init(), case.init()
    case.expect_same(
        first, second, "two runs of `t.init_with_output` with the same key and input differ", ("run 1", "run 2")
    )
    variables = first[1] if variables is None else variables
    with case.running("`t.apply(..., mutable=True)`"):
        first, second = case.apply(variables), case.apply(variables)
    case.expect_same(
        first, second, "two runs of `t.apply` with the same variables, inputs and keys differ", ("run 1", "run 2")
    )


# --- law 2: locality -----------------------------------------------------------------------------


class _Kept(fx.Handler):
    """Begins a fresh `make()` run on each entry and keeps it, so a law can read it after the run."""

    def __init__(self, make: Callable[[], Any]):
        self.make = make
        self.runs: list[Any] = []

    def begin(self) -> Any:
        self.runs.append(self.make())
        return self.runs[-1]


class _Recording:
    """Innermost: records the param values and keys the model receives, by path (and draw order)."""

    def __init__(self) -> None:
        self.params: dict[Any, Any] = {}
        self.keys: dict[Any, list[Any]] = {}

    def handle(self, request: Any, forward: Any) -> Any:
        out = forward(request)
        if isinstance(request, fx.ParamRequest):
            self.params.setdefault("/".join(request.path), out)
        elif isinstance(request, (fx.RandomRequest, fx.StreamKeyRequest)):
            slot = f"{type(request).__name__} {request.stream!r} at {'/'.join(request.path) or '<root>'}"
            self.keys.setdefault(slot, []).append(out)
        return out


def _recorded(case: _Case, model: Model) -> tuple[_Recording, _Recording]:
    """What `model` receives under init and under apply on its own variables."""
    recorder = _Kept(_Recording)
    hs = case.handlers + (recorder,)
    with case.running("the model" if model is case.model else "the model with steps removed"):
        _, variables = case.init(handlers=hs, fn=model)
        case.apply(variables, handlers=hs, fn=model)
    return recorder.runs[0], recorder.runs[-1]


def _common(a: dict, b: dict, same_length: bool = False) -> tuple[dict, dict]:
    shared = [k for k in a if k in b and (not same_length or len(a[k]) == len(b[k]))]
    return {k: a[k] for k in shared}, {k: b[k] for k in shared}


def check_locality(
    model: Model,
    x: Any,
    key: Any,
    handler: HandlerLike = None,
    *,
    drop: Any = None,
    training: bool = False,
) -> None:
    """A param's value and a path's keys do not change when requests at other paths are added or removed.

    Compares `model` with `model.drop(drop)` (positions in `model.walk()`;
    default: every second step) under init and apply: every param path, and
    every `(path, stream)` drawn from equally often in both, sees the same values.

    >>> from effax.testing.models import Draw, Param
    >>> check_locality(Model([Param("w0"), Draw(), Param("w1")]), jnp.ones(2), jax.random.key(0), drop=[0])
    """
    case = _case("locality", model, x, key, handler, training)
    drop = sorted(range(0, len(model.walk()), 2) if drop is None else drop)
    smaller = model.drop(drop)
    big, small = _recorded(case, model), _recorded(case, smaller)
    what = f"removing steps {drop} of `model.walk()` (leaving {smaller.requests() or 'no requests'}) changed"
    names = ("whole model", "steps removed")
    for label, b, s in (("init", big[0], small[0]), ("apply", big[1], small[1])):
        params = _common(b.params, s.params)
        case.expect_same(*params, f"{what} the param values the model received in {label}", names)
        keys = _common(b.keys, s.keys, same_length=True)
        case.expect_same(*keys, f"{what} the keys drawn at the paths kept, in {label}", names)


# --- law 3: init/apply agreement -----------------------------------------------------------------


def check_init_apply_agreement(
    model: Model, x: Any, key: Any, handler: HandlerLike = None, *, training: bool = False
) -> None:
    """`t.apply(t.init(k, x), x, rngs=k, mutable=True)[0]` equals `t.init_with_output(k, x)[0]`.

    >>> from effax.testing.models import Mode, State
    >>> check_init_apply_agreement(Model([State("s0"), Mode()]), jnp.ones(2), jax.random.key(0), training=True)
    """
    case = _case("init/apply agreement", model, x, key, handler, training)
    with case.running("`t.init_with_output`"):
        out_init, variables = case.init()
    with case.running("`t.apply` on the variables `t.init` made"):
        out_apply, _ = case.apply(variables)
    case.expect_same(
        out_init, out_apply, "the output of `t.init_with_output` differs from `t.apply` on its variables",
        ("init", "apply"),
    )


# --- law 4: abstract init ------------------------------------------------------------------------


def check_abstract_init(model: Model, x: Any, key: Any, handler: HandlerLike = None, *, training: bool = False) -> None:
    """`jax.eval_shape(t.init, k, x)` has the structure, shapes and dtypes of `t.init(k, x)`.

    >>> from effax.testing.models import Param
    >>> check_abstract_init(Model([Param("w0", (2, 3), "bfloat16")]), jnp.ones(2), jax.random.key(0))
    """
    case = _case("abstract init", model, x, key, handler, training)
    with case.running("`t.init`"):
        _, concrete = case.init()
    with case.running("`jax.eval_shape` of `t.init`"):
        t = case.transform()
        abstract = jax.eval_shape(
            lambda k, x: t.init(k, x, training=case.training, handlers=case.handlers), case.key, case.x
        )
    case.expect_same(
        concrete, abstract, "`jax.eval_shape(t.init, ...)` disagrees with `t.init`", ("t.init", "eval_shape"),
        values=False,
    )


# --- law 5: state --------------------------------------------------------------------------------


class _StateProbe:
    """Innermost: remembers every `set` and checks that each later `get` of that variable returns it."""

    def __init__(self) -> None:
        self.last: dict[Any, Any] = {}
        self.violations: list[str] = []

    def handle(self, request: Any, forward: Any) -> Any:
        slot = (getattr(request, "collection", None), request.path)
        if isinstance(request, fx.SetStateRequest):
            out = forward(request)
            self.last[slot] = request.value
            return out
        if isinstance(request, fx.GetStateRequest):
            got = forward(request)
            if slot in self.last:
                diff = difference(self.last[slot], got, names=("set", "got"))
                if diff is not None:
                    where = "/".join(request.path)
                    self.violations.append(
                        f"`get` of `{where}` in {request.collection!r} after a `set` returned another "
                        f"value than the last set\n  {diff}"
                    )
            return got
        return forward(request)


def check_state_laws(model: Model, x: Any, key: Any, handler: HandlerLike = None, *, training: bool = False) -> None:
    """Get after set returns the set value, the last of two sets wins, and frozen runs equal mutable ones.

    A probe innermost checks every `get` after a `set`, and `updates` holds
    the last value set; on `model.read_only()` (nothing set), `t.apply` with
    state frozen gives the output and state of a mutable run.

    >>> from effax.testing.models import State
    >>> check_state_laws(Model([State("s0", update="twice")]), jnp.ones(2), jax.random.key(0))
    """
    case = _case("state", model, x, key, handler, training)
    with case.running("`t.init_with_output`"):
        _, variables = case.init()
    probe = _Kept(_StateProbe)
    with case.running("`t.apply(..., mutable=True)`"):
        _, updates = case.apply(variables, handlers=case.handlers + (probe,))
    run = probe.runs[-1]
    if run.violations:
        raise case.fail(run.violations[0])
    for (collection, path), value in run.last.items():
        stored = get_path(updates.get(collection, {}), path)
        if stored is not MISSING:  # a handler keeping state itself reports it elsewhere
            what = f"`updates[{collection!r}]` at `{'/'.join(path)}` is not the last value set"
            case.expect_same(value, stored, what, ("last set", "updates"))
    frozen_model = model.read_only()
    case.model = frozen_model
    with case.running("`t.init_with_output` of the read-only model"):
        _, variables = case.init(fn=frozen_model)
    with case.running("`t.apply` of the read-only model with state frozen"):
        frozen = case.apply(variables, mutable=False, fn=frozen_model)
    with case.running("`t.apply` of the read-only model with state mutable"):
        out, updates = case.apply(variables, mutable=True, fn=frozen_model)
    what = "a model that sets nothing gives another output with state frozen than mutable"
    case.expect_same(frozen, out, what, ("frozen", "mutable"))
    for collection in variables.keys() & updates.keys():
        what = f"a model that sets nothing changed collection {collection!r} in a mutable run"
        case.expect_same(variables[collection], updates[collection], what, ("before", "after"))


# --- law 6: handler algebra ----------------------------------------------------------------------


def _results(case: _Case, handlers: tuple, fn: Any = None, what: str = "") -> tuple:
    with case.running(f"running the model {what}".rstrip()):
        out, variables = case.init(handlers=handlers, fn=fn)
        return (out, variables), case.apply(variables, handlers=handlers, fn=fn)


def check_forwarding_identity(
    model: Model, x: Any, key: Any, handler: HandlerLike = None, *, effects: Sequence[str] = (), training: bool = False
) -> None:
    """A forwarding handler is the identity: `fx.Handler()` anywhere in the stack changes nothing, and
    a handler run on a model without the `effects` it answers returns every forwarded answer unchanged.

    >>> from effax.testing.models import Param, SideInput
    >>> mask = fx.handlers.SideInputs({"mask": 0.0})
    >>> model = Model([Param("w0"), SideInput("mask")])
    >>> check_forwarding_identity(model, jnp.ones(2), jax.random.key(0), mask, effects=["side_input"])
    """
    unknown = [e for e in effects if e not in EFFECTS]
    if unknown:
        raise ValueError(f"unknown effects {unknown}; the kit knows {list(EFFECTS)}.")
    model = model.without(*effects)
    case = _case("forwarding identity", model, x, key, handler, training)
    reference = _results(case, case.handlers)
    forward = fx.Handler()
    for hs, where in (
        ((forward,) + case.handlers, "outside the handlers under test"),
        (case.handlers + (forward,), "inside the handlers under test"),
    ):
        what = f"a forwarding `fx.Handler()` {where} changed the results"
        case.expect_same(reference, _results(case, hs), what, ("without it", "with it"))
    if case.handlers:
        claimed = f"answers only {tuple(effects)}" if effects else "claims no effect"
        case.expect_same(
            _results(case, ()), reference,
            f"the handler under test {claimed}, yet on a model without those effects it changed the results; "
            "it must return `forward(request)` unchanged for requests it does not answer, or pass `effects=` "
            "naming what it answers",
            ("without it", "with it"),
        )


def check_commutes_with(
    model: Model, x: Any, key: Any, handler: HandlerLike, other: HandlerLike, *, training: bool = False
) -> None:
    """Handlers of disjoint effects commute: `handlers=(other, handler)` gives what `(handler, other)` gives.

    >>> from effax.testing.models import Mode, SideInput
    >>> mask, mode = fx.handlers.SideInputs({"mask": 0.0}), fx.handlers.Mode(True)
    >>> check_commutes_with(Model([SideInput("mask"), Mode()]), jnp.ones(2), jax.random.key(0), mask, mode)
    """
    case = _case("commutation", model, x, key, None, training)
    h, o = resolve(handler), resolve(other)
    case.handlers = h + o
    a = _results(case, h + o, what="with the other handler innermost")
    b = _results(case, o + h, what="with the handler under test innermost")
    case.expect_same(
        a, b,
        f"swapping the handler under test with {', '.join(_name(x) for x in o)} changed the results; they "
        "must answer disjoint effects, and neither may answer or perform the other's",
        ("other innermost", "handler under test innermost"),
    )


def _nested(model: Model, groups: Sequence[tuple]) -> Callable[[Any], Any]:
    def fn(x: Any) -> Any:
        with contextlib.ExitStack() as stack:
            for group in groups:
                stack.enter_context(fx.handle(*group))
            return model(x)

    return fn


def check_associativity(
    model: Model,
    x: Any,
    key: Any,
    handler: HandlerLike = None,
    *,
    outer: HandlerLike = None,
    inner: HandlerLike = None,
    training: bool = False,
) -> None:
    """Nesting is associative: `outer, handler, inner` give the same results however `fx.handle` groups them.

    Compared: all three in `handlers=`; `(outer)` then `handle(handler, inner)`
    inside; `(outer, handler)` then `handle(inner)`; and one `fx.handle` each.
    `outer` and `inner` default to forwarding `fx.Handler()`s.

    >>> from effax.testing.models import Param, SideInput
    >>> model, mask = Model([Param("w0"), SideInput("mask")]), fx.handlers.SideInputs({"mask": 0.0})
    >>> check_associativity(model, jnp.ones(2), jax.random.key(0), fx.handlers.InitParams(jax.random.key(1)),
    ...                     outer=mask)
    """
    case = _case("associativity", model, x, key, handler, training)
    o = resolve(outer) or (fx.Handler(),)
    i = resolve(inner) or (fx.Handler(),)
    h = case.handlers
    case.handlers = o + h + i
    flat = _results(case, o + h + i, what="with (outer, handler, inner) in one `fx.handle`")
    for label, hs, groups in (
        ("(outer), then (handler, inner)", o, [h + i]),
        ("(outer, handler), then (inner)", o + h, [i]),
        ("(outer), then (handler), then (inner)", (), [o, h, i]),
    ):
        nested = _results(case, hs, fn=_nested(model, groups), what=f"grouped {label}")
        case.expect_same(flat, nested, f"grouping the handlers as {label} changed the results", ("one group", label))


# --- law 7: sharing ------------------------------------------------------------------------------


def _path(name: str) -> tuple[str, ...]:
    return tuple(name.split("/"))


def _with(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """A copy of nested dicts `tree` with `value` at `path`."""
    head, rest = path[0], path[1:]
    return {**tree, head: _with(tree.get(head, {}), rest, value) if rest else value}


def check_sharing_laws(
    model: Model, x: Any, key: Any, bindings: Any, handler: HandlerLike = None, *, training: bool = False
) -> None:
    """A tied param appears once, its gradient is the sum of its per-use gradients, sharing twice equals once.

    `bindings` ties params of `model` (`strategies.share_bindings(model)`
    draws valid ones). The per-use gradients come from the untied model run
    on variables where each alias holds a copy of its canonical value.

    >>> from effax.testing.models import Param, Scope
    >>> model = Model([Param("w0", (2,)), Scope("blk0", [Param("w1", (2,))])])
    >>> check_sharing_laws(model, jnp.ones(2), jax.random.key(0), {"blk0/w1": "w0"})
    """
    case = _case("sharing", model, x, key, handler, training)
    bindings = dict(bindings)
    shared = fx.share(model, bindings)
    with case.running("`t.init` of `fx.share(model, bindings)`"):
        _, variables = case.init(fn=shared)
    params = variables["params"]
    for alias, canonical in bindings.items():
        if get_path(params, _path(alias)) is not MISSING:
            raise case.fail(f"the tied param `{alias}` appears in variables['params'] beside `{canonical}`")
        if get_path(params, _path(canonical)) is MISSING:
            raise case.fail(f"the canonical param `{canonical}` of `{alias}` is missing from variables['params']")
    once = _results(case, case.handlers, fn=shared, what="shared once")
    twice = _results(case, case.handlers, fn=fx.share(shared, bindings), what="shared twice")
    case.expect_same(once, twice, "sharing twice with the same bindings differs from sharing once", ("once", "twice"))

    untied = params
    for alias, canonical in bindings.items():
        untied = _with(untied, _path(alias), get_path(params, _path(canonical)))

    def loss(fn: Any) -> Callable[[Any], Any]:
        t = fx.transform(fn)
        return lambda p: jnp.sum(
            t.apply({**variables, "params": p}, case.x, rngs=case.key, mutable=True, training=case.training,
                    handlers=case.handlers)[0]
        )

    with case.running("`jax.grad` of the shared and the untied model"):
        got = jax.grad(loss(shared))(params)
        per_use = jax.grad(loss(model))(untied)
    expected = jax.tree.map(lambda g: g.astype(jnp.float32), per_use)
    for alias in bindings:
        expected = _strip(expected, _path(alias))
    for alias, canonical in bindings.items():
        c = _path(canonical)
        total = get_path(expected, c) + get_path(per_use, _path(alias)).astype(jnp.float32)
        expected = _with(expected, c, total)
    expected = jax.tree.map(lambda e, g: e.astype(g.dtype), expected, got)
    low = any(jnp.dtype(d) != jnp.float32 for _, d in model.param_specs().values())
    case.expect_same(
        expected, got, "the gradient of a tied param is not the sum of its per-use gradients",
        ("sum over the untied uses", "tied"), rtol=2e-2 if low else 1e-5, atol=2e-2 if low else 1e-6,
    )


def _strip(tree: dict, path: tuple[str, ...]) -> dict:
    """A copy of nested dicts `tree` without the leaf at `path` (and scopes it leaves empty)."""
    head, rest = path[0], path[1:]
    out = dict(tree)
    if rest:
        child = _strip(tree[head], rest)
        if child:
            out[head] = child
        else:
            del out[head]
    else:
        del out[head]
    return out


# --- law 8: purity -------------------------------------------------------------------------------


def check_purity_under_jit(
    model: Model,
    x: Any,
    key: Any,
    handler: HandlerLike = None,
    *,
    training: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> None:
    """`jax.jit(t.apply)` equals `t.apply`, no tracer leaks under `jax.checking_leaks()`, and a later eager run agrees.

    The one law that compiles; keep its `max_examples` small.

    >>> from effax.testing.models import Draw, Param
    >>> check_purity_under_jit(Model([Param("w0"), Draw()]), jnp.ones(2), jax.random.key(0))
    """
    case = _case("purity under jit", model, x, key, handler, training)
    with case.running("`t.init_with_output`"):
        _, variables = case.init()
    with case.running("eager `t.apply`"):
        eager = case.apply(variables)
    t = case.transform()

    def apply(v: Any, x: Any, k: Any) -> Any:
        return t.apply(v, x, rngs=k, mutable=True, training=case.training, handlers=case.handlers)

    with case.running("`jax.jit(t.apply)` under `jax.checking_leaks()`"):
        with jax.checking_leaks():
            jitted = jax.jit(apply)(variables, case.x, case.key)
    with case.running("eager `t.apply` after the jitted run"):
        again = case.apply(variables)
    what = "`jax.jit(t.apply)` gives other results than eager `t.apply`"
    case.expect_same(eager, jitted, what, ("eager", "jit"), rtol=rtol, atol=atol)
    what = "an eager `t.apply` after a jitted one gives other results than before it"
    case.expect_same(eager, again, what, ("before", "after"))


# --- partners for the algebra laws ---------------------------------------------------------------


def partner(effect: str) -> fx.Handler:
    """A built-in handler that answers only `effect`, to commute and nest with a handler of other effects.

    >>> from effax.testing import laws
    >>> laws.partner("mode").training
    True
    """
    if effect == "param":
        return fx.handlers.InitParams(jax.random.key(3))
    if effect == "state":
        return fx.handlers.FunctionalState({}, mutable=True)
    if effect == "random":
        return fx.handlers.KeysFromRngs(jax.random.key(7))
    if effect == "sow":
        return fx.handlers.CollectSown(True)
    if effect == "side_input":
        return fx.handlers.SideInputs({"mask": 3.0, "ctx": -2.0})
    if effect == "mode":
        return fx.handlers.Mode(True)
    raise ValueError(f"unknown effect {effect!r}; the kit knows {list(EFFECTS)}.")
