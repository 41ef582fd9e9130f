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
)

PARAM_SHAPES = ((), (1,), (2,), (3,), (2, 3))
STATE_SHAPES = ((), (2,))
STREAMS = ("dropout", "noise")
STATE_COLLECTIONS = ("state", "stats")
SOW_COLLECTIONS = ("intermediates", "probes")
SIDE_INPUT_TAGS = ("mask", "ctx")


def _check_effects(effects: Iterable[str], what: str) -> tuple[str, ...]:
    effects = tuple(effects)
    unknown = [e for e in effects if e not in EFFECTS]
    if unknown:
        raise ValueError(f"{what} names unknown effects {unknown}; the kit knows {list(EFFECTS)}.")
    return effects


def _step(effect: str, *, param_dtypes: Sequence[str], state_updates: Sequence[str]) -> st.SearchStrategy[Step]:
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
        )
    if effect == "random":
        return st.builds(Draw, stream=st.sampled_from(STREAMS))
    if effect == "sow":
        return st.builds(Sow, tag=st.just(""), collection=st.sampled_from(SOW_COLLECTIONS))
    if effect == "side_input":
        return st.builds(
            SideInput, tag=st.sampled_from(SIDE_INPUT_TAGS), default=st.sampled_from((0.5, -1.0, 2.0))
        )
    if effect == "mode":
        return st.just(Mode())
    return st.just(Scope(""))


def _fold(items: Sequence[tuple[int, Step]], max_depth: int) -> list[Step]:
    """Fold `(depth, step)` pairs into a tree: a scope holds the following deeper items."""
    root: list[Any] = []
    stack: list[list[Any]] = [root]
    for depth, step in items:
        del stack[min(depth, len(stack) - 1) + 1 :]
        stack[-1].append(step)
        if isinstance(step, Scope) and len(stack) <= max_depth:
            step_children: list[Any] = []
            stack[-1][-1] = (step, step_children)
            stack.append(step_children)
    return root


def _name(tree: list[Any]) -> list[Step]:
    """Give every scope, param, state and sow a name unique in the model, in order."""
    counts = {"blk": 0, "w": 0, "s": 0, "h": 0}

    def fresh(prefix: str) -> str:
        counts[prefix] += 1
        return f"{prefix}{counts[prefix] - 1}"

    def visit(items: list[Any]) -> list[Step]:
        out: list[Step] = []
        for item in items:
            if isinstance(item, tuple):
                scope, children = item
                out.append(Scope(fresh("blk"), visit(children)))
            elif isinstance(item, Scope):
                out.append(Scope(fresh("blk")))
            elif isinstance(item, Param):
                out.append(dataclasses.replace(item, name=fresh("w")))
            elif isinstance(item, State):
                out.append(dataclasses.replace(item, name=fresh("s")))
            elif isinstance(item, Sow):
                out.append(dataclasses.replace(item, tag=fresh("h")))
            else:
                out.append(item)
        return out

    return visit(tree)


def models(
    effects: Iterable[str] = EFFECTS,
    *,
    require: Iterable[str] = (),
    max_steps: int = 6,
    max_depth: int = 2,
    in_sizes: Sequence[int] = (1, 2, 3),
    param_dtypes: Sequence[str] = ("float32", "bfloat16"),
    state_updates: Sequence[str] = ("none", "once", "twice"),
) -> st.SearchStrategy[Model]:
    """Models of at most `max_steps` steps (plus one per required effect) mixing `effects`, scopes up to `max_depth`.

    Every effect in `require` appears at least once, so a law about a
    handler of that effect always has something to check.
    """
    effects = _check_effects(effects, "models(effects=...)")
    require = _check_effects(require, "models(require=...)")
    kinds = effects + require + (("scope",) if max_depth > 0 else ())  # required effects weigh double
    opts = dict(param_dtypes=param_dtypes, state_updates=state_updates)
    item = st.one_of([st.tuples(st.integers(0, max_depth), _step(k, **opts)) for k in kinds])

    @st.composite
    def draw_model(draw: Any) -> Model:
        items = draw(st.lists(item, max_size=max_steps))
        for effect in require:
            if all(step.effect != effect for _, step in items):
                at = draw(st.integers(0, len(items)))
                items.insert(at, (draw(st.integers(0, max_depth)), draw(_step(effect, **opts))))
        return Model(_name(_fold(items, max_depth)), in_size=draw(st.sampled_from(tuple(in_sizes))))

    return draw_model()


def inputs(model: Model) -> st.SearchStrategy[np.ndarray]:
    """Input arrays for `model`: float32 of shape `(model.in_size,)`, small finite values."""
    return hnp.arrays(np.float32, (model.in_size,), elements=st.floats(-2, 2, width=32))


def models_and_inputs(*args: Any, **kwargs: Any) -> st.SearchStrategy[tuple[Model, np.ndarray]]:
    """`(model, x)` pairs; takes the arguments of `models`."""
    model_strategy = models(*args, **kwargs)

    @st.composite
    def pair(draw: Any) -> tuple[Model, np.ndarray]:
        model = draw(model_strategy)
        return model, draw(inputs(model))

    return pair()


def keys(*, raw: bool = False) -> st.SearchStrategy[jax.Array]:
    """Typed keys (`jax.random.key(seed)`), or raw `PRNGKey`s with `raw=True`."""
    make = jax.random.PRNGKey if raw else jax.random.key
    return st.integers(0, 2**32 - 1).map(make)


def trainings() -> st.SearchStrategy[bool]:
    """The `training` flag, both ways."""
    return st.booleans()


def _array(spec: jax.ShapeDtypeStruct) -> st.SearchStrategy[jax.Array]:
    values = hnp.arrays(np.float32, spec.shape, elements=st.floats(-2, 2, width=32))
    return values.map(lambda a: jnp.asarray(a, spec.dtype))


def variables(model: Model) -> st.SearchStrategy[dict[str, Any]]:
    """Variable trees `t.apply` accepts for `model`: every param and state, right shapes and dtypes."""
    specs = model.variable_specs()
    return st.builds(lambda *leaves: jax.tree.unflatten(jax.tree.structure(specs), leaves),
                     *[_array(s) for s in jax.tree.leaves(specs)])


def removals(model: Model) -> st.SearchStrategy[frozenset[int]]:
    """Sets of positions in `model.walk()` to remove with `model.drop(...)` (for the locality law)."""
    n = len(model.walk())
    return st.frozensets(st.integers(0, n - 1), max_size=n) if n else st.just(frozenset())


def share_bindings(model: Model) -> st.SearchStrategy[dict[str, str]]:
    """`{alias: canonical}` param paths valid for `fx.share` on `model`: same shape and dtype, no chains.

    Only params of one spec are tied; each group gets one canonical path and
    some aliases, so no binding is a cycle, a chain, or matches nothing. A
    model without two params of one spec gets `{}`.
    """
    groups: dict[Any, list[Path]] = {}
    for path, spec in model.param_specs().items():
        groups.setdefault(spec, []).append(path)
    tie = [paths for paths in groups.values() if len(paths) > 1]

    @st.composite
    def bindings(draw: Any) -> dict[str, str]:
        out: dict[str, str] = {}
        for paths in tie:
            canonical = draw(st.sampled_from(paths))
            others = [p for p in paths if p != canonical]
            for alias in draw(st.lists(st.sampled_from(others), unique=True)):
                out["/".join(alias)] = "/".join(canonical)
        return out

    return bindings()
