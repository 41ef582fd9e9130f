"""Law 14, lifting: `fx.scan`/`fx.vmap`/`fx.remat` of a model equal the unrolled or mapped model.

The reference runs the model `n` times in scopes `l0, l1, ...`, under a
handler (`Iteration`) that gives iteration `i` exactly what the lifted
transform gives it: the param initialized with `fold_in(k_p, i)` and the
`n`-th draw at path `p` as `fold_in(k_{p,n}, i)`, `k` being what the model
unlifted would get at `p`. The lifted model's variables, restacked into
`l<i>` scopes, must then give the reference's init values, outputs, state
updates and sown values, under the built-in handlers and any extra ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import effax as fx
from effax.core import send

CONTEXTS = ("scan", "vmap", "remat")


class _Rekeyed:
    """An initializer that draws its key where the lifted transform would: `fold_in(key of path p, i)`."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, init: Callable[..., Any], path: tuple[str, ...], i: int):
        self.init, self.path, self.i = init, path, i

    def __call__(self, key: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        base = send(fx.StreamKeyRequest(self.path, "params"))  # asked of the handlers outside
        return self.init(jax.random.fold_in(base, self.i), shape, dtype)


class Iteration(fx.Handler):
    """Inside scope `l<i>`, answer keys and param initializers as iteration `i` of a lifted transform."""

    def __init__(self, i: int):
        self.i = i

    def begin(self) -> _IterationRun:
        return _IterationRun(self.i)


class _IterationRun:
    answers = (fx.ParamRequest, fx.RandomRequest, fx.StreamKeyRequest)

    def __init__(self, i: int):
        self.i = i
        self.counts: dict[tuple, int] = {}

    def handle(self, request: Any, forward: Any) -> Any:
        if isinstance(request, fx.ParamRequest):
            return forward(dataclasses.replace(request, init=_Rekeyed(request.init, request.path[1:], self.i)))
        if isinstance(request, (fx.RandomRequest, fx.StreamKeyRequest)):
            base = forward(fx.StreamKeyRequest(request.path[1:], request.stream))
            if isinstance(request, fx.StreamKeyRequest):
                return jax.random.fold_in(base, self.i)
            slot = (request.stream, request.path)
            n = self.counts.get(slot, 0)
            self.counts[slot] = n + 1
            return jax.random.fold_in(jax.random.fold_in(base, n), self.i)
        return forward(request)


def lifted(model: Callable[[Any], Any], context: str, n: int) -> Callable[[Any], Any]:
    """`model` run `n` times through the lifted transform `context` (remat: once)."""
    if context == "scan":
        return lambda x: fx.scan(lambda h, _: (model(h), None), length=n)(x)[0]
    if context == "vmap":
        return fx.vmap(model, in_axes=None, axis_size=n)
    if context == "remat":
        return fx.remat(model)
    raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")


def unrolled(model: Callable[[Any], Any], context: str, n: int) -> Callable[[Any], Any]:
    """What `lifted(model, context, n)` must equal: a Python loop (scan), a list of members (vmap), the model."""
    if context == "remat":
        return model

    def run(x: Any) -> Any:
        h, outs = x, []
        for i in range(n):
            with fx.scope(f"l{i}"), fx.handle(Iteration(i)):
                out = model(h if context == "scan" else x)
            h = out
            outs.append(out)
        return h if context == "scan" else jnp.stack(outs)

    return run


def restack(tree: dict[str, Any], n: int | None) -> dict[str, Any]:
    """Lifted variables (leading axis `n`) as the unrolled model's: `{"l<i>": slice i}` per collection."""
    if n is None:
        return tree
    return {
        c: {f"l{i}": jax.tree.map(lambda a, i=i: a[i], sub) for i in range(n)} if jax.tree.leaves(sub) else sub
        for c, sub in tree.items()
    }


def _close(what: str, got: Any, want: Any) -> None:
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    if got_tree != want_tree:
        raise AssertionError(
            f"effax law `lifting` does not hold: {what} has structure {got_tree}, the unrolled model {want_tree}"
        )
    for a, b in zip(got_leaves, want_leaves, strict=True):
        tol = 1e-2 if jnp.result_type(a) == jnp.bfloat16 else 1e-5
        if not np.allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol):
            raise AssertionError(
                f"effax law `lifting` does not hold: {what} differs from the unrolled model: {a} vs {b}"
            )


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

    `handlers` are installed in both runs (the handler under test). Raises
    `AssertionError` naming what differs.

    >>> from effax.testing.models import Model, Param, Draw
    >>> model = Model([Param("w0", init="normal"), Draw("d0")], in_size=2)
    >>> check_lifting(model, jnp.ones(2), jax.random.key(0), context="scan", training=True)
    """
    t, ref = fx.transform(lifted(model, context, n)), fx.transform(unrolled(model, context, n))
    lead = None if context == "remat" else n
    rngs = key  # one key serves every stream
    options = dict(training=training, handlers=list(handlers))
    out, v = t.init_with_output(rngs, x, mutable=True, **options)
    out_ref, v_ref = ref.init_with_output(rngs, x, mutable=True, **options)
    _close("init's output", out, out_ref)
    _close("init's variables", restack(v, lead), v_ref)
    state = t.init(rngs, x, **options)  # params and state, no sown values
    out, updates = t.apply(state, x, rngs=rngs, mutable=True, **options)
    out_ref, updates_ref = ref.apply(restack(state, lead), x, rngs=rngs, mutable=True, **options)
    _close("apply's output", out, out_ref)
    _close("apply's updates", restack(updates, lead), updates_ref)
