"""Discharge: an effectful function plus the built-in handlers becomes pure `init` and `apply`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from effax.core import (
    MISSING,
    EffaxError,
    Handler,
    ParamConflictError,
    flatten_handlers,
    flatten_paths,
    get_path,
    handle,
    hermetic,
    path_str,
)
from effax.effects import LocalStateRequest, ParamRequest
from effax.handlers import (
    CollectSown,
    FunctionalState,
    InitParams,
    KeysFromRngs,
    LoadParams,
    Mode,
)
from effax.handlers._mode import static_training
from effax.handlers._presets import apply_options, init_options, split_presets
from effax.handlers._state import normalize_mutable


def _check_variables_arg(variables: Any) -> Mapping[str, Any]:
    if not isinstance(variables, Mapping):
        raise EffaxError(
            f"`variables` must be a dict like {{'params': {{...}}, 'state': {{...}}}}, got "
            f"{type(variables).__name__}. Pass what `t.init` returned (merged with the updates of "
            "earlier runs: `{**variables, **updates}`)."
        )
    return variables


def _check_overlap(state_run: Any, sown_run: Any) -> None:
    both = state_run.used & sown_run.trees.keys()
    if both:
        raise ParamConflictError(
            f"collection {sorted(both)[0]!r} holds local state and sown values in one run; a "
            "collection holds one or the other. Give `fx.sow(..., collection=...)` or "
            "`fx.local_state(..., collection=...)` another collection name."
        )


@dataclasses.dataclass(frozen=True)
class Transformed:
    """A pair of pure functions, `init` and `apply`, made from an effectful `fn` by `fx.transform`."""

    fn: Callable[..., Any]

    def init(self, rngs: Any, *args: Any, training: bool = False, handlers: Any = (), **kwargs: Any) -> dict:
        """Create every param and state variable; returns `{"params": ..., <collection>: ...}`.

        `training` defaults to False; a preset in `handlers` sets it instead (`training=True`
        beside the eval preset is a conflict).
        """
        return self.init_with_output(rngs, *args, training=training, handlers=handlers, **kwargs)[1]

    def init_with_output(
        self, rngs: Any, *args: Any, training: bool = False, handlers: Any = (), **kwargs: Any
    ) -> tuple[Any, dict]:
        """Like `init`, also returning the output of the initializing run."""
        preset, handlers = split_presets(handlers)
        training, rngs = init_options(preset, training, rngs)
        mode = Mode(training)
        extra = flatten_handlers((handlers,))
        with hermetic(), handle(mode, KeysFromRngs(rngs), FunctionalState({}, True), InitParams(), *extra) as runs:
            out = self.fn(*args, **kwargs)
        state_run, params_run = runs[2], runs[3]
        return out, {"params": params_run.params, **state_run.initial()}

    def apply(
        self,
        variables: Mapping[str, Any],
        *args: Any,
        rngs: Any = None,
        mutable: Any = False,
        training: bool | None = None,
        handlers: Any = (),
        **kwargs: Any,
    ) -> Any:
        """Run the model on `variables`; with `mutable` truthy, return `(out, updates)`.

        A preset in `handlers` (`fx.handlers.train(rngs, mutable=...)`, `fx.handlers.eval()`)
        sets `training`, `rngs` and `mutable` in one argument.
        """
        variables = _check_variables_arg(variables)
        preset, handlers = split_presets(handlers)
        training, keys, mutable = apply_options(preset, training, rngs, mutable)
        collections = normalize_mutable(mutable)
        mode = None if training is None else Mode(static_training(training))
        extra = flatten_handlers((handlers,))
        state = FunctionalState(variables, collections)
        sown = CollectSown(collections)
        params = LoadParams(variables.get("params", {}))
        with hermetic(), handle(mode, keys, state, sown, params, *extra) as runs:
            out = self.fn(*args, **kwargs)
        offset = 0 if mode is None else 1
        state_run, sown_run = runs[offset + 1], runs[offset + 2]
        _check_overlap(state_run, sown_run)
        if not collections:
            return out
        # Sown values start fresh each run: they replace old sows that `variables` may still hold.
        return out, {**state_run.updates(), **sown_run.collections()}


def transform(fn: Callable[..., Any]) -> Transformed:
    """Discharge an effectful function into pure `init` and `apply`.

    >>> def model(x):
    ...     w = fx.param("w", jax.nn.initializers.ones, (x.shape[-1], 2))
    ...     return x @ w
    >>> t = fx.transform(model)
    >>> variables = t.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> t.apply(variables, jnp.ones((1, 3)))
    Array([[3., 3.]], dtype=float32)
    """
    if not callable(fn):
        raise EffaxError(f"`fx.transform` takes a function, got {type(fn).__name__}.")
    return Transformed(fn)


@dataclasses.dataclass
class VariablesReport:
    """What `fx.check_variables` found: every problem at once, paths as `collection:a/b/c`."""

    missing: list[str] = dataclasses.field(default_factory=list)
    unused: list[str] = dataclasses.field(default_factory=list)
    mis_shaped: list[str] = dataclasses.field(default_factory=list)
    mis_typed: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unused or self.mis_shaped or self.mis_typed)

    def __str__(self) -> str:
        if self.ok:
            return "variables match the model"
        parts = []
        for label, items in (
            ("missing", self.missing),
            ("unused", self.unused),
            ("mis-shaped", self.mis_shaped),
            ("mis-typed", self.mis_typed),
        ):
            parts.extend(f"{label}: {item}" for item in items)
        return "\n".join(parts)


class _Audit(Handler):
    """Answer params from `variables` leniently and record every mismatch (for `check_variables`)."""

    def __init__(self, variables: Mapping[str, Any], report: VariablesReport, used: set):
        self.variables, self.report, self.used = variables, report, used

    def handle(self, request: Any, forward: Any) -> Any:
        if type(request) is ParamRequest:
            name = f"params:{path_str(request.path)}"
            slot = ("params",) + request.path
            if slot in self.used:
                return jnp.zeros(request.shape, request.dtype)
            self.used.add(slot)
            stored = get_path(self.variables.get("params", {}), request.path)
            if stored is MISSING:
                self.report.missing.append(f"{name} ({request.spec()})")
            else:
                shape, dtype = jnp.shape(stored), jax.dtypes.canonicalize_dtype(jnp.result_type(stored))
                if shape != request.shape:
                    self.report.mis_shaped.append(f"{name}: model {request.shape}, variables {shape}")
                if dtype != request.dtype:
                    self.report.mis_typed.append(
                        f"{name}: model {jnp.dtype(request.dtype).name}, variables {jnp.dtype(dtype).name}"
                    )
            return jnp.zeros(request.shape, request.dtype)
        if type(request) is LocalStateRequest:
            self.used.add((request.collection,) + request.path)
            name = f"{request.collection}:{path_str(request.path)}"
            stored = get_path(self.variables.get(request.collection, {}), request.path)
            if stored is MISSING:
                self.report.missing.append(name)
            else:
                self._compare_state(name, stored, request.init())
        return forward(request)

    def _compare_state(self, name: str, stored: Any, fresh: Any) -> None:
        (s_leaves, s_def), (f_leaves, f_def) = jax.tree.flatten(stored), jax.tree.flatten(fresh)
        show = lambda leaves: [f"{jnp.result_type(a).name}{list(jnp.shape(a))}" for a in leaves]
        found = f"{name}: model {show(f_leaves)}, variables {show(s_leaves)}"
        if s_def != f_def or any(jnp.shape(a) != jnp.shape(b) for a, b in zip(s_leaves, f_leaves, strict=False)):
            self.report.mis_shaped.append(found)
        elif any(jnp.result_type(a) != jnp.result_type(b) for a, b in zip(s_leaves, f_leaves, strict=False)):
            self.report.mis_typed.append(found)


def check_variables(
    t: Transformed,
    variables: Mapping[str, Any],
    *args: Any,
    rngs: Any = None,
    training: bool | None = None,
    **kwargs: Any,
) -> VariablesReport:
    """Run the model abstractly on `variables` and list missing, unused, mis-shaped and mis-typed entries.

    Nothing is computed or allocated (`jax.eval_shape`). Without `rngs`, a
    dummy key serves every stream; without `training`, the model runs in eval.

    >>> t = fx.transform(lambda: fx.param("w", jax.nn.initializers.zeros, (2,)))
    >>> print(fx.check_variables(t, {"params": {"v": jnp.zeros(2)}}))
    missing: params:w (shape (2,), float32)
    unused: params:v
    """
    variables = _check_variables_arg(variables)
    report, used = VariablesReport(), set()
    keys = KeysFromRngs(jax.random.key(0) if rngs is None else rngs)
    mode = Mode(False if training is None else training)

    def run(variables: Any) -> None:
        state = FunctionalState(variables, True)
        with hermetic(), handle(mode, keys, state, CollectSown(()), _Audit(variables, report, used)):
            t.fn(*args, **kwargs)

    jax.eval_shape(run, variables)
    for collection, tree in variables.items():
        if isinstance(tree, Mapping):
            for path, _ in flatten_paths(tree):
                slot = (collection,) + path
                if not any(slot[:n] in used for n in range(2, len(slot) + 1)):
                    report.unused.append(f"{collection}:{path_str(path)}")
    return report
