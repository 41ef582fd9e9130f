"""`Module`: dataclass configuration plus a scope, so layers read like Flax linen or Haiku."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

from effax.core import InvalidNameError, check_name, is_answered, path_now, path_str, run_values, under_path
from effax.effects import ModuleCallRequest, call_module
from effax.nn._naming import Names, current_names, pop_names, push_names

_EXPLICIT = ("explicit name",)


def _claim(names: Names, parent: tuple[str, ...], module: Module) -> tuple[str, ...]:
    """The path of `module` under `parent`: `name=`, else the next `<Class>_<n>` of this call.

    An explicit name equal to an auto-name given earlier in the same call
    would silently share that layer's weights; it raises, as Flax's
    `NameInUseError` does. (An explicit name taken first is skipped by the
    auto-names that follow.)
    """
    if module.name is None:
        return names.auto_path(parent, type(module).__name__)
    return _claim_name(names, parent, module.name)


def _claim_name(names: Names, parent: tuple[str, ...], name: Any) -> tuple[str, ...]:
    name = check_name(name, "module")
    path = parent + (name,)
    base, _, n = name.rpartition("_")
    taken = names.frame.get(parent, {}).get(base, 0)
    if n.isdigit() and taken > int(n) and names.owners.get(path, _EXPLICIT) == names.owner:
        raise InvalidNameError(
            f"module name {name!r} at `{path_str(parent)}` is the auto-name of an earlier {base} "
            f"created in the same call, so the two layers would share `{path_str(path)}` (Flax "
            f"raises NameInUseError here). Give this one another name, e.g. name={name + '_out'!r}, "
            f"or name the earlier {base} explicitly too."
        )
    names.owners.setdefault(path, _EXPLICIT)  # auto-names skip it
    return path


def _routed(method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(self: Module, *args: Any, **kwargs: Any) -> Any:
        return self._call(method, fn, args, kwargs)

    return call


@dataclasses.dataclass(frozen=True, eq=False)
class Module:
    """Base class of layers: dataclass fields configure it; calling it runs inside its own scope.

    Subclasses become frozen dataclasses by themselves (do not decorate them).
    An instance built inside a run is named where it is built, as Flax and
    Haiku name modules: `name=` if given, else `<Class>_<n>` counted within
    the parent scope (`Dense_0`, `Dense_1`), so `Dense(2)(relu(Dense(3)(x)))`
    makes the 3-unit layer `Dense_1`. One built outside any run is named at
    its first call; `fx.transform(module)` runs it at the root scope, as
    Flax's top-level module. An explicit `name=` equal to an earlier
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
            if attr == "__call__" or not attr.startswith("_"):
                setattr(cls, attr, _routed(attr, fn))
        dataclasses.dataclass(frozen=True, eq=False)(cls)
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Module, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            # Inside a run, a module is named where it is built, as Flax and Haiku name it:
            # `Dense(2)(relu(Dense(3)(x)))` makes the 2-unit layer `Dense_0`; outside a run, at its
            # first call. The most derived class names it, once.
            if type(self) is cls and (run := run_values()) is not None:
                names = run.get(Names) or current_names()
                parent, name = path_now(), self.name
                path = names.auto_path(parent, cls.__name__) if name is None else _claim_name(names, parent, name)
                names.bound[self] = path

        cls.__init__ = __init__  # type: ignore[method-assign]

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
            path = names.bound[self] = _claim(names, path_now(), self)
        elif path_now() == path:  # a method of this module calling another one: same naming frame
            return call_module(path, self, method, fn, args, kwargs, None)
        if is_answered(ModuleCallRequest):  # a handler looks at module calls: send the request
            return call_module(path, self, method, fn, args, kwargs, names)
        # the fast path (what `call_module` does when nothing looks), inline: a frame per call matters eagerly
        saved, names.frame, names.owner = (names.frame, names.owner), {}, (path, method)
        try:
            return under_path(path, fn, self, *args, **kwargs)
        finally:
            names.frame, names.owner = saved
