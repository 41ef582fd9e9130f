"""The scope interpreter: the handler stack and the scope path (context variables, so threads and nested
transforms never see each other's, and both unwind when a model raises), and innermost-first routing; while a
handler runs it sees the stack outside it, so the effects it performs itself go outward, never back to itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

from effax.core._errors import EffaxError, InvalidNameError, UnhandledEffectError

__all__ = [
    "LATER", "Handler", "Path", "Request", "answers_of", "at_path", "begin_run", "check_name", "current_path",
    "current_stack", "end_run", "flatten_handlers", "handle", "hermetic", "is_stateless", "path_now",
    "path_str", "reset_path", "run_local", "run_values", "scope", "set_path", "send", "under_path", "under_stack",
]

Path = tuple[str, ...]

_PATH: contextvars.ContextVar[Path] = contextvars.ContextVar("effax_path", default=())
# What one run keeps beside its handlers, by kind (`fx.nn`'s module names): fresh in `hermetic()` and in the
# outermost `handle()`, so `t.init` and `t.apply` see the same; `run_local` reads it.
_RUN: contextvars.ContextVar[dict[type, Any] | None] = contextvars.ContextVar("effax_run", default=None)
# id of each installed run -> (whether it is its handler itself, i.e. stateless: lifted transforms rerun those
# inside bodies; the request classes it answers, its own or its handler's). Kept here, never written on the run.
_OWN: contextvars.ContextVar[dict[int, tuple] | None] = contextvars.ContextVar("effax_own_runs", default=None)


def path_str(path: Path) -> str:
    """`('encoder', 'dense')` -> `'encoder/dense'`; the root path reads `<root>`."""
    return "/".join(path) if path else "<root>"


def check_name(name: Any, kind: str) -> str:
    """Return `name` if it is a non-empty string without `/`, else raise `InvalidNameError`."""
    if type(name) is str and name and "/" not in name:
        return name
    text = isinstance(name, str)
    problem = "contains '/', which separates path components" if text and name else "is empty" if text else (
        f"is a {type(name).__name__}, not a string")
    fix = f" Use {name.replace('/', '_')!r} or nest `fx.scope`s instead." if text and "/" in name else ""
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

    A handler holds configuration. Entering it (`fx.handle`) calls `begin()`: a stateless handler returns
    itself, a stateful one a fresh run object that accumulates one run and answers `handle`. A class with
    `answers = (fx.ParamRequest, ...)` is sent only requests of those classes (and their subclasses), its
    runs too; with None, all.

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


class _Routes(dict):
    """Request class -> `(handle of the innermost run answering it, that run's index (`below(i)` is the stack
    its handler runs under), its in-place `answer_now` or None)`, or `()` when no run does; learned on first
    use, once per stack."""

    def __missing__(self, kind: type) -> tuple:
        runs, i = self.runs, len(self.runs) - 1  # skip the runs that declare they do not answer `kind`
        while i >= 0 and (answers := runs.answers[i]) is not None and not issubclass(kind, answers):
            i -= 1
        if i < 0:
            return self.setdefault(kind, ())
        run, own = runs[i], vars(type(runs[i]))  # `answer_now` beside the `handle` it shortens (not a subclass's)
        now = own["answer_now"].__get__(run) if "answer_now" in own and "handle" in own else None
        return self.setdefault(kind, (run.handle, i, now))


class _Runs(tuple):
    """The installed runs, outermost first, with their routes and the prefix stacks below each run."""

    def __new__(cls, runs: Iterable[Any], prefixes: list | None = None, answers: tuple | None = None) -> _Runs:
        self = super().__new__(cls, runs)
        self.prefixes = [None] * len(self) if prefixes is None else prefixes  # shared by a stack's prefixes
        self.answers = tuple(answers_of(run) for run in self) if answers is None else answers  # read once
        self.routes = _Routes()
        self.routes.runs = self
        return self

    def below(self, i: int) -> _Runs:  # the stack below run `i`, where its `handle` runs: made when first needed
        if self.prefixes[i] is None:
            self.prefixes[i] = _Runs(self[:i], self.prefixes, self.answers[:i])
        return self.prefixes[i]

    def forward(self, request: Request) -> Any:  # `send` with this stack installed, also when called later
        token = _STACK.set(self)
        try:
            return send(request)
        finally:
            _STACK.reset(token)


_EMPTY = _Runs(())  # no handlers: every route is ()
_STACK: contextvars.ContextVar[_Runs] = contextvars.ContextVar("effax_handlers", default=_EMPTY)
LATER = object()  # what a run's `answer_now(request)` returns for a request it answers only through `handle`


def send(request: Request) -> Any:
    """Route `request` through the handler stack, innermost handler first."""
    route = (stack := _STACK.get()).routes[type(request)]
    if not route:
        return request.unhandled()
    if route[2] is not None and (answer := route[2](request)) is not LATER:  # answered in place (`answer_now`)
        return answer
    token = _STACK.set(below := stack.below(route[1]))
    try:
        return route[0](request, below.forward)
    finally:
        _STACK.reset(token)


current_stack = _STACK.get  # the runs installed now, outermost first (`under_stack` reinstates them)


def under_stack(stack: tuple[Any, ...], fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Call `fn` under `stack` (a `current_stack()`): a module call's body runs under its call site's handlers."""
    token = _STACK.set(stack if type(stack) is _Runs else _Runs(stack))
    try:
        return fn(*args, **kwargs)
    finally:
        _STACK.reset(token)


def flatten_handlers(handlers: Iterable[Any]) -> list[Any]:
    """Flatten nested lists/tuples of handlers, so a preset can be a tuple; refuse what is not a handler."""
    flat: list[Any] = []
    for h in handlers:
        if isinstance(h, (list, tuple)):
            flat.extend(flatten_handlers(h))
        elif isinstance(h, type) and callable(getattr(h, "handle", None)):  # `handlers=[FrozenState]`
            raise EffaxError(f"{h.__name__} is a handler class; pass an instance: {h.__name__}() (with its arguments).")
        elif h is not None and not callable(getattr(h, "handle", None)):
            raise EffaxError(f"{h!r} is not a handler: a handler is an object with a `handle(request, forward)` "
                             "method, usually a subclass of `fx.Handler`.")
        elif h is not None:
            flat.append(h)
    return flat


class _Handling:
    __slots__ = ("_handlers", "_tokens")
    _checked: ClassVar[dict[type, tuple]] = {}  # run class -> the `answers` last found valid on it (a memo)

    def __init__(self, handlers: list[Any]):
        self._handlers, self._tokens = handlers, []

    def __enter__(self) -> tuple[Any, ...]:
        runs, info = tuple([h.begin() if hasattr(h, "begin") else h for h in self._handlers]), dict(_OWN.get() or {})
        for h, run in zip(self._handlers, runs, strict=True):  # a malformed `begin`/`answers` is refused on entry
            if not callable(getattr(run, "handle", None)):  # `begin()` forgot `return`
                raise EffaxError(f"`{type(h).__name__}.begin()` returned {run!r:.40}, which has no `handle`; return "
                                 "self or a run object (with a `handle(request, forward)` method).")
            if (answers := getattr(run, "answers", None)) is None:  # declared on the handler: its run's too
                answers = getattr(h, "answers", None)
            if answers is not None and answers is not self._checked.get(type(run)):  # checked once per class
                if type(answers) is not tuple or not all(
                        isinstance(a, type) and issubclass(a, Request) for a in answers):
                    raise EffaxError(f"{type(run).__name__}.answers is {answers!r}: it must be a tuple of request "
                                     "classes, `answers = (fx.ParamRequest, ...)`, or None (the handler sees every "
                                     "request), declared on the handler's class (or on the run's own class).")
                self._checked[type(run)] = answers
            info[id(run)] = (run is h, answers)
        stack = _Runs((below := _STACK.get()) + runs, None, below.answers + tuple(info[id(r)][1] for r in runs))
        self._tokens.append((_STACK.set(stack), begin_run(fresh=False), _OWN.set(info)))
        return runs

    def __exit__(self, *exc: Any) -> None:
        stack, run, own = self._tokens.pop()
        end_run(run)
        _OWN.reset(own)
        _STACK.reset(stack)


def is_stateless(run: Any) -> bool:
    """Whether an installed run is its handler itself (`begin()` returned self): it holds no per-run state."""
    return (_OWN.get() or {}).get(id(run), (False,))[0]


def answers_of(run: Any) -> tuple[type, ...] | None:
    """The request classes an installed run answers (its own `answers`, else its handler's); None: all."""
    return (_OWN.get() or {}).get(id(run), (False, getattr(run, "answers", None)))[1]


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


class hermetic:
    """A context with no handlers, the root path and a fresh run: results depend only on arguments (what
    `t.init`/`t.apply` do). One use at a time: `with hermetic():` makes a fresh one per block."""

    __slots__ = ("_tokens",)

    def __enter__(self) -> None:
        self._tokens = (_STACK.set(_EMPTY), _PATH.set(()), begin_run(fresh=True), _OWN.set({}))

    def __exit__(self, *exc: Any) -> None:
        stack, path, run, own = self._tokens
        end_run(run)
        _OWN.reset(own)
        _PATH.reset(path)
        _STACK.reset(stack)


def begin_run(fresh: bool) -> contextvars.Token | None:
    """Start a run's local values if `fresh` or none is active; returns what `end_run` takes."""
    return _RUN.set({}) if fresh or _RUN.get() is None else None


def end_run(token: contextvars.Token | None) -> None:
    if token is not None:
        _RUN.reset(token)


def run_local(kind: type) -> Any:
    """This run's `kind()` (made on first use), or None outside any run: bookkeeping of the layers above
    (`fx.nn`'s module names) that the core keeps without knowing it."""
    run = _RUN.get()
    return None if run is None else run[kind] if kind in run else run.setdefault(kind, kind())


# The live dict of this run's local values by kind (what `run_local` fills), or None outside any run;
# `current_path` without a Python frame; and `under_path` inline (a module call): for eager per-request paths.
run_values, path_now, set_path, reset_path = _RUN.get, _PATH.get, _PATH.set, _PATH.reset


class scope:
    """Name a sub-scope: requests inside get `name` appended to their path.

    >>> with fx.scope("encoder"):
    ...     fx.current_path()
    ('encoder',)
    """

    __slots__ = ("name", "_tokens")

    def __init__(self, name: str):
        ok = type(name) is str and name and "/" not in name  # checked inline: a scope per layer
        self.name, self._tokens = name if ok else check_name(name, "scope"), []

    def __enter__(self) -> Path:
        path = _PATH.get() + (self.name,)
        self._tokens.append(_PATH.set(path))
        return path

    def __exit__(self, *exc: Any) -> None:
        _PATH.reset(self._tokens.pop())


@contextlib.contextmanager
def at_path(path: Path) -> Iterator[Path]:
    """Set the current path outright, for one `with` block (lifted transforms, module calls and interop
    re-enter a scope this way)."""
    token = _PATH.set(path := tuple(path))
    try:
        yield path
    finally:
        _PATH.reset(token)


def under_path(path: Path, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Call `fn` with the current path set to `path` outright: `at_path` as one call (a module call's body)."""
    token = _PATH.set(path)
    try:
        return fn(*args, **kwargs)
    finally:
        _PATH.reset(token)


def current_path() -> Path:
    """The tuple of enclosing scope names.

    >>> fx.current_path()
    ()
    """
    return _PATH.get()
