"""Which JAX trace a run began in: effects that create or consume something must come from that trace.

A raw `jax.lax.scan`/`vmap`/`checkpoint`/`jit` inside a model would leak what
a handler creates out of its trace (or repeat it on every step); the runs of
params, state, keys and sows record `trace_state()` in `begin()` and refuse
such requests with a message that points to the lifted transforms.
"""

from __future__ import annotations

from typing import Any

from jax.extend.core import get_opaque_trace_state

from effax.core import Request, TraceMismatchError


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
