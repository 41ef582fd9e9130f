"""The random effect: per-stream, per-path, per-draw keys."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from effax.core import EffaxError, Request, check_name, path_now, path_str, send
from effax.effects._param import NO_ANSWER

_RANDOM_HINT = (
    "pass `rngs=` to `t.apply` (a key, or a dict {stream: key}), or install "
    "`fx.handlers.KeysFromRngs(rngs)`."
)


@dataclasses.dataclass(frozen=True)
class RandomRequest(Request):
    """Draw the next key of `stream` at `path`.

    A handler that answers it decides where keys come from; this one gives
    every draw the same key, for a test that must not depend on `rngs`:

    >>> class FixedKeys(fx.Handler):
    ...     answers = (fx.RandomRequest,)
    ...     def handle(self, request, forward):
    ...         return jax.random.key(42)
    >>> with fx.handle(FixedKeys()):
    ...     k = fx.next_key("dropout")
    >>> bool(k == jax.random.key(42))
    True
    """

    kind: ClassVar[str] = "key"  # the one name of this request, in errors, tables and the testing kit
    effect: ClassVar[str] = "random"  # the effect (family of requests) it belongs to

    stream: str

    hint: ClassVar[str] = _RANDOM_HINT

    def describe(self) -> str:
        return f"key draw from stream {self.stream!r} at `{path_str(self.path)}`"


@dataclasses.dataclass(frozen=True)
class StreamKeyRequest(Request):
    """Ask for the base key of `stream` at `path` (for code that derives its own keys).

    >>> r = fx.StreamKeyRequest(("block", "dropout"), "dropout")
    >>> r.kind, r.effect, r.describe()
    ('stream_key', 'random', "base key of stream 'dropout' at `block/dropout`")
    """

    kind: ClassVar[str] = "stream_key"  # the one name of this request, in errors, tables and the testing kit
    effect: ClassVar[str] = "random"  # the effect (family of requests) it belongs to

    stream: str

    hint: ClassVar[str] = _RANDOM_HINT

    def describe(self) -> str:
        return f"base key of stream {self.stream!r} at `{path_str(self.path)}`"


@dataclasses.dataclass(frozen=True)
class StreamNamesRequest(Request):
    """Ask which streams the run's keys serve: a tuple of names, or None for any stream (one key given).

    For code that hands keys to a library that checks for them (Flax's
    `self.has_rng("dropout")`), which must see the streams the user passed.
    Unanswered, it is None.

    >>> with fx.handle(fx.handlers.KeysFromRngs({"dropout": jax.random.key(0)})):
    ...     fx.effects.stream_names()
    ('dropout',)
    """

    kind: ClassVar[str] = "stream_names"  # the one name of this request, in errors, tables and the testing kit
    effect: ClassVar[str] = "random"  # the effect (family of requests) it belongs to

    def describe(self) -> str:
        return f"the names of the streams at `{path_str(self.path)}`"

    def unhandled(self) -> None:
        return None


def stream_names() -> tuple[str, ...] | None:
    """The streams the run's keys serve (`rngs`'s names), or None when one key serves every stream.

    >>> fx.transform(lambda: fx.effects.stream_names()).apply({}, rngs={"noise": jax.random.key(0)})
    ('noise',)
    """
    return send(StreamNamesRequest(path_now()))


@dataclasses.dataclass(frozen=True)
class RandomEffect:
    """A handle on one stream at the path where it was created.

    >>> def f():
    ...     s = fx.random_stream("noise")
    ...     return s.next_key(), s.next_key()
    >>> a, b = fx.transform(f).apply({}, rngs={"noise": jax.random.key(0)})
    >>> bool((jax.random.key_data(a) != jax.random.key_data(b)).any())
    True
    """

    path: tuple[str, ...]
    stream: str

    def next_key(self) -> jax.Array:
        request = RandomRequest(self.path, self.stream)
        return checked_key(request, send(request))


def next_key(stream: str = "default") -> jax.Array:
    """Draw a fresh typed key from `stream` at the current path.

    >>> def f():
    ...     return jax.random.normal(fx.next_key("noise"))
    >>> x = fx.transform(f).apply({}, rngs={"noise": jax.random.key(1)})
    """
    check_name(stream, "stream")
    request = RandomRequest(path_now(), stream)
    return checked_key(request, send(request))


def checked_key(request: RandomRequest, value: Any) -> jax.Array:
    """`value`, the answer to a key draw, if it is one typed key (shape ()); otherwise an `EffaxError` naming the
    draw and the handler's likely slip (law 10: an answer has its request's kind)."""
    try:  # `.dtype` and `.shape`: a key's `.aval` is built afresh on each read
        if value.shape == () and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            return value
    except (AttributeError, TypeError):  # no array: None from a forgotten `return`, a number
        pass
    if value is None:
        what = f"None; {NO_ANSWER}"
    else:
        what = f"{type(value).__name__} {getattr(value, 'dtype', '')}{list(getattr(value, 'shape', ()))}"
        what += ", not one typed key. Answer with one key of shape (): `jax.random.key(seed)`, `fold_in` of one"
        if getattr(value, "dtype", None) == jax.numpy.uint32:
            what += "; wrap raw uint32 key data with `jax.random.wrap_key_data(data)`"
        what += "."
    raise EffaxError(f"{request.describe()}: a handler answered {what}")


def random_stream(stream: str) -> RandomEffect:
    """A `RandomEffect` for `stream` bound to the current path.

    Take the stream once, then draw from it where the path has changed (in a
    helper, a loop body): every draw still belongs to where it was created.

    >>> def f():
    ...     with fx.scope("drop"):
    ...         s = fx.random_stream("dropout")
    ...     return s.next_key()
    >>> k = fx.transform(f).apply({}, rngs={"dropout": jax.random.key(0)})
    >>> k.shape, jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
    ((), True)
    """
    check_name(stream, "stream")
    return RandomEffect(path_now(), stream)


def stream_key(stream: str) -> jax.Array:
    """The base key of `stream` at the current path; at the root path, the key the user passed.

    For code that derives its own keys (`jax.random.split` of a whole batch)
    rather than drawing them one at a time with `fx.next_key`.

    >>> def f():
    ...     return fx.stream_key("dropout")
    >>> k = fx.transform(f).apply({}, rngs={"dropout": jax.random.key(0)})
    >>> bool(k == jax.random.key(0))
    True
    """
    check_name(stream, "stream")
    return send(StreamKeyRequest(path_now(), stream))
