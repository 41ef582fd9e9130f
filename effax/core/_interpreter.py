"""The scope interpreter: the handler stack, the scope stack, and request routing.

Both stacks live in context variables, so threads and nested transforms never
see each other's handlers, and both unwind when a model raises. Routing is
innermost-first; while a handler runs, the stack it sees is the part outside
it, so the effects it performs itself go outward, never back to itself.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from jax.extend.core import get_opaque_trace_state

from effax.core._errors import EffaxError, InvalidNameError, TraceMismatchError, UnhandledEffectError

__all__ = [
    "Handler", "Path", "Request", "answers_of", "at_path", "begin_run", "check_name", "check_trace", "current_path",
    "current_stack", "end_run", "flatten_handlers", "handle", "hermetic", "is_stateless", "path_str", "run_local",
    "scope", "send", "snapshot_run", "trace_state", "under_stack",
]

Path = tuple[str, ...]

_STACK: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("effax_handlers", default=())
_PATH: contextvars.ContextVar[Path] = contextvars.ContextVar("effax_path", default=())
# What one run keeps beside its handlers, by kind (`fx.nn`'s module names): fresh in `hermetic()` and in the
# outermost `handle()`, so `t.init` and `t.apply` see the same; `run_local` reads it.
_RUN: contextvars.ContextVar[dict[type, Any] | None] = contextvars.ContextVar("effax_run", default=None)
# ids of installed runs that are their handler itself (stateless): lifted transforms rerun them inside bodies.
_OWN: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("effax_own_runs", default=frozenset())


def path_str(path: Path) -> str:
    """`('encoder', 'dense')` -> `'encoder/dense'`; the root path reads `<root>`."""
    return "/".join(path) if path else "<root>"


def check_name(name: Any, kind: str) -> str:
    """Return `name` if it is a non-empty string without `/`, else raise `InvalidNameError`."""
    if type(name) is str and name and "/" not in name:
        return name
    if not isinstance(name, str):
        problem = f"is a {type(name).__name__}, not a string"
    elif not name:
        problem = "is empty"
    else:
        problem = "contains '/', which separates path components"
    fix = ""
    if isinstance(name, str) and "/" in name:
        fix = f" Use {name.replace('/', '_')!r} or nest `fx.scope`s instead."
    raise InvalidNameError(f"{kind} name {name!r} {problem}: names must be non-empty strings without '/'.{fix}")


@dataclasses.dataclass(frozen=True)
class Request:
    """One effect performed at `path`; a frozen dataclass per kind, whose `unhandled()` runs if nothing answers.

    >>> fx.ParamRequest(("dense", "w"), jax.nn.initializers.zeros, (2,), jnp.float32).kind
    'param'
    """

    path: Path

    hint: ClassVar[str] = "answer it with a handler: `with fx.handle(MyHandler()): ...`"
    kind: ClassVar[str] = "request"  # one name per request class ("param", "key", ...): its class name by default
    effect: ClassVar[str] = "request"  # the effect it belongs to ("random" for keys and stream keys)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" not in vars(cls):
            cls.kind = cls.__name__
        if "effect" not in vars(cls):
            cls.effect = cls.kind

    def describe(self) -> str:  # a short description for error messages
        return f"{type(self).__name__} at `{path_str(self.path)}`"

    def unhandled(self) -> Any:
        raise UnhandledEffectError(f"no handler answered {self.describe()}. To fix: {self.hint}")


class Handler:
    """Answers some requests and forwards the rest outward.

    A handler holds configuration. Entering it (`fx.handle`) calls `begin()`;
    a stateless handler returns itself, a stateful one returns a fresh run
    object that holds what one run accumulates and answers `handle`. A class
    that sets `answers = (fx.ParamRequest, ...)` is sent only those request
    classes (checked once, on entry); with `answers = None`, the default, it
    sees every request, module calls included.

    >>> class Double(fx.Handler):
    ...     def handle(self, request, forward):
    ...         out = forward(request)
    ...         return out * 2 if isinstance(request, fx.SideInputRequest) else out
    >>> with fx.handle(fx.handlers.SideInputs({"x": 3}), Double()):
    ...     fx.side_input("x")
    6
    """

    answers: ClassVar[tuple[type[Request], ...] | None] = None

    def begin(self) -> Any:
        return self

    def handle(self, request: Request, forward: Callable[[Request], Any]) -> Any:
        return forward(request)


def answers_of(run: Any) -> tuple[type[Request], ...] | None:
    """The request classes `run` declares it answers (its `answers`), or None: it sees every request."""
    return getattr(run, "answers", None)


def _check_answers(run: Any) -> None:
    answers = answers_of(run)
    if answers is not None and not (isinstance(answers, tuple) and all(
        isinstance(a, type) and issubclass(a, Request) for a in answers
    )):
        raise EffaxError(
            f"{type(run).__name__}.answers is {answers!r}: it must be a tuple of request classes, "
            "`answers = (fx.ParamRequest, ...)`, or None (the handler sees every request)."
        )


def _dispatch(stack: tuple[Any, ...], n: int, request: Request) -> Any:
    kind = type(request)
    while n:  # skip the handlers that declare they do not answer this kind of request
        answers = getattr(stack[n - 1], "answers", None)
        if answers is None or kind in answers:
            break
        n -= 1
    if n == 0:
        return request.unhandled()
    token = _STACK.set(stack[: n - 1])
    try:
        return stack[n - 1].handle(request, functools.partial(_dispatch, stack, n - 1))
    finally:
        _STACK.reset(token)


def send(request: Request) -> Any:
    """Route `request` through the handler stack, innermost handler first."""
    stack = _STACK.get()
    return _dispatch(stack, len(stack), request)


def current_stack() -> tuple[Any, ...]:
    """The runs installed now, outermost first; `under_stack` reinstates it."""
    return _STACK.get()


def under_stack(stack: tuple[Any, ...], fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Call `fn` under the handler stack `stack` (a `current_stack()`): a module call's body runs under its
    call site's handlers, not the empty stack `unhandled()` sees."""
    token = _STACK.set(stack)
    try:
        return fn(*args, **kwargs)
    finally:
        _STACK.reset(token)


def flatten_handlers(handlers: Iterable[Any]) -> list[Any]:
    """Flatten nested lists/tuples of handlers, so a preset can be a tuple."""
    flat: list[Any] = []
    for h in handlers:
        if isinstance(h, (list, tuple)):
            flat.extend(flatten_handlers(h))
        elif h is not None and callable(getattr(h, "handle", None)):
            flat.append(h)
        elif h is not None:
            raise EffaxError(
                f"{h!r} is not a handler: a handler is an object with a `handle(request, forward)` "
                "method, usually a subclass of `fx.Handler`."
            )
    return flat


class _Handling:
    __slots__ = ("_handlers", "_tokens")

    def __init__(self, handlers: list[Any]):
        self._handlers = handlers
        self._tokens: list[tuple[Any, Any, Any]] = []

    def __enter__(self) -> tuple[Any, ...]:
        runs = tuple(h.begin() if hasattr(h, "begin") else h for h in self._handlers)
        any(_check_answers(run) for run in runs)
        own = frozenset(id(r) for h, r in zip(self._handlers, runs, strict=True) if r is h)
        token = _OWN.set(_OWN.get() | own) if own else None
        self._tokens.append((_STACK.set(_STACK.get() + runs), begin_run(fresh=False), token))
        return runs

    def __exit__(self, *exc: Any) -> None:
        stack, run, own = self._tokens.pop()
        end_run(run)
        if own is not None:
            _OWN.reset(own)
        _STACK.reset(stack)


def is_stateless(run: Any) -> bool:
    """Whether an installed run is its handler itself (`begin()` returned self): it holds no per-run state."""
    return id(run) in _OWN.get()


def handle(*handlers: Any) -> _Handling:
    """Install handlers around a block; the last one is innermost and sees each request first.

    Returns a context manager whose value is the tuple of run objects (what
    each handler's `begin()` returned); read a stateful handler's results there.

    >>> with fx.handle(fx.handlers.CollectSown(True)) as (sown,):
    ...     fx.sow("h", 1.0)
    >>> sown.collections()
    {'intermediates': {'h': (1.0,)}}
    """
    return _Handling(flatten_handlers(handlers))


class _Hermetic:
    """Start from an empty handler stack and the root path (what `t.init`/`t.apply` do)."""

    __slots__ = ("_tokens",)

    def __init__(self) -> None:
        self._tokens: list[tuple[Any, ...]] = []

    def __enter__(self) -> None:
        self._tokens.append((_STACK.set(()), _PATH.set(()), begin_run(fresh=True), _OWN.set(frozenset())))

    def __exit__(self, *exc: Any) -> None:
        stack, path, run, own = self._tokens.pop()
        end_run(run)
        _OWN.reset(own)
        _PATH.reset(path)
        _STACK.reset(stack)


def hermetic() -> _Hermetic:
    """A context with no handlers, the root path and a fresh run: results depend only on arguments."""
    return _Hermetic()


def begin_run(fresh: bool) -> contextvars.Token | None:
    """Start a run's local values if `fresh` or none is active; returns what `end_run` takes."""
    return _RUN.set({}) if fresh or _RUN.get() is None else None


def end_run(token: contextvars.Token | None) -> None:
    if token is not None:
        _RUN.reset(token)


def run_local(kind: type) -> Any:
    """This run's `kind()` (made on first use), or None outside any run: bookkeeping of the layers above
    (`fx.nn`'s module names) that the core keeps without knowing it; one with `snapshot()` joins `snapshot_run`."""
    run = _RUN.get()
    if run is not None and kind not in run:
        run[kind] = kind()
    return None if run is None else run[kind]


def snapshot_run() -> Callable[[], None]:
    """A function putting the run-local values back as they are now, dropping those made since."""
    run = _RUN.get()
    run = {} if run is None else run  # not `or`: an empty run is falsy but must be the one restored
    kept, restores = set(run), [v.snapshot() for v in run.values() if hasattr(v, "snapshot")]

    def restore() -> None:
        for kind in [k for k in run if k not in kept]:
            del run[kind]
        for r in restores:
            r()

    return restore


class scope:
    """Name a sub-scope: requests inside get `name` appended to their path.

    >>> with fx.scope("encoder"):
    ...     fx.current_path()
    ('encoder',)
    """

    __slots__ = ("name", "_at", "_tokens")

    def __init__(self, name: str):
        self.name, self._at, self._tokens = check_name(name, "scope"), None, []

    def __enter__(self) -> Path:
        path = _PATH.get() + (self.name,) if self._at is None else self._at
        self._tokens.append(_PATH.set(path))
        return path

    def __exit__(self, *exc: Any) -> None:
        _PATH.reset(self._tokens.pop())


def at_path(path: Path) -> scope:
    """Set the current path outright (for lifted transforms and interop that re-enter a scope)."""
    outright = scope.__new__(scope)
    outright.name, outright._at, outright._tokens = None, tuple(path), []
    return outright


def current_path() -> Path:
    """The tuple of enclosing scope names.

    >>> fx.current_path()
    ()
    """
    return _PATH.get()


def trace_state() -> Any:
    """The JAX trace we are in now, as an opaque comparable token (recorded in `begin()`)."""
    return get_opaque_trace_state(convention="flax")


def check_trace(entered: Any, request: Request, action: str) -> None:
    """Raise if an effect that creates or consumes something comes from another JAX trace than `entered`
    (`trace_state()` when the run began): from a raw `jax.lax.scan`/`vmap`/`jit` in the model it would leak."""
    if trace_state() != entered:
        raise TraceMismatchError(
            f"{request.describe()} {action} inside a JAX transform (jax.lax.scan, jax.vmap, "
            "jax.checkpoint, jax.lax.cond, jax.jit, ...) that was applied inside the model, below the "
            "handler that answers it: its result would leak out of that trace or repeat on every step. "
            "Use the lifted transforms `fx.scan`, `fx.vmap`, `fx.remat` or `fx.cond`/`fx.switch` inside models, "
            "and put `jax.jit` around the discharged function (`jax.jit(t.apply)`), not around effect calls."
        )
