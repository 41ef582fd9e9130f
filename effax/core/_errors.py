"""Every error effax raises. Each subclasses `EffaxError` and reports module `effax`."""

from __future__ import annotations

__all__ = [
    "EffaxError", "FrozenStateError", "InvalidNameError", "MissingRngError", "MissingVariableError",
    "ParamConflictError", "ShapeMismatchError", "ShareError", "TraceMismatchError", "UnhandledEffectError",
]


class EffaxError(Exception):
    """Base class of every error effax raises on purpose; every subclass reports module `effax`."""

    __module__ = "effax"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.__module__ = "effax"


class UnhandledEffectError(EffaxError):
    """A request reached the bottom of the handler stack and nothing answered it."""


class MissingVariableError(EffaxError, LookupError):
    """A variable the model asked for is not in `variables` and may not be created."""


class ShapeMismatchError(EffaxError, ValueError):
    """A stored or written value has another tree structure, shape or dtype than asked."""


class ParamConflictError(EffaxError, ValueError):
    """Two requests disagree about the same path, or a name is both a leaf and a scope."""


class FrozenStateError(EffaxError):
    """`set` was called on a variable whose collection is not mutable in this run."""


class MissingRngError(EffaxError):
    """A random key was requested from a stream that `rngs` does not provide."""


class ShareError(EffaxError):
    """A share binding matched nothing, forms a cycle, or ties params that disagree."""


class InvalidNameError(EffaxError, ValueError):
    """A scope, param, state, tag, stream or collection name is empty or contains `/`."""


class TraceMismatchError(EffaxError):
    """An effect that creates or consumes something arrived from another JAX trace."""
