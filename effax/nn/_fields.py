"""Field checks run when a layer is built: a config mistake is an `EffaxError` naming the field, never a raw
JAX error from deep inside the layer's first call (or a silent truthy string).

Layers are built on every eager call, so each check passes the usual value with a type test (`type(v) is
bool`, a set look-up for a dtype already seen); only an unusual value takes the slow path, which accepts
what is valid after all (a NumPy int, a dtype spelled another way) or raises.
"""

from __future__ import annotations

import difflib
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effax.core import EffaxError, path_now, path_str

_F32, _BF16 = jnp.float32, jnp.bfloat16
_DTYPES: set[Any] = {jnp.float16, "float32", "bfloat16"}  # other hashable dtype values known good; grows
_DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64", "int32", "int8", "uint8", "int64", "bool")
CONV_PADDINGS = ("SAME", "VALID", "SAME_LOWER", "CIRCULAR", "REFLECT", "CAUSAL")
TRANSPOSE_PADDINGS = ("SAME", "VALID", "CIRCULAR")  # JAX's transposed convolution has no SAME_LOWER


def _head(module: Any, field: str, value: Any) -> str:
    """`Dense(dtype='floot32')`, and where it is built inside a model (`, built at `encoder``)."""
    shown = repr(value)
    shown = shown if len(shown) <= 50 else shown[:47] + "..."
    path, name = path_now(), module.__dict__.get("name")
    named = "" if name is None else f", name={name!r}"
    return f"{type(module).__name__}({field}={shown}{named})" + (f", built at `{path_str(path)}`," if path else "")


def _got(value: Any) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)}"
    if type(value) in (int, float):
        return repr(value)
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 50 else shown[:47] + '...'}"


def _near(value: Any, names: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        return ""
    near = difflib.get_close_matches(value.upper() if names[0].isupper() else value, names, n=1, cutoff=0.6)
    return f" Did you mean {near[0]!r}?" if near else ""


def _positive(value: Any) -> bool:
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return False
    return n is not None and n > 0


def check_bools(module: Any, *fields: str, optional: tuple[str, ...] = ()) -> None:
    """Refuse a flag that is not True or False (`use_bias='no'` is truthy); `optional` ones may be None."""
    d = module.__dict__
    for field in fields:
        if type(d[field]) is not bool:
            _bool(module, field, d[field], optional=False)
    for field in optional:
        value = d[field]
        if value is not None and type(value) is not bool:
            _bool(module, field, value, optional=True)


def check_dtypes(module: Any, *fields: str) -> None:
    """Refuse a dtype NumPy does not know (`dtype='floot32'`), here rather than in the layer's first call."""
    d = module.__dict__
    for field in fields:
        value = d[field]
        if value is None or value is _F32 or value is _BF16:  # the usual values, by identity (hashing is slow)
            continue
        _dtype(module, field, value)


def check_layer(module: Any, bools: tuple[str, ...], dtypes: tuple[str, ...] = ("dtype", "param_dtype")) -> None:
    """`check_bools` and `check_dtypes` in one call: what most layers' `__post_init__` does."""
    check_bools(module, *bools)
    check_dtypes(module, *dtypes)


def _bool(module: Any, field: str, value: Any, optional: bool) -> None:
    if isinstance(value, np.bool_):
        return
    if isinstance(value, jax.core.Tracer):  # a Python flag that a JAX transform turned into an array
        raise EffaxError(
            f"{type(module).__name__}: `{field}` must be a Python bool, but it is a traced array "
            f"({_got(value)}): a JAX transform (`jax.jit`, `jax.vmap`, a scan carry, `jax.checkpoint`) traced the "
            "flag on its way here. Keep it static: close over it, or mark it static "
            f"(`jax.jit(f, static_argnames=...)`, an `in_axes` entry None in `fx.vmap`)."
        )
    raise EffaxError(
        f"{_head(module, field, value)}: `{field}` must be True or False"
        + (" (or None: decided by the mode)" if optional else "")
        + f", got {_got(value)}"
        + (f"; any non-empty string is truthy, so {value!r} would mean True" if isinstance(value, str) else "")
        + f". Write `{field}=False` or `{field}=True`."
    )


def _dtype(module: Any, field: str, value: Any) -> None:
    try:
        if value in _DTYPES:  # seen valid before
            return
    except TypeError:  # unhashable: checked below
        pass
    try:
        jnp.dtype(value)
        ok = not isinstance(value, bool)
    except (TypeError, ValueError):
        ok = False
    if ok:
        try:
            _DTYPES.add(value)
        except TypeError:
            pass
        return
    default = "None to compute in the inputs' dtype" if field == "dtype" else "jnp.float32 by default"
    raise EffaxError(
        f"{_head(module, field, value)}: `{field}` must be a dtype (jnp.float32, jnp.bfloat16, 'float32', "
        f"...; {default}), got {_got(value)}.{_near(value, _DTYPE_NAMES)} Write e.g. "
        f"`{type(module).__name__}(..., {field}=jnp.bfloat16)`."
    )


def check_positive(module: Any, *fields: str, optional: tuple[str, ...] = ()) -> None:
    """Strides and dilations: a positive int, or one per spatial dim; `optional` ones may be None."""
    d = module.__dict__
    for field in fields + optional:
        value = d[field]
        if (type(value) is int and value > 0) or (value is None and field in optional):
            continue
        many = not isinstance(value, (str, bytes)) and hasattr(value, "__iter__")
        if many and all(map(_positive, value)) or not many and _positive(value):
            continue
        raise EffaxError(
            f"{_head(module, field, value)}: `{field}` must be a positive int, or one per spatial dim "
            f"(`{field}=(2, 2)`)"
            + (", or None for 1" if field in optional else "")
            + f", got {_got(value)}. Write e.g. `{field}=1`."
        )


def check_padding(module: Any, known: tuple[str, ...] = CONV_PADDINGS) -> None:
    """`padding`: one of `known` (any case), an int, or one int or `(low, high)` pair per spatial dim."""
    value = module.__dict__["padding"]
    if type(value) is str and (value in known or value.upper() in known):
        return
    if isinstance(value, str):
        ok = False
    elif not hasattr(value, "__iter__"):
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    else:
        ok = all(
            (isinstance(p, (int, np.integer)) and not isinstance(p, bool))
            or (not isinstance(p, str) and hasattr(p, "__len__") and len(p) == 2
                and all(isinstance(q, (int, np.integer)) and not isinstance(q, bool) for q in p))
            for p in value
        )
    if ok:
        return
    raise EffaxError(
        f"{_head(module, 'padding', value)}: `padding` must be "
        + ", ".join(map(repr, known[:-1])) + f" or {known[-1]!r} (any case), an int, or one int or (low, high) "
        f"pair per spatial dim (`padding=((1, 1), (0, 0))`), got {_got(value)}.{_near(value, known)}"
    )


def check_rate(module: Any, field: str) -> None:
    """A probability given as a Python number in [0, 1] (`Dropout(0.1)`), not a string or an array of several."""
    value = module.__dict__[field]
    if type(value) is float and 0.0 <= value <= 1.0:
        return
    try:
        rate = None if isinstance(value, (bool, str, bytes)) else float(value)
    except (TypeError, ValueError):
        rate = None
    if rate is not None and 0.0 <= rate <= 1.0:
        return
    raise EffaxError(
        f"{_head(module, field, value)}: `{field}` must be in [0, 1], got {_got(value)}"
        + ("; a rate read from a config file or a string needs `float(...)` first" if isinstance(value, str) else "")
        + f". Write e.g. `{type(module).__name__}({field}=0.1)`."
    )


def check_callables(module: Any, *fields: str) -> None:
    """Functions given as fields (`activation`, `gate_fn`): refuse what cannot be called, when built."""
    d = module.__dict__
    for field in fields:
        value = d[field]
        if not callable(value):
            raise EffaxError(
                f"{_head(module, field, value)}: `{field}` must be a function, got {_got(value)}. Write e.g. "
                f"`{field}=jax.nn.relu`."
            )
