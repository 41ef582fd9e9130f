"""`fx.check_variables`: a pure comparison of what `init` would make with the variables you have."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax

from effax.core import EffaxError
from effax.discharge import Transformed, transform
from effax.discharge._transform import OPTIONS, _check_variables_arg, refuse_module_class
from effax.inspect._abstract import run_abstractly
from effax.inspect._diff import VariablesReport, diff_variables
from effax.inspect._inventory import check_arguments


def check_variables(
    t: Any,
    variables: Mapping[str, Any],
    /,
    *args: Any,
    rngs: Any = None,
    training: bool | None = None,
    handlers: Any = (),
    **kwargs: Any,
) -> VariablesReport:
    """List every missing, unused, mis-shaped and mis-typed entry of `variables` for the model, at once.

    It compares `jax.eval_shape(t.init, ...)` under the same `handlers=`
    (side inputs, interceptors that create params, presets) with the given
    variables: the model never runs on them, so any stored value (a
    mis-shaped state, a boxed Flax value, a string) is reported, not
    raised. Nothing is computed or allocated. `t` is what `fx.transform`
    returned or the effectful function (as in `fx.summary`). Without `rngs`,
    a dummy key serves every stream; `training` is `init`'s (False when None).
    Sown values (`capture_intermediates`, `mutable` naming a sown collection)
    are a run's outputs, not variables: neither required nor reported unused.

    >>> t = fx.transform(lambda: fx.param("w", jax.nn.initializers.zeros, (2,)))
    >>> print(fx.check_variables(t, {"params": {"v": jnp.zeros(2)}}))
    missing: params:w (float32[2]); nearest in the variables: 'params:v'
    unused: params:v (float32[2])
    """
    refuse_module_class(t, "fx.check_variables", "fx.check_variables({}, variables, x)")
    init = getattr(t, "init", None)
    if not callable(init):
        if not callable(t):
            raise EffaxError(
                f"fx.check_variables takes a model: what `fx.transform` or `fx.multi_transform` returned, or the "
                f"effectful function; "
                f"got {type(t).__name__}."
            )
        t = transform(t)
        init = t.init
    if isinstance(t, Transformed):  # (a `fx.multi_transform`'s init has no one entry point to check)
        model_kwargs = {k: v for k, v in kwargs.items() if k not in OPTIONS}  # not `init`'s own options
        check_arguments(t, kwargs.get("method"), args, model_kwargs, "fx.check_variables",
                        "fx.check_variables(t, variables, x)")
    variables = _check_variables_arg(variables)  # the same refusal as `t.apply`'s
    key = jax.random.key(0) if rngs is None else rngs
    # `apply` with these options needs the variables `init` makes by default: every param and state
    # collection. `mutable` and `capture_intermediates` add the run's sown values (outputs, not variables:
    # neither needed nor unused, so `t.init(..., capture_intermediates=True)`'s result checks too) and, for
    # `mutable`, drop state collections it does not name.
    sowing = {k: kwargs.pop(k) for k in ("mutable", "capture_intermediates") if k in kwargs}
    run = functools.partial(init, training=False if training is None else training, handlers=handlers)
    expected = run_abstractly(run, key, *args, **kwargs)
    if any(sowing.values()):
        sown = set(run_abstractly(run, key, *args, **kwargs, **sowing)) - set(expected)
        variables = {c: tree for c, tree in variables.items() if c not in sown}
    return diff_variables(expected, variables)
