"""Effectful models as data: a small tree of steps, an interpreter, and a readable listing.

A law that fails on a generated model should show the model as the requests
it makes, not as an object dump. So a model here is a frozen tree of steps
(`Scope`, `Call`, `Param`, `State`, `Draw`, `StreamKey`, `Sow`, `SideInput`, `Mode`); calling it
on an input array performs each step's effect in order and mixes every answer
into the output, so any handler that changes an answer changes the output.

>>> from effax.testing.models import Model, Scope, Param, Draw
>>> model = Model([Scope("blk0", [Param("w0", (2,)), Draw("dropout")])], in_size=2)
>>> model
Model(in_size=2), 2 requests in order:
  param        blk0/w0  shape (2,) float32, init normal
  next_key     blk0     stream 'dropout'
>>> variables = fx.transform(model).init(jax.random.key(0), jnp.ones(2))
>>> variables["params"]["blk0"]["w0"].shape
(2,)
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

import effax as fx

INITIALIZERS = {
    "normal": jax.nn.initializers.normal(1.0),
    "uniform": jax.nn.initializers.uniform(1.0),
    "ones": jax.nn.initializers.ones,
    "zeros": jax.nn.initializers.zeros,
}
"""The initializers a generated `Param` may name (by key, so the listing stays readable)."""

EFFECTS = ("param", "state", "random", "sow", "side_input", "mode")
"""The effects a generated model mixes by default, one per kind of step."""

KNOWN_EFFECTS = EFFECTS + ("module_call",)
"""Every effect name the kit knows: the defaults, and `"module_call"` (a `Call`, an `fx.nn.Module` call),
which models hold only when asked for (`models(require=("module_call",))`, or a handler of module calls)."""


class LawKitError(fx.EffaxError, ValueError):
    """The testing kit cannot use an argument: an unknown effect, law or context, a budget that is not a dict.

    A `ValueError` too, as Python reports a wrong value; `LawKitTypeError` is the wrong-kind variant.

    >>> from effax.testing import assert_handler_laws
    >>> assert_handler_laws(fx.Handler, effects=["params"])
    Traceback (most recent call last):
    effax.LawKitError: effects names unknown effects ['params']; the kit knows [...]. Did you mean 'param'?
    """


class LawKitTypeError(LawKitError, TypeError):
    """The testing kit was given an object of the wrong kind: a handler that is neither a handler nor a
    factory of handlers, a model that is not a `Model`. A `TypeError` too.

    >>> from effax.testing import assert_handler_laws
    >>> assert_handler_laws(3, only=["determinism"])
    Traceback (most recent call last):
    effax.LawKitTypeError: handler=3 (type int) is neither a handler nor a factory of handlers: ...
    """


# errors report module `effax`, so doctest would not look for their examples here: name them
__test__ = {"LawKitError": LawKitError, "LawKitTypeError": LawKitTypeError}


def _names(value: Any, what: str, known: Iterable[str], kind: str, listing: str = "the kit knows") -> tuple[str, ...]:
    """`value` as a tuple of names, each one of `known`: one string is one name (`only="determinism"`,
    as hypothesis and pytest take one name for a list of one), never its letters."""
    names = (value,) if isinstance(value, str) else tuple(value)
    known = tuple(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        near = [m for n in unknown if isinstance(n, str) for m in difflib.get_close_matches(n, known, n=1)]
        hint = f" Did you mean {' or '.join(map(repr, dict.fromkeys(near)))}?" if near else ""
        raise LawKitError(f"{what} names unknown {kind} {unknown}; {listing} {list(known)}.{hint}")
    return names

Path = tuple[str, ...]


def _where(path: Path) -> str:
    return "/".join(path) if path else "<root>"


def _mean(value: jax.Array) -> jax.Array:
    return jnp.mean(jnp.asarray(value, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Param:
    """`fx.param(name, INITIALIZERS[init], shape, dtype)`; adds the mean of the param to the output.

    >>> t = fx.transform(Model([Param("w0", init="ones")], in_size=1))
    >>> t.init(jax.random.key(0), jnp.zeros(1))["params"]["w0"].dtype
    dtype('float32')
    """

    name: str
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    init: str = "normal"

    effect: ClassVar[str] = "param"

    def run(self, h: jax.Array) -> jax.Array:
        w = fx.param(self.name, INITIALIZERS[self.init], self.shape, jnp.dtype(self.dtype))
        return h + _mean(w)

    def describe(self, path: Path) -> tuple[str, str, str]:
        return "param", _where(path + (self.name,)), f"shape {self.shape} {self.dtype}, init {self.init}"


def _total(tree: Any) -> jax.Array:
    """The sum of the means of a pytree's leaves, as float32."""
    leaves = jax.tree.leaves(tree)
    out = _mean(leaves[0])
    for leaf in leaves[1:]:
        out = out + _mean(leaf)
    return out


def _stepped(tree: Any, scale: float, shift: jax.Array, count: int) -> Any:
    """Each float leaf `a * scale + shift` in its own dtype; each integer leaf (a counter) plus `count`."""
    def one(a: jax.Array) -> jax.Array:
        if jnp.issubdtype(a.dtype, jnp.integer):
            return a + count  # exact, so jit and eager agree
        return (a * scale + shift).astype(a.dtype)

    return jax.tree.map(one, tree)


@dataclasses.dataclass(frozen=True)
class State:
    """`fx.local_state` in `collection`, starting at 0.5; reads it, sets it `update` times, then reads it twice.

    `update` is `"none"` (read only), `"once"` or `"twice"` (two sets, the
    last one must win). Both reads after the sets reach the output, so a
    handler that keeps a set for one read only is seen. The value has
    `dtype` (an integer state is a counter starting at 1, stepped by 1 per
    set); with `tree` it is a dict, `{"mean": value, "count": int32 counter}`,
    so a handler that changes a state's dtype or structure is seen.

    >>> v = fx.transform(Model([State("s0")], in_size=1)).init(jax.random.key(0), jnp.zeros(1))
    >>> float(v["state"]["s0"])
    0.5
    >>> model = Model([State("s0", dtype="bfloat16", tree=True)], in_size=1)
    >>> jax.tree.map(lambda a: str(a.dtype), fx.transform(model).init(None, jnp.zeros(1))["state"])
    {'s0': {'count': 'int32', 'mean': 'bfloat16'}}
    """

    name: str
    collection: str = "state"
    shape: tuple[int, ...] = ()
    update: str = "once"
    dtype: str = "float32"
    tree: bool = False

    effect: ClassVar[str] = "state"

    def initial(self) -> Any:
        """The variable's initial value (its `init()`)."""
        dtype = jnp.dtype(self.dtype)
        value = jnp.full(self.shape, 1 if jnp.issubdtype(dtype, jnp.integer) else 0.5, dtype)
        return {"mean": value, "count": jnp.zeros((), jnp.int32)} if self.tree else value

    def run(self, h: jax.Array) -> jax.Array:
        cell = fx.local_state(self.name, self.initial, collection=self.collection)
        v = cell.get()
        h = h + _total(v)
        if self.update == "none":
            return h
        cell.set(_stepped(v, 1.0, _mean(h), 1))
        if self.update == "twice":
            cell.set(_stepped(v, 0.5, 0.25 * _mean(h), 2))
        h = h + _total(cell.get())
        return h + 0.5 * _total(cell.get())

    def describe(self, path: Path) -> tuple[str, str, str]:
        ops = {"none": "get", "once": "get, set, get, get", "twice": "get, set, set, get, get"}[self.update]
        value = f"shape {self.shape}" + (f" {self.dtype}" if self.dtype != "float32" else "")
        value = f"dict of mean ({value}) and count (shape () int32)" if self.tree else value
        return "local_state", _where(path + (self.name,)), f"in {self.collection!r}, {value}, {ops}"


@dataclasses.dataclass(frozen=True)
class Draw:
    """`fx.next_key(stream)`, `times` times at one path; adds uniform noise drawn from each key to the output.

    >>> [e.kind for e in fx.effects_of(Model([Draw("d0", times=2)], in_size=1), jnp.zeros(1))]
    ['key', 'key']
    """

    stream: str = "dropout"
    times: int = 1

    effect: ClassVar[str] = "random"

    def run(self, h: jax.Array) -> jax.Array:
        for _ in range(self.times):
            h = h + jax.random.uniform(fx.next_key(self.stream), h.shape, h.dtype)  # float32 under x64 too
        return h

    def describe(self, path: Path) -> tuple[str, str, str]:
        draws = f", {self.times} draws" if self.times != 1 else ""
        return "next_key", _where(path), f"stream {self.stream!r}{draws}"


@dataclasses.dataclass(frozen=True)
class StreamKey:
    """`fx.stream_key(stream)`, the stream's base key at this path (what a Flax module run through
    `fx.from_flax` gets); adds uniform noise drawn from it to the output.

    >>> [e.kind for e in fx.effects_of(Model([StreamKey("noise")], in_size=1), jnp.zeros(1))]
    ['stream_key']
    """

    stream: str = "dropout"

    effect: ClassVar[str] = "random"

    def run(self, h: jax.Array) -> jax.Array:
        return h + jax.random.uniform(fx.stream_key(self.stream), h.shape, h.dtype)

    def describe(self, path: Path) -> tuple[str, str, str]:
        return "stream_key", _where(path), f"stream {self.stream!r}"


@dataclasses.dataclass(frozen=True)
class Sow:
    """`fx.sow(tag, h, collection=collection)`: reports the running value, leaves it unchanged.

    >>> fx.transform(Model([Sow("h0")], in_size=1)).apply({}, jnp.ones(1), mutable=True)[1]
    {'intermediates': {'h0': (Array([1.], dtype=float32),)}}
    """

    tag: str
    collection: str = "intermediates"

    effect: ClassVar[str] = "sow"

    def run(self, h: jax.Array) -> jax.Array:
        fx.sow(self.tag, h, collection=self.collection)
        return h

    def describe(self, path: Path) -> tuple[str, str, str]:
        return "sow", _where(path + (self.tag,)), f"into {self.collection!r}"


@dataclasses.dataclass(frozen=True)
class SideInput:
    """`fx.side_input(tag, default=default)`; adds the answer to the output.

    >>> fx.transform(Model([SideInput("s0", default=2.0)], in_size=1)).apply({}, jnp.zeros(1))
    Array([2.], dtype=float32)
    """

    tag: str
    default: float = 0.5

    effect: ClassVar[str] = "side_input"

    def run(self, h: jax.Array) -> jax.Array:
        return h + _mean(fx.side_input(self.tag, default=self.default))

    def describe(self, path: Path) -> tuple[str, str, str]:
        return "side_input", _where(path), f"tag {self.tag!r}, default {self.default}"


@dataclasses.dataclass(frozen=True)
class Mode:
    """`fx.is_training()`; adds 1 to the output when training.

    >>> fx.transform(Model([Mode()], in_size=1)).apply({}, jnp.zeros(1), training=True)
    Array([1.], dtype=float32)
    """

    effect: ClassVar[str] = "mode"

    def run(self, h: jax.Array) -> jax.Array:
        return h + 1.0 if fx.is_training() else h

    def describe(self, path: Path) -> tuple[str, str, str]:
        return "is_training", _where(path), ""


@dataclasses.dataclass(frozen=True)
class Scope:
    """`with fx.scope(name):` around its children.

    >>> t = fx.transform(Model([Scope("blk", [Param("w0")])], in_size=1))
    >>> list(t.init(jax.random.key(0), jnp.zeros(1))["params"])
    ['blk']
    """

    name: str
    children: tuple[Step, ...] = ()

    effect: ClassVar[str] = "scope"

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", tuple(self.children))

    def run(self, h: jax.Array) -> jax.Array:
        with fx.scope(self.name):
            for child in self.children:
                h = child.run(h)
        return h


class _Layer(fx.nn.Module):
    """The module a `Call` runs: its steps, in its own scope."""

    steps: tuple[Any, ...] = ()

    def __call__(self, h: jax.Array) -> jax.Array:
        for step in self.steps:
            h = step.run(h)
        return h


@dataclasses.dataclass(frozen=True)
class Call:
    """An `fx.nn.Module` named `name` whose `__call__` runs the children: a module call (`fx.ModuleCallRequest`),
    for handlers that intercept calls (a LoRA adapter, a logger), in its scope `name`.

    >>> t = fx.transform(Model([Call("mod0", [Param("w0")])], in_size=1))
    >>> list(t.init(jax.random.key(0), jnp.zeros(1))["params"]["mod0"])
    ['w0']
    """

    name: str
    children: tuple[Step, ...] = ()

    effect: ClassVar[str] = "module_call"

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", tuple(self.children))

    def run(self, h: jax.Array) -> jax.Array:
        return _Layer(self.children, name=self.name)(h)

    def describe(self, path: Path) -> tuple[str, str, str]:
        n = len(self.children)
        return "module_call", _where(path + (self.name,)), f"__call__, {n} step{'s' * (n != 1)} inside"


Step = Param | State | Draw | StreamKey | Sow | SideInput | Mode | Scope | Call


@dataclasses.dataclass(frozen=True, repr=False)
class Model:
    """An effectful function described as data: `model(x)` runs its steps on `x` of shape `(in_size,)`.

    The output has the shape of `x` and depends on every answer the model
    receives; `repr(model)` lists its requests in order, and `model.code()`
    gives Python that rebuilds it.

    >>> from effax.testing.models import Model, Param, State
    >>> model = Model([Param("w0", init="ones"), State("s0", update="none")], in_size=1)
    >>> t = fx.transform(model)
    >>> t.apply(t.init(jax.random.key(0), jnp.zeros(1)), jnp.zeros(1))
    Array([1.5], dtype=float32)
    """

    steps: tuple[Step, ...]
    in_size: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))

    def __call__(self, x: Any) -> jax.Array:
        h = jnp.asarray(x, jnp.float32)
        for step in self.steps:
            h = step.run(h)
        return h

    # --- reading the description
    def walk(self) -> list[tuple[Path, Step]]:
        """Every step with the path of the scope it runs in, in order (a scope before its children)."""
        out: list[tuple[Path, Step]] = []

        def visit(steps: Iterable[Step], path: Path) -> None:
            for step in steps:
                out.append((path, step))
                if isinstance(step, Scope | Call):
                    visit(step.children, path + (step.name,))

        visit(self.steps, ())
        return out

    def requests(self) -> list[str]:
        """One line per request the model makes, in order: operation, where, and what it asks."""
        rows = [step.describe(path) for path, step in self.walk() if not isinstance(step, Scope)]
        width = max((len(where) for _, where, _ in rows), default=0)
        return [f"{op:<12} {where:<{width}}  {what}".rstrip() for op, where, what in rows]

    def __repr__(self) -> str:
        lines = self.requests()
        head = f"Model(in_size={self.in_size}), {len(lines)} request{'s' * (len(lines) != 1)}"
        return head + (" in order:\n  " + "\n  ".join(lines) if lines else " (none)")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis prints falsifying examples with this

    def code(self) -> str:
        """Python that rebuilds this model (with `from effax.testing.models import *`)."""
        return f"Model({list(self.steps)!r}, in_size={self.in_size})"

    def effects(self) -> frozenset[str]:
        """The effect names of the steps the model performs (see `EFFECTS`)."""
        return frozenset(step.effect for _, step in self.walk() if not isinstance(step, Scope))

    def param_specs(self) -> dict[Path, tuple[tuple[int, ...], str]]:
        """`{path: (shape, dtype)}` of every param, in order."""
        return {
            path + (step.name,): (step.shape, step.dtype)
            for path, step in self.walk()
            if isinstance(step, Param)
        }

    def variable_specs(self) -> dict[str, Any]:
        """What `t.init` returns, as `jax.ShapeDtypeStruct`s: `params` and every state collection."""
        specs: dict[str, Any] = {"params": {}}
        for path, step in self.walk():
            if isinstance(step, Param):
                collection, name = "params", step.name
                spec = jax.ShapeDtypeStruct(step.shape, jnp.dtype(step.dtype))
            elif isinstance(step, State):
                collection, name = step.collection, step.name
                spec = jax.eval_shape(step.initial)
            else:
                continue
            node = specs.setdefault(collection, {})
            for key in path:
                node = node.setdefault(key, {})
            node[name] = spec
        return specs

    # --- deriving other models
    def _rebuild(self, keep: Any) -> Model:
        counter = iter(range(len(self.walk())))

        def prune(steps: Iterable[Step]) -> list[Step]:
            out = []
            for step in steps:
                index = next(counter)
                if isinstance(step, Scope | Call):
                    children = prune(step.children)
                    if keep(index, step):
                        out.append(type(step)(step.name, children))
                elif keep(index, step):
                    out.append(step)
            return out

        return Model(prune(self.steps), self.in_size)

    def drop(self, indices: Iterable[int]) -> Model:
        """The model without the steps at these positions of `walk()` (a dropped scope takes its children).

        Every kept step keeps its path, so the result differs from this model
        only by requests at other paths (what the locality law needs).
        """
        dropped = set(indices)
        return self._rebuild(lambda i, step: i not in dropped)

    def without(self, *effects: str) -> Model:
        """The model without the steps of these effects (scopes stay)."""
        return self._rebuild(lambda i, step: step.effect not in effects)

    def read_only(self) -> Model:
        """The same model with every state only read, never set."""

        def freeze(steps: Iterable[Step]) -> list[Step]:
            return [
                type(s)(s.name, freeze(s.children))
                if isinstance(s, Scope | Call)
                else dataclasses.replace(s, update="none")
                if isinstance(s, State)
                else s
                for s in steps
            ]

        return Model(freeze(self.steps), self.in_size)
