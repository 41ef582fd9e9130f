"""Keys per stream, per path, per draw, derived from the user's `rngs` by the pinned hashes."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from effax.core import EffaxError, Handler, MissingRngError, check_name
from effax.effects import RandomRequest, StreamKeyRequest, StreamNamesRequest
from effax.handlers._trace import check_trace, trace_state


def _digest(text: str, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, person=person).digest(), "little")


def h_path(path: tuple[str, ...]) -> int:
    """The pinned 64-bit hash of a path: BLAKE2b-8 of `"/".join(path)`, person `effax-path`."""
    return _digest("/".join(path), b"effax-path")


def h_stream(stream: str) -> int:
    """The pinned 64-bit hash of a stream name, in its own domain (person `effax-stream`)."""
    return _digest(stream, b"effax-stream")


@functools.partial(jax.jit, inline=True)
def _fold_words(key: jax.Array, low: np.uint32, high: np.uint32) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(key, low), high)


@functools.partial(jax.jit, inline=True)
def _fold_word(key: jax.Array, word: np.uint32) -> jax.Array:
    return jax.random.fold_in(key, word)


def fold(key: jax.Array, h: int) -> jax.Array:
    """Fold a 64-bit hash into `key`: the low little-endian 32-bit word, then the high one.

    One jitted call that is inlined where it is traced: a program holds the same two `random_fold_in`
    primitives as two `jax.random.fold_in` calls would make, but tracing them costs one call instead of two
    of `fold_in`'s Python (a deep model's abstract init spent 40% of its time folding keys), and an eager
    fold is one dispatch instead of about ten.
    """
    return _fold_words(key, np.uint32(h & 0xFFFFFFFF), np.uint32(h >> 32))


@functools.lru_cache(maxsize=8)
def _raw_key_shape(impl: str) -> tuple[int, ...]:
    """The shape of one raw key's data under the default PRNG implementation (`(2,)` for threefry)."""
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape


def looks_like_key(x: Any) -> bool:
    """A typed key, or raw key data (uint32, last dimension 2 or 4): what `rngs` take, for error hints."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not hasattr(x, "shape"):
        return False
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or (dtype == np.uint32 and x.shape[-1:] in ((2,), (4,)))


def refuse_handlers_as(value: Any, option: str) -> None:
    """Raise if `value`, given for `option` (`rngs`, `mutable`), is a preset or a handler: they go in `handlers=`."""
    hs = value if isinstance(value, tuple) else (value,)
    if hs and all(callable(getattr(h, "handle", None)) for h in hs):
        if type(value).__name__ == "Preset":  # (`_presets` imports this module: the class is known by name)
            what = repr(value)
        else:
            what = f"a {type(value).__name__} of handlers" if hs is value else f"the handler {type(value).__name__}"
        raise EffaxError(
            f"`{option}=` got {what}: pass presets and handlers as `handlers=`, "
            "`t.apply(variables, x, handlers=fx.handlers.train(key))`; a preset sets rngs and mutable itself."
        )


def check_key(key: Any, stream: str | None) -> bool:
    """Raise unless `key` is one key (typed, or raw key data); return whether it is typed. No op runs."""
    dtype = getattr(key, "dtype", None)
    shape = tuple(getattr(key, "shape", ()))
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    where = "`rngs`" if stream is None else f"rngs for stream {stream!r}"
    if not typed and (dtype is None or not np.issubdtype(dtype, np.integer)):
        if dtype is None:
            refuse_handlers_as(key, "rngs")
        spec = f"{np.dtype(dtype).name}{list(shape)}" if dtype is not None else f"{type(key).__name__} {key!r:.40}"
        raise EffaxError(
            f"{where} is {spec}, not a key: pass `jax.random.key(seed)` (or a raw "
            "`jax.random.PRNGKey(seed)`), or a dict {stream: key}."
        )
    want = () if typed else _raw_key_shape(str(jax.config.jax_default_prng_impl))
    if shape != want:
        extra = shape[: len(shape) - len(want)] if shape[len(shape) - len(want):] == want else None
        spec = str(dtype) if typed else f"{np.dtype(dtype).name}"
        if extra:
            raise EffaxError(
                f"{where} is a batch of {int(np.prod(extra))} keys ({spec}{list(shape)}), but effax "
                "takes one key and derives a key per path, stream and draw from it. Pass one key; "
                "for per-example keys, map the call: `jax.vmap(lambda k, x: t.apply(v, x, rngs=k))(keys, xs)`."
            )
        raise EffaxError(
            f"{where} is {spec}{list(shape)}, not a key: a raw key is {spec}{list(want)} "
            "(`jax.random.PRNGKey(seed)`), a typed key has shape () (`jax.random.key(seed)`)."
        )
    return typed


def as_typed_key(key: Any, stream: str) -> jax.Array:
    """Accept a raw `PRNGKey` (uint32 data) or a typed `jax.random.key`; return a typed key."""
    if check_key(key, stream):
        return key
    return jax.random.wrap_key_data(key)


class KeysFromRngs(Handler):
    """Answer random requests from `rngs`: a key, a dict `{stream: key}`, or None (no randomness).

    A single key `k` serves stream `"params"` as given and stream `s` as
    `fold(k, h_stream(s))`; a dict must name every stream drawn from.

    >>> with fx.handle(fx.handlers.KeysFromRngs({"noise": jax.random.key(0)})):
    ...     k = fx.next_key("noise")
    """

    def __init__(self, rngs: Any):
        if rngs is not None and isinstance(rngs, Mapping):  # (`None` first: the abstract check is slower)
            for stream, key in rngs.items():
                check_name(stream, "stream")
                check_key(key, stream)
        elif rngs is not None:
            check_key(rngs, None)
        self.rngs = rngs

    def begin(self) -> _KeysRun:
        return _KeysRun(self.rngs)


class _KeysRun:
    answers = (RandomRequest, StreamKeyRequest, StreamNamesRequest)

    __slots__ = ("rngs", "trace", "roots", "bases", "counts")

    def __init__(self, rngs: Any):
        self.rngs = rngs
        self.trace = trace_state()
        self.roots: dict[str, jax.Array] = {}
        self.bases: dict[tuple[str, tuple[str, ...]], jax.Array] = {}
        self.counts: dict[tuple[str, tuple[str, ...]], int] = {}

    def root(self, stream: str, request: Any) -> jax.Array:
        key = self.roots.get(stream)
        if key is not None:
            return key
        rngs = self.rngs
        if rngs is None or (isinstance(rngs, Mapping) and stream not in rngs):
            given = sorted(rngs) if isinstance(rngs, Mapping) else []
            raise MissingRngError(
                f"{request.describe()} needs a key for stream {stream!r}, but rngs "
                + (f"names only {given}" if given else "is None")
                + f". Pass it: `rngs={{{stream!r}: key, ...}}` (or a single key, which serves every stream)."
            )
        if isinstance(rngs, Mapping):
            key = as_typed_key(rngs[stream], stream)
        else:
            key = as_typed_key(rngs, stream)
            if stream != "params":
                key = fold(key, h_stream(stream))
        self.roots[stream] = key
        return key

    def base(self, stream: str, path: tuple[str, ...], request: Any) -> jax.Array:
        slot = (stream, path)
        key = self.bases.get(slot)
        if key is None:
            key = self.root(stream, request)
            if path:
                key = fold(key, h_path(path))
            self.bases[slot] = key
        return key

    def handle(self, request: Any, forward: Any) -> Any:
        if type(request) is RandomRequest or type(request) is StreamKeyRequest:
            check_trace(self.trace, request, "draws a key")
            key = self.base(request.stream, request.path, request)
            if type(request) is StreamKeyRequest:
                return key
            slot = (request.stream, request.path)
            n = self.counts.get(slot, 0)
            self.counts[slot] = n + 1
            return _fold_word(key, np.uint32(n))  # `jax.random.fold_in(key, n)`, one eager dispatch
        if type(request) is StreamNamesRequest:  # a dict names its streams; one key (or none) serves any
            return () if self.rngs is None else tuple(self.rngs) if isinstance(self.rngs, Mapping) else None
        return forward(request)
