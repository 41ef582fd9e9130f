"""Handlers over module calls: intercept them (Flax's and Haiku's `intercept_methods`) or capture their outputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from effax.core import EffaxError, Handler
from effax.effects import CaptureRequest, ModuleCallRequest, sow

Interceptor = Callable[[Callable[..., Any], tuple, dict, ModuleCallRequest], Any]
CallFilter = Callable[[Any, str], bool]


class InterceptMethods(Handler):
    """Run `interceptor(next_fun, args, kwargs, context)` around every `fx.nn.Module` call.

    The signature is Flax's and Haiku's: `next_fun(*args, **kwargs)` runs
    the call (through the handlers outside, then the method body), and
    `context` is the `fx.ModuleCallRequest` (`.path`, `.module`, `.method`).
    The interceptor may change the arguments or the result, or return
    without calling `next_fun` to replace the call. With nested handlers the
    innermost intercepts first, so it wraps the others: effax's one
    precedence rule. Flax and Haiku call the *outermost* interceptor first,
    so `with nn.intercept_methods(a): with nn.intercept_methods(b): ...`
    translates to `handlers=[InterceptMethods(b), InterceptMethods(a)]`
    (reverse the order: the last handler is innermost and runs first).

    >>> def double_dense(next_fun, args, kwargs, context):
    ...     out = next_fun(*args, **kwargs)
    ...     return out * 2 if isinstance(context.module, fx.nn.Dense) else out
    >>> t = fx.transform(lambda x: fx.nn.Dense(1, kernel_init=jax.nn.initializers.ones)(x))
    >>> v = t.init(jax.random.key(0), jnp.ones((1, 2)))
    >>> t.apply(v, jnp.ones((1, 2)), handlers=[fx.handlers.InterceptMethods(double_dense)])
    Array([[4.]], dtype=float32)
    """

    answers = (ModuleCallRequest,)

    def __init__(self, interceptor: Interceptor):
        if not callable(interceptor):
            raise EffaxError(
                f"InterceptMethods takes a function `interceptor(next_fun, args, kwargs, context)`, "
                f"got {type(interceptor).__name__}."
            )
        self.interceptor = interceptor

    def handle(self, request: Any, forward: Callable[[Any], Any]) -> Any:
        if type(request) is not ModuleCallRequest:
            return forward(request)

        def next_fun(*args: Any, **kwargs: Any) -> Any:
            return forward(dataclasses.replace(request, args=args, kwargs=kwargs))

        return self.interceptor(next_fun, request.args, request.kwargs, request)


def _call_only(module: Any, method: str) -> bool:
    return method == "__call__"


class CaptureIntermediates(Handler):
    """Sow the output of every module call that `filter(module, method)` picks into `"intermediates"`.

    The output lands at the module's path under the method's name, as a
    tuple with one entry per call: `{"Dense_0": {"__call__": (y,)}}`, Flax's
    layout. `filter=True` picks every `__call__` (Flax's default). It also
    answers `fx.effects.capture_filter()`, so `fx.from_flax` modules capture
    Flax's own intermediates with the same filter, under the module's path. It records
    what the caller receives, after the handlers inside it. This is what
    `t.init`/`t.apply(..., capture_intermediates=...)` install; the sown
    values are collected when `"intermediates"` is mutable.

    >>> t = fx.transform(lambda x: fx.nn.Dense(2)(x))
    >>> x = jnp.ones((1, 3))
    >>> v = t.init(jax.random.key(0), x)
    >>> with fx.handle(fx.handlers.LoadParams(v["params"]), fx.handlers.CollectSown(True),
    ...                fx.handlers.CaptureIntermediates()) as (_, sown, _):
    ...     y = t.fn(x)
    >>> jax.tree.map(jnp.shape, sown.collections())
    {'intermediates': {'Dense_0': {'__call__': ((1, 2),)}}}
    """

    answers = (ModuleCallRequest, CaptureRequest)

    def __init__(self, filter: bool | CallFilter = True):  # noqa: A002 - Flax's name for it
        if filter is True:
            filter = _call_only
        elif not callable(filter):
            raise EffaxError(
                f"capture_intermediates takes True or a function `filter(module, method_name) -> bool`, got {filter!r}."
            )
        self.filter = filter

    def handle(self, request: Any, forward: Callable[[Any], Any]) -> Any:
        if type(request) is CaptureRequest:  # code running another library's modules captures their calls too
            return self.filter
        out = forward(request)
        if type(request) is ModuleCallRequest and self.filter(request.module, request.method):
            sow(request.method, out)  # sent from the module's path, to the handlers outside this one
        return out
