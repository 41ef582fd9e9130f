"""Flax linen interop: a linen module as an effectful function (`fx.from_flax`)."""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from effax.core import (
    EffaxError,
    FrozenStateError,
    at_path,
    check_name,
    current_path,
    get_path,
    path_str,
    scope,
)
from effax.effects import local_state, param, stream_key
from effax.interop._common import is_mutable, request_tree, sow_tree

_RNG_STREAM = re.compile(r'needs PRNG for "([^"]+)"')
_IMMUTABLE = re.compile(r'collection "([^"]+)" is immutable')
_CACHE_SIZE = 256
# (module, method, argument signature) -> _Spec; a pure memo of `jax.eval_shape(module.init)`.
_SPECS: dict[Any, _Spec] = {}
_SPECS_LOCK = threading.Lock()


def _linen() -> Any:
    try:
        import flax.linen as nn
    except ImportError:  # pragma: no cover - flax is a test dependency
        raise EffaxError(
            "`fx.from_flax` needs Flax: `pip install flax`, or `pip install effax[flax]`."
        ) from None
    return nn


@dataclasses.dataclass
class _Spec:
    """What one abstract `module.init` taught: the variables to request and the rng streams drawn."""

    params: Mapping[str, Any]  # leaves: (ShapeDtypeStruct, logical axes or None)
    state: dict[str, Mapping[str, Any]]  # collection -> tree of ShapeDtypeStruct pytrees
    streams: frozenset[str] = frozenset()


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _struct(x: Any) -> jax.ShapeDtypeStruct:
    weak = bool(getattr(getattr(x, "aval", None), "weak_type", False))
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, weak_type=weak)


def _leaves(tree: Mapping[str, Any]) -> list[Any]:
    out: list[Any] = []
    for node in tree.values():
        out.extend(_leaves(node) if isinstance(node, Mapping) else [node])
    return out


def _param_leaf(nn: Any, node: Any, where: tuple[str, ...]) -> tuple[jax.ShapeDtypeStruct, Any]:
    axes = None
    if isinstance(node, nn.meta.AxisMetadata):
        names = getattr(node, "names", None)
        node = node.unbox()
        if names is not None and len(names) == len(node.shape):
            if all(n is None or isinstance(n, str) for n in names):
                axes = tuple(names)
    if not isinstance(node, jax.ShapeDtypeStruct):
        raise EffaxError(
            f"Flax param `{path_str(where)}` is a {type(node).__name__}, not one array; effax params "
            "are arrays. Make the Flax param an array (or a dict of arrays), or keep this value in "
            "another collection with `self.variable(...)`."
        )
    return node, axes


def _classify(nn: Any, variables: Mapping[str, Any]) -> _Spec:
    """Split Flax's abstract variables into params and state; drop sown collections.

    A collection whose every variable is a tuple is what `Module.sow` makes
    (its default reduce appends to a tuple), so it is sown output, not state.
    """

    def params(tree: Mapping[str, Any], where: tuple[str, ...]) -> dict[str, Any]:
        return {
            k: params(v, where + (k,)) if isinstance(v, Mapping) else _param_leaf(nn, v, where + (k,))
            for k, v in tree.items()
        }

    state = {}
    for collection, tree in variables.items():
        if collection == "params" or not isinstance(tree, Mapping):
            continue
        leaves = _leaves(tree)
        if leaves and not all(isinstance(v, tuple) for v in leaves):
            state[collection] = nn.meta.unbox(tree)
    return _Spec(params(variables.get("params", {}), ()), state)


@functools.cache
def _key_struct() -> jax.ShapeDtypeStruct:
    return jax.eval_shape(lambda: jax.random.key(0))


def _spec(nn: Any, module: Any, method: Any, args: tuple, kwargs: dict) -> _Spec:
    """The module's variable structure, from `jax.eval_shape(module.init, ...)`, memoized by signature.

    Array arguments enter abstractly; everything else (Python bools such as
    `train=True`, ints, strings) stays a static Python value, so Flax's
    `if train:` works under `jax.jit` too.
    """
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = [_is_array(x) for x in leaves]
    signature = tuple(_struct(x) if d else x for x, d in zip(leaves, dynamic, strict=True))
    cache_key: Any = (module, method, treedef, signature)
    try:
        spec = _SPECS.get(cache_key)
    except TypeError:  # an unhashable module field or argument: no memo
        cache_key, spec = None, None
    if spec is not None:
        return spec

    def init(key: jax.Array, *arrays: Any) -> Any:
        it = iter(arrays)
        a, kw = jax.tree.unflatten(treedef, [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)])
        return module.init({"params": key}, *a, method=method, **kw)

    structs = [s for s, d in zip(signature, dynamic, strict=True) if d]
    spec = _classify(nn, jax.eval_shape(init, _key_struct(), *structs))
    if cache_key is not None:
        with _SPECS_LOCK:
            if len(_SPECS) >= _CACHE_SIZE:
                _SPECS.pop(next(iter(_SPECS)))
            _SPECS[cache_key] = spec
    return spec


class _FlaxInit:
    """Flax's own `module.init`, run at most once per call and only when a variable is created.

    Its key is `fx.stream_key("params")` at the module's scope, so under
    `t.init` the module gets Flax's real initializers, and at the root path
    exactly the key the user passed.
    """

    def __init__(self, nn: Any, module: Any, method: Any, args: tuple, kwargs: dict, path: tuple):
        self.nn, self.module, self.method, self.args, self.kwargs, self.path = (
            nn, module, method, args, kwargs, path,
        )
        self.variables: Any = None

    def value(self, where: tuple[str, ...]) -> Any:
        if self.variables is None:
            with at_path(self.path):
                key = stream_key("params")
            made = self.module.init({"params": key}, *self.args, method=self.method, **self.kwargs)
            self.variables = self.nn.meta.unbox(made)
        return get_path(self.variables, where)


def _apply(nn: Any, module: Any, spec: _Spec, variables: dict, frozen: set[str], method: Any,
           args: tuple, kwargs: dict) -> tuple[Any, dict]:
    """`module.apply`, giving Flax a key for each stream it draws from (learned on first use)."""
    import flax.errors

    path = current_path()
    mutable = nn.DenyList(("params", *sorted(frozen)))
    streams, keys = set(spec.streams), {}
    while True:
        for stream in sorted(streams - keys.keys()):
            keys[stream] = stream_key(stream)
        try:
            out = module.apply(variables, *args, rngs=keys or None, method=method, mutable=mutable, **kwargs)
            break
        except flax.errors.InvalidRngError as e:
            found = _RNG_STREAM.search(str(e))
            if found is None or found.group(1) in streams:
                raise
            streams.add(found.group(1))
        except flax.errors.ModifyScopeVariableError as e:
            found = _IMMUTABLE.search(str(e))
            c = found.group(1) if found else "<collection>"
            raise FrozenStateError(
                f"the Flax module at `{path_str(path)}` writes collection {c!r}, which is frozen in "
                f"this run (Flax: {str(e).split(' (https')[0]}). To update it, pass `mutable=[{c!r}]` "
                "to `t.apply` and use the returned updates; in eval, run the module in eval mode "
                "(e.g. `train=False`, `use_running_average=True`)."
            ) from None
    if streams != spec.streams:
        spec.streams = frozenset(streams)
    return out


def _run(nn: Any, module: Any, method: Any, args: tuple, kwargs: dict) -> Any:
    path = current_path()
    spec = _spec(nn, module, method, args, kwargs)
    init = _FlaxInit(nn, module, method, args, kwargs, path)

    def relative(name: str) -> tuple[str, ...]:
        return current_path()[len(path):] + (name,)

    def one_param(name: str, node: tuple[jax.ShapeDtypeStruct, Any]) -> jax.Array:
        struct, axes = node
        where = ("params",) + relative(name)
        return param(name, lambda key, shape, dtype: init.value(where), struct.shape, struct.dtype, axes=axes)

    variables: dict[str, Any] = {"params": request_tree(spec.params, one_param)}
    cells: dict[str, list] = {}
    for collection, tree in spec.state.items():
        held = cells[collection] = []

        def one_state(name: str, node: Any, c: str = collection, held: list = held) -> Any:
            where = relative(name)
            cell = local_state(name, lambda: init.value((c,) + where), collection=c)
            value = cell.get()
            held.append((where, cell, value))
            return value

        variables[collection] = request_tree(tree, one_state)
    frozen = {c for c, held in cells.items() if held and not is_mutable(held[0][1], held[0][2])}

    out, updates = _apply(nn, module, spec, variables, frozen, method, args, kwargs)
    for collection, tree in updates.items():
        if collection in spec.state:
            if collection not in frozen:
                for where, cell, old in cells[collection]:
                    new = get_path(tree, where)
                    if new is not old:
                        cell.set(new)
        elif collection != "params":
            sow_tree(tree, collection)
    return out


def from_flax(module: Any, *, name: str | None = None) -> Callable[..., Any]:
    """A Flax linen module as an effectful function, so existing Flax code runs inside effax models.

    Called under effax handlers, the function requests every variable of the
    module through effects: each `params` leaf through `fx.param`, each leaf
    of every other collection through `fx.local_state(..., collection=c)`,
    in Flax's own nesting under the current scope (plus `name`). A Flax
    checkpoint of the whole model therefore loads unchanged into `t.apply`
    (unbox `nn.Partitioned` values first; their names become `axes`). It
    then runs Flax's own `module.apply` on them, writes the collections Flax
    changed back with `set`, and re-sows Flax's sown values (`intermediates`,
    and any collection whose variables are all tuples) through `fx.sow`.
    Call it like the module: `f(x, train=True)`, `f(x, method="encode")`;
    non-array arguments reach Flax as Python values, also under `jax.jit`.

    Mutability follows the run: a collection frozen in effax is immutable in
    Flax, and a Flax write to it raises `FrozenStateError`.

    Keys: Flax gets, for each stream `s` it draws from, `fx.stream_key(s)`
    at the module's scope. At the root path that is exactly the key the user
    passed, so for a module that is the whole model,
    `t.apply(v, x, rngs={"dropout": k}, mutable=["batch_stats"])` equals
    `module.apply(v, x, rngs={"dropout": k}, mutable=["batch_stats"])`. Nested
    under scope path `p`, Flax's key for `s` is `fold(k_s, h_path(p))` (the
    pinned hash of DESIGN.md), from which Flax derives per-submodule keys its
    own way. Each call is one `module.apply`: calling the function twice at
    one scope in a run gives both calls the same keys (use two names for
    independent dropout). Flax never falls back to the `"params"` stream for a
    missing stream: a stream absent from `rngs` raises `MissingRngError`.

    Init: every variable comes from one run of Flax's own `module.init`
    (its real initializers) with key `fx.stream_key("params")` at the
    module's scope; the per-path key effax hands each `fx.param` initializer
    is not used. So at the root `t.init(k, x)` equals `module.init(k, x)`;
    nested, the values differ from Flax's by that key, with Flax's structure,
    shapes and dtypes.

    The structure comes from `jax.eval_shape(module.init, ...)`, memoized per
    module and argument signature (shapes, dtypes, static values) when those
    are hashable, so only the first call of a signature traces the module
    twice.

    >>> import flax.linen as nn
    >>> dense = nn.Dense(3)
    >>> t = fx.transform(fx.from_flax(dense))
    >>> x = jnp.ones((2, 4))
    >>> variables = t.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'bias': (3,), 'kernel': (4, 3)}}
    >>> bool(jnp.array_equal(t.apply(variables, x), dense.apply(variables, x)))
    True
    """
    nn = _linen()
    if not isinstance(module, nn.Module):
        raise EffaxError(
            f"`fx.from_flax` takes a Flax linen module (an `nn.Module` instance), got "
            f"{type(module).__name__}. For Flax NNX modules use `fx.from_nnx`."
        )
    if module.scope is not None:
        raise EffaxError(
            f"`fx.from_flax` got a bound {type(module).__name__} (one inside `apply` or `bind`); pass "
            "the unbound module, e.g. `nn.Dense(3)`, and let effax supply its variables."
        )
    if name is not None:
        check_name(name, "scope")

    def flax_module(*args: Any, method: Any = None, **kwargs: Any) -> Any:
        if name is None:
            return _run(nn, module, method, args, kwargs)
        with scope(name):
            return _run(nn, module, method, args, kwargs)

    flax_module.__qualname__ = flax_module.__name__ = f"from_flax({type(module).__name__})"
    return flax_module
