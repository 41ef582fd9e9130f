"""Train and eval presets: the options of one mode (training flag, rngs, mutable collections) as one argument."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from effax.core import EffaxError, FrozenStateError, Handler, MissingRngError
from effax.effects import RandomRequest, SetStateRequest, StreamKeyRequest, StreamNamesRequest
from effax.handlers._mode import Mode, static_training
from effax.handlers._random import KeysFromRngs, looks_like_key
from effax.handlers._state import normalize_mutable


class _NoKeys(Handler):
    """Refuse every key draw: eval draws no randomness."""

    answers = (RandomRequest, StreamKeyRequest, StreamNamesRequest)

    def handle(self, request: Any, forward: Any) -> Any:
        if type(request) is StreamNamesRequest:
            return ()  # no stream: a library checking for a key (`has_rng`) sees none
        if type(request) is RandomRequest or type(request) is StreamKeyRequest:
            raise MissingRngError(
                f"{request.describe()} under the eval preset, which draws no randomness. Layers "
                "that are random only in training (Dropout) check `fx.is_training()` first; if "
                "this draw is meant, run with `fx.handlers.train(rngs)` or pass `rngs=` without "
                "the eval preset."
            )
        return forward(request)


class _NoWrites(Handler):
    """Refuse every state write outside the inference-state collections `allowed`: eval writes no training state."""

    answers = (SetStateRequest,)

    def __init__(self, allowed: frozenset[str] = frozenset()):
        self.allowed = allowed

    def handle(self, request: Any, forward: Any) -> Any:
        if type(request) is SetStateRequest and request.collection not in self.allowed:
            c = request.collection
            allowed = f" (it allows only {sorted(self.allowed)})" if self.allowed else ""
            raise FrozenStateError(
                f"{request.describe()} under the eval preset{allowed}, which writes no training "
                f"state. If {c!r} is inference state (a decode cache), name it: "
                f"`fx.handlers.eval(mutable=[{c!r}])` writes it and returns `(out, updates)`. If it "
                "is training state, guard the update with `if fx.is_training():`, or run with "
                f"`fx.handlers.train(rngs, mutable=[{c!r}])`."
            )
        return forward(request)


def brief(rngs: Any) -> str:
    """Keys print as `<key>`, so messages stay one line."""
    if isinstance(rngs, Mapping):
        return "{" + ", ".join(f"{s!r}: <key>" for s in rngs) + "}"
    return "None" if rngs is None else "<key>"


class Preset(tuple):
    """A mode's options as one value: `training`, `rngs` (as a keys handler) and `mutable`.

    Given to `t.apply(..., handlers=preset)` (or `t.init`), its options take
    the place of `training=`, `rngs=` and `mutable=`, and the return shape
    follows its mutable collections; an explicit argument that disagrees
    raises `EffaxError`. A preset is also a tuple of handlers, so
    `fx.handle(preset)` installs its mode and keys (and, for eval, refuses
    draws and writes). Make them with `fx.handlers.train` and `fx.handlers.eval`.
    Spread into a list (`handlers=[*preset, lora]`) it is still the preset:
    each of its handlers names it (`handler.preset`). It is a pytree whose
    leaves are the train preset's keys, so `jax.jit(t.apply)(v, x,
    handlers=preset)` traces the keys and keeps the mode and mutable static.

    >>> preset = fx.handlers.train(jax.random.key(0), mutable=["batch_stats"])
    >>> preset
    fx.handlers.train(rngs=<key>, mutable=('batch_stats',))
    >>> preset.training, preset.mutable
    (True, frozenset({'batch_stats'}))
    >>> t = fx.transform(lambda x: fx.nn.Dropout(0.5)(x))
    >>> t.apply({}, jnp.ones(4), handlers=fx.handlers.eval())  # no dropout, no key needed
    Array([1., 1., 1., 1.], dtype=float32)
    """

    training: bool
    rngs: Any
    mutable: frozenset[str] | bool | None
    keys: Handler

    def __new__(
        cls, training: bool, keys: Handler, mutable: Any, rngs: Any = None, extra: tuple = ()
    ) -> Preset:
        training = static_training(training)
        self = super().__new__(cls, (Mode(training), keys, *extra))
        self.training, self.keys, self.rngs = training, keys, rngs
        self.mutable = None if mutable is None else normalize_mutable(mutable)
        for handler in self:  # spread into a list (`[*preset, lora]`), its handlers still name their preset
            handler.preset = self
        return self

    def __repr__(self) -> str:
        if not self.training:
            mutable = tuple(sorted(self.mutable))  # type: ignore[arg-type]
            return f"fx.handlers.eval(mutable={mutable!r})" if self.mutable else "fx.handlers.eval()"
        mutable = self.mutable if self.mutable is None or self.mutable is True else tuple(sorted(self.mutable))
        return f"fx.handlers.train(rngs={brief(self.rngs)}, mutable={mutable!r})"


def _flatten_preset(preset: Preset) -> tuple[tuple, tuple]:
    """A preset as a pytree, so `jax.jit(t.apply)(v, x, handlers=fx.handlers.train(key))` traces it: the train
    preset's keys are its leaves (each step's fresh key reuses one compiled program), the mode and mutable
    collections its static part (two presets of one mode compare equal, so jit's cache hits)."""
    return ((preset.rngs,) if preset.training else ()), (preset.training, preset.mutable)


def _unflatten_preset(static: tuple, leaves: Any) -> Preset:
    training, mutable = static
    if not training:
        return eval(mutable)
    keys = object.__new__(KeysFromRngs)  # unchecked: under a trace the leaves are tracers (or JAX's placeholders)
    keys.rngs = leaves[0]
    return Preset(True, keys, mutable, leaves[0])


jax.tree_util.register_pytree_node(Preset, _flatten_preset, _unflatten_preset)


def train(rngs: Any, mutable: Any = None) -> Preset:
    """The training preset: `training=True`, keys from `rngs`, and the `mutable` collections.

    With `mutable=None` the preset leaves mutability to `apply`'s `mutable=`.

    >>> def f(x):
    ...     x = fx.nn.BatchNorm()(x)
    ...     return fx.nn.Dropout(0.5)(x)
    >>> t = fx.transform(f)
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> v = t.init(jax.random.key(0), x)
    >>> y, updates = t.apply(v, x, handlers=fx.handlers.train(jax.random.key(1), mutable=["batch_stats"]))
    >>> y = t.apply({**v, **updates}, x, handlers=fx.handlers.eval())   # same model, eval
    """
    return Preset(True, KeysFromRngs(rngs), mutable, rngs)


def _refuse_keys(given: str) -> EffaxError:
    return EffaxError(
        f"fx.handlers.eval({given}): eval draws no keys, as dropout is off in eval, so it takes no rngs; it "
        "takes only mutable=[...], the inference-state collections it may write (a decode cache): "
        "`fx.handlers.eval()`, or `fx.handlers.eval(mutable=['cache'])`. For draws at eval time (MC dropout), "
        "pass `rngs=` and `training=False` to `t.apply` without the preset."
    )


def eval(mutable: Any = (), *, rngs: Any = None) -> Preset:  # noqa: A001 - the name users expect beside `train`
    """The eval preset: `training=False`, no randomness drawn, no training state written.

    A draw raises `MissingRngError`, a `set` raises `FrozenStateError`; with
    `apply` it returns only the output. Inference has state of its own (a
    decode cache): `mutable` names those collections, which may then be
    written (and created when missing), and `apply` returns `(out, updates)`
    with them, as `mutable=` does; every other collection stays frozen.
    It takes no keys (dropout is off in eval): `eval(key)` and
    `eval(rngs=...)`, written by symmetry with `train(rngs)`, are refused.

    >>> def f(x):
    ...     return fx.nn.Dropout(0.5)(x)
    >>> fx.transform(f).apply({}, jnp.ones(2), handlers=fx.handlers.eval())
    Array([1., 1.], dtype=float32)
    >>> with fx.handle(fx.handlers.eval()):
    ...     fx.is_training()
    False

    A step counter kept as inference state:

    >>> def step(x):
    ...     n = fx.local_state("n", lambda: 0, collection="cache")
    ...     n.set(n.get() + 1)
    ...     return x
    >>> t = fx.transform(step)
    >>> t.apply({}, 1.0, handlers=fx.handlers.eval(mutable=["cache"]))
    (1.0, {'cache': {'n': Array(1, dtype=int32)}})
    """
    if rngs is not None:
        raise _refuse_keys("rngs=...")
    if looks_like_key(mutable) or isinstance(mutable, Mapping) and any(map(looks_like_key, mutable.values())):
        raise _refuse_keys("key")  # `eval(key)`, by symmetry with `train(key)`
    if mutable is True:
        raise EffaxError(
            "fx.handlers.eval(mutable=True) would let eval write every collection, training state "
            "(batch_stats) included. Name the inference-state collections it may write: "
            "`fx.handlers.eval(mutable=['cache'])`."
        )
    allowed = normalize_mutable(mutable)
    return Preset(False, _NoKeys(), allowed, None, (_NoWrites(allowed),))  # type: ignore[arg-type]
