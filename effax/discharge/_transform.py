"""Discharge: an effectful function plus the built-in handlers becomes pure `init` and `apply`."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax

from effax.core import (
    EffaxError,
    ParamConflictError,
    flatten_handlers,
    handle,
    hermetic,
)
from effax.discharge._options import apply_options, init_options, split_presets
from effax.handlers import (
    ALL,
    CaptureIntermediates,
    CollectSown,
    FunctionalState,
    InitParams,
    InitState,
    KeysFromRngs,
    LoadParams,
    Mode,
    check_key,
    normalize_mutable,
)


def refuse_module_class(fn: Any, call: str, example: str = "{}") -> None:
    """Refuse an `fx.nn.Module` class where a model goes (`fx.transform(MLP)`): called with the model's
    inputs it would build a module from them (the input taken as its first field), and return that module.

    `call` names the function refusing it, `example` the fixed call, `{}` standing for the instance."""
    _refuse_flax_module(fn, call, example)
    if isinstance(fn, type) and getattr(fn, "_effax_at_root", None) is not None:
        name = fn.__name__
        raise EffaxError(
            f"{call} got the class {name}; pass an instance: {example.format(f'{name}(...)')}. A class called "
            "with the model's inputs builds a module from them (an input taken as its first field) instead "
            "of running one. (`fx.scan`, `fx.vmap` and `fx.remat` take a class on purpose: they lift "
            "it per instance.)"
        )


def _refuse_flax_module(fn: Any, call: str, example: str) -> None:
    """A Flax module (or class) where a model goes: without `fx.from_flax` it fails inside Flax, unbound."""
    for module, kind, wrap in (("flax.linen", "linen", "fx.from_flax"), ("flax.nnx", "NNX", "fx.from_nnx")):
        api = sys.modules.get(module)  # never imported here: a model of that kind exists only if it is
        base = getattr(api, "Module", None)
        if base is None or not (isinstance(fn, base) or isinstance(fn, type) and issubclass(fn, base)):
            continue
        name = fn.__name__ if isinstance(fn, type) else type(fn).__name__
        instance = f"{name}(...)" if isinstance(fn, type) else "module"
        raise EffaxError(
            f"{call} got the Flax {kind} module {'class ' if isinstance(fn, type) else ''}{name}: a {kind} module "
            f"runs in effax through `{wrap}`, which hands it its variables: "
            f"{example.format(f'{wrap}({instance})')}. Its variables keep {kind}'s layout."
        )


def _check_variables_arg(variables: Any) -> Mapping[str, Any]:
    if type(variables) is not dict and not isinstance(variables, Mapping):
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
    """The entry point `method=` names: `owner.<method>` for a name, `method(owner, ...)` for a function.

    An owner that resolves its own entry points (what `fx.from_flax` returns:
    Flax calls `method` with the bound Flax module) does so through `_effax_entry`.
    """
    own = getattr(type(owner), "_effax_entry", None)
    if own is not None:
        return own(owner, method)
    if isinstance(method, str):
        target = getattr(owner, method, None)
        if callable(target):
            return target
        methods = sorted(  # `setup` is a module's own, never an entry point
            m for m in dir(type(owner)) if not m.startswith("_") and m != "setup" and callable(getattr(owner, m, None))
        )
        raise EffaxError(
            f"method={method!r}: {type(owner).__name__} {getattr(owner, '__name__', '')} has no method "
            f"{method!r} (its public methods: {methods or 'none'}). Name one of them, or pass a function "
            "called with the module, `method=lambda m, *a: m.encode(*a)`; for plain functions with "
            "several entry points use `fx.multi_transform`."
        )
    if inspect.ismethod(method) and method.__self__ is owner:
        return method
    if callable(method):
        return functools.partial(method, owner)
    raise EffaxError(
        f"method= takes a method name or a function called as `method(module, *args)`, got {type(method).__name__}."
    )


def _entry_point(owner: Any, method: Any) -> Callable[..., Any]:
    """What `fx.transform(owner, method=...)` runs; a module runs at the root scope (`_effax_at_root`),
    as Flax's top-level module: its layers are `Dense_0`, not `Classifier_0/Dense_0`."""
    fn = owner if method is None else _method_of(owner, method)
    at_root = getattr(type(owner), "_effax_at_root", None)
    return fn if at_root is None else at_root(owner, fn)


_cached_entry_point = functools.lru_cache(maxsize=256)(_entry_point)

OPTIONS = ("training", "rngs", "mutable", "handlers", "method", "capture_intermediates")


@functools.lru_cache(maxsize=1024)
def _keyword_options(fn: Any, bound: bool) -> tuple[tuple[str, int | None], ...]:
    """The options of `init`/`apply` that `fn` also takes by keyword, with their positional index (or None).

    Read once per function: the signature is inspected here, never per call.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): nothing can clash
        return ()
    if bound:
        params = params[1:]
    given = fn.keywords if isinstance(fn, functools.partial) else {}  # bound by the user: not taken
    found = []
    for i, p in enumerate(params):
        if p.name in OPTIONS and p.name not in given and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            found.append((p.name, i if p.kind is p.POSITIONAL_OR_KEYWORD else None))
    return tuple(found)


def _positional_names(fn: Callable[..., Any]) -> str:
    """`"x, y"`: the positional parameters of `fn` before its options, spelled for a lambda; `"*a"` if unsure."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return "*a"
    names = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.name in OPTIONS:
            break
        names.append(p.name)
    return ", ".join(names) or "*a"


def _check_options(entry: Callable[..., Any], args: tuple, call: str, owner: Any = None, method: Any = None) -> None:
    """Refuse a model keyword named like an option: effax would take it, and the model would never see it.

    The fix it suggests for a module at the root scope (`owner`, what `fx.transform` got) keeps it there,
    `method=lambda m, x: m(x, training=fx.is_training())`: a wrapping lambda would make the module a
    layer of the lambda (`Critic_0/Dense_0`), so the variables of the linen model it ports would not load.
    """
    bound = inspect.ismethod(entry)
    fn = entry.__func__ if bound else entry
    try:
        clashes = _keyword_options(fn, bound)
    except TypeError:  # unhashable: inspect it now
        clashes = _keyword_options.__wrapped__(fn, bound)
    for name, position in clashes:
        if position is not None and position < len(args):
            continue  # given positionally: it reaches the model, nothing is taken
        value = "fx.is_training()" if name == "training" else "..."
        if getattr(type(owner), "_effax_at_root", None) is not None:  # a module: keep it at the root scope
            target = method if method is not None else getattr(getattr(entry, "__wrapped__", None), "__name__", 0)
            called = f"m.{target}" if isinstance(target, str) and target != "__call__" else "m"
            a = _positional_names(entry)
            fix = (
                f"call it through `method=`, which keeps the module at the root scope (a wrapping lambda "
                f"would rename its params `{type(owner).__name__}_0/...`, so linen variables would not load): "
                f"`fx.transform(model, method=lambda m, {a}: {called}({a}, {name}={value}))`"
            )
        elif name == "training":
            fix = (
                "ask for the mode inside the model, "
                "`fx.transform(lambda x: model(x, training=fx.is_training()))`"
            )
        else:
            fix = f"bind it in a wrapper, `fx.transform(functools.partial(model, {name}=...))`"
        if name == "training":
            fix += f", and pass `training=` to `{call}` as usual"
        raise EffaxError(
            f"`{call}`: the model {getattr(entry, '__name__', type(entry).__name__)} takes a keyword "
            f"argument {name!r}, which is also an option of `t.init`/`t.apply` ({', '.join(OPTIONS)}): "
            f"effax would take `{name}=` itself and the model would never see it. Feed it another "
            f"way: {fix}; or pass it positionally."
        )


# Which call (`t.init`/`t.apply`) is running a model in this context; None outside models.
_RUNNING: contextvars.ContextVar[str | None] = contextvars.ContextVar("effax_running", default=None)


def _refuse_nested(call: str) -> None:
    """A transform's `init`/`apply` inside a model another one runs would be hermetic: refuse it."""
    outer = _RUNNING.get()
    if outer is not None:
        raise EffaxError(
            f"`{call}` of a transformed model was called inside a model that `{outer}` is running. "
            "The inner call is hermetic: its params would be made afresh (or read from a constant "
            "tree) on every call, never join the outer variables, and never be trained. Call the "
            "inner model's function directly, `fx.transform(lambda x: outer(inner_fn(x)))`, so its "
            "params land in the outer variables (under `with fx.scope('inner'):` if you like), or "
            "build it from `fx.nn` modules."
        )


def _check_init_rngs(rngs: Any, args: tuple) -> None:
    """`t.init(x)` without a key takes `x` for the key: say so, rather than fail on a missing argument."""
    if rngs is None or isinstance(rngs, Mapping):
        return
    try:
        check_key(rngs, None)
    except EffaxError as e:
        raise EffaxError(
            f"`t.init(rngs, *args)` takes the key first; {e} If you passed the model's input first, "
            "pass the key before it: `t.init(jax.random.key(0), x)`."
        ) from None


class _Runs(NamedTuple):
    """The storage runs of one discharged call, by name: read results here, never by position."""

    state: Any
    sown: Any
    params: Any


def _discharged(
    call: str, entry: Callable[..., Any], args: tuple, kwargs: dict, outer: tuple, storage: tuple, extra: list
) -> tuple[Any, _Runs]:
    """Run `entry` hermetically under the built-in handlers, outermost first: mode and keys (`outer`), then
    state, sows and params (`storage`), then the `handlers=` given (`extra`), as the design pins."""
    builtin = [h for h in outer if h is not None] + list(storage)  # one block: entered once per call
    with hermetic(), handle(*builtin) as runs:
        state, sown, params = runs[len(builtin) - 3 :]
        token = _RUNNING.set(call)
        try:
            if extra:  # the handlers given enter with the built-in ones installed, as if nested inside them
                with handle(*extra):
                    out = entry(*args, **kwargs)
            else:
                out = entry(*args, **kwargs)
        finally:
            _RUNNING.reset(token)
    _check_overlap(state, sown)
    return out, _Runs(state, sown, params)


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

    >>> t = fx.transform(lambda x: x * fx.param("w", jax.nn.initializers.ones, ()))
    >>> isinstance(t, fx.Transformed), t.apply(t.init(jax.random.key(0), 2.0), 2.0)
    (True, Array(2., dtype=float32))
    """

    fn: Callable[..., Any]
    owner: Any = None
    _effax_discharged: ClassVar[bool] = True  # callable, but no model: what takes a model refuses it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Refuse a call: `t(variables, x)` and `jax.jit(t)` (Haiku's and Flax's habits) mean `t.apply`.

        Why a call raises rather than runs `apply`: `t` is a pair of pure functions, and the one a call
        would run is ambiguous (Haiku's `transform` returns the same pair); so a call says which to use.
        Handlers given to a jitted `apply` are no arrays: a preset is a pytree (its keys are traced),
        other handlers go in a function that calls `apply`, or static (`static_argnames=("handlers",)`).
        """
        raise EffaxError(
            "a transformed model is not called itself: `t.init(key, x)` creates the variables and "
            "`t.apply(variables, x)` runs the model; jit those, `jax.jit(t.apply)(variables, x)`."
        )

    def _entry(self, method: Any) -> Callable[..., Any]:
        if method is None:
            return self.fn
        owner = self.fn if self.owner is None else self.owner
        try:  # one entry per (owner, method): its signature is then inspected once
            return _cached_entry_point(owner, method)
        except TypeError:  # an unhashable method
            return _entry_point(owner, method)

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
        _refuse_nested("t.init")
        _check_init_rngs(rngs, args)
        return self._run_init(
            "t.init", args, kwargs, rngs=rngs, training=training, handlers=handlers, mutable=mutable,
            capture_intermediates=capture_intermediates, method=method,
        )

    def _run_init(
        self,
        call: str,
        args: tuple,
        kwargs: dict,
        *,
        rngs: Any,
        training: Any,
        handlers: Any,
        mutable: Any,
        capture_intermediates: Any,
        method: Any,
        around: Any = (),
        inside: Any = (),
        default_rngs: Any = None,
    ) -> tuple[Any, dict]:
        """The initializing run `init` makes, for `call` (named in errors): the one place its options are read.

        `fx.effects_of` runs the model through here, so a summary sees what
        `init` makes under the same options: `around` are handlers just
        inside the storage handlers (outside `handlers=`), `inside` the
        innermost ones, and `default_rngs` serves the draws when neither
        `rngs` nor a preset gives a key.
        """
        preset, handlers = split_presets(handlers)
        training, rngs = init_options(preset, training, rngs)
        state_collections, sown_collections = _init_mutable(mutable)
        extra = flatten_handlers((around, handlers))
        if capture_intermediates:
            sown_collections = _with_intermediates(sown_collections)
            extra.append(CaptureIntermediates(capture_intermediates))
        extra.extend(flatten_handlers((inside,)))
        entry = self._entry(method)
        _check_options(entry, args, call, self.owner, method)
        keys = KeysFromRngs(default_rngs if rngs is None else rngs)
        storage = (InitState({}, state_collections), CollectSown(sown_collections), InitParams())
        out, runs = _discharged(call, entry, args, kwargs, (Mode(training), keys), storage, extra)
        return out, {"params": runs.params.params, **runs.state.initial(), **runs.sown.collections()}

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
        _refuse_nested("t.apply")
        variables = _check_variables_arg(variables)
        if handlers == ():  # the usual call: no preset, no handlers (eager calls pay for every step)
            keys, extra = KeysFromRngs(rngs), []
        else:
            preset, handlers = split_presets(handlers)
            training, keys, mutable = apply_options(preset, training, rngs, mutable)
            extra = flatten_handlers((handlers,))
        collections = normalize_mutable(mutable)
        mode = None if training is None else Mode(training)  # `Mode` checks it is a Python bool
        if capture_intermediates:
            collections = _with_intermediates(collections)
            extra.append(CaptureIntermediates(capture_intermediates))
        entry = self._entry(method)
        _check_options(entry, args, "t.apply", self.owner, method)
        storage = (
            FunctionalState(variables, collections), CollectSown(collections), LoadParams(variables.get("params", {}))
        )
        out, runs = _discharged("t.apply", entry, args, kwargs, (mode, keys), storage, extra)
        if not collections:
            return out
        # Sown values start fresh each run: they replace old sows that `variables` may still hold.
        return out, {**runs.state.updates(), **runs.sown.collections()}


def transform(fn: Callable[..., Any], *, method: Any = None) -> Transformed:
    """Discharge an effectful function into pure `init` and `apply`.

    `fn` may be an `fx.nn.Module`; it runs at the root scope, as Flax's
    top-level module (its layers are `Dense_0`, not `Classifier_0/Dense_0`),
    so the variables of the equivalent linen model apply unchanged. `method`
    picks its entry point (a name, or a function called as
    `method(module, *args)`), and `init`/`apply` take `method=` to run
    another one, as in Flax. Give the submodules that two entry points share
    explicit names (`Dense(2, name="encoder")`): an inline `Dense` reached
    from `decode` alone would otherwise be counted afresh. A module class
    is refused: pass an instance, `fx.transform(MLP(...))`.

    A keyword argument of `fn` named like an option of `init`/`apply`
    (`training`, `rngs`, `mutable`, `handlers`, `method`,
    `capture_intermediates`) would be taken by effax and never reach `fn`,
    so calls refuse it with an `EffaxError`: read the mode inside the model
    (`fx.transform(lambda x: model(x, training=fx.is_training()))`; for a
    module, `fx.transform(module, method=lambda m, x: m(x,
    training=fx.is_training()))`, which keeps it at the root scope), bind
    it with `functools.partial`, or pass it positionally.

    >>> def model(x):
    ...     w = fx.param("w", jax.nn.initializers.ones, (x.shape[-1], 2))
    ...     return x @ w
    >>> t = fx.transform(model)
    >>> variables = t.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> t.apply(variables, jnp.ones((1, 3)))
    Array([[3., 3.]], dtype=float32)
    """
    if not callable(fn) or getattr(type(fn), "_effax_discharged", False):
        raise EffaxError(f"`fx.transform` takes a function, got {type(fn).__name__}.")
    refuse_module_class(fn, "fx.transform", "fx.transform({})")
    if method is None and getattr(type(fn), "_effax_at_root", None) is None:
        return Transformed(fn)
    return Transformed(_entry_point(fn, method), fn)


@dataclasses.dataclass(frozen=True)
class MultiTransformed:
    """What `fx.multi_transform` returns: `init` runs the template, `apply` is a tree of apply functions.

    >>> def f():
    ...     scale = lambda x: x * fx.param("s", jax.nn.initializers.ones, ())
    ...     return scale, {"scale": scale}
    >>> m = fx.multi_transform(f)
    >>> sorted(m.apply), m.apply["scale"](m.init(jax.random.key(0), 3.0), 3.0)
    (['scale'], Array(3., dtype=float32))
    """

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
    called once here to learn the entries, and afresh in every run, where the
    modules it builds are named as built. Name the shared modules
    (`name="encoder"`) or scope the code (`fx.scope`), so an entry's names do
    not depend on what else `f` builds.

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
