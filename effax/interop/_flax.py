"""Flax linen interop: a linen module as an effectful function (`fx.from_flax`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from effax.core import (
    EffaxError,
    FrozenStateError,
    Handler,
    MissingRngError,
    MissingVariableError,
    at_path,
    check_name,
    current_path,
    handle,
    path_str,
    scope,
)
from effax.effects import (
    InitializingRequest,
    ModeRequest,
    ModuleCallRequest,
    capture_filter,
    is_initializing,
    local_state,
    param,
    stream_key,
    stream_names,
)
from effax.effects._param import is_axis
from effax.interop._common import is_mutable, request_tree, sow_tree

_RNG_STREAM = re.compile(r'needs PRNG for "([^"]+)"')
_IMMUTABLE = re.compile(r'collection "([^"]+)" is immutable')
_CACHE_SIZE = 256
# (module, method, argument signature) -> _Spec; a pure memo of `jax.eval_shape(module.init)`.
_SPECS: dict[Any, _Spec] = {}
_SPECS_LOCK = threading.Lock()


def _at(tree: Any, where: tuple[str, ...]) -> Any:
    """The value at `where` in Flax's nested variables (interop uses effects only, not the handlers' storage)."""
    for key in where:
        tree = tree[key]
    return tree


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
    init_streams: frozenset[str] | None = None  # the streams other than "params" its init draws (once learned)
    state_axes: dict[tuple[str, ...], Any] = dataclasses.field(default_factory=dict)  # (collection, *path) -> axes


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


def _unboxed(nn: Any, node: Any, what: str) -> tuple[Any, Any]:
    """A Flax variable's abstract value and logical axes: a box's names become `axes`, never dropped.

    A name entry that is a tuple of names (`nn.with_partitioning(init, (("data", "model"),
    None))`, a dimension split over several mesh axes) is kept as it is: `fx.param` and
    `fx.sharding` take tuple entries and map them name by name, so such a variable is sharded as
    Flax shards it. Names that are neither (or more than the dimensions) are refused, never
    replaced by a silent replication.
    """
    axes = None
    if isinstance(node, nn.meta.AxisMetadata):
        names = getattr(node, "names", None)
        node = node.unbox(apply_constraint=False) if isinstance(node, nn.Partitioned) else node.unbox()
        if names is not None:  # fewer names than dimensions leave the rest None, as a `PartitionSpec` does
            names, ndim = tuple(names), len(getattr(node, "shape", names))
            if not all(map(is_axis, names)) or len(names) > ndim:
                raise EffaxError(
                    f"Flax {what} has partition names {names!r:.80} for shape "
                    f"{tuple(getattr(node, 'shape', ()))}: effax takes at most one entry per dimension, each a "
                    "name, None or a tuple of names. Fix the names given to `nn.with_partitioning` / "
                    "`nn.with_logical_partitioning`, or drop the box to leave the variable replicated."
                )
            axes = names + (None,) * (ndim - len(names))
    return node, axes


def _param_leaf(nn: Any, node: Any, where: tuple[str, ...]) -> tuple[jax.ShapeDtypeStruct, Any]:
    """A Flax param's abstract value and logical axes (`_unboxed`); a param is one array."""
    node, axes = _unboxed(nn, node, f"param `{path_str(where)}`")
    if not isinstance(node, jax.ShapeDtypeStruct):
        raise EffaxError(
            f"Flax param `{path_str(where)}` is a {type(node).__name__}, not one array; effax params "
            "are arrays. Make the Flax param an array (or a dict of arrays), or keep this value in "
            "another collection with `self.variable(...)`."
        )
    return node, axes


def _tuples_only(tree: Any) -> bool:
    """Whether a collection holds only tuples: what `Module.sow` makes (its default reduce appends to one),
    or state whose value is a tuple (an LSTM carry); `_sown` tells them apart."""
    leaves = _leaves(tree) if isinstance(tree, Mapping) else []
    return bool(leaves) and all(isinstance(v, tuple) for v in leaves)


def _classify(nn: Any, variables: Mapping[str, Any], sown: frozenset[str] = frozenset()) -> _Spec:
    """Split Flax's abstract variables into params and state; drop the `sown` collections."""

    def params(tree: Mapping[str, Any], where: tuple[str, ...]) -> dict[str, Any]:
        return {
            k: params(v, where + (k,)) if isinstance(v, Mapping) else _param_leaf(nn, v, where + (k,))
            for k, v in tree.items()
        }

    def state_axes(tree: Mapping[str, Any], where: tuple[str, ...]) -> None:  # a box's names, by path
        for k, v in tree.items():
            if isinstance(v, Mapping):
                state_axes(v, where + (k,))
            elif isinstance(v, nn.meta.AxisMetadata):
                _, names = _unboxed(nn, v, f"variable `{path_str(where[1:] + (k,))}` in collection {where[0]!r}")
                if names is not None:
                    axes[where + (k,)] = names

    state, axes = {}, {}
    for collection, tree in variables.items():
        if collection == "params" or not isinstance(tree, Mapping):
            continue
        if _leaves(tree) and collection not in sown:
            state_axes(tree, (collection,))
            state[collection] = nn.meta.unbox(tree)
    return _Spec(params(variables.get("params", {}), ()), state, state_axes=axes)


@functools.cache
def _key_struct() -> jax.ShapeDtypeStruct:
    return jax.eval_shape(lambda: jax.random.key(0))


class _InsideFlax(Handler):
    """Installed while Flax runs a module: an effax effect from inside it (an `fx.nn` layer in a linen
    `@compact` method) is refused by name. `fx.from_flax` hands the module linen's variables only, so such a
    request would reach effax's handlers from inside Flax's own shape pass, as a trace mismatch. The run's
    mode is let through: a Python bool, no variable, so `method=lambda m, x: m(x, train=fx.is_training())`
    (run by Flax, inside the bound module) feeds a linen keyword as a plain wrapper does."""

    def __init__(self, module: Any):
        self.module = module

    def handle(self, request: Any, forward: Any) -> Any:
        # a module call's own requests say what it asked for; the mode is a Python bool, not a variable
        if isinstance(request, (ModuleCallRequest, ModeRequest, InitializingRequest)):
            return forward(request)
        raise EffaxError(
            f"{request.describe()} was requested from inside the Flax module {type(self.module).__name__}, "
            "which `fx.from_flax` runs with linen's own variables: effax effects and `fx.nn` layers are not "
            "carried into a linen module. Use linen layers inside linen modules (`nn.Dense`), or port the "
            "module to `fx.nn` (then call `fx.from_flax` on the linen parts it holds)."
        )


def _rebuilt(treedef: Any, leaves: list[Any], dynamic: list[bool], arrays: tuple) -> tuple[tuple, dict]:
    """`(args, kwargs)` of a call with its array leaves (`dynamic`) replaced, in order, by `arrays` (the
    abstract values of a shape pass); every other leaf stays the Python value it is."""
    it = iter(arrays)
    return jax.tree.unflatten(treedef, [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)])


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

    def init(key: jax.Array, *arrays: Any, frozen: tuple[str, ...] = ()) -> Any:
        a, kw = _rebuilt(treedef, leaves, dynamic, arrays)
        return module.init({"params": key}, *a, method=method, mutable=nn.DenyList(("intermediates", *frozen)), **kw)

    structs = [s for s, d in zip(signature, dynamic, strict=True) if d]
    with handle(_InsideFlax(module)):
        variables = jax.eval_shape(init, _key_struct(), *structs)
        tuples = [c for c, tree in variables.items() if c != "params" and _tuples_only(tree)]
        spec = _classify(nn, variables, _sown(init, [_key_struct(), *structs], tuples))
    if cache_key is not None:
        with _SPECS_LOCK:
            if len(_SPECS) >= _CACHE_SIZE:
                _SPECS.pop(next(iter(_SPECS)))
            _SPECS[cache_key] = spec
    return spec


def _sown(init: Any, args: list, collections: list[str]) -> frozenset[str]:
    """Which of the `collections` (each holding only tuples) are sown, not state: with a collection frozen,
    `Module.sow` skips it and init still runs, while `self.variable` cannot create its variable there (an
    abstract init per collection, once per module signature; none for a module that sows nothing)."""
    import flax.errors

    sown = []
    for c in collections:
        try:
            jax.eval_shape(functools.partial(init, frozen=(c,)), *args)
        except flax.errors.FlaxError:  # it creates a variable there: state, e.g. an LSTM carry
            continue
        sown.append(c)
    return frozenset(sown)


def _init_streams(nn: Any, module: Any, spec: _Spec, method: Any, args: tuple, kwargs: dict) -> frozenset[str]:
    """The rng streams other than "params" that the module's init draws from, learned once per module
    signature: its init runs abstractly, in Flax's init mode, on its own params and with no "params" key, so
    each `make_rng` of another stream raises `InvalidRngError` naming it (Flax's own init would draw it from
    "params" instead).

    Why: `_run` gives Flax's init `fx.stream_key(s)` for each such stream, as apply gives it, so init's output
    is what apply computes on init's variables (law 3), and a stream missing from a `rngs` dict raises
    `MissingRngError` (docs/design.md, Strictness). A module whose init needs a key for more than its
    params and the streams it names (a state initializer drawing from "params") keeps Flax's fallback.
    """
    import flax.core
    import flax.errors

    if spec.init_streams is not None:
        return spec.init_streams
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = [_is_array(x) for x in leaves]
    call = method if callable(method) else getattr(type(module), method or "__call__")

    def init(params: Any, keys: dict, *arrays: Any) -> Any:
        a, kw = _rebuilt(treedef, leaves, dynamic, arrays)

        def bound(scope: Any) -> Any:  # linen's `init_with_output`, with the params given
            return call(module.clone(parent=scope, _deep_clone=True), *a, **kw)

        return flax.core.apply(bound, mutable=True, flags={"initializing": True})(
            {"params": params}, rngs=keys or None)

    params = jax.tree.map(lambda node: node[0], spec.params, is_leaf=lambda node: type(node) is tuple)
    structs = [_struct(x) for x, d in zip(leaves, dynamic, strict=True) if d]
    streams: set[str] = set()
    while True:
        try:
            with handle(_InsideFlax(module)):
                jax.eval_shape(init, params, dict.fromkeys(streams, _key_struct()), *structs)
            break
        except flax.errors.InvalidRngError as e:
            found = _RNG_STREAM.search(str(e))
            if found is None or found.group(1) in streams or found.group(1) == "params":
                break  # not a stream it draws: what was learned stands
            streams.add(found.group(1))
        except Exception:  # any other failure: Flax's own init, run next, raises it if it is real
            break
    spec.init_streams = frozenset(streams)
    return spec.init_streams


class _FlaxInit:
    """Flax's own `module.init`: the variables of one init, made at most once per call.

    Its key is `fx.stream_key("params")` at the module's scope, so under
    `t.init` the module gets Flax's real initializers, and at the root path
    exactly the key the user passed. Under `t.init` the call keeps what its
    `init_with_output` made; under `t.apply` the init runs only if a state
    variable is missing from a mutable collection.
    """

    def __init__(self, nn: Any, module: Any, method: Any, args: tuple, kwargs: dict, path: tuple):
        self.nn, self.module, self.method, self.args, self.kwargs, self.path = (
            nn, module, method, args, kwargs, path,
        )
        self.variables: Any = None

    def keep(self, variables: Any) -> None:
        self.variables = self.nn.meta.unbox(variables)

    def value(self, where: tuple[str, ...]) -> Any:
        if self.variables is None:
            with at_path(self.path):
                try:
                    key = stream_key("params")
                except MissingRngError as e:  # under apply: a variable is missing, which is what to say
                    collection, *rest = where
                    raise MissingVariableError(
                        f"no {path_str(self.path + tuple(rest))} in variables[{collection!r}]: the Flax module "
                        f"`{type(self.module).__name__}` at `{path_str(self.path)}` writes it, so it is made by "
                        "running Flax's init, which needs a 'params' key this run does not give. Pass "
                        f"the variables `t.init` made (variables[{collection!r}], e.g. "
                        "a decode cache), or `rngs=` to create it."
                    ) from e
            self.keep(self.module.init({"params": key}, *self.args, method=self.method, **self.kwargs))
        return _at(self.variables, where)


class _Stored:
    """A param initializer that returns the value Flax's init made at `where`.

    Unhashable on purpose: effax runs it as a plain call in the current trace,
    never as a cached jitted initializer (its value comes from Flax's init, not the key).
    """

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, init: _FlaxInit, where: tuple[str, ...]):
        self.init, self.where = init, where

    def __call__(self, key: Any, shape: Any, dtype: Any) -> Any:
        return self.init.value(self.where)


def _apply(nn: Any, module: Any, spec: _Spec, variables: dict, frozen: set[str], method: Any,
           args: tuple, kwargs: dict, capture: Any) -> tuple[Any, dict]:
    """`module.apply`, giving Flax a key for each stream it draws from (learned on first use)."""
    import flax.errors

    path = current_path()
    mutable = nn.DenyList(("params", *sorted(frozen)))
    # the streams `rngs` names, as `module.apply(v, x, rngs=rngs)` gets them (a module may check
    # `self.has_rng("dropout")`), but "params" only once Flax asks for it: Flax would draw a missing stream
    # from it, where effax raises `MissingRngError`; with one key for every stream, those Flax draws from,
    # learned on first use
    names = stream_names()
    streams, keys = set(spec.streams) if names is None else set(names) - {"params"}, {}
    while True:
        for stream in sorted(streams - keys.keys()):
            keys[stream] = stream_key(stream)
        try:
            with handle(_InsideFlax(module)):
                out = module.apply(
                    variables, *args, rngs=keys or None, method=method, mutable=mutable,
                    capture_intermediates=capture, **kwargs,
                )
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
                "to `t.apply` and use the returned updates (with the eval preset, "
                f"`fx.handlers.eval(mutable=[{c!r}])` for inference state such as a decode cache); "
                "for training state in eval, run the module in eval mode (e.g. `train=False`, "
                "`use_running_average=True`)."
            ) from None
    if names is None and streams != spec.streams:
        spec.streams = frozenset(streams)
    return out


def _run(nn: Any, module: Any, method: Any, args: tuple, kwargs: dict) -> Any:
    path = current_path()
    spec = _spec(nn, module, method, args, kwargs)
    init = _FlaxInit(nn, module, method, args, kwargs, path)
    capture = capture_filter() or False
    initializing = is_initializing()
    if initializing:  # Flax's own init, in Flax's init mode: its variables and its output
        # every stream `rngs` names, as `module.init(rngs, x)` gets them, and each its init draws from
        names = set(stream_names() or ()) | _init_streams(nn, module, spec, method, args, kwargs)
        with at_path(path):
            rngs = {"params": stream_key("params")}
            rngs.update({s: stream_key(s) for s in sorted(names - {"params"})})
        out, made = module.init_with_output(
            rngs, *args, method=method, mutable=True, capture_intermediates=capture, **kwargs
        )
        init.keep(made)

    def relative(name: str) -> tuple[str, ...]:
        return current_path()[len(path):] + (name,)

    def one_param(name: str, node: tuple[jax.ShapeDtypeStruct, Any]) -> jax.Array:
        struct, axes = node
        return param(name, _Stored(init, ("params",) + relative(name)), struct.shape, struct.dtype, axes=axes)

    variables: dict[str, Any] = {"params": request_tree(spec.params, one_param)}
    cells: dict[str, list] = {}
    for collection, tree in spec.state.items():
        held = cells[collection] = []
        optional = collection == "perturbations" and not initializing  # Flax's `perturb`: read only if given

        def one_state(name: str, node: Any, c: str = collection, held: list = held, optional: bool = optional) -> Any:
            where = relative(name)
            cell = local_state(name, _absent if optional else lambda: init.value((c,) + where), collection=c,
                               axes=spec.state_axes.get((c,) + where))
            value = cell.get()
            held.append((where, cell, value))
            return value

        try:
            variables[collection] = request_tree(tree, one_state)
        except (_Absent, MissingVariableError):
            if not optional:
                raise
            del cells[collection]  # not given: `perturb` adds nothing, as in Flax
    if initializing:  # init creates, it does not step: no state is written back
        if _changed(variables, init.variables):  # a handler answered another value (an interceptor): the
            out, made = _apply(nn, module, spec, variables, set(), method, args, kwargs, capture)  # output
            _sow_rest(made, spec)  # and sows are the answered variables', as under `t.apply` (law 3)
        else:
            _sow_rest(init.variables, spec)
        return out
    frozen = {c for c, held in cells.items() if held and not is_mutable(held[0][1], held[0][2])}

    out, updates = _apply(nn, module, spec, variables, frozen, method, args, kwargs, capture)
    for collection, tree in updates.items():
        if collection in cells and collection not in frozen:
            for where, cell, old in cells[collection]:
                new = _at(tree, where)
                if isinstance(old, tuple) and isinstance(new, tuple) and len(new) > len(old):
                    raise EffaxError(
                        f"the Flax module sows `{path_str(path + where)}` into collection {collection!r}, where "
                        "it also keeps variables: effax keeps a collection for state or for sown values, not "
                        f"both. Sow into another collection (`self.sow('intermediates', ...)`), or keep "
                        "the value as a variable."
                    )
                if new is not old:
                    cell.set(new)
    _sow_rest(updates, spec)
    return out


def _changed(answered: Mapping[str, Any], made: Mapping[str, Any]) -> bool:
    """Whether some variable was answered with another value than the one Flax's init made."""
    ours, flax = jax.tree.leaves(answered), jax.tree.leaves({c: made.get(c, {}) for c in answered})
    return len(ours) != len(flax) or any(a is not b for a, b in zip(ours, flax, strict=True))


class _Absent(Exception):
    """Raised by the `init()` of a variable that is read only when given (Flax's `perturbations`)."""


def _absent() -> Any:
    raise _Absent


def _sow_rest(collections: Mapping[str, Any], spec: _Spec) -> None:
    """Re-sow what Flax sowed (every collection that is neither params nor state) through `fx.sow`.

    Flax's sown values are tuples (its default `reduce_fn` appends). Anything else there is a sow with a
    `reduce_fn` of its own, or a variable Flax created only at apply time, outside what its init makes:
    effax collects sows as tuples and learns a module's variables from its init, so it refuses both, by
    path, rather than hand back a value shaped unlike Flax's.
    """
    for collection, tree in collections.items():
        if collection == "params" or collection in spec.state:
            continue
        for path, leaf in jax.tree.leaves_with_path(tree, is_leaf=lambda x: isinstance(x, tuple)):
            if not isinstance(leaf, tuple):
                where = path_str(current_path() + tuple(str(getattr(k, "key", k)) for k in path))
                shown = f"an array {leaf.dtype}{list(leaf.shape)}" if hasattr(leaf, "shape") else type(leaf).__name__
                raise EffaxError(
                    f"the Flax module wrote `{where}` in collection {collection!r} as {shown}, not as "
                    "Flax's default sow makes it (a tuple): a `self.sow` with "
                    "a `reduce_fn`/`init_fn`, or a `self.variable` created only at apply time. effax "
                    "collects sown values as tuples and learns a module's variables from its init: keep "
                    "the default sow, or create the variable at init (so that code path runs there too)."
                )
        sow_tree(tree, collection)


@functools.cache
def _linen_api(nn: Any) -> frozenset[str]:
    """Names every linen module has (`init`, `apply`, `param`, ...): not entry points of the model."""
    return frozenset(dir(nn.Module))


class FlaxFunction:
    """What `fx.from_flax` returns: the linen module as an effectful function, one entry point per method.

    Calling it runs the module's `__call__` (or the method `from_flax` was
    given); `f.encode` is the same function for the module's `encode`, so
    `fx.transform(f).apply(v, x, method="encode")` runs it, as Flax's
    `module.apply(v, x, method="encode")` does. Its signature is the Flax
    method's, which `fx.transform` reads to refuse keywords that clash with its
    own options.
    """

    def __init__(self, nn: Any, module: Any, name: str | None, method: Any = None):
        self._nn, self._module, self._name, self._method = nn, module, name, method
        self._signature: Any = None
        label = method if isinstance(method, str) or method is None else getattr(method, "__name__", "method")
        self.__name__ = self.__qualname__ = f"from_flax({type(module).__name__})" + (
            f".{label}" if method is not None else ""
        )

    def __call__(self, *args: Any, method: Any = None, **kwargs: Any) -> Any:
        method = self._method if method is None else method
        if self._name is None:
            return _run(self._nn, self._module, method, args, kwargs)
        with scope(self._name):
            return _run(self._nn, self._module, method, args, kwargs)

    def __getattr__(self, attr: str) -> Any:
        if (attr.startswith("_") or attr in _linen_api(self._nn)
                or not callable(getattr(type(self._module), attr, None))):
            raise AttributeError(
                f"{self.__name__} has no method {attr!r}: {type(self._module).__name__} defines no such method."
            )
        return FlaxFunction(self._nn, self._module, self._name, attr)

    def _effax_entry(self, method: Any) -> FlaxFunction:
        """The entry point `method=` names (a method name, or a function called with the bound
        Flax module as Flax calls it), for `fx.transform(f, method=...)` and `t.apply(..., method=...)`."""
        if isinstance(method, str) and not callable(getattr(type(self._module), method, None)):
            methods = sorted(
                m for m in dir(type(self._module))
                if not m.startswith("_") and m not in _linen_api(self._nn)
                and callable(getattr(type(self._module), m, None))
            )
            raise EffaxError(
                f"method={method!r}: the Flax module {type(self._module).__name__} has no method "
                f"{method!r} (its methods: {methods or 'none'}). Name one of them, or pass a function "
                "called with the bound Flax module, as Flax's `apply` takes it: "
                "`method=lambda m, *a: m.encode(*a)`."
            )
        return FlaxFunction(self._nn, self._module, self._name, method)

    @property
    def __signature__(self) -> inspect.Signature:
        if self._signature is None:
            method = "__call__" if self._method is None else self._method
            try:
                if isinstance(method, str):
                    sig = inspect.signature(getattr(self._module, method))
                else:  # `method(module, *args)`: drop the module
                    sig = inspect.signature(method)
                    sig = sig.replace(parameters=list(sig.parameters.values())[1:])
            except (TypeError, ValueError):
                sig = inspect.Signature(
                    [inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
                     inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
                )
            self._signature = sig
        return self._signature

    def __repr__(self) -> str:
        return f"<{self.__name__}>"


def from_flax(module: Any, *, name: str | None = None) -> FlaxFunction:
    """A Flax linen module as an effectful function, so existing Flax code runs inside effax models.

    Called under effax handlers, the function requests every variable of the
    module through effects: each `params` leaf through `fx.param`, each leaf
    of every other collection through `fx.local_state(..., collection=c)`,
    in Flax's own nesting under the current scope (plus `name`). A Flax
    checkpoint of the whole model therefore loads unchanged into `t.apply`
    (boxed values such as `nn.Partitioned` are unboxed; under init their
    names become `axes`, a tuple entry such as `(("data", "model"), None)`
    included: `fx.sharding` maps a tuple entry name by name into one
    `PartitionSpec` tuple entry, as Flax does, so the param is sharded as in
    Flax rather than silently replicated; names that do not fit the shape are
    refused). It then runs Flax's own `module.apply` on them,
    writes the collections Flax changed back with `set`, and re-sows Flax's
    sown values (`intermediates`, and any collection whose variables are all
    tuples) through `fx.sow`. With `capture_intermediates=` in effax, Flax
    captures its own submodules' outputs (same filter), under the module's path.
    Call it like the module: `f(x, train=True)`, `f(x, method="encode")` or
    `f.encode(x)`; non-array arguments reach Flax as Python values, also
    under `jax.jit`. A keyword of the module named like an option of
    `t.init`/`t.apply` (`training`, `rngs`, `mutable`, `handlers`, `method`,
    `capture_intermediates`) cannot be passed through them: feed it
    from inside the model, `fx.transform(lambda x: f(x, training=fx.is_training()))`.

    Mutability follows the run: a collection frozen in effax is immutable in
    Flax, and a Flax write to it raises `FrozenStateError`. A decode cache
    is inference state: `t.apply(..., handlers=fx.handlers.eval(mutable=["cache"]))`.

    Keys: Flax gets, for each stream `s` it draws from, `fx.stream_key(s)`
    at the module's scope. At the root path that is exactly the key the user
    passed, so for a module that is the whole model,
    `t.apply(v, x, rngs={"dropout": k}, mutable=["batch_stats"])` equals
    `module.apply(v, x, rngs={"dropout": k}, mutable=["batch_stats"])`. Nested
    under scope path `p`, Flax's key for `s` is `fold(k_s, h_path(p))` (the
    pinned hash of docs/design.md), from which Flax derives per-submodule keys its
    own way. Each call is one `module.apply`: calling the function twice at
    one scope in a run gives both calls the same keys (use two names for
    independent dropout). Flax never falls back to the `"params"` stream for a
    missing stream: a stream absent from `rngs` raises `MissingRngError`.

    Init: under `t.init` (`fx.is_initializing()`, also abstractly in
    `jax.eval_shape(t.init)` and `fx.summary`) the module runs Flax's own
    `init_with_output`, in Flax's init mode, with key
    `fx.stream_key("params")` at the module's scope (as Flax's `init(key)`),
    and `fx.stream_key(s)` for each other stream `s` it draws, as apply
    gives it, where Flax would draw it from "params": so init's output is
    what apply computes on init's variables (law 3), and a stream missing
    from a `rngs` dict raises `MissingRngError` (the streams are learned by
    one abstract init per module signature). Modules that branch on
    `is_initializing()` or `has_variable` (BatchNorm with `axis_name`,
    decode caches) initialize as in Flax, every variable is Flax's, and the
    init output is Flax's; the per-path key effax hands each `fx.param`
    initializer is not used. So at the root `t.init_with_output(k, x)`
    equals `module.init_with_output(k, x)` (for a module whose init draws
    from "params" only); nested, the values differ from
    Flax's by that key, with Flax's structure, shapes and dtypes.

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
    return FlaxFunction(nn, module, name)

