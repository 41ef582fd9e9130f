"""The one abstract run: call a function under `jax.eval_shape`, arrays traced, everything else static.

`fx.effects_of`, `fx.summary`, `fx.check_variables` and the lifted
transforms' learning pass all run code this way, so nothing is computed and
no parameter memory is allocated. While `abstract_mode()` is on, lifted
transforms only say what they request and return zeros of their output's
shape instead of running their JAX transform: a pass that only learns what
a model asks for traces each body once, however deeply transforms nest.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

_ABSTRACT: contextvars.ContextVar[bool] = contextvars.ContextVar("effax_abstract_mode", default=False)


def abstract_mode() -> bool:
    """Whether the code running now only learns what it requests (lifted transforms skip their work).

    >>> from effax.inspect import abstract_mode, run_abstractly
    >>> abstract_mode()
    False
    >>> run_abstractly(lambda: print("learning only:", abstract_mode()), learn_only=True)
    learning only: True
    """
    return _ABSTRACT.get()


class abstractly:
    """Run a block in abstract mode (or, with `on=False`, out of it).

    A context manager, so abstract mode ends with the block, even on an exception.

    >>> from effax.inspect import abstract_mode, abstractly
    >>> with abstractly():
    ...     print(abstract_mode())
    ...     with abstractly(on=False):
    ...         print(abstract_mode())
    True
    False
    """

    __slots__ = ("on", "_token")

    def __init__(self, on: bool = True):
        self.on = on

    def __enter__(self) -> None:
        self._token = _ABSTRACT.set(self.on)

    def __exit__(self, *exc: Any) -> None:
        _ABSTRACT.reset(self._token)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def run_abstractly(
    fn: Callable[..., Any],
    *args: Any,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
    learn_only: bool = False,
    **kwargs: Any,
) -> Any:
    """`fn(*args, **kwargs)` under `jax.eval_shape` (and `wrap`, e.g. a `jax.vmap`); returns the output's shapes.

    Arrays and `jax.ShapeDtypeStruct`s among the arguments are traced; other
    leaves (Python numbers, flags, strings) stay static, as `t.init` sees
    them (with `wrap`, every argument is traced, as the wrapping transform
    needs). `learn_only=True` runs it in abstract mode.

    >>> from effax.inspect import run_abstractly
    >>> run_abstractly(lambda x, n: x.sum(0) * n, jax.ShapeDtypeStruct((4, 3), jnp.float32), 2)
    ShapeDtypeStruct(shape=(3,), dtype=float32)
    """
    if wrap is not None:

        def wrapped(*args: Any) -> Any:
            with abstractly(learn_only):
                return fn(*args, **kwargs)

        return jax.eval_shape(wrap(wrapped), *args)
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = [i for i, x in enumerate(leaves) if _is_array(x)]

    def run(*values: Any) -> Any:
        full = list(leaves)
        for i, v in zip(dynamic, values, strict=True):
            full[i] = v
        a, k = jax.tree.unflatten(treedef, full)
        with abstractly(learn_only):
            return fn(*a, **k)

    return jax.eval_shape(run, *[leaves[i] for i in dynamic])
