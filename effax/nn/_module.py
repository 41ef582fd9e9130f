"""`Module`: dataclass configuration plus a scope, so layers read like Flax linen or Haiku."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

from effax.core import (
    EffaxError,
    InvalidNameError,
    check_name,
    current_stack,
    path_now,
    path_str,
    reset_path,
    run_local,
    run_values,
    set_path,
    under_path,
)
from effax.effects import ModuleCallRequest, call_module
from effax.nn._naming import Names, current_names, pop_names, push_names

_EXPLICIT = ("explicit name",)
_FLAX_ENTRY_POINTS = ("init", "init_with_output", "apply")  # a linen module's own, a transform's in effax
# A linen module's methods for its variables, rngs and collections, and what an `fx.nn` module calls instead:
# the effects are functions of the current path, not methods of the module (so any function can use them).
_FLAX_METHODS = {
    "param": "fx.param(name, init, shape, dtype) (the initializer takes `(key, shape, dtype)`)",
    "variable": "fx.local_state(name, lambda: value, collection=...) and its `.get()` / `.set(v)`",
    "get_variable": "fx.local_state(name, init, collection=...).get()",
    "put_variable": "fx.local_state(name, init, collection=...).set(value)",
    "has_variable": "fx.local_state(name, init, collection=...), whose `init()` runs only when it is missing",
    "make_rng": "fx.next_key(stream)",
    "has_rng": "fx.next_key(stream) (a missing stream is a `MissingRngError` that names it)",
    "sow": "fx.sow(tag, value, collection=...)",
    "perturb": "fx.sow(tag, value, collection=...) (gradients of intermediates: differentiate a function of them)",
    "is_initializing": "fx.is_initializing()",
    "is_mutable_collection": "the `mutable=` you pass to `t.apply` (a model does not branch on it)",
    "bind": "t = fx.transform(module); t.apply(variables, x)",
    "tabulate": "fx.summary(fx.transform(module), key, x)",
    "variables": "the variables `t.init` returns (a module holds none)",
}


class ModuleNotTransformedError(EffaxError, AttributeError):
    """`module.init(key, x)` (Flax's habit) on an `fx.nn` module: in effax, `fx.transform(module)` has them.

    Also an `AttributeError`, so `hasattr(module, "init")` stays False. A linen module's own methods
    (`self.param`, `self.variable`, `self.make_rng`, `self.sow`, ...) raise it too, naming effax's function
    for each (`fx.param`, `fx.local_state`, `fx.next_key`, `fx.sow`).

    >>> fx.nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 2)))
    Traceback (most recent call last):
    effax.ModuleNotTransformedError: `Dense.init`: fx.nn modules are not transformed themselves ...
    """


def where(kind: str) -> str:
    """The layer in an error message: its kind and the path it runs at (`Conv `encoder/Conv_1``), so a
    message about a wrong input or config says which layer of a model refused it."""
    path = path_now()
    return f"{kind} `{path_str(path)}`" if path else kind


def _claim(names: Names, parent: tuple[str, ...], module: Module) -> tuple[str, ...]:
    """The path of `module` under `parent`: `name=`, else the next `<Class>_<n>` of this call.

    An explicit name equal to an auto-name given earlier in the same call
    would silently share that layer's weights; it raises, as Flax's
    `NameInUseError` does. (An explicit name taken first is skipped by the
    auto-names that follow.)
    """
    if module.name is None:
        return names.auto_path(parent, type(module).__name__)
    return _claim_name(names, parent, module.name, module)


def _field_name(owner: Any, module: Any) -> str | None:
    """The name Flax gives `module` as a field of `owner`: the field (`proj`), with the index or key inside
    a list, tuple or dict field (`layers_0`, `blocks_enc`); None when no field of `owner` holds it."""

    def find(value: Any, name: str) -> str | None:
        if value is module:
            return name
        if isinstance(value, dict):
            items: Any = value.items()
        else:
            items = enumerate(value) if isinstance(value, list | tuple) else ()
        for key, item in items:
            found = find(item, f"{name}_{key}")
            if found is not None:
                return found
        return None

    for f in dataclasses.fields(owner):
        found = find(owner.__dict__.get(f.name), f.name)
        if found is not None:
            return found
    return None


def _adopt(names: Names, parent: tuple[str, ...], module: Module) -> tuple[str, ...]:
    """The path of `module`, made outside the run, at its first call under `parent`: the field of the module
    running there that holds it, as Flax adopts a submodule passed in (`Block(proj=Dense(3))` makes
    `proj`, `Sequential([...])` makes `layers_0`; the field's name wins over `name=`, as Flax's default);
    else `name=` or the next auto-name."""
    for owner, path in list(names.bound.items()):
        if path == parent and owner is not module and isinstance(owner, Module):
            name = _field_name(owner, module)
            if name is not None:
                return _claim_name(names, parent, name, module)
    return _claim(names, parent, module)


def _claim_name(names: Names, parent: tuple[str, ...], name: Any, module: Any = None) -> tuple[str, ...]:
    """The path `parent/name` of `module`, given its name explicitly (`name=`, a setup() attribute).

    Two instances claiming one name in the same call would silently be one layer (one set of weights): it
    raises, as Flax's `NameInUseError`. (One instance called again, or a call made again, re-claims it.)
    """
    name = check_name(name, "module")
    path = parent + (name,)
    if module is not None:
        if names.frame is None:
            names.frame = {}
        claims = names.frame.setdefault(parent, {})
        first = claims.setdefault((name,), module)  # a tuple key: never a class's auto-name counter
        if first is not module:
            raise InvalidNameError(
                f"module name {name!r} at `{path_str(parent)}` is given to two modules in the same call "
                f"({type(first).__name__} and {type(module).__name__}), so the two layers would silently share "
                f"`{path_str(path)}` (Flax raises NameInUseError here). Give each its own name; to share one "
                "layer's weights, call the same instance twice."
            )
    base, _, n = name.rpartition("_")
    taken = (names.frame or {}).get(parent, {}).get(base, 0)
    if n.isdigit() and taken > int(n) and names.owners.get(path, _EXPLICIT) == names.owner:
        raise InvalidNameError(
            f"module name {name!r} at `{path_str(parent)}` is the auto-name of an earlier {base} "
            f"created in the same call, so the two layers would share `{path_str(path)}` (Flax "
            f"raises NameInUseError here). Give this one another name, e.g. name={name + '_out'!r}, "
            f"or name the earlier {base} explicitly too."
        )
    names.owners.setdefault(path, _EXPLICIT)  # auto-names skip it
    return path


_NO_ARG = object()  # no positional argument: `call`'s first parameter was not given


def _routed(method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    plain = method == "__call__"  # the call owns its children's names as its path (no tuple to build)

    @functools.wraps(fn)
    def call(self: Module, x: Any = _NO_ARG, /, *args: Any, **kwargs: Any) -> Any:
        # The usual eager call, decided here in one frame: a layer named in this run, called from outside it,
        # no setup(), and no handler looking at module calls (no route for `ModuleCallRequest`). It is
        # `Module._call` and `call_module`'s fast path with `Names.enter`/`leave` and `under_path` inline;
        # every other call takes `_call`. The first positional argument is a parameter of its own: a layer
        # called with one input (`Dense(3)(x)`) is called on without packing its arguments again.
        run = run_values()
        names = None if run is None else run.get(Names)
        path = None if names is None else names.bound.get(self)
        if (path is None or type(self)._call is not _PLAIN_CALL or path_now() == path
                or current_stack().routes[ModuleCallRequest]):
            return self._call(method, fn, args if x is _NO_ARG else (x, *args), kwargs)
        frame, owner = names.frame, names.owner
        names.frame, names.owner = None, path if plain else (path, method)
        token = set_path(path)
        try:
            if x is _NO_ARG:
                return fn(self, *args, **kwargs)
            return fn(self, x, *args, **kwargs) if args or kwargs else fn(self, x)
        finally:
            reset_path(token)
            names.frame, names.owner = frame, owner

    return call


def _name_where_built(module: Module, cls: type) -> None:
    """Inside a run, name `module` where it is built, as Flax and Haiku do: `Dense(2)(relu(Dense(3)(x)))`
    makes the 2-unit layer `Dense_0`. Outside a run it is named at its first call (`Module._call`). Only the
    `__init__` of the most derived class `cls` names it, once."""
    if type(module) is cls and (run := run_values()) is not None:
        names = run.get(Names) or current_names()
        if type(owner := names.owner) is tuple and owner and owner[-1] is _SETUP:
            return  # built in `setup()`: named by the attribute that holds it, or where it is adopted (Flax)
        parent, name = path_now(), module.name
        path = names.auto_path(parent, cls.__name__) if name is None else _claim_name(names, parent, name, module)
        names.bound[module] = path


class _Setups(dict):
    """Run-local: module -> the attributes its `setup()` assigned, while a call of the module runs."""


class _Assigned(dict):
    """What one `setup()` assigned; `open` while it runs (only then may it assign)."""

    open = True


_SETUP = object()  # the naming frame of a `setup()`: the modules it builds are not named where built


def _run_setup(module: Module, path: tuple[str, ...]) -> dict[str, Any]:
    """Run `module.setup()` at `path`, in a naming frame of its own; what it assigns is kept while the caller
    (`_after_setup`) runs, and dropped after, so no value outlives the JAX trace it was made in."""
    setups, names = run_local(_Setups), current_names()
    setups[module] = values = _Assigned()
    saved = names.enter(path, _SETUP)
    try:
        under_path(path, type(module).setup, module)
    except BaseException:
        setups.pop(module, None)
        raise
    finally:
        names.leave(saved)
        values.open = False
    return values


def _after_setup(fn: Callable[..., Any], self: Module, *args: Any, **kwargs: Any) -> Any:
    """`fn(self, ...)` (a method of a module with `setup()`), after `setup()` when no call of the module is
    running yet; its attributes live until that call returns."""
    setups = run_local(_Setups)
    if self in setups:  # a method called by another of this call: set up already
        return fn(self, *args, **kwargs)
    _run_setup(self, path_now())
    try:
        return fn(self, *args, **kwargs)
    finally:
        setups.pop(self, None)


def _setup_values(module: Module, name: str) -> dict[str, Any]:
    """What `setup()` assigns on `module`: the running call's, else from a `setup()` run for this read alone."""
    if run_values() is None:
        raise AttributeError(
            f"{type(module).__name__}.{name} is assigned in setup(), which runs only while the module runs "
            "(a call of it, or `t.init`/`t.apply`): read it there."
        )
    values = run_local(_Setups).get(module)
    if values is not None:
        return values
    names = current_names()
    path = names.bound.get(module)
    if path is None:
        path = names.bound[module] = _adopt(names, path_now(), module)
    try:
        return _run_setup(module, path)
    finally:
        run_local(_Setups).pop(module, None)


def _call_with_setup(self: Module, method: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """`Module._call` of a module with `setup()`: the method runs after it (only these classes pay for it)."""
    return Module._call(self, method, functools.partial(_after_setup, fn), args, kwargs)


def _setup_setattr(self: Module, name: str, value: Any) -> None:
    """`self.<name> = value` inside `setup()`: kept for this call; a module in it is named after the attribute
    (its own `name=` first, as in Flax; one already named keeps its name, so `self.b = self.a` is `a`)."""
    values = None if run_values() is None else run_local(_Setups).get(self)
    cls = type(self).__name__
    if name in self.__dataclass_fields__:
        raise dataclasses.FrozenInstanceError(
            f"cannot assign to field {name!r} of {cls}: fields configure the module and stay as given, even in "
            f"setup(); assign what setup() makes to another attribute (`self.{name}_ = ...`)."
        )
    if values is None or not values.open:
        raise dataclasses.FrozenInstanceError(
            f"cannot assign {cls}.{name} here: a module is frozen, and attributes are assigned only in "
            "setup() (Flax's AssignSubModuleError). Assign it in setup(), or build the layer inline and call it."
        )
    values[name] = value
    names, parent = current_names(), path_now()

    def bind(item: Any, label: str) -> None:
        if not isinstance(item, Module):  # a lifted module class's instance (`fx.remat(Block)()`)
            item = getattr(item, "_effax_module", item)
        if isinstance(item, Module):
            if item not in names.bound:
                names.bound[item] = _claim_name(names, parent, label if item.name is None else item.name, item)
        elif isinstance(item, dict):
            for key, sub in item.items():
                bind(sub, f"{label}_{key}")
        elif isinstance(item, list | tuple):
            for i, sub in enumerate(item):
                bind(sub, f"{label}_{i}")

    bind(value, name)


class _Factory:
    """The default of a field with a `default_factory` (call it), shown as `dataclasses` shows its own."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()


# The tail of a made `__init__`: `_name_where_built`, with the usual case inline (an auto-name in a run, not
# in `setup()`; `Names.auto_path` inline, but for a name taken already) so an eager layer pays no frame for it.
# `_labels` is the class's `<Class>_<n>` by count: each auto-name string is formatted once per process.
_NAMED_WHERE_BUILT = """\
    if type(self) is not _cls or (_fx_run := _run_values()) is None:
        return
    _fx_names = _fx_run.get(_Names)
    if (_fx_names is None or self.name is not None
            or type(_fx_owner := _fx_names.owner) is tuple and _fx_owner and _fx_owner[-1] is _SETUP):
        return _name_where_built(self, _cls)
    _fx_parent, _fx_frame = _path_now(), _fx_names.frame
    if _fx_frame is None:
        _fx_frame = _fx_names.frame = {}
    _fx_counters = _fx_frame.get(_fx_parent)
    if _fx_counters is None:
        _fx_counters = _fx_frame[_fx_parent] = {}
    _fx_n = _fx_counters.get(_base, 0)
    try:
        _fx_path = _fx_parent + (_labels[_fx_n],)
    except KeyError:  # a count not reached before: its label, kept (the same string from any thread)
        _fx_path = _fx_parent + (_labels.setdefault(_fx_n, f"{_base}_{_fx_n}"),)
    if _fx_names.owners.setdefault(_fx_path, _fx_owner) == _fx_owner:
        _fx_counters[_base] = _fx_n + 1
    else:
        _fx_path = _fx_names.auto_path(_fx_parent, _base)
    _fx_names.bound[self] = _fx_path
"""


def _named_init(cls: type) -> Callable[..., None] | None:
    """The frozen dataclass `__init__` of `cls`, filling `__dict__` directly, then `_name_where_built`; None
    when `cls` has pseudo-fields (`InitVar`) or a field named `self` or `_...` (the names the made code uses),
    which keep the dataclass's own, wrapped.

    Same signature, defaults and `__post_init__` call as the dataclass's; the instance stays frozen (only
    `__setattr__` is refused, and this writes no attribute through it). Why: an eager model builds every layer
    on every call, and the dataclass's `object.__setattr__` per field plus a wrapper around it were most of that.
    """
    init = cls.__init__
    fields = dataclasses.fields(cls)
    given = [f for f in fields if f.init]
    order = [f for f in given if not f.kw_only] + [f for f in given if f.kw_only]
    if list(inspect.signature(init).parameters)[1:] != [f.name for f in order] or any(
        f.name == "self" or f.name.startswith("_") for f in fields
    ):
        return None
    env: dict[str, Any] = {"_cls": cls, "_FACTORY": _FACTORY, "_name_where_built": _name_where_built,
                           "_base": cls.__name__, "_labels": {}, "_Names": Names, "_SETUP": _SETUP,
                           "_run_values": run_values, "_path_now": path_now}  # `_` names: no field's
    params, body = {}, []
    for f in fields:
        value, default = f.name, None  # what the field gets; the parameter's default, by name in `env`
        if f.default is not dataclasses.MISSING:
            env[default := f"_fx_default_{f.name}"] = f.default
            value = f.name if f.init else default
        elif f.default_factory is not dataclasses.MISSING:
            env[factory := f"_fx_factory_{f.name}"] = f.default_factory
            default = "_FACTORY"
            value = f"{factory}() if {f.name} is _FACTORY else {f.name}" if f.init else f"{factory}()"
        elif not f.init:
            continue  # no value: the dataclass leaves it unset too
        if f.init:
            params[f.name] = f.name if default is None else f"{f.name}={default}"
        body.append(f"    _fx_d[{f.name!r}] = {value}")
    signature = [params[f.name] for f in order if not f.kw_only]
    if len(signature) < len(order):
        signature += ["*"] + [params[f.name] for f in order if f.kw_only]
    post = "    self.__post_init__()\n" if hasattr(cls, "__post_init__") else ""
    source = (
        f"def __init__(self, {', '.join(signature)}):\n    _fx_d = self.__dict__\n" + "\n".join(body) + "\n"
        + post + _NAMED_WHERE_BUILT
    )
    exec(source, env)  # noqa: S102 (how `dataclasses` itself makes `__init__`)
    made = env["__init__"]
    made.__qualname__ = f"{cls.__qualname__}.__init__"
    made.__module__ = cls.__module__
    made.__annotations__ = dict(init.__annotations__)
    return made


@dataclasses.dataclass(frozen=True, eq=False)
class Module:
    """Base class of layers: dataclass fields configure it; calling it runs inside its own scope.

    Subclasses become frozen dataclasses by themselves (do not decorate them).
    An instance built inside a run is named where it is built, as Flax and
    Haiku name modules: `name=` if given, else `<Class>_<n>` counted within
    the parent scope (`Dense_0`, `Dense_1`), so `Dense(2)(relu(Dense(3)(x)))`
    makes the 3-unit layer `Dense_1`. One built outside any run is named at
    its first call: after the field of its caller that holds it, as Flax
    adopts submodules passed in (`Block(proj=Dense(3))` makes `proj`, a
    list field `layers_0`, ...), else as above. `fx.transform(module)` runs
    it at the root scope, as Flax's top-level module. An explicit `name=` equal to an earlier
    auto-name of the same call raises `InvalidNameError` (Flax's
    `NameInUseError`). Calling the same instance again uses the same path,
    so it shares its weights; a module called twice that creates layers
    inline re-creates the same names, so those share too. `__call__` and
    every public method run in the module's scope (`Embed.attend` reads the
    same `embedding`).

    >>> class Affine(fx.nn.Module):
    ...     features: int
    ...     def __call__(self, x):
    ...         w = fx.param("w", jax.nn.initializers.ones, (x.shape[-1], self.features))
    ...         return x @ w
    >>> def model(x):
    ...     shared = Affine(2)
    ...     return Affine(2, name="head")(shared(shared(x)))
    >>> v = fx.transform(model).init(jax.random.key(0), jnp.ones((1, 2)))
    >>> jax.tree.map(jnp.shape, v["params"])
    {'Affine_0': {'w': (2, 2)}, 'head': {'w': (2, 2)}}
    """

    name: str | None = dataclasses.field(default=None, kw_only=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = inspect.get_annotations(cls)  # a field's default may be a function: not a method
        for attr, fn in list(vars(cls).items()):
            if attr in fields or not inspect.isfunction(fn):
                continue
            if attr == "__call__" or not attr.startswith("_") and attr != "setup":
                setattr(cls, attr, _routed(attr, fn))
        own_init = "__init__" in vars(cls)  # a subclass's own `__init__` is kept, and wrapped to name it
        dataclasses.dataclass(frozen=True, eq=False)(cls)
        if cls.setup is not Module.setup:  # frozen, except for what `setup()` assigns while a call runs
            cls.__setattr__ = _setup_setattr  # type: ignore[method-assign, assignment]
            cls._call = _call_with_setup  # type: ignore[method-assign]
        made = None if own_init else _named_init(cls)
        if made is not None:
            cls.__init__ = made  # type: ignore[method-assign]
            return
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Module, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            _name_where_built(self, cls)

        cls.__init__ = __init__  # type: ignore[method-assign]

    def setup(self) -> None:
        """Assign submodules, params and state as Flax's `setup` does: it runs at the module's path when a
        call of the module starts, and what it assigns lives while that call runs (so no value outlives its
        JAX trace; a read from outside a call runs it for that read). A submodule is named after its
        attribute (`self.enc = Dense(2)` makes `enc`; a list `layers_0`, ...); a param is `fx.param(...)`.

        >>> class AE(fx.nn.Module):
        ...     def setup(self):
        ...         self.enc, self.dec = fx.nn.Dense(2), fx.nn.Dense(3)
        ...         self.scale = fx.param("scale", jax.nn.initializers.ones, ())
        ...     def __call__(self, x):
        ...         return self.dec(self.enc(x)) * self.scale
        >>> v = fx.transform(AE()).init(jax.random.key(0), jnp.ones((1, 3)))
        >>> sorted(v["params"])
        ['dec', 'enc', 'scale']
        """

    def __getattr__(self, name: str) -> Any:  # only for attributes not found: `setup()`'s
        if name in _FLAX_ENTRY_POINTS:
            call = "t.apply(variables, x)" if name == "apply" else f"t.{name}(key, x)"
            raise ModuleNotTransformedError(
                f"`{type(self).__name__}.{name}`: fx.nn modules are not transformed themselves, as a linen "
                f"module is (`module.{name}(...)`); transform the module first: `t = fx.transform(module); "
                f"{call}`. `t.init`, `t.init_with_output` and `t.apply` take Flax's arguments."
            )
        if name.startswith(("__", "_effax")) or type(self).setup is Module.setup:
            raise _no_attribute(self, name)
        values = _setup_values(self, name)
        if name in _FLAX_METHODS and name not in values:
            raise _no_attribute(self, name)
        if name not in values:
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}: it is no field, and its setup() does not "
                f"assign it (assigned: {sorted(values) or 'nothing'})."
            )
        return values[name]

    def _effax_at_root(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` (this module or one of its methods) run as the whole model: the module sits at the
        root scope, as Flax's top-level module, so its layers are `Dense_0`, not `Classifier_0/Dense_0`.
        `fx.transform(module)` runs it this way."""

        @functools.wraps(fn)
        def at_root(*args: Any, **kwargs: Any) -> Any:
            token = push_names(fresh=False)
            try:
                current_names().bound.setdefault(self, ())  # type: ignore[union-attr]
                return fn(*args, **kwargs)
            finally:
                pop_names(token)

        at_root.__name__ = at_root.__qualname__ = type(self).__name__
        return at_root

    def _call(self, method: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run `fn(self, *args, **kwargs)` in this module's scope: the one path every module call takes.

        The call is a module-call request (`fx.ModuleCallRequest`), so handlers can intercept it.
        """
        run = run_values()
        names = None if run is None else run.get(Names) or current_names()
        if names is None:  # called outside any run: this call is the run
            token = push_names(fresh=True)
            try:
                return self._call(method, fn, args, kwargs)
            finally:
                pop_names(token)
        path = names.bound.get(self)
        if path is None:  # made outside this run: named at its first call
            path = names.bound[self] = _adopt(names, path_now(), self)
        elif path_now() == path:  # a method of this module calling another one: same naming frame
            names = None
        return call_module(path, self, method, fn, args, kwargs, names)


def _no_attribute(module: Module, name: str) -> AttributeError:
    """A missing attribute; a linen module's method (`self.param`) is named with what effax calls instead."""
    cls = type(module).__name__
    instead = _FLAX_METHODS.get(name)
    if instead is None:
        return AttributeError(f"{cls!r} object has no attribute {name!r}")
    return ModuleNotTransformedError(
        f"`{cls}.{name}`: an fx.nn module has no `self.{name}` (a linen module's method); in effax it is "
        f"{instead}, called inside the module's method, at its path: `w = fx.param('w', init, shape)`."
    )


_PLAIN_CALL = Module._call  # what `_routed`'s fast path stands for (a class with `setup()` has another)
