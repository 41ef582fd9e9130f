"""The laws of docs/design.md as checks on one model, input and key, for the handlers you write.

Each `check_*` runs a model (see `effax.testing.models`) through
`fx.transform` with your handler innermost (`handlers=`), the way users run
it, and raises `AssertionError` when the law does not hold. The message names
the law that failed, the request involved, and what differed in the terms of
the model (`variables after init['params'] at `blk0/w0``), then lists the
model's requests, so the smallest counterexample hypothesis finds reads as a
short list of requests.

Every run of every check also watches each request the model makes, just
inside your handler: an answer of another shape, dtype or kind than its
request (law 10), a key drawn twice in one run (law 11), a request changed
while it was handled (law 12), a `get` that misses the last `set` (law 5)
fail at once, under their own law, whichever check was running.

`handler` is a handler, a class or zero-argument factory (called once per
check, so state a buggy handler keeps on itself shows up within the check),
`None` (the built-in handlers alone), or a sequence of those (outermost
first). `LAWS` lists the laws once, in the order `assert_handler_laws` runs
them, with what each needs.

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

import collections
import contextlib
import contextvars
import copy
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import effax as fx
from effax.handlers._tree import MISSING, get_path
from effax.testing.models import EFFECTS, KNOWN_EFFECTS, LawKitError, LawKitTypeError, Model, _names

__all__ = [
    "check_determinism", "check_locality", "check_init_apply_agreement", "check_abstract_init",
    "check_state_laws", "check_forwarding_identity", "check_commutes_with", "check_associativity",
    "check_sharing_laws", "check_purity_under_jit", "check_answers_match_requests", "check_fresh_keys",
    "check_reuse", "check_reference", "performed_effects", "effect_of", "declared_effects", "difference", "tolerance",
    "partner", "resolve", "fresh_copies", "repeated_keys_allowed", "Law", "LAWS", "Subject", "check_lifting",
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
            raise LawKitTypeError(
                f"handler={handler!r:.60} (type {type(handler).__name__}) is neither a handler nor a factory of "
                "handlers: pass an `fx.Handler` instance (`MyHandler()`), its class or a function making one "
                "(`MyHandler`, `lambda: MyHandler(3)`), None, or a list of those."
            )
        return resolve(handler())
    return (handler,)


def fresh_copies(handler: HandlerLike) -> Callable[[], tuple[Any, ...]]:
    """A maker of fresh handler instances: deep copies of `handler` as it is now, before any run.

    Copies are taken of a pristine instance, so state a handler shares with
    its siblings (a mutable default argument, a class attribute) is not
    shared with the copies; a handler that cannot be copied is made again
    by its factory (or, for an instance, reused as it is).

    >>> fresh = fresh_copies(lambda: fx.handlers.SideInputs({"mask": 1.0}))
    >>> a, b = fresh(), fresh()
    >>> a[0] is not b[0] and a[0].values == b[0].values
    True
    """
    template = resolve(handler)
    try:
        pristine: tuple[Any, ...] | None = copy.deepcopy(template)
    except Exception:
        pristine = None

    def fresh() -> tuple[Any, ...]:
        if pristine is not None:
            with contextlib.suppress(Exception):
                return copy.deepcopy(pristine)
        return resolve(handler)

    return fresh


def _name(h: Any) -> str:
    if type(h).__repr__ is not object.__repr__:
        return repr(h)
    return f"{type(h).__name__}()"


_KINDS: dict[type, str] = {
    fx.ParamRequest: "param",
    fx.LocalStateRequest: "state",
    fx.GetStateRequest: "state",
    fx.SetStateRequest: "state",
    fx.RandomRequest: "random",
    fx.StreamKeyRequest: "random",
    fx.SideOutputRequest: "sow",
    fx.SideInputRequest: "side_input",
    fx.ModeRequest: "mode",
    fx.ModuleCallRequest: "module_call",
}


def effect_of(request: Any) -> str | None:
    """The kit's effect name (see `effax.testing.models.EFFECTS`) of a request or request class, or None.

    >>> effect_of(fx.ModeRequest(())), effect_of(fx.GetStateRequest)
    ('mode', 'state')
    """
    for cls in (request if isinstance(request, type) else type(request)).__mro__:
        if cls in _KINDS:
            return _KINDS[cls]
    return None


def declared_effects(handler: HandlerLike) -> tuple[str, ...] | None:
    """The effects the handlers declare they answer (`answers = (...)` on their classes), or None if any does not.

    >>> class Masks(fx.Handler):
    ...     answers = (fx.SideInputRequest,)
    >>> declared_effects(Masks)
    ('side_input',)
    """
    if isinstance(handler, (list, tuple)):
        parts = [declared_effects(h) for h in handler if h is not None]
        if any(p is None for p in parts):
            return None
        return tuple(dict.fromkeys(e for p in parts for e in p or ()))
    if not isinstance(handler, type) and not callable(getattr(handler, "handle", None)):
        if not callable(handler):
            return None
        made = handler()  # a factory (`lambda: Masks(cfg)`): what it makes declares it (the kit calls it anyway)
        return None if made is handler else declared_effects(made)
    answers = getattr(handler, "answers", None)
    if answers is None:
        return None
    if not isinstance(answers, tuple | list):  # as the interpreter refuses it, on entry
        name = handler.__name__ if isinstance(handler, type) else type(handler).__name__
        raise fx.EffaxError(
            f"{name}.answers is {answers!r}: it must be a tuple of request classes, "
            "`answers = (fx.ParamRequest, ...)`, or None (the handler sees every request)."
        )
    return tuple(dict.fromkeys(e for e in map(effect_of, answers) if e is not None))


# --- comparing results ---------------------------------------------------------------------------


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _spec(x: Any) -> tuple[tuple[int, ...], str]:
    if _is_key(x):
        return tuple(np.shape(x)), str(x.dtype)
    dtype = getattr(x, "dtype", None)
    dtype = np.asarray(x).dtype if dtype is None else dtype
    return tuple(np.shape(x)), jnp.dtype(jax.dtypes.canonicalize_dtype(dtype)).name


def _show_spec(x: Any) -> str:
    """The spec as given (a NumPy float64 answer reads float64, though it compares as the float32 it becomes)."""
    shape, dtype = _spec(x)
    raw = getattr(x, "dtype", None)
    if raw is not None and not _is_key(x):
        dtype = jnp.dtype(raw).name
    return f"shape {shape}, {dtype}"


def _leaf(x: Any) -> np.ndarray:
    if _is_key(x):
        with jax.ensure_compile_time_eval():  # a concrete key met inside a trace: its data stays concrete
            return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


_PRECISION = {"float64": 0, "float32": 1, "float16": 2, "bfloat16": 3}
_TOLERANCE = {0: (1e-7, 1e-9), 1: (1e-5, 1e-6), 2: (2e-3, 2e-3), 3: (3e-2, 3e-2)}


def tolerance(*dtypes: Any) -> tuple[float, float]:
    """`(rtol, atol)` for values computed at the lowest float precision among `dtypes` (bfloat16 is not float32).

    >>> tolerance("float32")
    (1e-05, 1e-06)
    >>> tolerance("float32", jnp.bfloat16)
    (0.03, 0.03)
    """
    worst = 1
    for d in dtypes:
        with contextlib.suppress(TypeError):
            worst = max(worst, _PRECISION.get(jnp.dtype(d).name, 1))
    return _TOLERANCE[worst]


def _float_dtypes(tree: Any) -> set[str]:
    out = set()
    for x in jax.tree.leaves(tree):
        dtype = getattr(x, "dtype", None)
        if dtype is not None and not _is_key(x) and jnp.issubdtype(dtype, jnp.floating):
            out.add(jnp.dtype(dtype).name)
    return out


_RESULTS = ("output of init", "variables after init", "output of apply", "updates after apply")


def _labeled(labels: Sequence[str], values: Sequence[Any]) -> collections.OrderedDict:
    """Results under their names, in run order (an `OrderedDict` keeps it when flattened)."""
    return collections.OrderedDict(zip(labels, values, strict=True))


def _where(path: Any) -> str:
    """A key path in user terms: `variables after init['params'] at `blk0/w0``, never `[0][0]`."""
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    if not keys:
        return "the whole value"
    head, rest = keys[0], keys[1:]
    if head in _RESULTS:
        if not rest:
            return str(head)
        if head.startswith("output"):
            return f"{head} at {list(rest)}"
        collection, rest = rest[0], rest[1:]
        names = [str(k) for k in rest if isinstance(k, str)]
        count = [k for k in rest if isinstance(k, int)]
        where = f"{head}[{collection!r}]" + (f" at `{'/'.join(names)}`" if names else "")
        return where + (f", value {count[0]} sown" if count else "")
    text = "/".join(str(k) for k in keys)
    return text if "`" in text else f"`{text}`"


def _paths(leaves: Sequence[Any]) -> str:
    names = [_where(p) for p, _ in leaves]
    return ", ".join(names[:8]) + (f", ... ({len(names)} leaves)" if len(names) > 8 else "") or "(no leaves)"


def _short(x: np.ndarray) -> str:
    flat = x.reshape(-1)
    text = np.array2string(flat[:6], precision=6, separator=", ")
    return text[:-1] + ", ...]" if flat.size > 6 else text


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
    'at `w`: [0., 0.] (init) vs [1., 1.] (apply)'
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
            return f"at {_where(path)}: {_short(x)} ({names[0]}) vs {_short(y)} ({names[1]})"
    return None


# --- the watch: laws 5, 10, 11 and 12 checked on every request of every run -----------------------


class _Violation(AssertionError):
    """Raised inside a run by the watch; the running check reports it under `law`."""

    def __init__(self, law: str, what: str, detail: str | None = None):
        super().__init__(f"effax law `{law}` does not hold: {what}")
        self.law, self.what, self.detail = law, what, detail


def _concrete(x: Any) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


def _snapshot(request: Any) -> list[tuple[str, Any, list[Any]]]:
    """Each field of a request with the identity of what it holds (its pytree leaves)."""
    out = []
    for field in dataclasses.fields(request):
        value = getattr(request, field.name)
        leaves, treedef = jax.tree.flatten(value)
        out.append((field.name, treedef, leaves))
    return out


def _changed(request: Any, before: list[tuple[str, Any, list[Any]]]) -> str | None:
    for name, treedef, leaves in before:
        now, now_def = jax.tree.flatten(getattr(request, name))
        if now_def != treedef or len(now) != len(leaves) or any(a is not b for a, b in zip(now, leaves, strict=True)):
            return name
    return None


_REPEATS_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("effax_testing_repeats", default=False)


@contextlib.contextmanager
def repeated_keys_allowed() -> Iterator[None]:
    """Within the block, the watch does not require fresh keys: for models that ask for repetition.

    Law 11 excepts draws the user asked to repeat (`split_rngs=False` in a
    lifted transform); a check of such a model runs inside this block.

    >>> from effax.testing.models import Draw
    >>> class SameKey(fx.Handler):
    ...     def handle(self, request, forward):
    ...         return jax.random.key(0) if isinstance(request, fx.RandomRequest) else forward(request)
    >>> with repeated_keys_allowed():
    ...     check_determinism(Model([Draw(times=2)]), jnp.ones(2), jax.random.key(0), SameKey)
    """
    token = _REPEATS_ALLOWED.set(True)
    try:
        yield
    finally:
        _REPEATS_ALLOWED.reset(token)


class _Watch(fx.Handler):
    """Innermost in every run of every check; keeps its runs so a check can read them afterwards."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep  # not under `jax.jit`: a kept run would hold its tracers
        self.runs: list[_WatchRun] = []

    def begin(self) -> _WatchRun:
        run = _WatchRun()
        if self.keep:
            self.runs.append(run)
        return run


class _WatchRun:
    module_calls = False

    def __init__(self) -> None:
        self.keys: dict[bytes, str] = {}
        self.draws: dict[tuple[str, Any], int] = {}
        self.declared: dict[tuple[str, Any], Any] = {}
        self.last_set: dict[tuple[str, Any], Any] = {}
        self.answered: list[tuple[Any, Any]] = []
        self.dtypes: set[str] = set()

    def handle(self, request: Any, forward: Any) -> Any:
        before = _snapshot(request)
        kind = type(request)
        set_value = request.value if kind is fx.SetStateRequest else None
        out = forward(request)
        field = _changed(request, before)
        if field is not None:
            raise _Violation(
                "reuse",
                f"the handler under test changed {request.describe()} while handling it (its field "
                f"`{field}`)",
                "a request is shared with the model and every other handler: never change it in place; "
                "forward a new one, `forward(dataclasses.replace(request, ...))`",
            )
        if kind is fx.ParamRequest:
            self._param(request, out)
        elif kind is fx.LocalStateRequest:
            self._declare(request)
        elif kind is fx.GetStateRequest:
            self._get(request, out)
        elif kind is fx.SetStateRequest:
            self.last_set[(request.collection, request.path)] = set_value
        elif kind is fx.RandomRequest or kind is fx.StreamKeyRequest:
            self._key(request, out)
        elif kind is fx.ModeRequest and not isinstance(out, (bool, np.bool_)):
            raise _Violation(
                "answers match requests",
                f"{request.describe()} was answered with {type(out).__name__} {out!r}, not a Python bool",
                "`fx.is_training()` decides which program runs: answer it with True or False",
            )
        if kind in (fx.ParamRequest, fx.GetStateRequest, fx.RandomRequest, fx.StreamKeyRequest,
                    fx.SideInputRequest, fx.ModeRequest):
            self.answered.append((request, out))
        return out

    def _param(self, request: Any, out: Any) -> None:
        want = (tuple(request.shape), jnp.dtype(jax.dtypes.canonicalize_dtype(request.dtype)).name)
        if not hasattr(out, "shape") or _is_key(out) or _spec(out) != want:
            got = _show_spec(out) if hasattr(out, "shape") else type(out).__name__
            raise _Violation(
                "answers match requests",
                f"{request.describe()} was answered with {got}",
                f"the model asked for shape {want[0]}, {want[1]}: a param answer must have the shape and "
                "dtype of its request (cast or reshape inside the handler)",
            )
        self.dtypes.add(want[1])

    def _declare(self, request: Any) -> None:
        slot = (request.collection, request.path)
        if slot not in self.declared:
            try:
                self.declared[slot] = jax.eval_shape(request.init)
            except Exception:
                self.declared[slot] = None

    def _get(self, request: Any, out: Any) -> None:
        slot = (request.collection, request.path)
        declared = self.declared.get(slot)
        if declared is not None:
            diff = difference(declared, out, names=("declared by its init()", "answered"), values=False)
            if diff is not None:
                raise _Violation(
                    "answers match requests",
                    f"{request.describe()} was answered with a value unlike the variable's `init()`",
                    diff.replace("at the whole value: ", ""),
                )
        if slot in self.last_set:
            last = self.last_set[slot]
            if out is last or not (_concrete(out) and _concrete(last)):
                return
            diff = difference(last, out, names=("last set", "got"), **dict(zip(("rtol", "atol"), tolerance(
                *_float_dtypes(last)), strict=True)))
            if diff is not None:
                raise _Violation(
                    "state",
                    f"`get` of `{'/'.join(request.path)}` in {request.collection!r} after a `set` returned "
                    "another value than the last set",
                    diff.replace("at the whole value: ", ""),
                )

    def _key(self, request: Any, out: Any) -> None:
        if not _is_key(out) or np.shape(out) != ():
            got = _show_spec(out) if hasattr(out, "shape") else type(out).__name__
            raise _Violation(
                "answers match requests",
                f"{request.describe()} was answered with {got}, not one typed key",
                "answer key requests with a scalar `jax.random.key` (wrap raw uint32 data with "
                "`jax.random.wrap_key_data`)",
            )
        if type(request) is not fx.RandomRequest:
            return
        slot = (request.stream, request.path)
        n = self.draws.get(slot, 0)
        self.draws[slot] = n + 1
        if not _concrete(out) or _REPEATS_ALLOWED.get():
            return
        data = _leaf(out).tobytes()
        where = f"draw {n} from stream {request.stream!r} at `{'/'.join(request.path) or '<root>'}`"
        if data in self.keys:
            raise _Violation(
                "fresh keys",
                f"{where} returned the same key as {self.keys[data]}",
                "every `next_key` of a run must be new: fold in the path, the stream and a per-run "
                "draw counter (`jax.random.fold_in(base, n)`)",
            )
        self.keys[data] = where


# --- running a model and reporting a failure -----------------------------------------------------


class _Case:
    """One model, input, key and mode, run with the handlers under test; failures raise AssertionError."""

    def __init__(self, law: str, model: Model, x: Any, key: Any, handlers: tuple[Any, ...], training: bool):
        self.law, self.model, self.x, self.key = law, model, x, key
        self.handlers, self.training = handlers, training
        self.notes: list[str] = []
        self.watch = _Watch()

    def init(self, handlers: Any = None, fn: Any = None) -> tuple[Any, dict]:
        hs = tuple(self.handlers if handlers is None else handlers) + (self.watch,)
        t = fx.transform(self.model if fn is None else fn)
        return t.init_with_output(self.key, self.x, training=self.training, handlers=hs)

    def apply(self, variables: Any, mutable: Any = True, handlers: Any = None, fn: Any = None) -> Any:
        hs = tuple(self.handlers if handlers is None else handlers) + (self.watch,)
        t = fx.transform(self.model if fn is None else fn)
        return t.apply(variables, self.x, rngs=self.key, mutable=mutable, training=self.training, handlers=hs)

    def results(
        self, handlers: Any = None, fn: Any = None, what: str = "", apply_handlers: Any = None, plain: Any = None
    ) -> dict:
        """Output and variables of `init_with_output`, then output and updates of `apply` on them.

        `plain` is `fn` without any handler it installs itself, for the rerun an error triggers."""
        with self.running(f"running the model{' ' + what if what else ''}", fn if plain is None else plain):
            out, variables = self.init(handlers=handlers, fn=fn)
            hs = handlers if apply_handlers is None else apply_handlers
            applied, updates = self.apply(variables, handlers=hs, fn=fn)
        return _labeled(_RESULTS, (out, variables, applied, updates))

    def fail(
        self, what: str, detail: str | None = None, law: str | None = None, verdict: str = "does not hold"
    ) -> AssertionError:
        key = _leaf(self.key).tolist() if self.key is not None else None
        handlers = ", ".join(_name(h) for h in self.handlers) or "none (the built-in handlers alone)"
        lines = [
            f"effax law `{law or self.law}` {verdict}: {what}",
            *[f"  {line}" for line in (detail or "").splitlines() if line],
            f"model: {self.model!r}".replace("\n", "\n  "),
            f"x = {np.asarray(self.x).tolist()}, key data = {key}, training = {self.training}",
            f"handlers under test (innermost last): {handlers}",
            *self.notes,
            f"rebuild the model: {self.model.code()}",
        ]
        return AssertionError("\n".join(lines))

    @contextlib.contextmanager
    def running(self, what: str, fn: Any = None) -> Iterator[None]:
        """Report a violation the watch saw, or an error raised running `fn` (default: the model), as a failure."""
        try:
            yield
        except _Violation as v:
            raise self.fail(v.what, v.detail, law=v.law) from None
        except AssertionError:
            raise
        except Exception as e:
            raise self._raised(what, e, self.model if fn is None else fn) from e

    def _raised(self, what: str, error: Exception, fn: Any) -> AssertionError:
        """An error is no difference the law compares: say that the model raised, and whether it raises
        without the handlers under test too (one plain `init` and `apply`), which says whose fault it is."""
        shown = f"{type(error).__name__}: " + "\n".join(str(error).splitlines()[:6])
        plain = f"`t.init_with_output` then `t.apply` of the {'model' if fn is self.model else 'same function'} " \
                "with the built-in handlers alone"
        try:
            t = fx.transform(fn)
            _, variables = t.init_with_output(self.key, self.x, training=self.training)
            t.apply(variables, self.x, rngs=self.key, mutable=True, training=self.training)
        except Exception as again:
            return self.fail(
                f"{what} raised {type(error).__name__} while the law ran, and the model raises without the "
                "handlers under test too",
                f"{shown}\n{plain} raise {type(again).__name__} as well: the model or the case is at fault, not "
                "the handler under test (check the model, its input and key, or the bindings given)",
                verdict="could not be checked",
            )
        return self.fail(
            f"{what} raised {type(error).__name__} while the law ran, and only with the handlers under test",
            f"{shown}\n{plain} run: the handler under test causes the error (with what it answers, or with "
            "the requests it makes or forwards)",
        )

    def expect_same(
        self, a: Any, b: Any, what: str, names: tuple[str, str], advice: str = "", **tolerance: Any
    ) -> None:
        diff = difference(a, b, names=names, **tolerance)
        if diff is not None:
            raise self.fail(what, diff + (f"\n{advice}" if advice else ""))


def _case(law: str, model: Model, x: Any, key: Any, handler: HandlerLike, training: bool) -> _Case:
    if not isinstance(model, Model):
        raise LawKitTypeError(
            f"the laws run an `effax.testing.models.Model`, got {type(model).__name__}: draw one with "
            "`effax.testing.strategies.models()` or build one, `Model([Param('w0')])`."
        )
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
        _labeled(_RESULTS[:2], first), _labeled(_RESULTS[:2], second),
        "two runs of `t.init_with_output` with the same key and input differ", ("run 1", "run 2"), _DETERMINISM,
    )
    variables = first[1] if variables is None else variables
    with case.running("`t.apply(..., mutable=True)`"):
        first, second = case.apply(variables), case.apply(variables)
    case.expect_same(
        _labeled(_RESULTS[2:], first), _labeled(_RESULTS[2:], second),
        "two runs of `t.apply` with the same variables, inputs and keys differ", ("run 1", "run 2"), _DETERMINISM,
    )


_DETERMINISM = (
    "an answer may depend only on what the run is given: keep no state on the handler instance across runs "
    "(per-run state belongs on the object `begin()` returns), derive keys from the run's key with "
    "`jax.random.fold_in` (or forward key requests), and read no NumPy or Python global RNG, clock or counter"
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

    module_calls = False

    def __init__(self) -> None:
        self.params: dict[Any, Any] = {}
        self.keys: dict[Any, list[Any]] = {}

    def handle(self, request: Any, forward: Any) -> Any:
        out = forward(request)
        if isinstance(request, fx.ParamRequest):
            self.params.setdefault(f"param `{'/'.join(request.path)}`", out)
        elif isinstance(request, (fx.RandomRequest, fx.StreamKeyRequest)):
            op = "next_key" if isinstance(request, fx.RandomRequest) else "stream_key"
            slot = f"{op}({request.stream!r}) at `{'/'.join(request.path) or '<root>'}`"
            self.keys.setdefault(slot, []).append(out)
        return out


def _recorded(case: _Case, model: Model) -> tuple[_Recording, _Recording]:
    """What `model` receives under init and under apply on its own variables."""
    recorder = _Kept(_Recording)
    hs = case.handlers + (recorder,)
    with case.running("the model" if model is case.model else "the model with steps removed", model):
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
    case.notes.append(f"removed: steps {drop} of `model.walk()`, leaving {smaller.requests() or 'no requests'}")
    big, small = _recorded(case, model), _recorded(case, smaller)
    what = "removing requests at other paths changed"
    names = ("whole model", "steps removed")
    for label, b, s in (("init", big[0], small[0]), ("apply", big[1], small[1])):
        params = _common(b.params, s.params)
        case.expect_same(*params, f"{what} a param value the model received in {label}", names,
                         "derive a param's value from its own path (`request.initialize(jax.random.fold_in(key, "
                         "zlib.crc32('/'.join(request.path).encode())))`; not Python's `hash()`, which is salted per "
                         "process), never from a counter shared across paths (call order)")
        keys = [{f"{slot}, draw {n}": k for slot, ks in side.items() for n, k in enumerate(ks)}
                for side in _common(b.keys, s.keys, same_length=True)]
        case.expect_same(*keys, f"{what} a key drawn at a path that was kept, in {label}", names,
                         "derive a key from the request's path and stream (`jax.random.fold_in` of a hash of "
                         "each), then a draw count kept per (path, stream); never from a counter shared across "
                         "paths or streams")


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
        t = fx.transform(case.model)
        hs = case.handlers + (case.watch,)
        abstract = jax.eval_shape(lambda k, x: t.init(k, x, training=case.training, handlers=hs), case.key, case.x)
    case.expect_same(
        {"variables after init": concrete}, {"variables after init": abstract},
        "`jax.eval_shape(t.init, ...)` disagrees with `t.init`", ("t.init", "eval_shape"), values=False,
    )


# --- law 5: state --------------------------------------------------------------------------------


def check_state_laws(model: Model, x: Any, key: Any, handler: HandlerLike = None, *, training: bool = False) -> None:
    """Get after set returns the set value, the last of two sets wins, and frozen runs equal mutable ones.

    Every `get` after a `set` is compared with the value the model set (as
    it was when the model set it, not as the request holds it afterwards),
    and `updates` holds the last value set; on `model.read_only()` (nothing
    set), `t.apply` with state frozen gives the output and state of a
    mutable run.

    >>> from effax.testing.models import State
    >>> check_state_laws(Model([State("s0", update="twice")]), jnp.ones(2), jax.random.key(0))
    """
    case = _case("state", model, x, key, handler, training)
    with case.running("`t.init_with_output`"):
        _, variables = case.init()
    with case.running("`t.apply(..., mutable=True)`"):
        _, updates = case.apply(variables)
    for (collection, path), value in case.watch.runs[-1].last_set.items():
        stored = get_path(updates.get(collection, {}), path)
        if stored is not MISSING:  # a handler keeping state itself answers the gets, checked above
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
    effects = _names(effects, "effects", KNOWN_EFFECTS, "effects")
    model = model.without(*effects)
    case = _case("forwarding identity", model, x, key, handler, training)
    reference = case.results()
    forward = fx.Handler()
    for hs, where in (
        ((forward,) + case.handlers, "outside the handlers under test"),
        (case.handlers + (forward,), "inside the handlers under test"),
    ):
        what = f"a forwarding `fx.Handler()` {where} changed the results"
        case.expect_same(reference, case.results(hs, what=f"with `fx.Handler()` {where}"), what,
                         ("without it", "with it"))
    if case.handlers:
        claimed = f"answers only {tuple(effects)}" if effects else "claims no effect"
        case.expect_same(
            case.results((), what="without the handlers under test"), reference,
            f"the handler under test {claimed}, yet on a model without those effects it changed the results; "
            "it must return `forward(request)` unchanged for requests it does not answer, or pass `effects=` "
            "naming what it answers",
            ("without it", "with it"),
        )


def check_commutes_with(
    model: Model, x: Any, key: Any, handler: HandlerLike, other: HandlerLike, *, training: bool = False
) -> None:
    """Handlers of disjoint effects commute: `handlers=(other, handler)` gives what `(handler, other)` gives.

    Disjoint means neither answers, nor performs, what the other answers
    (`performed_effects` finds what a handler performs; `assert_handler_laws`
    picks partners accordingly).

    >>> from effax.testing.models import Mode, SideInput
    >>> mask, mode = fx.handlers.SideInputs({"mask": 0.0}), fx.handlers.Mode(True)
    >>> check_commutes_with(Model([SideInput("mask"), Mode()]), jnp.ones(2), jax.random.key(0), mask, mode)
    """
    case = _case("commutation", model, x, key, None, training)
    h, o = resolve(handler), resolve(other)
    case.handlers = h + o
    a = case.results(h + o, what="with the other handler innermost")
    b = case.results(o + h, what="with the handler under test innermost")
    case.expect_same(
        a, b,
        f"swapping the handler under test with {', '.join(_name(x) for x in o)} changed the results; they "
        "must answer disjoint effects, and neither may answer what the other performs",
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
    flat = case.results(o + h + i, what="with (outer, handler, inner) in one `fx.handle`")
    for label, hs, groups in (
        ("(outer), then (handler, inner)", o, [h + i]),
        ("(outer, handler), then (inner)", o + h, [i]),
        ("(outer), then (handler), then (inner)", (), [o, h, i]),
    ):
        nested = case.results(hs, fn=_nested(model, groups), what=f"grouped {label}", plain=model)
        case.expect_same(flat, nested, f"grouping the handlers as {label} changed the results", ("one group", label))


_FORWARDED: contextvars.ContextVar[bool] = contextvars.ContextVar("effax_testing_forwarded", default=False)


class _Marked(fx.Handler):
    """Wraps a handler under test: what it forwards is marked, so `_Performed` tells it from what it performs."""

    def __init__(self, inner: Any):
        self.inner = inner

    def begin(self) -> Any:
        run = self.inner.begin() if hasattr(self.inner, "begin") else self.inner
        return _MarkedRun(run, getattr(self.inner, "answers", None))


class _MarkedRun:
    def __init__(self, run: Any, handler_answers: Any = None):
        self.run = run
        self.module_calls = getattr(run, "module_calls", True)
        # sent only what the wrapped run answers: its own declaration, else its handler's (as the interpreter)
        answers = getattr(run, "answers", None)
        self.answers = handler_answers if answers is None else answers

    def handle(self, request: Any, forward: Any) -> Any:
        def marked(r: Any) -> Any:
            token = _FORWARDED.set(True)
            try:
                return forward(r)
            finally:
                _FORWARDED.reset(token)

        return self.run.handle(request, marked)


class _Performed(fx.Handler):
    """Just outside a `_Marked` handler: records the effects of the requests that handler performs itself."""

    module_calls = False

    def __init__(self, sink: set[str]):
        self.sink = sink

    def handle(self, request: Any, forward: Any) -> Any:
        if not _FORWARDED.get():
            effect = effect_of(request)
            if effect is not None:
                self.sink.add(effect)
        token = _FORWARDED.set(False)
        try:
            return forward(request)
        finally:
            _FORWARDED.reset(token)


def performed_effects(
    model: Model, x: Any, key: Any, handler: HandlerLike, *, training: bool = False
) -> frozenset[str]:
    """The effects the handlers perform themselves while the model runs (not those they forward).

    A handler's `effects` name what it answers; what it performs (`fx.is_training()`
    or `fx.next_key` inside `handle`, a LoRA adapter's own `fx.param`) is
    answered further out, so it must not be commuted with a handler of that effect.

    >>> class TrainOnlyScale(fx.Handler):
    ...     def handle(self, request, forward):
    ...         out = forward(request)
    ...         return out * 2 if isinstance(request, fx.ParamRequest) and fx.is_training() else out
    >>> from effax.testing.models import Param
    >>> sorted(performed_effects(Model([Param("w0")]), jnp.ones(2), jax.random.key(0), TrainOnlyScale))
    ['mode']
    """
    case = _case("commutation", model, x, key, handler, training)
    sink: set[str] = set()
    wrapped = tuple(w for h in case.handlers for w in (_Performed(sink), _Marked(h)))
    case.results(wrapped, what="to learn which effects the handler under test performs")
    return frozenset(sink)


# --- law 7: sharing ------------------------------------------------------------------------------


def _path(name: str) -> tuple[str, ...]:
    return tuple(name.split("/"))


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(k.key) for k in path): value for path, value in leaves}


def _unflat(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


class _Untie(fx.Handler):
    """Outermost of the handlers under test: each use a share pass moved gets a storage slot of its own.

    The handlers under test still see the request as `fx.share` made it (the
    canonical path), so the untied run differs from the tied one only in
    where the params are stored: the reference for per-use gradients.
    """

    module_calls = False

    def __init__(self) -> None:
        self.own: dict[tuple[str, ...], tuple[str, ...]] = {}

    def handle(self, request: Any, forward: Any) -> Any:
        if type(request) is fx.ParamRequest and request.via:
            own = request.path[:-1] + (request.path[-1] + "@" + "|".join(request.original_path),)
            self.own[own] = request.path
            return forward(dataclasses.replace(request, path=own, origin=None, via=()))
        return forward(request)


class _Stored(fx.Handler):
    """Outermost of the handlers under test: records the param requests that reach the storage."""

    module_calls = False

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def handle(self, request: Any, forward: Any) -> Any:
        if type(request) is fx.ParamRequest:
            self.requests.append(request)
        return forward(request)


def check_sharing_laws(
    model: Model, x: Any, key: Any, bindings: Any, handler: HandlerLike = None, *, training: bool = False
) -> None:
    """A tied param is stored once, its gradient is the sum of its per-use gradients, sharing twice equals once.

    `bindings` ties params of `model` (`strategies.sharing_cases()` draws
    models with valid ones). The per-use gradients come from the same shared
    model with each use stored apart (every handler under test sees the very
    requests it sees when tied, canonical paths included), holding a copy of
    the tied value; so handlers that depend on the path, prefix it, keep
    params of their own or answer without forwarding are compared fairly.

    >>> from effax.testing.models import Param, Scope
    >>> model = Model([Param("w0", (2,)), Scope("blk0", [Param("w1", (2,))])])
    >>> check_sharing_laws(model, jnp.ones(2), jax.random.key(0), {"blk0/w1": "w0"})
    """
    case = _case("sharing", model, x, key, handler, training)
    bindings = dict(bindings)
    case.notes.append(f"share bindings: {bindings}")
    shared = fx.share(model, bindings)
    stored = _Stored()
    with case.running("`t.init` of `fx.share(model, bindings)`", shared):
        _, variables = case.init(handlers=(stored,) + case.handlers, fn=shared)
    aliases = [_path(a) for a in bindings]
    for request in stored.requests:
        if any(request.path[: len(a)] == a for a in aliases):
            raise case.fail(
                f"a param reached the params storage at the alias path `{'/'.join(request.path)}`, which the "
                "bindings tie to another: the handler under test undid the tie",
                "forward what `fx.share` made (`request.path` is the canonical path), not `request.original_path`",
            )
    once = case.results(fn=shared, what="shared once")
    twice = case.results(fn=fx.share(shared, bindings), what="shared twice")
    case.expect_same(once, twice, "sharing twice with the same bindings differs from sharing once", ("once", "twice"))

    untie = _Untie()
    untied_handlers = (untie,) + case.handlers
    with case.running("`t.init` of the shared model with each use stored apart", shared):
        _, untied_variables = case.init(handlers=untied_handlers, fn=shared)
    tied = _flat(variables["params"])
    try:
        untied = {p: tied[untie.own.get(p, p)] for p in _flat(untied_variables["params"])}
    except KeyError as e:
        raise case.fail(
            f"the untied run stored param `{'/'.join(e.args[0])}`, which the tied run did not make"
        ) from None
    untied_params = _unflat(untied)
    low = tolerance(*_float_dtypes(variables["params"]), *(d for _, d in model.param_specs().values()))

    def loss(handlers: Any, params: Any, base: Any) -> Any:
        t = fx.transform(shared)
        hs = tuple(handlers) + (case.watch,)
        out, _ = t.apply({**base, "params": params}, case.x, rngs=case.key, mutable=True, training=case.training,
                         handlers=hs)
        return jnp.sum(out.astype(jnp.float32)), out

    with case.running("`jax.grad` of the tied model and of the model with each use stored apart", shared):
        (_, out_tied), got = jax.value_and_grad(
            lambda p: loss(case.handlers, p, variables), has_aux=True)(variables["params"])
        (_, out_untied), per_use = jax.value_and_grad(
            lambda p: loss(untied_handlers, p, untied_variables), has_aux=True)(untied_params)
    rtol, atol = low
    case.expect_same(
        {"output of apply": out_tied}, {"output of apply": out_untied},
        "the tied model and the model with each use stored apart (holding equal values) give other outputs",
        ("tied", "stored apart"), rtol=rtol, atol=atol,
    )
    expected: dict[tuple[str, ...], Any] = {}
    for path, g in _flat(per_use).items():
        slot = untie.own.get(path, path)
        expected[slot] = expected.get(slot, 0.0) + np.asarray(g, np.float64)
    got_flat = {p: np.asarray(g, np.float64) for p, g in _flat(got).items()}
    scale = max([1.0] + [float(np.max(np.abs(g))) for g in got_flat.values() if g.size])
    case.expect_same(
        {"gradient": _unflat(expected)}, {"gradient": _unflat(got_flat)},
        "the gradient of a tied param is not the sum of its per-use gradients",
        ("sum over the uses stored apart", "tied"), rtol=rtol, atol=atol * scale,
    )


# --- law 8: purity -------------------------------------------------------------------------------


def check_purity_under_jit(
    model: Model,
    x: Any,
    key: Any,
    handler: HandlerLike = None,
    *,
    training: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """`jax.jit(t.apply)` equals `t.apply`, no tracer leaks under `jax.checking_leaks()`, and a later eager run agrees.

    `rtol`/`atol` default to `tolerance` of the lowest float precision among
    the model's params and the results (bfloat16 is compared at bfloat16's
    precision). The one law that compiles. A tracer kept on a handler is
    found by looking through its attributes after the jitted run, at once;
    `jax.checking_leaks()` (seconds per leak) then traces `t.apply` once
    more for any other leak.

    >>> from effax.testing.models import Draw, Param
    >>> check_purity_under_jit(Model([Param("w0"), Draw()]), jnp.ones(2), jax.random.key(0))
    """
    case = _case("purity under jit", model, x, key, handler, training)
    with case.running("`t.init_with_output`"):
        _, variables = case.init()
    with case.running("eager `t.apply`"):
        eager = case.apply(variables)
    t = fx.transform(case.model)
    hs = case.handlers + (_Watch(keep=False),)

    def apply(v: Any, x: Any, k: Any) -> Any:
        return t.apply(v, x, rngs=k, mutable=True, training=case.training, handlers=hs)

    with case.running("`jax.jit(t.apply)`"):
        jitted = jax.jit(apply)(variables, case.x, case.key)
    # where handlers usually leak, found at once: `jax.checking_leaks` takes seconds to report a leak
    kept = next(filter(None, (_tracer_in(h, _name(h)) for h in case.handlers)), None)
    if kept is not None:
        raise case.fail(f"`jax.jit(t.apply)` left a tracer in the handler under test: `{kept}` holds one", _LEAK)
    with case.running("tracing `t.apply` under `jax.checking_leaks()`"):
        try:
            with jax.checking_leaks():  # a new function, so JAX traces it again rather than reuse jit's trace
                jax.make_jaxpr(lambda v, x, k: apply(v, x, k))(variables, case.x, case.key)
        except Exception as e:
            if not str(e).startswith("Leaked"):
                raise
            shown = "\n".join(str(e).splitlines()[:3])
            raise case.fail("a tracer of `t.apply`'s trace outlived it (`jax.checking_leaks()`)",
                            f"{shown}\n{_LEAK}") from None
    with case.running("eager `t.apply` after the jitted run"):
        again = case.apply(variables)
    default = tolerance(*_float_dtypes(variables), *(d for _, d in model.param_specs().values()),
                        *case.watch.runs[0].dtypes)
    rtol = default[0] if rtol is None else rtol
    atol = default[1] if atol is None else atol
    names = _RESULTS[2:]
    what = "`jax.jit(t.apply)` gives other results than eager `t.apply`"
    case.expect_same(_labeled(names, eager), _labeled(names, jitted), what, ("eager", "jit"), rtol=rtol, atol=atol)
    what = "an eager `t.apply` after a jitted one gives other results than before it"
    case.expect_same(_labeled(names, eager), _labeled(names, again), what, ("before", "after"))


_LEAK = (
    "a tracer lives only inside its trace: keep what a run collects on the object `begin()` returns (read it "
    "from `runs` after the run), never on the handler, its class or a global"
)


def _tracer_in(x: Any, where: str, depth: int = 0, seen: set[int] | None = None) -> str | None:
    """Where `x` holds a tracer, down its attributes, dicts, lists, tuples and sets (a few levels), or None."""
    if isinstance(x, jax.core.Tracer):
        return where
    seen = set() if seen is None else seen
    if depth > 4 or id(x) in seen or isinstance(x, (str, bytes, int, float, type, jax.Array, np.ndarray)):
        return None
    seen.add(id(x))
    if isinstance(x, dict):
        parts = [(f"{where}[{k!r}]", v) for k, v in x.items()]
    elif isinstance(x, (list, tuple)):
        parts = [(f"{where}[{i}]", v) for i, v in enumerate(x)]
    elif isinstance(x, (set, frozenset)):
        parts = [(f"an item of {where}", v) for v in x]
    elif hasattr(x, "__dict__") and not callable(x) or isinstance(x, fx.Handler):
        parts = [(f"{where}.{k}", v) for k, v in vars(x).items()]
    else:
        return None
    return next(filter(None, (_tracer_in(v, w, depth + 1, seen) for w, v in parts)), None)


# --- law 10: answers match requests --------------------------------------------------------------


def check_answers_match_requests(
    model: Model, x: Any, key: Any, handler: HandlerLike = None, *, training: bool = False
) -> None:
    """Every answer to a param, state, key or mode request has the request's shape, dtype and kind.

    A param answer has the requested shape and dtype; a `get` has the
    structure, shapes and dtypes of the variable's `init()`; a key is one
    typed key; `is_training` is a Python bool. (Every other check watches
    the same, on every run.)

    >>> from effax.testing.models import Param
    >>> class Transposed(fx.Handler):
    ...     def handle(self, request, forward):
    ...         out = forward(request)
    ...         return out.T if isinstance(request, fx.ParamRequest) else out
    >>> check_answers_match_requests(Model([Param("w0", (2, 3))]), jnp.ones(2), jax.random.key(0), Transposed)
    Traceback (most recent call last):
    AssertionError: effax law `answers match requests` does not hold: param `w0` (shape (2, 3), float32) was ...
    ...
    """
    case = _case("answers match requests", model, x, key, handler, training)
    case.results()


# --- law 11: fresh keys --------------------------------------------------------------------------


def check_fresh_keys(model: Model, x: Any, key: Any, handler: HandlerLike = None, *, training: bool = False) -> None:
    """No two `next_key` draws of one run return the same key, across paths, streams and draw indices.

    >>> from effax.testing.models import Draw
    >>> class SameKey(fx.Handler):
    ...     def handle(self, request, forward):
    ...         return jax.random.key(0) if isinstance(request, fx.RandomRequest) else forward(request)
    >>> check_fresh_keys(Model([Draw(times=2)]), jnp.ones(2), jax.random.key(0), SameKey)
    Traceback (most recent call last):
    AssertionError: effax law `fresh keys` does not hold: draw 1 from stream 'dropout' at `<root>` returned ...
    ...
    """
    case = _case("fresh keys", model, x, key, handler, training)
    case.results()


# --- law 12: reuse -------------------------------------------------------------------------------


def check_reuse(
    model: Model,
    x: Any,
    key: Any,
    handler: HandlerLike = None,
    *,
    other: Model | None = None,
    fresh: Callable[[], tuple[Any, ...]] | None = None,
    training: bool = False,
) -> None:
    """One handler instance, entered for several runs, models and threads, gives what fresh instances give.

    Every single run (an `init`, an `apply`) with a fresh instance is the
    reference. One instance then runs `model`, `other` (default: `model`),
    `model` again with the other `training`, another key and other
    variables, `model` in another thread, and `other` while a run of
    `model` is paused half-way; each must match its reference. A
    handler that keeps a run's state on itself (a counter, a `seen` set, a
    flag set in `begin()`, the mode or keys of its first run) or shares it
    between instances (a mutable default argument) fails here. `fresh`
    makes fresh instances (default: `fresh_copies(handler)`). Every run
    also checks that no request is changed by handling it.

    >>> from effax.testing.models import Sow
    >>> class SowOnce(fx.Handler):      # keeps `seen` on the handler, not on a run
    ...     def __init__(self):
    ...         self.seen = set()
    ...     def handle(self, request, forward):
    ...         if isinstance(request, fx.SideOutputRequest):
    ...             if request.tag in self.seen:
    ...                 return None
    ...             self.seen.add(request.tag)
    ...         return forward(request)
    >>> check_reuse(Model([Sow("h0")]), jnp.ones(2), jax.random.key(0), SowOnce)
    Traceback (most recent call last):
    AssertionError: effax law `reuse` does not hold: the instance ... its 2nd run (apply of the model) ...
    ...
    """
    case = _case("reuse", model, x, key, None, training)
    # the third run changes all a run is given: a handler that latches its first run's mode, key or
    # variables answers that run's way there
    changed = _case("reuse", model, x, None if key is None else jax.random.fold_in(key, 1), None, not training)
    changed.watch, changed.notes = case.watch, case.notes
    fresh = fresh_copies(handler) if fresh is None else fresh
    other = model if other is None else other
    if other is not model:
        case.notes.append(f"the other model: {other!r}".replace("\n", "\n  "))
    reference: dict[tuple[int, int], tuple[Any, Any]] = {}
    for m, c in ((model, case), (other, case), (model, changed)):
        if (id(m), id(c)) not in reference:
            with c.running("a fresh instance", m):
                out, variables = c.init(handlers=fresh(), fn=m)
                applied = c.apply(_shifted(variables) if c is changed else variables, handlers=fresh(), fn=m)
                reference[(id(m), id(c))] = ((out, variables), applied)
    one = fresh()
    case.handlers = changed.handlers = one
    runs = 0

    def expect(m: Model, got: Any, which: int, where: str, c: _Case = case) -> None:
        nonlocal runs
        runs += 1
        name = "the model" if m is model else "the other model"
        label = ("init", "apply")[which]
        names = _RESULTS[2 * which: 2 * which + 2]
        want = _labeled(names, reference[(id(m), id(c))][which])
        diff = difference(want, _labeled(names, got), names=("fresh instance", "reused instance"))
        if diff is not None:
            nth = {1: "1st", 2: "2nd", 3: "3rd"}.get(runs, f"{runs}th")
            raise case.fail(
                f"the instance {', '.join(_name(h) for h in one)} gave other results in its {nth} run "
                f"({label} of {name}{where}) than a fresh instance",
                diff + "\na handler holds configuration; what one run accumulates belongs on the object "
                "`begin()` returns, fresh each time (and never in a mutable default argument)",
            )

    def both(m: Model, where: str = "", c: _Case = case) -> None:
        with c.running(f"the reused instance ({where.strip(', ') or 'in sequence'})", m):
            out, variables = c.init(handlers=one, fn=m)
            expect(m, (out, variables), 0, where, c)
            variables = reference[(id(m), id(c))][0][1]
            variables = _shifted(variables) if c is changed else variables
            expect(m, c.apply(variables, handlers=one, fn=m), 1, where, c)

    both(model)
    both(other)
    key_data = None if changed.key is None else _leaf(changed.key).tolist()
    both(model, f", again with training={changed.training}, key data {key_data}, and apply on the variables "
                "plus 1", changed)
    box: dict[str, Any] = {}

    def in_thread() -> None:
        try:
            both(model, ", in another thread")
        except BaseException as e:  # re-raised in the calling thread
            box["error"] = e

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]

    # Interleaved: the run of `model` begins, pauses in another thread while a whole run of `other`
    # uses the same instance here, then finishes.
    started, resume, outer = threading.Event(), threading.Event(), {}

    def paused(x: Any) -> Any:
        started.set()
        resume.wait(60)
        return model(x)

    def run_outer() -> None:
        try:
            outer["out"] = fx.transform(paused).init_with_output(
                case.key, case.x, training=case.training, handlers=one + (case.watch,))
        except BaseException as e:
            outer["error"] = e
        finally:
            started.set()

    thread = threading.Thread(target=run_outer)
    thread.start()
    started.wait(60)
    try:
        with case.running("the reused instance, during a run of the model in another thread", other):
            inner = case.init(handlers=one, fn=other)
    finally:
        resume.set()
        thread.join()
    with case.running("the reused instance, with a run of the other model while its run was paused"):
        if "error" in outer:
            raise outer["error"]
    expect(other, inner, 0, ", while a run of the model was in progress")
    expect(model, outer["out"], 0, ", around a run of the other model")


def _shifted(variables: Any) -> Any:
    """Other variables of the same structure, shapes and dtypes (each number leaf plus 1; a key stays)."""
    return jax.tree.map(lambda a: a + 1 if jnp.issubdtype(jnp.result_type(a), jnp.number) else a, variables)


# --- law 13: reference ---------------------------------------------------------------------------


def check_reference(
    model: Model, x: Any, key: Any, handler: HandlerLike, reference: HandlerLike, *, training: bool = False
) -> None:
    """A drop-in replacement for a built-in handler gives the built-in's answers and results.

    Runs the model with `handler`, then with `reference` in its place, and
    compares the answer to every request (in order) and the results, at the
    precision of their dtypes.

    >>> from effax.testing.models import SideInput
    >>> class MyInputs(fx.Handler):
    ...     def __init__(self, values):
    ...         self.values = values
    ...     def handle(self, request, forward):
    ...         if isinstance(request, fx.SideInputRequest):
    ...             return self.values.get(request.tag, 0.0)    # forgets the model's default
    ...         return forward(request)
    >>> model = Model([SideInput("mask"), SideInput("ctx", default=2.0)])
    >>> check_reference(model, jnp.ones(2), jax.random.key(0), MyInputs({"mask": 1.0}),
    ...                 fx.handlers.SideInputs({"mask": 1.0}))
    Traceback (most recent call last):
    AssertionError: effax law `reference` does not hold: the answer to side input 'ctx' at `<root>` in init differs ...
    ...
    """
    case = _case("reference", model, x, key, handler, training)
    ref = resolve(reference)
    case.notes.append(f"reference: {', '.join(_name(h) for h in ref)}")
    mine = case.results(what="with the handler under test")
    mine_answers = [run.answered for run in case.watch.runs]
    case.watch = _Watch()
    theirs = case.results(ref, what="with the reference handler")
    their_answers = [run.answered for run in case.watch.runs]
    for label, a, b in zip(("init", "apply"), mine_answers, their_answers, strict=True):
        a = [(r.describe(), out) for r, out in a]
        b = [(r.describe(), out) for r, out in b]
        if [d for d, _ in a] != [d for d, _ in b]:
            raise case.fail(
                f"the model made other requests in {label} with the handler under test than with the reference",
                f"handler under test: {[d for d, _ in a]}\n  reference: {[d for d, _ in b]}",
            )
        for (what, x_), (_, y_) in zip(a, b, strict=True):
            rtol, atol = tolerance(*_float_dtypes(x_), *_float_dtypes(y_))
            diff = difference(x_, y_, names=("handler under test", "reference"), rtol=rtol, atol=atol)
            if diff is not None:
                raise case.fail(f"the answer to {what} in {label} differs from the reference handler's",
                                diff.replace("at the whole value: ", ""))
    rtol, atol = tolerance(*_float_dtypes(mine), *_float_dtypes(theirs))
    case.expect_same(mine, theirs, "the results differ from the reference handler's",
                     ("handler under test", "reference"), rtol=rtol, atol=atol)


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
    raise LawKitError(f"unknown effect {effect!r}; the kit knows {list(EFFECTS)}.")


# --- the registry: every law once, with what it needs ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Subject:
    """What `assert_handler_laws` tests: the handler, the effects it answers, and how to draw cases.

    >>> from effax.testing import strategies
    >>> subject = Subject(fx.Handler, (), strategies.models_and_inputs(), fresh_copies(fx.Handler))
    >>> [name for name, law in LAWS.items() if law.applies(subject)][:3]
    ['answers match requests', 'fresh keys', 'determinism']
    """

    handler: HandlerLike
    effects: tuple[str, ...]
    models: Any
    fresh: Callable[[], tuple[Any, ...]]
    reference: HandlerLike = None
    custom_models: bool = False
    sees_every_request: bool = False  # it declares no `answers`: module calls reach it too


@dataclasses.dataclass(frozen=True)
class Law:
    """One law of docs/design.md as the kit runs it.

    `applies(effects)` says whether it concerns a handler answering
    `effects`; `run(subject, data, key, training)` draws what the law needs
    from hypothesis's `data` and calls `check`; `budget` scales the kit's
    `max_examples` for this law.

    >>> LAWS["purity under jit"].number, LAWS["purity under jit"].budget
    (8, 0.5)
    """

    name: str
    number: int
    check: Callable[..., None]
    run: Callable[[Subject, Any, Any, bool], None]
    applies: Callable[[Subject], bool] = lambda subject: True
    budget: float = 1.0


def _draw_model(subject: Subject, data: Any, label: str = "model, x") -> tuple[Model, Any]:
    return data.draw(subject.models, label=label)


def _run_simple(check: Callable[..., None]) -> Callable[[Subject, Any, Any, bool], None]:
    def run(subject: Subject, data: Any, key: Any, training: bool) -> None:
        model, x = _draw_model(subject, data)
        check(model, x, key, subject.handler, training=training)

    return run


def _run_locality(subject: Subject, data: Any, key: Any, training: bool) -> None:
    from effax.testing.strategies import models_and_inputs, removals

    answered = tuple(e for e in subject.effects if e in ("param", "random"))
    if subject.custom_models:
        model, x = _draw_model(subject, data)
    else:  # two requests of an answered effect, so one can go before the other
        twice = answered[:1] * 2 + tuple(e for e in subject.effects if e not in answered[:1])
        model, x = data.draw(models_and_inputs(require=twice), label="model, x")
    drop = data.draw(removals(model, effects=answered), label="drop")
    check_locality(model, x, key, subject.handler, drop=drop, training=training)


def _run_forwarding(subject: Subject, data: Any, key: Any, training: bool) -> None:
    from effax.testing.strategies import models_and_inputs

    if subject.custom_models:
        model, x = _draw_model(subject, data)
    else:  # a request of every effect the handler forwards, so one it drops or changes is always met; module
        # calls too for a handler that declares no `answers` (it is sent them, as every request)
        pool = KNOWN_EFFECTS if subject.sees_every_request else EFFECTS
        forwarded = tuple(e for e in pool if e not in subject.effects)
        model, x = data.draw(models_and_inputs(require=forwarded), label="model, x")
    check_forwarding_identity(model, x, key, subject.handler, effects=subject.effects, training=training)


def _partners(subject: Subject, model: Model, x: Any, key: Any, training: bool) -> list[str]:
    """Effects of built-in partners that commute with the handler: neither answered nor performed by it."""
    performed = performed_effects(model, x, key, subject.handler, training=training)
    return [e for e in EFFECTS if e not in subject.effects and e not in performed]


def _run_commutation(subject: Subject, data: Any, key: Any, training: bool) -> None:
    from hypothesis import strategies as st

    model, x = _draw_model(subject, data)
    others = _partners(subject, model, x, key, training)
    if others:
        other = data.draw(st.sampled_from(others), label="partner effect")
        check_commutes_with(model, x, key, subject.handler, partner(other), training=training)


def _run_associativity(subject: Subject, data: Any, key: Any, training: bool) -> None:
    from hypothesis import strategies as st

    model, x = _draw_model(subject, data)
    others = [e for e in EFFECTS if e not in subject.effects]
    outer = data.draw(st.permutations(others), label="outer partner effects") if others else []
    inner = data.draw(st.lists(st.sampled_from(others), unique=True, max_size=2), label="inner partner effects") \
        if others else []
    check_associativity(model, x, key, subject.handler, outer=[partner(e) for e in outer],
                        inner=[partner(e) for e in inner], training=training)


def _run_sharing(subject: Subject, data: Any, key: Any, training: bool) -> None:
    from effax.testing.strategies import share_bindings, sharing_cases

    if subject.custom_models:
        model, x = _draw_model(subject, data)
        bindings = data.draw(share_bindings(model), label="bindings")
    else:
        model, x, bindings = data.draw(sharing_cases(require=subject.effects), label="model, x, bindings")
    check_sharing_laws(model, x, key, bindings, subject.handler, training=training)


def _run_fresh_keys(subject: Subject, data: Any, key: Any, training: bool) -> None:
    from effax.testing.strategies import models_and_inputs

    if subject.custom_models:
        model, x = _draw_model(subject, data)
    else:
        model, x = data.draw(models_and_inputs(require=tuple(dict.fromkeys(subject.effects + ("random",)))),
                             label="model, x")
    check_fresh_keys(model, x, key, subject.handler, training=training)


def _run_reuse(subject: Subject, data: Any, key: Any, training: bool) -> None:
    model, x = _draw_model(subject, data)
    other, _ = _draw_model(subject, data, label="other model")
    other = Model(other.steps, model.in_size)
    check_reuse(model, x, key, subject.handler, other=other, fresh=subject.fresh, training=training)


def check_lifting(
    model: Model, x: Any, key: Any, handler: HandlerLike = None, *, training: bool = False, context: str = "scan"
) -> None:
    """Law 14: `fx.scan`/`fx.vmap`/`fx.remat` of `model`, under `handler`, equal the unrolled or mapped model.

    The reference runs the model once per iteration in scopes `l0, l1`,
    with each iteration's param keys and draws derived as the lifted
    transform derives them (`effax.testing.lifting`); init values, outputs,
    state updates and sown values must match on restacked variables.

    >>> from effax.testing.models import Draw, Param
    >>> check_lifting(Model([Param("w0"), Draw()]), jnp.ones(2), jax.random.key(0), fx.Handler, context="vmap")
    """
    from effax.testing import lifting

    case = _case("lifting", model, x, key, handler, training)
    case.notes.append(f"lifted by: fx.{context} (`effax.testing.lifting.lifted(model, {context!r}, 2)`)")
    try:
        with case.running(f"the model lifted by fx.{context}", lifting.lifted(model, context, 2)):
            lifting.check_lifting(model, case.x, key, context=context, training=training, handlers=case.handlers)
    except lifting.LiftingMismatch as e:  # the bare check's finding, with the case around it
        detail = e.detail
        if any(getattr(type(h), "begin", fx.Handler.begin) is not fx.Handler.begin for h in case.handlers):
            detail = (detail or "") + (
                "\na handler with per-run state (`begin()` returns a run) stays outside a lifted body and is "
                "asked once per lifted call, for the stacked request: the params and keys it asks for itself "
                "while answering are made once, not per layer. If it needs none, keep it; else make it stateless "
                "(`begin()` returns the handler), so the lift reruns it per layer as the unrolled model does.")
        raise case.fail(e.what, detail) from None


def _run_lifting(subject: Subject, data: Any, key: Any, training: bool) -> None:
    from hypothesis import strategies as st

    from effax.testing.lifting import CONTEXTS

    model, x = _draw_model(subject, data)
    context = data.draw(st.sampled_from(CONTEXTS), label="lifted by")
    check_lifting(model, x, key, subject.handler, training=training, context=context)


def _run_reference(subject: Subject, data: Any, key: Any, training: bool) -> None:
    model, x = _draw_model(subject, data)
    check_reference(model, x, key, subject.handler, subject.reference, training=training)


LAWS: dict[str, Law] = {
    law.name: law
    for law in (
        Law("answers match requests", 10, check_answers_match_requests, _run_simple(check_answers_match_requests)),
        Law("fresh keys", 11, check_fresh_keys, _run_fresh_keys),
        Law("determinism", 1, check_determinism, _run_simple(check_determinism)),
        Law("locality", 2, check_locality, _run_locality, lambda s: bool({"param", "random"} & set(s.effects))),
        Law("init/apply agreement", 3, check_init_apply_agreement, _run_simple(check_init_apply_agreement)),
        Law("abstract init", 4, check_abstract_init, _run_simple(check_abstract_init)),
        Law("state", 5, check_state_laws, _run_simple(check_state_laws), lambda s: "state" in s.effects),
        Law("forwarding identity", 6, check_forwarding_identity, _run_forwarding),
        Law("commutation", 6, check_commutes_with, _run_commutation),
        Law("associativity", 6, check_associativity, _run_associativity),
        Law("sharing", 7, check_sharing_laws, _run_sharing, lambda s: "param" in s.effects),
        Law("reuse", 12, check_reuse, _run_reuse),
        Law("reference", 13, check_reference, _run_reference, lambda s: s.reference is not None),
        Law("purity under jit", 8, check_purity_under_jit, _run_simple(check_purity_under_jit), budget=0.5),
        Law("lifting", 14, check_lifting, _run_lifting, budget=0.5),
    )
}
"""Every law the kit runs, by the name its failures use, in the order `assert_handler_laws` runs them."""
