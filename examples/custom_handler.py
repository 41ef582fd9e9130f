"""Write your own handler, then prove it obeys the laws the rest of effax relies on.

Run: python examples/custom_handler.py   (needs hypothesis: pip install -e ".[examples]")

Two small handlers:
- `BFloat16Params` answers every param with its value rounded through
  bfloat16 (a cheap way to see how a model fares with low-precision weights);
- `RequestLog` answers nothing and records what the model asked for.

`effax.testing` then checks them over generated models (random mixes of
params, state, key draws, sows, side inputs and scopes): answers match their
requests, fresh keys, determinism, locality, init/apply agreement, abstract
init, the state laws, forwarding identity, commutation and nesting with the
built-in handlers, sharing, reuse of one instance, and purity under
`jax.jit`. A property of our own (rounding twice is rounding once) uses the
same strategies, and a sloppy variant shows what a caught bug looks like: it
rounds state too, so a `get` no longer returns what the model `set`.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
from hypothesis import given, settings

import effax as fx
from effax.testing import assert_handler_laws, strategies


class BFloat16Params(fx.Handler):
    """Answer each param rounded through bfloat16, keeping its declared dtype."""

    def handle(self, request: Any, forward: Any) -> Any:
        value = forward(request)
        if isinstance(request, fx.ParamRequest):
            return value.astype(jnp.bfloat16).astype(request.dtype)
        return value


class RequestLog(fx.Handler):
    """Record `request.describe()` for every request; the log lives on the run, not the handler."""

    def begin(self) -> _LogRun:
        return _LogRun()


class _LogRun:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def handle(self, request: Any, forward: Any) -> Any:
        self.lines.append(request.describe())
        return forward(request)


class SloppyBFloat16(fx.Handler):
    """A buggy variant: it rounds every float answer it sees, state and side inputs included."""

    def handle(self, request: Any, forward: Any) -> Any:
        value = forward(request)
        if hasattr(value, "astype") and jnp.issubdtype(value.dtype, jnp.floating):
            return value.astype(jnp.bfloat16).astype(value.dtype)
        return value


def model(x: jax.Array) -> jax.Array:
    with fx.scope("dense"):
        w = fx.param("kernel", jax.nn.initializers.normal(1.0), (x.shape[-1], 3))
    return jnp.tanh(x @ w)


def catch_sloppy(seed: int | None = None, max_examples: int = 10) -> str | None:
    """Run the laws on the sloppy variant; return the failure (None if it slipped through)."""
    try:
        assert_handler_laws(SloppyBFloat16, effects=("param",), max_examples=max_examples, seed=seed)
    except AssertionError as e:
        return str(e)
    return None


def main(max_examples: int = 10, seed: int | None = 0, verbose: bool = True) -> dict[str, Any]:
    t = fx.transform(model)
    x = jnp.linspace(-1.0, 1.0, 4)
    variables = t.init(jax.random.key(0), x)
    full = t.apply(variables, x)
    with fx.handle(fx.handlers.LoadParams(variables["params"]), BFloat16Params(), RequestLog()) as (_, _, log):
        rounded = model(x)  # the run objects come back from `fx.handle`: read the log there
    if verbose:
        print("requests:", "; ".join(log.lines))
        print(f"max |full - bfloat16 weights| = {float(jnp.max(jnp.abs(full - rounded))):.2e}")

    # The laws, over generated models. Each raises AssertionError naming the law, the request and the
    # smallest model's requests. `seed` makes the run reproducible (None: a new random run each time).
    assert_handler_laws(BFloat16Params, effects=("param",), max_examples=max_examples, seed=seed)
    assert_handler_laws(RequestLog, max_examples=max_examples, seed=seed)

    # A property of our own, with the same strategies: rounding twice is rounding once.
    @settings(max_examples=max_examples, deadline=None, database=None)
    @given(strategies.models_and_inputs(require=("param",)), strategies.keys())
    def rounding_is_idempotent(model_and_x: Any, key: jax.Array) -> None:
        generated, x = model_and_x
        t = fx.transform(generated)
        variables = t.init(key, x)
        once = t.apply(variables, x, rngs=key, training=False, mutable=True, handlers=[BFloat16Params()])
        twice = t.apply(
            variables, x, rngs=key, training=False, mutable=True, handlers=[BFloat16Params(), BFloat16Params()]
        )
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), once, twice))

    rounding_is_idempotent()

    # What a caught bug looks like.
    caught = catch_sloppy(seed, max_examples)
    if verbose:
        print("BFloat16Params and RequestLog obey every law; rounding twice is rounding once.")
        print("The sloppy variant is caught:\n" + (caught or "(not caught)").split("\nrebuild")[0])
    return {"log": log.lines, "max_abs_diff": float(jnp.max(jnp.abs(full - rounded))), "caught": caught}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: a new random run)")
    args = parser.parse_args()
    main(args.max_examples, args.seed)
