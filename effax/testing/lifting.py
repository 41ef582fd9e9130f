"""Law 14, lifting: `fx.scan`/`fx.vmap`/`fx.remat` of a model equal the unrolled or mapped model.

The reference runs the unlifted model once per iteration (scan: chained
through the carry; vmap: each member on the same input), each iteration a
run of its own on iteration `i`'s slice of the variables, so every handler
sees the same paths as in the lifted body. An `Iteration` handler (inside
the built-in handlers and the stateful ones under test, outside the
stateless ones, as the lifted body places them) gives iteration `i` what
the lifted transform gives it: a param initialized with `fold_in(k, i)`,
the `n`-th draw at a path as `fold_in(k_n, i)` and a stream's base key as
`fold_in(fold_in(b, 2**32 - 1), i)`, `k`, `k_n` and `b` being what the
unlifted model gets there. The lifted model's init values, outputs, state
updates and sown values must equal the reference's, restacked, under the
built-in handlers and the handler under test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import effax as fx
from effax.testing.laws import _float_dtypes, difference, tolerance
from effax.testing.models import LawKitError

CONTEXTS = ("scan", "vmap", "remat")


class _Rekeyed:
    """An initializer that uses the key it is given as the lifted transform does: `fold_in(key, i)`."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, init: Callable[..., Any], i: int):
        self.init, self.i = init, i

    def __call__(self, key: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.init(jax.random.fold_in(key, self.i), shape, dtype)


# `effax.lift` gives iteration i the base key `fold_in(fold_in(b, _BASES), i)`: `fold_in(b, i)` is the i-th
# `next_key` drawn at the same path, which it would repeat.
_BASES = 0xFFFF_FFFF


class Iteration(fx.Handler):
    """Answer keys and param initializers as iteration `i` of a lifted transform gets them.

    >>> t = fx.transform(lambda: jax.random.key_data(fx.next_key("noise")))
    >>> k1 = t.apply({}, rngs=jax.random.key(0), handlers=[Iteration(1)])
    >>> k0 = t.apply({}, rngs=jax.random.key(0))
    >>> bool((k1 == jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(k0), 1))).all())
    True
    """

    answers = (fx.ParamRequest, fx.RandomRequest, fx.StreamKeyRequest)

    def __init__(self, i: int):
        self.i = i

    def handle(self, request: Any, forward: Any) -> Any:
        if isinstance(request, fx.ParamRequest):
            return forward(dataclasses.replace(request, init=_Rekeyed(request.init, self.i)))
        key = forward(request)
        if isinstance(request, fx.StreamKeyRequest):
            key = jax.random.fold_in(key, _BASES)
        return jax.random.fold_in(key, self.i)


def lifted(model: Callable[[Any], Any], context: str, n: int) -> Callable[[Any], Any]:
    """`model` run `n` times through the lifted transform `context` (remat: once)."""
    if context == "scan":
        return lambda x: fx.scan(lambda h, _: (model(h), None), length=n)(x)[0]
    if context == "vmap":
        return fx.vmap(model, in_axes=None, axis_size=n)
    if context == "remat":
        return fx.remat(model)
    raise LawKitError(f"context must be one of {CONTEXTS}, got {context!r}.")


def _slice(tree: Any, i: int) -> Any:
    return jax.tree.map(lambda a: a[i], tree)


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def reference(
    model: Callable[[Any], Any],
    context: str,
    n: int,
    x: Any,
    key: Any,
    *,
    training: bool,
    handlers: Sequence[Any],
    variables: Any = None,
) -> tuple[Any, Any]:
    """What the lifted model must give: `(output, variables)` of `init_with_output` when `variables` is None,
    else `(output, updates)` of `apply(..., mutable=True)`, stacked over the iterations like the lifted model's."""
    t = fx.transform(model)
    options = dict(rngs=key, training=training, mutable=True)
    if context == "remat":
        hs = list(handlers)
        if variables is None:
            return t.init_with_output(key, x, training=training, mutable=True, handlers=hs)
        return t.apply(variables, x, handlers=hs, **options)
    outs, made, h = [], [], x
    handlers = list(handlers)
    # Where iteration i's keys are derived: inside the handlers with per-run state, whose answers the lifted
    # transform folds after the fact; outside the stateless ones, which run inside the lifted body.
    stateful = [j for j, handler in enumerate(handlers) if handler.begin() is not handler]
    at = stateful[-1] + 1 if stateful else 0
    for i in range(n):
        hs = [*handlers[:at], Iteration(i), *handlers[at:]]
        given = h if context == "scan" else x
        if variables is None:
            out, v = t.init_with_output(key, given, training=training, mutable=True, handlers=hs)
        else:
            out, v = t.apply(_slice(variables, i), given, handlers=hs, **options)
        outs.append(out)
        made.append(v)
        h = out
    out = h if context == "scan" else jnp.stack(outs)
    return out, {c: _stack([m[c] for m in made]) for c in made[0]}


class LiftingMismatch(AssertionError):
    """Law 14 failed: `what` of the lifted model differs from the unrolled one, `detail` says where and how."""

    def __init__(self, what: str, detail: str | None = None):
        lines = [f"effax law `lifting` does not hold: {what}", *[f"  {x}" for x in (detail or "").splitlines()]]
        super().__init__("\n".join(lines))
        self.what, self.detail = what, detail


def _close(
    what: str, got: Any, want: Any, model_dtypes: Sequence[Any] = (), names: tuple[str, str] = ("lifted", "unrolled")
) -> None:
    """Leaves agree within `laws.tolerance` of their dtypes and the model's float dtypes: a lifted body is
    compiled while the unrolled reference runs op by op, and XLA computes fused bfloat16 arithmetic (an
    initializer's, the model's) at another precision than eager ops, so a model with a bfloat16 variable
    agrees only to bfloat16's precision, even in its float32 outputs. `what` names the result (one of
    `laws`' result names, so a difference is located as `variables after init['params'] at `w0``)."""
    rtol, atol = tolerance(*_float_dtypes(got), *model_dtypes)
    diff = difference({what: got}, {what: want}, names=names, rtol=rtol, atol=atol)
    if diff is not None:
        raise LiftingMismatch(f"{what} differs from the unrolled model", diff)


def check_lifting(
    model: Callable[[Any], Any],
    x: Any,
    key: jax.Array,
    *,
    context: str,
    n: int = 2,
    training: bool = False,
    handlers: Sequence[Any] = (),
) -> None:
    """Law 14 for one model: the lifted model equals the unrolled one in init, apply and updates.

    `handlers` are installed in both (the handler under test). Raises
    `AssertionError` naming what differs.

    >>> from effax.testing.models import Model, Param, Draw
    >>> model = Model([Param("w0", init="normal"), Draw("d0")], in_size=2)
    >>> check_lifting(model, jnp.ones(2), jax.random.key(0), context="scan", training=True)
    """
    t = fx.transform(lifted(model, context, n))
    handlers = list(handlers)
    common = dict(training=training, handlers=handlers)
    out, v = t.init_with_output(key, x, mutable=True, **common)
    out_ref, v_ref = reference(model, context, n, x, key, **common)
    # the model's own param dtypes too: a handler that answers params itself stores none in the variables
    specs = model.param_specs() if hasattr(model, "param_specs") else {}
    dtypes = sorted(_float_dtypes(v_ref) | {dtype for _, dtype in specs.values()})
    names = (f"under fx.{context}", "unrolled")
    _close("output of init", out, out_ref, dtypes, names)
    _close("variables after init", v, v_ref, dtypes, names)
    state = t.init(key, x, **common)  # params and state, no sown values
    out, updates = t.apply(state, x, rngs=key, mutable=True, **common)
    out_ref, updates_ref = reference(model, context, n, x, key, variables=state, **common)
    _close("output of apply", out, out_ref, dtypes, names)
    _close("updates after apply", updates, updates_ref, dtypes, names)
