"""`Module`: dataclass configuration plus a scope, so layers read like Flax linen or Haiku."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

from effax.core import check_name, current_names, current_path, pop_names, push_names
from effax.effects import call_module

_EXPLICIT = ("explicit name",)


def _routed(method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(self: Module, *args: Any, **kwargs: Any) -> Any:
        return self._call(method, fn, args, kwargs)

    return call


@dataclasses.dataclass(frozen=True, eq=False)
class Module:
    """Base class of layers: dataclass fields configure it; calling it runs inside its own scope.

    Subclasses become frozen dataclasses by themselves (do not decorate them).
    An instance is named on its first call in a run: `name=` if given, else
    `<Class>_<n>` counted within the parent scope (`Dense_0`, `Dense_1`).
    Calling the same instance again uses the same path, so it shares its
    weights; a module called twice that creates layers inline re-creates the
    same names, so those share too. `__call__` and every public method run
    in the module's scope (`Embed.attend` reads the same `embedding`).

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

    def _call(self, method: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run `fn(self, *args, **kwargs)` in this module's scope: the one path every module call takes.

        The call is a module-call request (`fx.ModuleCallRequest`), so handlers can intercept it.
        """
        names = current_names()
        if names is None:  # called outside any run: this call is the run
            token = push_names(fresh=True)
            try:
                return self._call(method, fn, args, kwargs)
            finally:
                pop_names(token)
        path = names.bound.get(self)
        if path is None:
            parent = current_path()
            if self.name is None:
                path = parent + (names.auto_name(parent, type(self).__name__),)
            else:
                path = parent + (check_name(self.name, "module"),)
                names.owners.setdefault(path, _EXPLICIT)  # auto-names skip it
            names.bound[self] = path
        elif current_path() == path:  # a method of this module calling another one: same naming frame
            return call_module(path, self, method, fn, args, kwargs, None)
        return call_module(path, self, method, fn, args, kwargs, names)
