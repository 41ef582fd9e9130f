"""Hypothesis strategies for effectful models, their inputs, keys, variables and share bindings.

A model is drawn as a flat list of `(depth, step)` pairs folded into a tree,
so hypothesis shrinks a failing model by deleting steps and flattening scopes
until only the requests that matter are left. Names are given after drawing,
one counter per kind (`w0`, `s0`, `blk0`, `h0`), so no two requests collide.

>>> from hypothesis import given, settings
>>> from effax.testing import strategies
>>> @settings(max_examples=3, deadline=None, database=None)
... @given(strategies.models(require=("param",)), strategies.keys())
... def test_init_makes_params(model, key):
...     assert fx.transform(model).init(key, jnp.ones(model.in_size))["params"]
>>> test_init_makes_params()
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from effax.testing.models import (
    EFFECTS,
    INITIALIZERS,
    KNOWN_EFFECTS,
    Call,
    Draw,
    Mode,
    Model,
    Param,
    Path,
    Scope,
    SideInput,
    Sow,
    State,
    Step,
    StreamKey,
    _names,
)

PARAM_SHAPES = ((), (1,), (2,), (3,), (2, 3))
STATE_SHAPES = ((), (2,))
STATE_DTYPES = ("float32", "int32", "bfloat16")
STREAMS = ("dropout", "noise")
STATE_COLLECTIONS = ("state", "stats")
SOW_COLLECTIONS = ("intermediates", "probes")
SIDE_INPUT_TAGS = ("mask", "ctx")


def _check_effects(effects: Iterable[str], what: str) -> tuple[str, ...]:
    return _names(effects, what, KNOWN_EFFECTS, "effects")


def _step(
    effect: str, *, param_dtypes: Sequence[str], state_updates: Sequence[str], state_dtypes: Sequence[str]
) -> st.SearchStrategy[Step]:
    """A step of one effect with a placeholder name (names are given after the tree is built)."""
    if effect == "param":
        return st.builds(
            Param,
            name=st.just(""),
            shape=st.sampled_from(PARAM_SHAPES),
            dtype=st.sampled_from(tuple(param_dtypes)),
            init=st.sampled_from(tuple(INITIALIZERS)),
        )
    if effect == "state":
        return st.builds(
            State,
            name=st.just(""),
            collection=st.sampled_from(STATE_COLLECTIONS),
            shape=st.sampled_from(STATE_SHAPES),
            update=st.sampled_from(tuple(state_updates)),
            dtype=st.sampled_from(tuple(state_dtypes)),
            tree=st.booleans(),
        )
    if effect == "random":  # a next_key draw, or the stream's base key (a Flax module's)
        return st.one_of(
            st.builds(Draw, stream=st.sampled_from(STREAMS), times=st.sampled_from((1, 2, 3))),
            st.builds(StreamKey, stream=st.sampled_from(STREAMS)),
        )
    if effect == "sow":
        return st.builds(Sow, tag=st.just(""), collection=st.sampled_from(SOW_COLLECTIONS))
    if effect == "side_input":
        return st.builds(
            SideInput, tag=st.sampled_from(SIDE_INPUT_TAGS), default=st.sampled_from((0.5, -1.0, 2.0))
        )
    if effect == "mode":
        return st.just(Mode())
    if effect == "module_call":
        return st.just(Call(""))
    return st.just(Scope(""))


def _fold(items: Sequence[tuple[int, Step]], max_depth: int) -> list[Step]:
    """Fold `(depth, step)` pairs into a tree: a scope holds the following deeper items."""
    root: list[Any] = []
    stack: list[list[Any]] = [root]
    for depth, step in items:
        del stack[min(depth, len(stack) - 1) + 1 :]
        stack[-1].append(step)
        if isinstance(step, Scope | Call) and len(stack) <= max_depth:
            step_children: list[Any] = []
            stack[-1][-1] = (step, step_children)
            stack.append(step_children)
    return root


def _name(tree: list[Any]) -> list[Step]:
    """Give every scope, param, state and sow a name, in order.

    Scopes and sow tags are unique in the model; params are counted per
    scope, so two scopes each hold a `w0` (a handler that keys params by name
    instead of path mixes them up); states are counted per scope and
    collection, so two collections at one scope reuse names (`s0` in 'state'
    beside `s0` in 'stats'): one path, two variables.
    """
    counts: dict[Any, int] = {}

    def fresh(prefix: str, slot: Any = None) -> str:
        n = counts.get((prefix, slot), 0)
        counts[(prefix, slot)] = n + 1
        return f"{prefix}{n}"

    def visit(items: list[Any], path: Path) -> list[Step]:
        out: list[Step] = []
        for item in items:
            if isinstance(item, tuple):
                scope, children = item
                name = fresh("mod" if isinstance(scope, Call) else "blk")
                out.append(type(scope)(name, visit(children, path + (name,))))
            elif isinstance(item, Scope | Call):
                out.append(type(item)(fresh("mod" if isinstance(item, Call) else "blk")))
            elif isinstance(item, Param):
                out.append(dataclasses.replace(item, name=fresh("w", path)))
            elif isinstance(item, State):
                out.append(dataclasses.replace(item, name=fresh("s", (path, item.collection))))
            elif isinstance(item, Sow):
                out.append(dataclasses.replace(item, tag=fresh("h")))
            else:
                out.append(item)
        return out

    return visit(tree, ())


def _items(
    effects: Iterable[str],
    require: Iterable[str],
    max_steps: int,
    max_depth: int,
    param_dtypes: Sequence[str],
    state_updates: Sequence[str],
    state_dtypes: Sequence[str] = STATE_DTYPES,
) -> st.SearchStrategy[list[tuple[int, Step]]]:
    """The `(depth, step)` list a model is folded from; each required effect appears as often as `require` names it."""
    effects = _check_effects(effects, "models(effects=...)")
    require = _check_effects(require, "models(require=...)")
    kinds = effects + require + (("scope",) if max_depth > 0 else ())  # required effects weigh double
    opts = dict(param_dtypes=param_dtypes, state_updates=state_updates, state_dtypes=state_dtypes)
    item = st.one_of([st.tuples(st.integers(0, max_depth), _step(k, **opts)) for k in kinds])

    @st.composite
    def draw_items(draw: Any) -> list[tuple[int, Step]]:
        items = draw(st.lists(item, max_size=max_steps))
        for effect in dict.fromkeys(require):
            for _ in range(require.count(effect) - sum(step.effect == effect for _, step in items)):
                at = draw(st.integers(0, len(items)))
                items.insert(at, (draw(st.integers(0, max_depth)), draw(_step(effect, **opts))))
        writes = [u for u in state_updates if u != "none"]
        states = [i for i, (_, step) in enumerate(items) if isinstance(step, State)]
        if "state" in require and writes and states and all(items[i][1].update == "none" for i in states):
            depth, step = items[states[0]]  # a state handler always meets a `set`
            items[states[0]] = (depth, dataclasses.replace(step, update=draw(st.sampled_from(writes))))
        if "random" in require and max_depth > 0 and draw(st.booleans()):  # one stream drawn at two paths
            stream, at = draw(st.sampled_from(STREAMS)), draw(st.integers(0, len(items)))
            items[at:at] = [(0, Draw(stream)), (0, Scope("")), (1, Draw(stream))]
        return items

    return draw_items()


def models(
    effects: Iterable[str] = EFFECTS,
    *,
    require: Iterable[str] = (),
    max_steps: int = 6,
    max_depth: int = 2,
    in_sizes: Sequence[int] = (1, 2, 3),
    param_dtypes: Sequence[str] = ("float32", "bfloat16"),
    state_updates: Sequence[str] = ("none", "once", "twice"),
    state_dtypes: Sequence[str] = STATE_DTYPES,
) -> st.SearchStrategy[Model]:
    """Models of at most `max_steps` steps (plus one per required effect) mixing `effects`, scopes up to `max_depth`.

    Every effect in `require` appears at least once (as often as it is
    named there), so a law about a handler of that effect always has
    something to check (a required state is set at least once); with
    `"random"` required, about half the models
    also draw one stream at two paths (at the root and inside a scope), so a
    key handler that ignores paths repeats a key. Draws come one to
    three at a path, or as the stream's base key (`fx.stream_key`); states
    are float32, int32 or bfloat16 (`state_dtypes`), sometimes a dict, are
    read twice after their sets, and their names repeat across collections
    at one scope.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(models(require=("state",)))
    ... def test(model):
    ...     assert "state" in model.effects()
    >>> test()
    """
    items = _items(effects, require, max_steps, max_depth, param_dtypes, state_updates, state_dtypes)
    sizes = st.sampled_from(tuple(in_sizes))
    return st.builds(lambda i, n: Model(_name(_fold(i, max_depth)), in_size=n), items, sizes)


def inputs(model: Model) -> st.SearchStrategy[np.ndarray]:
    """Input arrays for `model`: float32 of shape `(model.in_size,)`, small finite values.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=3, deadline=None, database=None)
    ... @given(inputs(Model([], in_size=3)))
    ... def test(x):
    ...     assert x.shape == (3,)
    >>> test()
    """
    return hnp.arrays(np.float32, (model.in_size,), elements=st.floats(-2, 2, width=32))


def models_and_inputs(*args: Any, **kwargs: Any) -> st.SearchStrategy[tuple[Model, np.ndarray]]:
    """`(model, x)` pairs; takes the arguments of `models`.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=3, deadline=None, database=None)
    ... @given(models_and_inputs(require=("param",)))
    ... def test(model_and_x):
    ...     model, x = model_and_x
    ...     assert x.shape == (model.in_size,)
    >>> test()
    """
    model_strategy = models(*args, **kwargs)

    @st.composite
    def pair(draw: Any) -> tuple[Model, np.ndarray]:
        model = draw(model_strategy)
        return model, draw(inputs(model))

    return pair()


def keys(*, raw: bool = False) -> st.SearchStrategy[jax.Array]:
    """Typed keys (`jax.random.key(seed)`), or raw `PRNGKey`s with `raw=True`.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=3, deadline=None, database=None)
    ... @given(keys(raw=True))
    ... def test(key):
    ...     assert key.shape == (2,)
    >>> test()
    """
    make = jax.random.PRNGKey if raw else jax.random.key
    return st.integers(0, 2**32 - 1).map(make)


def trainings() -> st.SearchStrategy[bool]:
    """The `training` flag, both ways.

    >>> from hypothesis import find
    >>> find(trainings(), lambda training: training)
    True
    """
    return st.booleans()


def _array(spec: jax.ShapeDtypeStruct) -> st.SearchStrategy[jax.Array]:
    values = hnp.arrays(np.float32, spec.shape, elements=st.floats(-2, 2, width=32))
    return values.map(lambda a: jnp.asarray(a, spec.dtype))


def variables(model: Model) -> st.SearchStrategy[dict[str, Any]]:
    """Variable trees `t.apply` accepts for `model`: every param and state, right shapes and dtypes.

    >>> from hypothesis import given, settings
    >>> from effax.testing.models import Param
    >>> model = Model([Param("w0", (2,))])
    >>> @settings(max_examples=3, deadline=None, database=None)
    ... @given(variables(model))
    ... def test(v):
    ...     assert v["params"]["w0"].shape == (2,)
    >>> test()
    """
    specs = model.variable_specs()
    return st.builds(lambda *leaves: jax.tree.unflatten(jax.tree.structure(specs), leaves),
                     *[_array(s) for s in jax.tree.leaves(specs)])


def _requests_at(model: Model, effects: Sequence[str] | None) -> list[set[int]]:
    """For each position of `model.walk()`, the positions of the requests it removes (itself, or a scope's)."""
    walk = model.walk()
    out = []
    for i in range(len(walk)):
        inside = {j for j in range(len(walk)) if j == i or _contains(model, i, j)}
        out.append({j for j in inside if not isinstance(walk[j][1], Scope)
                    and (effects is None or walk[j][1].effect in effects)})
    return out


def removals(model: Model, effects: Sequence[str] | None = None) -> st.SearchStrategy[frozenset[int]]:
    """Sets of positions in `model.walk()` to remove with `model.drop(...)` (for the locality law).

    Nine in ten removals drop a request before a request that stays at
    another path or stream (the case that shifts a call-order counter; a
    draw kept at the removed one's path and stream is renumbered, so it
    shows nothing), both of `effects` when given; the rest are any subset.

    >>> from hypothesis import given, settings
    >>> from effax.testing.models import Param
    >>> model = Model([Param("w0"), Param("w1")])
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(removals(model, effects=("param",)))
    ... def test(drop):
    ...     assert drop <= {0, 1}
    >>> test()
    """
    if effects is not None:
        effects = _check_effects(effects, "removals(effects=...)")
    n = len(model.walk())
    if not n:
        return st.just(frozenset())
    anywhere = st.frozensets(st.integers(0, n - 1), max_size=n)
    removes = _requests_at(model, effects)
    walk = model.walk()

    def slot(j: int) -> tuple:  # a kept draw at the slot of a removed one is renumbered, not compared
        path, step = walk[j]
        return path, getattr(step, "stream", getattr(step, "name", None))

    pivots = [
        (i, later) for i in range(n) if removes[i]
        for later in [[j for j in range(i + 1, n) if j not in removes[i] and removes[j] == {j}
                       and slot(j) not in {slot(k) for k in removes[i]}]]
        if later
    ]
    if not pivots:
        return anywhere

    @st.composite
    def before_a_kept_one(draw: Any) -> frozenset[int]:
        i, later = draw(st.sampled_from(pivots))
        kept = draw(st.sampled_from(later))
        more = draw(st.frozensets(st.integers(0, n - 1), max_size=n))
        return frozenset({i} | {j for j in more if j != kept and not _contains(model, j, kept)})

    return st.integers(0, 9).flatmap(lambda k: before_a_kept_one() if k else anywhere)


def _contains(model: Model, scope_at: int, at: int) -> bool:
    """Whether position `at` of `model.walk()` lies inside the scope at position `scope_at`."""
    walk = model.walk()
    path, step = walk[scope_at]
    if not isinstance(step, Scope):
        return False
    inside = path + (step.name,)
    return walk[at][0][: len(inside)] == inside


def share_bindings(model: Model, *, chains: bool = True) -> st.SearchStrategy[dict[str, str]]:
    """`{alias: canonical}` param paths valid for `fx.share` on `model`: params of one shape and dtype, no cycle.

    Each group of params of one spec gets one canonical path; every other
    member may be tied to it, or (with `chains`) to a member already tied,
    so `c -> b -> a` chains occur and are resolved by `fx.share`. A model
    without two params of one spec gets `{}`.

    >>> from hypothesis import given, settings
    >>> from effax.testing.models import Param
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(share_bindings(Model([Param("w0", (2,)), Param("w1", (2,))])))
    ... def test(bindings):
    ...     assert bindings in ({}, {"w1": "w0"}, {"w0": "w1"})
    >>> test()
    """
    groups: dict[Any, list[Path]] = {}
    for path, spec in model.param_specs().items():
        groups.setdefault(spec, []).append(path)
    tie = [paths for paths in groups.values() if len(paths) > 1]
    if not tie:
        return st.just({})

    @st.composite
    def bindings(draw: Any) -> dict[str, str]:
        out: dict[str, str] = {}
        for paths in tie:
            canonical = draw(st.sampled_from(paths))
            tied = [canonical]
            for alias in draw(st.permutations([p for p in paths if p != canonical])):
                if not draw(st.booleans()):
                    continue
                target = draw(st.sampled_from(tied)) if chains else canonical
                out["/".join(alias)] = "/".join(target)
                tied.append(alias)
        return out

    return bindings()


def sharing_cases(
    effects: Iterable[str] = EFFECTS, *, require: Iterable[str] = ("param",), **model_options: Any
) -> st.SearchStrategy[tuple[Model, np.ndarray, dict[str, str]]]:
    """`(model, x, bindings)` for the sharing law: the one generator the kit and effax's own tests use.

    In three examples of four the model gets a twin of one of its params (same
    shape, dtype and initializer, at another path) and the bindings tie at
    least one pair, so the law has a tied param to check; otherwise the
    bindings are whatever `share_bindings` draws (often `{}`).

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(sharing_cases())
    ... def test(case):
    ...     model, x, bindings = case
    ...     fx.transform(fx.share(model, bindings)).init(jax.random.key(0), x)
    >>> test()
    """
    require = tuple(dict.fromkeys(("param",) + _check_effects(require, "sharing_cases(require=...)")))
    options = dict(max_steps=6, max_depth=2, param_dtypes=("float32", "bfloat16"),
                   state_updates=("none", "once", "twice"))
    in_sizes = tuple(model_options.pop("in_sizes", (1, 2, 3)))
    options.update(model_options)
    items_strategy = _items(effects, require, **options)

    @st.composite
    def case(draw: Any) -> tuple[Model, np.ndarray, dict[str, str]]:
        items = draw(items_strategy)
        twin = draw(st.integers(0, 3)) < 3  # (hypothesis starts from, and shrinks to, 0: a twin)
        if twin:
            params = [step for _, step in items if isinstance(step, Param)]
            original = draw(st.sampled_from(params))
            at = draw(st.integers(0, len(items)))
            items.insert(at, (draw(st.integers(0, options["max_depth"])), original))
        model = Model(_name(_fold(items, options["max_depth"])), in_size=draw(st.sampled_from(in_sizes)))
        bindings = draw(share_bindings(model))
        if twin and not bindings:
            groups: dict[Any, list[Path]] = {}
            for path, spec in model.param_specs().items():
                groups.setdefault(spec, []).append(path)
            pairs = [paths for paths in groups.values() if len(paths) > 1]
            alias, canonical = draw(st.sampled_from(pairs))[:2]
            bindings = {"/".join(alias): "/".join(canonical)}
        return model, draw(inputs(model)), bindings

    return case()


FLAX_ACTIVATIONS = ("relu", "tanh")


@functools.cache
def _flax_classes() -> tuple[type, type]:
    """The linen module classes `flax_models` builds (defined once, on first use: Flax is a test dependency)."""
    import flax.linen as nn

    def run(module: Any, layers: tuple, x: jax.Array, train: bool) -> jax.Array:
        for kind, *arg in layers:
            if kind == "Dense":
                x = nn.Dense(arg[0])(x)
            elif kind == "LayerNorm":
                x = nn.LayerNorm()(x)
            elif kind == "BatchNorm":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            elif kind == "Dropout":
                x = nn.Dropout(arg[0], deterministic=not train)(x)
            elif kind in FLAX_ACTIVATIONS:
                x = getattr(nn, kind)(x)
            elif kind == "sow":
                module.sow("intermediates", arg[0], x)
            elif kind == "count":
                n = module.variable("counters", arg[0], lambda: jnp.zeros((), jnp.int32))
                if train and not module.is_initializing():
                    n.value += 1
            else:  # ("child", layers): the one nested submodule
                x = FlaxBlock(arg[0], name="child")(x, train)
        return x

    def updated(layers: tuple, train: bool) -> set[str]:
        kinds = {spec[0] for spec in layers} | {spec[0] for child in layers if child[0] == "child" for spec in child[1]}
        writes = {"sow": "intermediates"} | ({"BatchNorm": "batch_stats", "count": "counters"} if train else {})
        return {collection for kind, collection in writes.items() if kind in kinds}

    class FlaxBlock(nn.Module):
        """A compact submodule of some of the generated layers."""

        layers: tuple = ()

        @nn.compact
        def __call__(self, x: jax.Array, train: bool) -> jax.Array:
            return run(self, self.layers, x, train)

    class FlaxModel(nn.Module):
        """A generated linen model: `layers` in order, as `(kind, *args)` tuples (see `flax_models`)."""

        layers: tuple = ()

        def updated_collections(self, train: bool) -> list[str]:
            """The collections `apply` changes in this mode, sorted: what to pass as `mutable=`."""
            return sorted(updated(self.layers, train))

        @nn.compact
        def __call__(self, x: jax.Array, train: bool) -> jax.Array:
            return run(self, self.layers, x, train)

    for cls in (FlaxModel, FlaxBlock):  # a counterexample reads `FlaxModel(layers=...)`
        cls.__qualname__ = cls.__name__
    return FlaxModel, FlaxBlock


def _flax_layer() -> st.SearchStrategy[tuple]:
    return st.one_of(
        st.tuples(st.just("Dense"), st.integers(1, 4)),
        st.just(("LayerNorm",)),
        st.just(("BatchNorm",)),
        st.tuples(st.just("Dropout"), st.floats(0.0, 0.9).map(lambda rate: round(rate, 2))),
        st.sampled_from(FLAX_ACTIVATIONS).map(lambda kind: (kind,)),
        st.just(("sow", "")),
        st.just(("count", "")),
    )


def flax_models(
    *, max_layers: int = 5, nested: bool = True, out_features: int | None = None
) -> st.SearchStrategy[Any]:
    """Small Flax linen models, each a drawn list of layers run by one `@nn.compact def __call__(self, x, train)`.

    They let the interop laws (9, 3 and 14 through `fx.from_flax`) be checked
    over models hypothesis draws, and shrinks to a minimal failing one, not
    only over hand-picked modules. Up to `max_layers` layers mix
    `nn.Dense(n)` (n in 1..4), `nn.LayerNorm()`,
    `nn.BatchNorm(use_running_average=not train, momentum=0.9)`,
    `nn.Dropout(rate, deterministic=not train)` (rate in 0..0.9), relu and
    tanh, `self.sow("intermediates", "h<i>", x)` and an int32 counter
    `self.variable("counters", "n<i>", ...)` incremented in training (not at
    init); with `nested`, about half the models also hold one compact child
    module (scope `child`) of one to three such layers. `out_features=n`
    appends `nn.Dense(n)`, so an input of `n` features keeps its shape (a
    layer for `fx.scan`). Models run on any `(batch, features)` input (tests
    use `(2, 3)`); `module.layers` lists the layers as `(kind, *args)`
    tuples, and `module.updated_collections(train)` names the collections
    `apply` changes in that mode (its `mutable=`).

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=3, deadline=None, database=None)
    ... @given(flax_models(out_features=3))
    ... def test(module):
    ...     x = jnp.ones((2, 3))
    ...     variables = module.init(jax.random.key(0), x, train=False)
    ...     assert fx.transform(fx.from_flax(module)).apply(variables, x, train=False).shape == (2, 3)
    >>> test()
    """
    model_class, _ = _flax_classes()
    layer = _flax_layer()

    @st.composite
    def model(draw: Any) -> Any:
        layers = draw(st.lists(layer, max_size=max_layers))
        if nested and draw(st.booleans()):
            inner = draw(st.lists(layer, min_size=1, max_size=3))
            layers.insert(draw(st.integers(0, len(layers))), ("child", inner))
        if out_features is not None:
            layers.append(("Dense", out_features))
        counts = {"sow": 0, "count": 0}

        def named(specs: list) -> tuple:  # sow tags h0, h1, ... and counters n0, n1, ... in order
            out = []
            for kind, *arg in specs:
                if kind in counts:
                    arg = [f"{'h' if kind == 'sow' else 'n'}{counts[kind]}"]
                    counts[kind] += 1
                elif kind == "child":
                    arg = [named(arg[0])]
                out.append((kind, *arg))
            return tuple(out)

        return model_class(named(layers))

    return model()
