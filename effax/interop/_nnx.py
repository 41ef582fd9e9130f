"""Flax NNX interop: an NNX module as an effectful function (`fx.from_nnx`)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from effax.core import (
    EffaxError,
    FrozenStateError,
    MissingRngError,
    UnhandledEffectError,
    at_path,
    check_name,
    current_path,
    path_str,
    scope,
)
from effax.effects import local_state, param, sow, stream_key, stream_names
from effax.effects._param import is_axis


def _nnx() -> Any:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a test dependency
        raise EffaxError("`fx.from_nnx` needs Flax: `pip install flax`, or `pip install effax[flax]`.") from None
    return nnx


def _collection(nnx: Any, kind: type) -> str:
    """The Linen-style collection name Flax gives an NNX variable type (`BatchStat` -> `batch_stats`)."""
    try:
        return nnx.variablelib.variable_name_from_type(kind)
    except ValueError:
        return kind.__name__


def _axes(var: Any, value: Any, where: str) -> tuple[Any, ...] | None:
    """The variable's sharding names as `axes`, a tuple entry (one dimension split over several names)
    included, as `from_flax` keeps them; None when it has none. Fewer names than dimensions leave the rest
    None, as a `PartitionSpec` does; names effax cannot keep are refused, never dropped (a silent
    replication)."""
    metadata = var.get_metadata()
    names = next((metadata[k] for k in ("out_sharding", "sharding_names", "sharding") if metadata.get(k)), None)
    if names is None:
        return None
    shape = tuple(jnp.shape(value))
    names = getattr(names, "spec", names)  # a `NamedSharding`: its `PartitionSpec`
    if isinstance(names, (tuple, list)) and len(names) <= len(shape):
        names = tuple(names) + (None,) * (len(shape) - len(names))
        if all(map(is_axis, names)):
            return names
    raise EffaxError(
        f"NNX {where} has sharding names {names!r:.80} for shape {shape}: effax takes at most one entry per "
        "dimension, each a name, None or a tuple of names. Fix the `sharding=` given to the variable, or drop "
        "it to leave the variable replicated."
    )


def _key(tag: str, shape: tuple[int, ...]) -> tuple[jax.Array, bool]:
    """`fx.stream_key(tag)` here, or a stand-in and False when the run has no key for `tag`.

    NNX modules hold their streams even when they do not draw (a Dropout in
    eval); the stand-in is never used: drawing from it raises below.
    """
    names = stream_names()  # asked first: inside a lifted transform a missing key shows only outside it
    key, given = jax.random.key(0), False
    if names is None or tag in names:
        try:
            key, given = stream_key(tag), True
        except (MissingRngError, UnhandledEffectError):
            pass
    return (jax.random.split(key, shape) if shape else key), given


def _run(nnx: Any, graphdef: Any, entries: list, method: Any, args: tuple, kwargs: dict) -> Any:
    base = current_path()
    flat, cells, missing = [], [], []
    for path, names, var in entries:
        value = var.get_value()
        with at_path(base + names[:-1]):
            if isinstance(var, nnx.RngKey):
                new, given = _key(var.get_metadata()["tag"], tuple(value.shape))
                if not given:
                    missing.append((names, var.get_metadata()["tag"]))
            elif isinstance(var, nnx.RngCount):
                new = jnp.zeros_like(value)
            elif isinstance(var, nnx.Param):
                shape, dtype = tuple(jnp.shape(value)), jnp.result_type(value)
                axes = _axes(var, value, f"param `{path_str(names)}`")
                new = param(names[-1], lambda key, s, d, v=value: v, shape, dtype, axes=axes)
            else:
                c = _collection(nnx, type(var))
                axes = _axes(var, value, f"variable `{path_str(names)}` in collection {c!r}")
                cell = local_state(names[-1], lambda v=value: v, collection=c, axes=axes)
                new = cell.get()
                cells.append((path, cell, new))
        flat.append((path, var.replace(new)))

    # merge reuses the Variable objects, so keep the values given to compare with afterwards
    counts = {path: var.get_value() for path, var in flat if isinstance(var, nnx.RngCount)}
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    out = getattr(model, method)(*args, **kwargs) if isinstance(method, str) else method(model, *args, **kwargs)
    after = dict(nnx.to_flat_state(nnx.split(model)[1]))

    for names, tag in missing:
        count = names[:-1] + ("count",)
        path = next(p for p in counts if tuple(map(str, p)) == count)
        if after[path].get_value() is not counts[path]:
            with at_path(base + names[:-1]):
                stream_key(tag)  # raises MissingRngError, naming the stream and the streams given
    frozen: set[str] = set()
    for path, cell, old in cells:
        new = after[path].get_value()
        if new is not old and cell.collection not in frozen:
            try:
                cell.set(new)
            except FrozenStateError:
                frozen.add(cell.collection)
    known = {path for path, _ in flat}
    for path, var in after.items():
        if path in known:
            continue
        names = tuple(str(p) for p in path)
        value, collection = var.get_value(), _collection(nnx, type(var))
        with at_path(base + names[:-1]):
            for v in value if isinstance(value, tuple) else (value,):
                sow(names[-1], v, collection=collection)
    return out


def from_nnx(module: Any, *, name: str | None = None) -> Callable[..., Any]:
    """A Flax NNX module as an effectful function, its variables requested through effects.

    The module is split once (`nnx.split`); each call requests its variables
    under the current scope (plus `name`), merges a fresh copy with them
    (`nnx.merge`) and calls it, so the module given is never mutated.
    `nnx.Param`s go through `fx.param`; every other variable type through
    `fx.local_state` in the collection Flax names it (`BatchStat` ->
    `batch_stats`); variables the call adds (`sow`'s `Intermediate`s) come
    back through `fx.sow`. Init values are the module's own current values.

    Keys: an NNX stream held at module path `q` with tag `s` gets
    `fx.stream_key(s)` at scope `q`, and its count restarts at 0 each call;
    drawing from a stream `rngs` does not provide raises `MissingRngError`.
    A module's optional per-call `rngs=` keyword (`nnx.Dropout`,
    `nnx.Sequential`) is fed this way, so it is no clash with `t.apply`'s
    `rngs` option; a module that requires one is refused by `fx.transform`.

    State writes: the variables the module changed are `set`. NNX has no
    immutable collections, so in a collection that is frozen in the run its
    writes are dropped; put the module in eval mode (`module.eval()`, or
    `deterministic=True`, `use_running_average=True`) for evaluation.

    Call it like the module, `f(x)`, or another method, `f(x, method="encode")`.

    >>> from flax import nnx
    >>> linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> t = fx.transform(fx.from_nnx(linear))
    >>> variables = t.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> bool(jnp.array_equal(t.apply(variables, jnp.ones((1, 3))), linear(jnp.ones((1, 3)))))
    True
    """
    nnx = _nnx()
    if not isinstance(module, nnx.Module):
        raise EffaxError(
            f"`fx.from_nnx` takes a Flax NNX module (an `nnx.Module` instance), got "
            f"{type(module).__name__}. For Flax linen modules use `fx.from_flax`."
        )
    if name is not None:
        check_name(name, "scope")
    graphdef, state = nnx.split(module)
    entries = []
    for path, var in nnx.to_flat_state(state):
        names = tuple(str(p) for p in path)
        for n in names:
            check_name(n, "NNX attribute")
        entries.append((path, names, var))

    def nnx_module(*args: Any, method: Any = "__call__", **kwargs: Any) -> Any:
        if name is None:
            return _run(nnx, graphdef, entries, method, args, kwargs)
        with scope(name):
            return _run(nnx, graphdef, entries, method, args, kwargs)

    nnx_module.__qualname__ = nnx_module.__name__ = f"from_nnx({type(module).__name__})"
    try:  # the module's own signature: `fx.transform` reads it to refuse keywords named like its options
        signature = inspect.signature(module.__call__)
        # but NNX's per-call key override (`rngs=None` of `nnx.Dropout`, `nnx.Sequential`, attention) is what
        # effax's own `rngs` feeds through the module's streams: not a clash, and the stock modules stay usable
        own = [p for p in signature.parameters.values()
               if p.name != "rngs" or p.default is inspect.Parameter.empty]
        nnx_module.__signature__ = signature.replace(parameters=own)  # type: ignore[attr-defined]
    except (TypeError, ValueError, AttributeError):
        pass
    api = set(dir(nnx.Module))
    for attr in dir(type(module)):  # `f.encode`, so `t.apply(v, x, method="encode")` reaches the method
        if not attr.startswith("_") and attr not in api and callable(getattr(type(module), attr, None)):
            setattr(nnx_module, attr, functools.partial(nnx_module, method=attr))
    return nnx_module
