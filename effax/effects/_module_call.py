"""The module-call effect: every `fx.nn.Module` call is a request a handler can observe, change or replace.

Unhandled, the request simply runs the call, so no handler is needed. When
no handler on the stack looks at module calls the request is not even built:
the call costs a few dict look-ups at trace time and nothing in the compiled
program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

from effax.core import Path, Request, at_path, current_stack, path_str, send, under_path, under_stack


@dataclasses.dataclass(frozen=True, eq=False)
class ModuleCallRequest(Request):
    """A call `module.<method>(*args, **kwargs)` of the module at `path`; unhandled, it runs the call.

    A handler sees it at the module's path (`fx.current_path() == request.path`)
    and may observe it (`out = forward(request)`), change the arguments
    (`forward(dataclasses.replace(request, args=...))`) or the result, or replace
    the call (return without forwarding). The body, run when the request
    falls off the stack, runs under every handler of the call site, so the
    module calls and effects inside it are seen by the interceptors too.
    Every handler gets module calls unless its class declares `answers`
    without `ModuleCallRequest` (effax's built-in handlers do), and when no
    installed handler looks the request is not even built.

    >>> class Double(fx.Handler):
    ...     def handle(self, request, forward):
    ...         out = forward(request)
    ...         return out * 2 if isinstance(request, fx.ModuleCallRequest) else out
    >>> t = fx.transform(lambda x: fx.nn.Dense(1, kernel_init=jax.nn.initializers.ones)(x))
    >>> v = t.init(jax.random.key(0), jnp.ones((1, 2)))
    >>> t.apply(v, jnp.ones((1, 2)), handlers=[Double()])
    Array([[4.]], dtype=float32)
    """

    kind: ClassVar[str] = "module_call"  # the one name of this request, in errors, tables and the testing kit
    effect: ClassVar[str] = "module_call"  # the effect (family of requests) it belongs to

    module: Any
    method: str
    args: tuple
    kwargs: dict
    body: Callable[[ModuleCallRequest], Any] = dataclasses.field(repr=False)

    @property
    def method_name(self) -> str:
        """The method's name (Flax's and Haiku's interceptor contexts call it this)."""
        return self.method

    def describe(self) -> str:
        return f"call of `{type(self.module).__name__}.{self.method}` at `{path_str(self.path)}`"

    def unhandled(self) -> Any:
        return self.body(self)


def sees_module_calls(run: Any) -> bool:
    """Whether the handler run `run` is sent module-call requests: unless its `answers` leave them out.

    A handler you write sees every request unless it declares what it
    answers; effax's own handlers (params, state, keys, ...) declare theirs,
    so with only them installed no module-call request is built at all.
    """
    answers = getattr(run, "answers", None)
    return answers is None or ModuleCallRequest in answers


def _body(stack: tuple[Any, ...], fn: Callable[..., Any], names: Any, request: ModuleCallRequest) -> Any:
    """Run the method in the module's scope under the call site's handlers (all of them, the interceptors too)."""
    saved = None if names is None else names.enter(request.path, request.method)
    try:
        with at_path(request.path):
            return under_stack(stack, fn, request.module, *request.args, **request.kwargs)
    finally:
        if names is not None:
            names.leave(saved)


def call_module(
    path: Path, module: Any, method: str, fn: Callable[..., Any], args: tuple, kwargs: dict, names: Any
) -> Any:
    """Perform the call `fn(module, *args, **kwargs)` of the module at `path` as a module-call request.

    `names` is the run's `Names` when the call starts a fresh naming frame (a
    call from outside the module), None for a method of the module calling
    another one. `fx.nn.Module` calls this for every call; write modules, not
    calls to this.
    """
    if not current_stack().routes[ModuleCallRequest]:  # the fast path: no run answers module calls
        if names is None:
            return fn(module, *args, **kwargs)
        saved = names.enter(path, method)
        try:
            return under_path(path, fn, module, *args, **kwargs)
        finally:
            names.leave(saved)
    body = functools.partial(_body, current_stack(), fn, names)
    with at_path(path):
        return send(ModuleCallRequest(path, module, method, args, kwargs, body))
