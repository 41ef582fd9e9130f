"""`fx.cond` and `fx.switch`: `jax.lax.cond`/`switch` over effectful branches (Flax's `nn.cond`, `nn.switch`).

Every branch's needs are learned and requested outside, so after `init` the
variables of *all* branches exist, whichever branch ran (a param only one
branch uses is still created, as in Flax). When something must be created
(under init), every branch runs and the results are selected by the index,
so each branch's variables are made from its own code; otherwise the branches
run under `jax.lax.switch`, and only the taken one computes. Keys follow the
branch taken: a path that draws in several branches is given as many keys as
the branch that draws most, in order. A branch's state `set` writes through
(an untaken branch leaves the value as it was). Sown values follow the
branch taken, so every branch must sow the same tags with the same shapes
where they are collected (`mutable=`, `capture_intermediates`); a sow that
nothing collects does nothing, in one branch as anywhere, and `fx.summary`
lists every branch's sows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from effax.core import EffaxError, MissingRngError, current_stack, path_str
from effax.effects import capture_filter
from effax.inspect import abstract_mode
from effax.lift._body import Answerer, Needs, run_lifted, sow_keeper
from effax.lift._transforms import (
    _abstract_results,
    _brief,
    _Crossing,
    _hand_back,
    _here,
    _learn,
    _names_snapshot,
    _plan,
    _type_of,
    _zeros,
)

_ONE = _Crossing(None, False, False, lambda collection, declared: "unmapped", lambda stream: False)


def _merge(all_needs: list[Needs], outer: tuple[Any, ...]) -> Needs:
    """The union of the branches' needs: every param and variable, the most draws per path; the sows that
    something outside keeps (a sow nothing keeps does nothing, so the branches need not agree on it)."""
    merged = Needs()
    for needs in all_needs:
        for slot, init in needs.param_inits.items():  # a param's initializer: the first branch declaring it
            merged.param_inits.setdefault(slot, init)
        for slot, request in needs.params.items():
            first = merged.params.setdefault(slot, request)
            if (first.shape, first.dtype) != (request.shape, request.dtype):
                raise EffaxError(
                    f"fx.cond/fx.switch: the branches ask for param `{path_str(slot[1])}` with different specs "
                    f"({first.spec()} vs {request.spec()}); a path names one variable in every branch."
                )
        for slot, need in needs.state.items():
            first = merged.state.get(slot)
            if first is None:
                merged.state[slot] = need
            else:
                first.written = first.written or need.written
                if first.request is None and need.request is not None:
                    first.request = need.request
        for slot, count in needs.draws.items():
            merged.draws[slot] = max(merged.draws.get(slot, 0), count)
        merged.bases.update(needs.bases)
        for slot, draws in needs.init_draws.items():  # a variable's `init()`: the first branch declaring it
            merged.init_draws.setdefault(slot, draws)
        for slot, uses in needs.param_uses.items():  # a param's later uses: as many as the branch using it most
            if len(uses) > len(merged.param_uses.get(slot, ())):
                merged.param_uses[slot] = uses
    keepers = {k: sow_keeper(outer, k[0], k[1]) for needs in all_needs for k in needs.sows}
    sows = [{k: v for k, v in needs.sows.items() if keepers[k] is not None} for needs in all_needs]
    if any(s != sows[0] for s in sows[1:]) and not abstract_mode():  # a summary lists every branch's sows
        odd = {k for s in sows for k in s if any(k not in o or o[k] != s[k] for o in sows)}
        users = sorted({type(keepers[k]).__name__ for k in odd if not hasattr(keepers[k], "keeps")})
        user = (f" Here {', '.join(users)} may keep them: a handler that declares no `answers` is sent every "
                "sow; declare what it answers (`answers = (fx.ParamRequest,)`) to let them pass.") if users else ""
        if capture_filter() is not None:  # the sows are `capture_intermediates`'s, not the user's
            user += (" With `capture_intermediates`, the outputs of the modules each branch calls are sown: "
                     "pass a filter that leaves the branches' modules out (`capture_intermediates=lambda m, "
                     "method: ...`), or capture outside the cond.")
        raise EffaxError(
            "fx.cond/fx.switch: the branches sow different values ("
            + "; ".join(
                f"branch {i}: " + (", ".join(f"{k[-1]!r} at `{path_str(k[2])}` {_sown_types(s[k])}" for k in s)
                                   or "nothing")
                for i, s in enumerate(sows)
            )
            + "). Sown values follow the branch taken, so where they are collected (`mutable=`) "
            "every branch must sow the same tags with the same shapes: sow a placeholder "
            f"(`jnp.zeros_like(v)`) in the others, or sow after the cond.{user}"
        )
    if abstract_mode():  # every branch's sows, as their requests are listed (the kept ones agree)
        for needs in all_needs:
            for key, structs in needs.sows.items():
                merged.sows.setdefault(key, structs)
    else:
        merged.sows = dict(sows[0])
    return merged


def _sown_types(structs: list[Any]) -> str:
    """The values one branch sows under a tag, `float32[2,3]` each: what tells two branches' sows apart."""
    return "(" + ", ".join(" ".join(map(_type_of, jax.tree.leaves(v))) for v in structs) + ")"


class _BranchAnswerer(Answerer):
    """A branch's answerer: what it did not make or write comes back as it went in."""

    def output(self, what: str, slot: tuple) -> Any:
        state = self.plan.state.get(slot)
        if what == "state" and slot not in self.state and state is not None:
            # not touched in this branch: as it went in, or, made in another branch, its initial value (None
            # here: `switch` puts that branch's made value in)
            return None if state.index is None else self.ins[state.index]
        if what != "state" and slot not in (self.params if what == "param" else self.initial):
            return None  # made by another branch
        return super().output(what, slot)


def _select(index: Any, values: list[Any]) -> Any:
    if len(values) == 1:
        return values[0]
    return jax.tree.map(lambda *vs: jax.lax.select_n(index, *vs), *values)


def switch(index: Any, branches: Sequence[Callable[..., Any]], *operands: Any) -> Any:
    """`jax.lax.switch` over effectful branches: run `branches[index](*operands)`.

    All branches' variables exist after init whichever runs; see the module
    docstring for keys, state and sows. `index` is clamped as in `jax.lax.switch`.

    >>> def model(x, i):
    ...     small = lambda x: x * fx.param("a", jax.nn.initializers.ones, ())
    ...     big = lambda x: x * fx.param("b", jax.nn.initializers.ones, ()) * 10
    ...     return fx.switch(i, [small, big], x)
    >>> t = fx.transform(model)
    >>> v = t.init(jax.random.key(0), 1.0, 0)
    >>> sorted(v["params"])
    ['a', 'b']
    >>> t.apply(v, 2.0, 1)
    Array(20., dtype=float32)
    """
    listed = not callable(branches) and not hasattr(branches, "shape") and isinstance(branches, Iterable)
    if listed:
        branches = list(branches)
    if not listed or not branches:
        raise EffaxError(
            f"fx.switch takes a non-empty list of branch functions, got {_brief(branches)}: "
            "`fx.switch(index, [f0, f1], *operands)`."
        )
    for i, b in enumerate(branches):
        if not callable(b):
            raise EffaxError(
                f"fx.switch: branch {i} is {_brief(b)}, not a function; every branch is called on the operands: "
                "`fx.switch(index, [f0, f1], *operands)`."
            )
    _check_scalar(index, "fx.switch", "index", "an int", "`jnp.argmax(scores)`")
    if not jnp.issubdtype(jnp.result_type(index), jnp.integer):  # `jax.lax.switch` refuses it too
        raise EffaxError(
            f"fx.switch: index must be an int (it picks a branch by position), got {_type_of(index)}; a float "
            "would be truncated silently. Convert it as you mean it: `jnp.round(i).astype(int)`, "
            "`jnp.floor(i).astype(int)`, or `fx.cond(pred, ...)` for a bool."
        )
    outer = current_stack()
    restore = _names_snapshot()  # branches are named in order, as the real pass traces them: learn them so too
    try:
        learned = [_learn(outer, b, operands, rollback=False) for b in branches]
    except MissingRngError as e:
        raise _every_branch_draws(e) from None
    finally:
        if restore is not None:
            restore()
    structs = [jax.tree.structure(out) for _, out, _ in learned]
    shapes = [jax.tree.map(lambda s: (s.shape, s.dtype), out) for _, out, _ in learned]
    if any(s != structs[0] for s in structs[1:]) or any(s != shapes[0] for s in shapes[1:]):
        raise EffaxError(
            f"fx.cond/fx.switch: the branches return different shapes ({'; '.join(map(str, shapes))}); like "
            "`jax.lax.switch`, every branch must return the same structure, shapes and dtypes."
        )
    needs = _merge([n for n, _, _ in learned], outer)
    try:
        plan = _plan(needs, outer, _ONE)
    except MissingRngError as e:
        raise _every_branch_draws(e) from None
    if abstract_mode():
        values, sown = _abstract_results(plan, needs, None)
        _hand_back(plan, outer, values, sown)
        return _zeros(learned[0][1])
    index = jnp.clip(jnp.asarray(index, jnp.int32), 0, len(branches) - 1)
    ins = [v for _, v in plan.inputs]
    keys: list[tuple] = list(needs.sows)

    def branch(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(ins: list[Any], operands: tuple) -> Any:
            answerer = _BranchAnswerer(plan, list(ins))
            out = run_lifted(outer, answerer, fn, *operands)
            return out, answerer.outputs(), [answerer.sown.get(k, []) for k in keys]

        return run

    if any(p.fresh for p in plan.params.values()) or any(s.fresh for s in plan.state.values()):
        results = [branch(b)(ins, operands) for b in branches]  # creating: every branch makes its own
        out = _select(index, [r[0] for r in results])
        values, initial = [], {}
        for i, (_, what, slot) in enumerate(plan.outputs):
            if what in ("param", "initial"):  # the branch that made it (each branch makes its own)
                values.append(next(r[1][i] for r in results if r[1][i] is not None))
                initial[slot] = values[-1]
            else:  # a variable made in another branch stays at its initial value where this one is taken
                values.append(_select(index, [initial[slot] if r[1][i] is None else r[1][i] for r in results]))
        sown = _select(index, [r[2] for r in results])
    else:
        out, values, sown = jax.lax.switch(index, [branch(b) for b in branches], ins, operands)
    _hand_back(plan, outer, values, list(zip(keys, sown, strict=True)))
    return out


def _every_branch_draws(e: MissingRngError) -> MissingRngError:
    """A draw of a branch that may not run was refused: say why it is asked for at all (once, when nested)."""
    if "fx.cond/fx.switch asks for the keys" in str(e):
        return e
    return MissingRngError(
        f"{e} (fx.cond/fx.switch asks for the keys of every branch before one runs, as `jax.lax.cond` traces "
        "them all, even for a Python bool `pred`; to draw only when a Python condition holds, use a Python `if`)"
    )


def _check_scalar(value: Any, where: str, what: str, kind: str, example: str) -> None:
    """A branch selector is one scalar for the whole call (`jax.lax.cond`/`switch`), never per element."""
    try:
        if value is None:  # `jnp.shape(None)` is (), and `jnp.asarray(None)` a raw ValueError
            raise TypeError
        shape = jnp.shape(value)
        dtype = jnp.result_type(value)
    except (TypeError, ValueError):
        shape, dtype = None, None
    if shape != () or not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.number)):
        got = _type_of(value) if shape is not None else _brief(value)
        raise EffaxError(
            f"{_here(where)}: {what} must be a scalar ({kind}, shape ()), as in jax.lax.{where[3:]}: it picks "
            f"one branch for the whole call; got {got}. Reduce it to one value ({example}); to choose "
            "element by element, compute both results and use `jnp.where(mask, a, b)`."
        )


def cond(pred: Any, true_fn: Callable[..., Any], false_fn: Callable[..., Any], *operands: Any) -> Any:
    """`jax.lax.cond` over effectful branches: `true_fn(*operands)` if `pred` else `false_fn(*operands)`.

    `pred` is one scalar, a bool or a number (nonzero is true), for the whole
    call, as in `jax.lax.cond`; for an element-wise choice use `jnp.where`.
    Both branches' params exist after `init`, whichever branch runs (Flax's
    `nn.cond`); keys and sown values follow the branch taken, and a branch
    that writes state writes through.

    >>> def model(x, flip):
    ...     dense = lambda x: x @ fx.param("w", jax.nn.initializers.ones, (2, 2))
    ...     return fx.cond(flip, lambda x: -x, dense, x)
    >>> t = fx.transform(model)
    >>> v = t.init(jax.random.key(0), jnp.ones(2), True)
    >>> v["params"]["w"].shape
    (2, 2)
    >>> t.apply(v, jnp.ones(2), False)
    Array([2., 2.], dtype=float32)
    """
    for name, fn in (("true_fn", true_fn), ("false_fn", false_fn)):
        if not callable(fn):
            raise EffaxError(
                f"fx.cond: {name} is {_brief(fn)}, not a function; the operands follow the two branches: "
                "`fx.cond(pred, true_fn, false_fn, *operands)`."
            )
    _check_scalar(pred, "fx.cond", "pred", "a bool or a number", "`jnp.all(x > 0)`, `(x > 0).any()`")
    index = jnp.where(jnp.asarray(pred), 0, 1)  # true_fn first: layers made inline are named in reading order
    return switch(index, [true_fn, false_fn], *operands)
