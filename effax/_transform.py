"""Discharge: an effectful function plus the built-in handlers becomes pure `init` and `apply`."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from effax.core import (
    MISSING,
    EffaxError,
    Handler,
    ParamConflictError,
    flatten_handlers,
    flatten_paths,
    get_path,
    handle,
    hermetic,
    path_str,
)
from effax.effects import LocalStateRequest, ParamRequest
from effax.handlers import (
    CaptureIntermediates,
    CollectSown,
    FunctionalState,
    InitParams,
    KeysFromRngs,
    LoadParams,
    Mode,
)
from effax.handlers._mode import static_training
from effax.handlers._presets import apply_options, init_options, split_presets
from effax.handlers._state import ALL, normalize_mutable


def _check_variables_arg(variables: Any) -> Mapping[str, Any]:
    if not isinstance(variables, Mapping):
        raise EffaxError(
            f"`variables` must be a dict like {{'params': {{...}}, 'state': {{...}}}}, got "
            f"{type(variables).__name__}. Pass what `t.init` returned (merged with the updates of "
            "earlier runs: `{**variables, **updates}`)."
        )
    return variables


def _check_overlap(state_run: Any, sown_run: Any) -> None:
    both = state_run.used & sown_run.trees.keys()
    if both:
        raise ParamConflictError(
            f"collection {sorted(both)[0]!r} holds local state and sown values in one run; a "
            "collection holds one or the other. Give `fx.sow(..., collection=...)` or "
            "`fx.local_state(..., collection=...)` another collection name."
        )


def _method_of(owner: Any, method: Any) -> Callable[..., Any]:
    """The entry point `method=` names: `owner.<method>` for a name, `method(owner, ...)` for a function."""
    if isinstance(method, str):
        target = getattr(owner, method, None)
        if callable(target):
            return target
        methods = sorted(m for m in dir(type(owner)) if not m.startswith("_") and callable(getattr(owner, m, None)))
        raise EffaxError(
            f"method={method!r}: {type(owner).__name__} {getattr(owner, '__name__', '')} has no method "
            f"{method!r} (its public methods: {methods or 'none'}). Name one of them, or pass a function "
            "`method=lambda m, *a: m.encode(*a)`; for plain functions with several entry points use "
            "`fx.multi_transform`."
        )
    if inspect.ismethod(method) and method.__self__ is owner:
        return method
    if callable(method):
        return functools.partial(method, owner)
    raise EffaxError(
        f"method= takes a method name or a function called as `method(module, *args)`, got {type(method).__name__}."
    )


def _with_intermediates(collections: frozenset[str] | bool) -> frozenset[str] | bool:
    return collections if collections is ALL else collections | {"intermediates"}  # type: ignore[operator]


def _init_mutable(mutable: Any) -> tuple[Any, Any]:
    """`(state collections, sown collections)` that `init` creates and returns."""
    if mutable is None:  # DESIGN: every state collection, no sown values
        return ALL, frozenset()
    if isinstance(mutable, str):
        mutable = () if mutable == "params" else mutable
    elif isinstance(mutable, (list, tuple, set, frozenset)):
        mutable = tuple(c for c in mutable if c != "params")  # Flax lists "params"; init always makes them
    collections = normalize_mutable(mutable)
    return collections, collections


@dataclasses.dataclass(frozen=True)
class Transformed:
    """A pair of pure functions, `init` and `apply`, made from an effectful `fn` by `fx.transform`.

    `fn` is the entry point that runs; `owner`, when set, is the object whose
    methods `method=` names (the module `fx.transform(module, method=...)` got).
    """

    fn: Callable[..., Any]
    owner: Any = None

    def _entry(self, method: Any) -> Callable[..., Any]:
        if method is None:
            return self.fn
        return _method_of(self.fn if self.owner is None else self.owner, method)

    def init(
        self,
        rngs: Any,
        *args: Any,
        training: bool = False,
        handlers: Any = (),
        mutable: Any = None,
        capture_intermediates: bool | Callable[[Any, str], bool] = False,
        method: Any = None,
        **kwargs: Any,
    ) -> dict:
        """Create every param and state variable; returns `{"params": ..., <collection>: ...}`.

        `training` defaults to False; a preset in `handlers` sets it instead (`training=True`
        beside the eval preset is a conflict).
        `mutable` names the collections init creates and returns besides
        `"params"` (always made; Flax's `mutable=["params", ...]` is accepted).
        Its default is every state collection and no sown values (Flax's
        default, everything but `"intermediates"`, for models that sow only
        there); a list of names or `True` opts sown collections in, so
        `mutable=True` also returns what the model sows during init, and
        state in a collection left out raises `MissingVariableError`, as in
        Flax. `capture_intermediates` and `method` are as in `apply`.

        >>> def f(x):
        ...     fx.sow("h", x)
        ...     return fx.nn.BatchNorm()(x)
        >>> t = fx.transform(f)
        >>> sorted(t.init(jax.random.key(0), jnp.ones((2, 3))))
        ['batch_stats', 'params']
        >>> sorted(t.init(jax.random.key(0), jnp.ones((2, 3)), mutable=True))
        ['batch_stats', 'intermediates', 'params']
        """
        return self.init_with_output(
            rngs,
            *args,
            training=training,
            handlers=handlers,
            mutable=mutable,
            capture_intermediates=capture_intermediates,
            method=method,
            **kwargs,
        )[1]

    def init_with_output(
        self,
        rngs: Any,
        *args: Any,
        training: bool = False,
        handlers: Any = (),
        mutable: Any = None,
        capture_intermediates: bool | Callable[[Any, str], bool] = False,
        method: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, dict]:
        """Like `init`, also returning the output of the initializing run."""
        preset, handlers = split_presets(handlers)
        training, rngs = init_options(preset, training, rngs)
        state_collections, sown_collections = _init_mutable(mutable)
        extra = flatten_handlers((handlers,))
        if capture_intermediates:
            sown_collections = _with_intermediates(sown_collections)
            extra.append(CaptureIntermediates(capture_intermediates))
        entry = self._entry(method)
        state, sown = FunctionalState({}, state_collections), CollectSown(sown_collections)
        with hermetic(), handle(Mode(training), KeysFromRngs(rngs), state, sown, InitParams(), *extra) as runs:
            out = entry(*args, **kwargs)
        state_run, sown_run, params_run = runs[2], runs[3], runs[4]
        _check_overlap(state_run, sown_run)
        return out, {"params": params_run.params, **state_run.initial(), **sown_run.collections()}

    def apply(
        self,
        variables: Mapping[str, Any],
        *args: Any,
        rngs: Any = None,
        mutable: Any = False,
        training: bool | None = None,
        handlers: Any = (),
        capture_intermediates: bool | Callable[[Any, str], bool] = False,
        method: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model on `variables`; with `mutable` truthy, return `(out, updates)`.

        A preset in `handlers` (`fx.handlers.train(rngs, mutable=...)`, `fx.handlers.eval()`)
        sets `training`, `rngs` and `mutable` in one argument.
        `capture_intermediates=True` sows the output of every `fx.nn` module's
        `__call__` into `updates["intermediates"]` at the module's path, under
        `"__call__"` (Flax's layout); a function `filter(module, method_name)`
        picks the calls (other methods land under their names). It makes
        `"intermediates"` mutable, as Flax does. `method` runs another entry
        point: a method name of the module `fx.transform` got
        (`method="decode"`), or a function called as `method(module, *args)`.

        >>> t = fx.transform(lambda x: fx.nn.Dense(2)(x))
        >>> v = t.init(jax.random.key(0), jnp.ones((1, 3)))
        >>> y, updates = t.apply(v, jnp.ones((1, 3)), capture_intermediates=True)
        >>> jax.tree.map(jnp.shape, updates)
        {'intermediates': {'Dense_0': {'__call__': ((1, 2),)}}}
        """
        variables = _check_variables_arg(variables)
        preset, handlers = split_presets(handlers)
        training, keys, mutable = apply_options(preset, training, rngs, mutable)
        collections = normalize_mutable(mutable)
        mode = None if training is None else Mode(static_training(training))
        extra = flatten_handlers((handlers,))
        if capture_intermediates:
            collections = _with_intermediates(collections)
            extra.append(CaptureIntermediates(capture_intermediates))
        entry = self._entry(method)
        state = FunctionalState(variables, collections)
        sown = CollectSown(collections)
        params = LoadParams(variables.get("params", {}))
        with hermetic(), handle(mode, keys, state, sown, params, *extra) as runs:
            out = entry(*args, **kwargs)
        offset = 0 if mode is None else 1
        state_run, sown_run = runs[offset + 1], runs[offset + 2]
        _check_overlap(state_run, sown_run)
        if not collections:
            return out
        # Sown values start fresh each run: they replace old sows that `variables` may still hold.
        return out, {**state_run.updates(), **sown_run.collections()}


def transform(fn: Callable[..., Any], *, method: Any = None) -> Transformed:
    """Discharge an effectful function into pure `init` and `apply`.

    `fn` may be an `fx.nn.Module`; `method` picks its entry point (a name,
    or a function called as `method(module, *args)`), and `init`/`apply` take
    `method=` to run another one, as in Flax. Give the submodules that two
    entry points share explicit names (`Dense(2, name="encoder")`): a module
    is named when a run first calls it, so an inline `Dense` reached from
    `decode` alone would otherwise be counted afresh.

    >>> def model(x):
    ...     w = fx.param("w", jax.nn.initializers.ones, (x.shape[-1], 2))
    ...     return x @ w
    >>> t = fx.transform(model)
    >>> variables = t.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> t.apply(variables, jnp.ones((1, 3)))
    Array([[3., 3.]], dtype=float32)
    """
    if not callable(fn):
        raise EffaxError(f"`fx.transform` takes a function, got {type(fn).__name__}.")
    if method is None:
        return Transformed(fn)
    return Transformed(_method_of(fn, method), fn)


@dataclasses.dataclass(frozen=True)
class MultiTransformed:
    """What `fx.multi_transform` returns: `init` runs the template, `apply` is a tree of apply functions."""

    init: Callable[..., dict]
    init_with_output: Callable[..., tuple[Any, dict]]
    apply: Any


def multi_transform(f: Callable[[], tuple[Callable[..., Any], Any]]) -> MultiTransformed:
    """Discharge several entry points that share variables, like Haiku's `multi_transform`.

    `f()` builds what the entries share (modules) and returns `(template,
    entries)`: `init` runs `template`, which should reach every variable;
    `entries` is a tree (dict, tuple) of functions, and `apply` is the same
    tree of `apply` functions, each `apply(variables, *args, rngs=...,
    mutable=..., training=..., handlers=..., ...)` as `fx.transform`'s. `f` is
    called once here to learn the entries, and afresh in every run. Name the
    shared modules (`name="encoder"`) or scope the code (`fx.scope`): names
    are given when a run first calls a module, so an entry that skips one
    would otherwise count the next one's auto-name from zero.

    >>> def f():
    ...     encoder = fx.nn.Dense(2, name="encoder")
    ...     decoder = fx.nn.Dense(3, name="decoder")
    ...     return (lambda x: decoder(encoder(x))), {"encode": encoder, "decode": decoder}
    >>> ae = fx.multi_transform(f)
    >>> v = ae.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> z = ae.apply["encode"](v, jnp.ones((1, 3)))
    >>> ae.apply["decode"](v, z).shape
    (1, 3)
    """
    if not callable(f):
        raise EffaxError(f"`fx.multi_transform` takes a function `f() -> (template, entries)`, got {type(f).__name__}.")

    def built() -> tuple[Callable[..., Any], Any]:
        made = f()
        if not (isinstance(made, tuple) and len(made) == 2 and callable(made[0])):
            raise EffaxError(
                "`fx.multi_transform(f)`: `f()` must return `(template, entries)`, a function that "
                f"reaches every variable and a tree of entry functions; got {made!r}."
            )
        return made

    with hermetic():
        leaves, treedef = jax.tree.flatten(built()[1])
    for leaf in leaves:
        if not callable(leaf):
            raise EffaxError(f"`fx.multi_transform(f)`: entry {leaf!r} of `f()[1]` is not a function.")

    def template(*args: Any, **kwargs: Any) -> Any:
        return built()[0](*args, **kwargs)

    def entry(i: int) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            return jax.tree.leaves(built()[1])[i](*args, **kwargs)

        return run

    t = Transformed(template)
    applies = [Transformed(entry(i)).apply for i in range(len(leaves))]
    return MultiTransformed(t.init, t.init_with_output, jax.tree.unflatten(treedef, applies))


@dataclasses.dataclass
class VariablesReport:
    """What `fx.check_variables` found: every problem at once, paths as `collection:a/b/c`."""

    missing: list[str] = dataclasses.field(default_factory=list)
    unused: list[str] = dataclasses.field(default_factory=list)
    mis_shaped: list[str] = dataclasses.field(default_factory=list)
    mis_typed: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unused or self.mis_shaped or self.mis_typed)

    def __str__(self) -> str:
        if self.ok:
            return "variables match the model"
        parts = []
        for label, items in (
            ("missing", self.missing),
            ("unused", self.unused),
            ("mis-shaped", self.mis_shaped),
            ("mis-typed", self.mis_typed),
        ):
            parts.extend(f"{label}: {item}" for item in items)
        return "\n".join(parts)


class _Audit(Handler):
    """Answer params from `variables` leniently and record every mismatch (for `check_variables`)."""

    module_calls = False  # never looks at module calls: they skip it

    def __init__(self, variables: Mapping[str, Any], report: VariablesReport, used: set):
        self.variables, self.report, self.used = variables, report, used

    def handle(self, request: Any, forward: Any) -> Any:
        if type(request) is ParamRequest:
            name = f"params:{path_str(request.path)}"
            slot = ("params",) + request.path
            if slot in self.used:
                return jnp.zeros(request.shape, request.dtype)
            self.used.add(slot)
            stored = get_path(self.variables.get("params", {}), request.path)
            if stored is MISSING:
                self.report.missing.append(f"{name} ({request.spec()})")
            else:
                shape, dtype = jnp.shape(stored), jax.dtypes.canonicalize_dtype(jnp.result_type(stored))
                if shape != request.shape:
                    self.report.mis_shaped.append(f"{name}: model {request.shape}, variables {shape}")
                if dtype != request.dtype:
                    self.report.mis_typed.append(
                        f"{name}: model {jnp.dtype(request.dtype).name}, variables {jnp.dtype(dtype).name}"
                    )
            return jnp.zeros(request.shape, request.dtype)
        if type(request) is LocalStateRequest:
            self.used.add((request.collection,) + request.path)
            name = f"{request.collection}:{path_str(request.path)}"
            stored = get_path(self.variables.get(request.collection, {}), request.path)
            if stored is MISSING:
                self.report.missing.append(name)
            else:
                self._compare_state(name, stored, request.init())
        return forward(request)

    def _compare_state(self, name: str, stored: Any, fresh: Any) -> None:
        (s_leaves, s_def), (f_leaves, f_def) = jax.tree.flatten(stored), jax.tree.flatten(fresh)
        show = lambda leaves: [f"{jnp.result_type(a).name}{list(jnp.shape(a))}" for a in leaves]
        found = f"{name}: model {show(f_leaves)}, variables {show(s_leaves)}"
        if s_def != f_def or any(jnp.shape(a) != jnp.shape(b) for a, b in zip(s_leaves, f_leaves, strict=False)):
            self.report.mis_shaped.append(found)
        elif any(jnp.result_type(a) != jnp.result_type(b) for a, b in zip(s_leaves, f_leaves, strict=False)):
            self.report.mis_typed.append(found)


def check_variables(
    t: Transformed,
    variables: Mapping[str, Any],
    *args: Any,
    rngs: Any = None,
    training: bool | None = None,
    **kwargs: Any,
) -> VariablesReport:
    """Run the model abstractly on `variables` and list missing, unused, mis-shaped and mis-typed entries.

    Nothing is computed or allocated (`jax.eval_shape`). Without `rngs`, a
    dummy key serves every stream; without `training`, the model runs in eval.

    >>> t = fx.transform(lambda: fx.param("w", jax.nn.initializers.zeros, (2,)))
    >>> print(fx.check_variables(t, {"params": {"v": jnp.zeros(2)}}))
    missing: params:w (shape (2,), float32)
    unused: params:v
    """
    variables = _check_variables_arg(variables)
    report, used = VariablesReport(), set()
    keys = KeysFromRngs(jax.random.key(0) if rngs is None else rngs)
    mode = Mode(False if training is None else training)

    def run(variables: Any) -> None:
        state = FunctionalState(variables, True)
        with hermetic(), handle(mode, keys, state, CollectSown(()), _Audit(variables, report, used)):
            t.fn(*args, **kwargs)

    jax.eval_shape(run, variables)
    for collection, tree in variables.items():
        if isinstance(tree, Mapping):
            for path, _ in flatten_paths(tree):
                slot = (collection,) + path
                if not any(slot[:n] in used for n in range(2, len(slot) + 1)):
                    report.unused.append(f"{collection}:{path_str(path)}")
    return report
