"""Weight tying as a handler pass: requests under an alias path are answered at a canonical path.

`fx.share(fn, {"decoder/embed": "encoder/embed"})` returns a function that
runs `fn` under one more handler, innermost: it rewrites every param request
whose path starts with an alias prefix to the canonical prefix before the
storage handler sees it. Nothing in the model changes, the variables hold the
canonical entry only, and the gradient of a tied weight is the sum over its
uses because JAX sees one array read in several places.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp

from effax.core import (
    EffaxError,
    Handler,
    Path,
    ShareError,
    check_name,
    current_path,
    handle,
    path_str,
    run_local,
)
from effax.effects import GetStateRequest, LocalStateRequest, ParamRequest, SetStateRequest, is_initializing
from effax.handlers._params import stacked_hint
from effax.handlers._tree import nearest

StatePolicy = Literal["forbidden", "allowed", "unsafe"]
_POLICIES = ("forbidden", "allowed", "unsafe")


@dataclasses.dataclass(frozen=True)
class ShareBinding:
    """One binding of a share pass: requests under `alias` (or tagged `tag`) go to `canonical`.

    >>> str(fx.ShareBinding(("decoder", "embed"), ("encoder", "embed")))
    'decoder/embed -> encoder/embed'
    """

    alias: Path | None
    canonical: Path
    tag: str | None = None

    def __str__(self) -> str:
        source = f"shared={self.tag!r}" if self.tag is not None else path_str(self.alias or ())
        return f"{source} -> {path_str(self.canonical)}"


def _as_path(value: Any, what: str) -> Path:
    """`"a/b"` or `("a", "b")` -> `("a", "b")`, every component a valid name."""
    if isinstance(value, str):
        parts = tuple(value.split("/"))
    elif isinstance(value, (tuple, list)):
        parts = tuple(value)
    else:
        raise ShareError(
            f"{what} {value!r} is a {type(value).__name__}; a share path is a string like "
            "'decoder/embed' or a tuple of names like ('decoder', 'embed')."
        )
    if not parts:
        raise ShareError(f"{what} is the root path: a binding must name a scope or a param.")
    for part in parts:
        check_name(part, f"{what} path component")
    return parts


def _under(path: Path, prefix: Path) -> bool:
    return path[: len(prefix)] == prefix


def _structure(init: Callable[[], Any]) -> Any:
    shapes = jax.eval_shape(init)
    return jax.tree.structure(shapes), [(s.shape, jnp.dtype(s.dtype).name) for s in jax.tree.leaves(shapes)]


class Share(Handler):
    """The handler `fx.share` installs; it holds the bindings, checked once when made.

    `fx.share` is the usual way in. Installed by hand, call the run's
    `finish()` after the block: it raises `ShareError` for bindings that
    matched nothing.

    >>> stored = fx.handlers.LoadParams({"a": {"w": jnp.ones(2)}})
    >>> with fx.handle(stored, fx.handlers.Share({"b": "a"})) as (_, run):
    ...     with fx.scope("b"):
    ...         w = fx.param("w", jax.nn.initializers.zeros, (2,))
    >>> run.finish()
    >>> w
    Array([1., 1.], dtype=float32)
    """

    def __init__(
        self,
        bindings: Mapping[Any, Any] | None = None,
        *,
        tags: Iterable[str] | Mapping[str, Any] | bool | None = None,
        state: StatePolicy = "forbidden",
        strict: bool = True,
    ):
        if state not in _POLICIES:
            raise ShareError(
                f"state={state!r} is not a state sharing policy: use 'forbidden' (tied scopes may "
                "not hold local state), 'allowed' (tied state must agree on structure, shapes and "
                "dtypes) or 'unsafe' (tied state is shared unchecked)."
            )
        if bindings is not None and not isinstance(bindings, Mapping):
            raise ShareError(
                f"share bindings must be a dict {{alias: canonical}}, got {type(bindings).__name__}: "
                "e.g. `fx.share(fn, {'decoder/embed': 'encoder/embed'})`."
            )
        self.state = state
        self.strict = bool(strict)
        self.by_alias: dict[Path, ShareBinding] = {}
        for alias, canonical in (bindings or {}).items():
            binding = ShareBinding(_as_path(alias, "alias"), _as_path(canonical, "canonical"))
            known = self.by_alias.setdefault(binding.alias, binding)
            if known.canonical != binding.canonical:
                raise ShareError(
                    f"alias `{path_str(binding.alias)}` is bound twice, to "
                    f"`{path_str(known.canonical)}` and to `{path_str(binding.canonical)}`: keep one."
                )
        self.all_tags = tags is True
        self.tags: dict[str, Path | None] = {}
        if isinstance(tags, Mapping):
            self.tags = {check_name(t, "shared tag"): _as_path(c, "canonical") for t, c in tags.items()}
        elif isinstance(tags, str):
            self.tags = {check_name(tags, "shared tag"): None}
        elif tags not in (None, False, True):
            if not isinstance(tags, Iterable):
                raise ShareError(
                    f"tags={tags!r} is not a set of tags: pass a list of the `shared=` tags to bind "
                    "(`tags=['embed']`), a dict `{tag: canonical path}`, or `tags=True` for every tag."
                )
            self.tags = {check_name(t, "shared tag"): None for t in tags}
        self._cache: dict[Path, tuple[Path, tuple[ShareBinding, ...], frozenset[Path]]] = {}
        for alias in self.by_alias:
            self.resolve(alias)  # a cycle through an alias itself fails here, not mid-run
        self._check_nested()

    def _check_nested(self) -> None:
        """An alias inside another alias must send its params where the outer binding would."""
        for outer, b1 in self.by_alias.items():
            for inner, b2 in self.by_alias.items():
                if len(outer) < len(inner) and _under(inner, outer):
                    by_outer = self.resolve(b1.canonical + inner[len(outer) :])[0]
                    by_inner = self.resolve(b2.canonical)[0]
                    if by_outer != by_inner:
                        raise ShareError(
                            f"bindings `{b1}` and `{b2}` conflict: `{path_str(inner)}` lies under "
                            f"alias `{path_str(outer)}`, which sends it to `{path_str(by_outer)}`, "
                            f"but its own binding sends it to `{path_str(by_inner)}`. Bind the "
                            f"children of `{path_str(outer)}` one by one instead, or drop one binding."
                        )

    def resolve(self, path: Path) -> tuple[Path, tuple[ShareBinding, ...], frozenset[Path]]:
        """`(final path, bindings applied, aliases matched)`; chains resolve, cycles raise."""
        hit = self._cache.get(path)
        if hit is not None:
            return hit
        applied: list[ShareBinding] = []
        matched: set[Path] = set()
        current = path
        steps = [path]
        while True:
            binding = None
            for i in range(len(current), 0, -1):
                found = self.by_alias.get(current[:i])
                if found is not None:
                    matched.add(found.alias)  # type: ignore[arg-type]
                    binding = binding or found
            if binding is None:
                break
            applied.append(binding)
            current = binding.canonical + current[len(binding.alias or ()) :]
            steps.append(current)
            if binding in applied[:-1]:
                chain = " -> ".join(f"`{path_str(p)}`" for p in steps)
                used = ", ".join(f"`{b}`" for b in dict.fromkeys(applied))
                raise ShareError(
                    f"share bindings form a cycle: {chain} never reaches a path outside every "
                    f"alias (bindings {used}). A tied param must end at one canonical path: "
                    "remove one of these bindings."
                )
        hit = self._cache[path] = (current, tuple(applied), frozenset(matched))
        return hit

    def begin(self) -> _ShareRun:
        return _ShareRun(self, current_path())


class _ActivePasses:
    """The share passes running now, outermost first (a run-local value of the core)."""

    def __init__(self) -> None:
        self.runs: list[_ShareRun] = []


class _ShareRun:
    """One run of a share pass: what matched, and the first request seen at each canonical path."""

    answers = (ParamRequest, LocalStateRequest, GetStateRequest, SetStateRequest)
    # a param it ties is answered with another's value: a lift around the pass creates the params its body
    # makes outside, through it, so the body runs on the tied value (the unrolled loop's)
    moves_params = True

    __slots__ = ("share", "base", "matched", "tags_used", "params", "states", "asked", "passed_on")

    def __init__(self, share: Share, base: Path):
        self.share = share
        self.base = base
        self.matched: set[Path] = set()
        self.tags_used: set[str] = set()
        self.asked: set[Path] = set()  # every path the model asked for (a canonical asked directly is a tie)
        self.passed_on: set[ShareBinding] = set()  # bindings whose canonical a request left again (a chain)
        self.params: dict[Path, ParamRequest] = {}
        self.states: dict[tuple[str, Path], LocalStateRequest] = {}

    def handle(self, request: Any, forward: Any) -> Any:
        kind = type(request)
        if kind is ParamRequest:
            return forward(self.param(request))
        if kind is LocalStateRequest:
            return forward(self.declare(request))
        if (kind is GetStateRequest or kind is SetStateRequest) and self.share.state != "forbidden":
            path, applied, _ = self.share.resolve(request.path)
            if applied:  # where its declaration went, through the passes nested inside this one too
                request = dataclasses.replace(request, path=self._through_inner_passes(path)[0])
        return forward(request)

    def _move(self, request: Any, tag_binding: ShareBinding | None) -> tuple[Path, tuple[ShareBinding, ...]]:
        """Where `request` goes, and the bindings that send it there; records what matched."""
        start = request.path if tag_binding is None else tag_binding.canonical
        path, applied, matched = self.share.resolve(start)
        self.asked.add(request.path if request.origin is None else request.origin)
        if matched:
            self.matched.update(matched)
        for asked in (request.origin, request.path if tag_binding else None):
            if asked is not None:  # a binding counts as matched on the path the model asked for too
                self.matched.update(self.share.resolve(asked)[2])
        if applied:  # a share pass inside this one was passed already: send the result through its bindings too
            path, more = self._through_inner_passes(path)
            applied += more
            # every binding but the last sent the request on (a chain); after a tag, the tag made the tie
            self.passed_on.update(applied if tag_binding else applied[:-1])
        return path, ((tag_binding,) if tag_binding else ()) + applied

    def _through_inner_passes(self, path: Path) -> tuple[Path, tuple[ShareBinding, ...]]:
        """`fx.share(fx.share(f, {"b": "a"}), {"c": "b"})` ties `c` to `a`: a path this (outer) pass moved is
        resolved again by the passes nested inside it, until none moves it; a cycle across passes raises."""
        passes = run_local(_ActivePasses).runs
        inner = passes[passes.index(self) + 1 :] if self in passes else []
        applied: tuple[ShareBinding, ...] = ()
        seen = {path}
        moved = True
        while moved:
            moved = False
            for run in inner:
                to, more, matched = run.share.resolve(path)
                if more:
                    run.matched.update(matched)
                    applied, path, moved = applied + more, to, True
                    if path in seen:
                        raise ShareError(
                            f"nested share passes form a cycle at `{path_str(path)}` (bindings "
                            f"{', '.join(f'`{b}`' for b in applied)}): remove one of these bindings."
                        )
                    seen.add(path)
        return path, applied

    def param(self, request: ParamRequest) -> ParamRequest:
        tag_binding = None
        tag = request.shared
        if tag is not None and (self.share.all_tags or tag in self.share.tags):
            self.tags_used.add(tag)
            if request.unbound_tag is not None:
                target = self.share.tags.get(tag) or self.base + (tag,)
                tag_binding = ShareBinding(None, target, tag)
        path, applied = self._move(request, tag_binding)
        if applied:
            request = dataclasses.replace(request, path=path, origin=request.original_path, via=request.via + applied)
        first = self.params.setdefault(path, request)
        if first is not request and (first.shape != request.shape or first.dtype != request.dtype):
            if first.original_path != request.original_path:
                # the alias is the one a binding moved (whichever the model asked for first)
                alias, canonical = (first, request) if first.via and not request.via else (request, first)
                binding = (alias.via or canonical.via)[-1]
                raise ShareError(
                    f"share binding `{binding}` ties param `{path_str(alias.original_path)}` "
                    f"({alias.spec()}) to `{path_str(canonical.original_path)}` ({canonical.spec()}) at "
                    f"`{path_str(path)}`, but tied params must have one shape and dtype. Make the two "
                    f"layers the same {'size' if first.shape != request.shape else 'dtype'}, or drop the "
                    "binding." + stacked_hint(first, request)
                )
        return request

    def declare(self, request: LocalStateRequest) -> LocalStateRequest:
        path, applied = self._move(request, None)
        if applied:
            origin = request.path if request.origin is None else request.origin
            if self.share.state == "forbidden":
                raise ShareError(
                    f"binding `{applied[0]}` would tie {request.describe()} to `{path_str(path)}`, "
                    "but local state sharing is 'forbidden' (the default). Pass "
                    "`fx.share(..., state='allowed')` to share it (both uses must agree on its "
                    "structure), `state='unsafe'` to share it unchecked, or bind the tied layer's "
                    "params one by one so its state stays separate."
                )
            if getattr(request.init, "from_lifted_body", False):
                raise ShareError(
                    f"binding `{applied[0]}` would tie {request.describe()}, declared inside a lifted transform "
                    f"(fx.scan / fx.vmap / fx.remat), to `{path_str(path)}` from a `fx.share` pass around that "
                    "transform. The lifted body keeps each declared variable apart, so reads and writes of the "
                    "tied uses inside it would not see each other. Apply the pass inside the body, "
                    "`fx.scan(fx.share(body, bindings, state=...), ...)`, or tie only the params."
                )
            request = dataclasses.replace(request, path=path, origin=origin, via=request.via + applied)
        key = (request.collection, path)
        first = self.states.setdefault(key, request)
        if first is not request and self.share.state == "allowed":
            a = first.path if first.origin is None else first.origin
            b = request.path if request.origin is None else request.origin
            if a != b and _structure(first.init) != _structure(request.init):
                raise ShareError(
                    f"state `{path_str(b)}` is tied to `{path_str(a)}` at `{path_str(path)}` in "
                    f"collection {request.collection!r}, but their `init()` make different "
                    f"structures: {_structure(request.init)[1]} vs {_structure(first.init)[1]}. "
                    "With state='allowed' tied state must agree; make them agree, or use "
                    "state='unsafe' to keep the first one."
                )
        return request

    def finish(self) -> None:
        """Raise `ShareError` for bindings and tags that matched nothing in this run, and, in a run
        that creates variables, for a binding whose canonical path the model never asks for."""
        if not self.share.strict:
            return
        unmatched = [str(b) for a, b in self.share.by_alias.items() if a not in self.matched]
        unmatched += [f"shared={t!r}" for t in self.share.tags if t not in self.tags_used]
        if not unmatched:
            self._check_canonicals()
            return
        asked = [r.original_path for r in self.params.values()]
        asked += [r.path if r.origin is None else r.origin for r in self.states.values()]
        seen = sorted({path_str(p[:i]) for p in asked for i in range(1, len(p) + 1)})
        hints = []
        for b in self.share.by_alias.values():
            if str(b) in unmatched:
                under = path_str(self.base + (b.alias or ()))
                if self.base and under in seen:  # written relative to where `fx.share` is called
                    hints.append(
                        f"Bindings name paths from the root, and this pass runs at `{path_str(self.base)}`: "
                        f"write `{under}` -> `{path_str(self.base + b.canonical)}`."
                    )
                    continue
                near = difflib.get_close_matches(path_str(b.alias or ()), seen, n=2, cutoff=0.6)
                if near:
                    hints.append(f"For `{path_str(b.alias or ())}`, did you mean {' or '.join(repr(n) for n in near)}?")
        raise ShareError(
            f"share binding(s) {', '.join(f'`{u}`' for u in unmatched)} matched nothing in this run: "
            "no param or state lies under that alias (or carries that tag). "
            + (" ".join(hints) + " " if hints else "")
            + "Fix the path or tag, or pass `strict=False` to `fx.share` when some runs skip that part "
            "of the model."
        )

    def _check_canonicals(self) -> None:
        """A binding whose canonical path the model never asks for renames its alias instead of tying it.

        The canonical counts as asked when a request asked under it (not under the alias), or
        when the requests sent there go on to another path (a chain, through this pass, a pass
        inside it, or one around it). Checked only in a run that creates variables: an apply that
        runs only the alias's part of the model (a decode method) reads the canonical entry.
        """
        active = run_local(_ActivePasses)
        if active is None:  # `finish()` called by hand after the block: no run to ask whether it initialized
            return
        suspects = [
            b for b in self.share.by_alias.values()
            if b not in self.passed_on
            and not any(_under(p, b.canonical) and not _under(p, b.alias or ()) for p in self.asked)
        ]
        if suspects:
            around = [run for run in active.runs if run is not self]
            suspects = [b for b in suspects if not any(run.share.resolve(b.canonical)[1] for run in around)]
        # the mode last: asking it is a request (seen by inventories), sent only when a binding is suspect
        if not suspects or not is_initializing():
            return
        aliases = [b.alias for b in self.share.by_alias.values() if b.alias is not None]
        scopes = {p[:i] for p in self.asked for i in range(1, len(p) + 1)}
        scopes = {q for q in scopes if not any(_under(q, a) for a in aliases)}
        lines = []
        for b in suspects:
            alike = [q for q in scopes if len(q) == len(b.canonical)] or scopes
            near = nearest(b.canonical, alike, n=2)
            lines.append(
                f"`{b}`: nothing asks for `{path_str(b.canonical)}` but the alias, so the params under "
                f"`{path_str(b.alias or ())}` are created there, under a new name"
                + (f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else "")
                + "."
            )
        raise ShareError(
            f"share binding(s) tie nothing in this run, they rename: {' '.join(lines)} A canonical "
            "path must be one the model uses itself: fix it (`fx.share(fn, {alias: path the model "
            "asks for})`), or pass `strict=False` to `fx.share` when this run skips the canonical's "
            "part of the model (an init of one method)."
        )


def share(
    fn: Callable[..., Any],
    bindings: Mapping[Any, Any] | None = None,
    *,
    tags: Iterable[str] | Mapping[str, Any] | bool | None = None,
    state: StatePolicy = "forbidden",
    strict: bool = True,
) -> Callable[..., Any]:
    """Tie weights without touching the model: `fn` runs with alias paths answered at canonical ones.

    `bindings` maps an alias path to a canonical path (`"a/b"` or a tuple of
    names), for a whole sub-scope (a tied layer) or one param (a tied param);
    chains resolve. `tags` binds params declared `fx.param(..., shared=tag)`:
    a list (or `True`: every tag) puts each at `<path of this call>/<tag>`, a
    dict `{tag: path}` where you say. `state` says whether local state under an
    alias is refused (`"forbidden"`), shared when both uses agree on its
    structure (`"allowed"`), or shared unchecked (`"unsafe"`); random keys and
    sows are never tied. A binding that matches nothing in a run raises
    `ShareError` (unless `strict=False`), as do cycles, conflicting bindings,
    tied params that disagree on shape or dtype, and, under `init`, a
    canonical path the model never asks for itself (a typo there would rename
    the alias's params instead of tying them). `fn` may be an `fx.nn.Module`:
    `fx.transform(fx.share(module, ...))` runs it at the root scope, as
    `fx.transform(module)` does.

    >>> def model(x):
    ...     with fx.scope("encoder"):
    ...         e = fx.param("w", jax.nn.initializers.ones, (2, 2))
    ...     with fx.scope("decoder"):
    ...         d = fx.param("w", jax.nn.initializers.ones, (2, 2))
    ...     return x @ e @ d.T
    >>> t = fx.transform(fx.share(model, {"decoder": "encoder"}))
    >>> jax.tree.map(jnp.shape, t.init(jax.random.key(0), jnp.ones(2)))
    {'params': {'encoder': {'w': (2, 2)}}}
    """
    if not callable(fn) or getattr(type(fn), "_effax_discharged", False):
        raise EffaxError(
            f"`fx.share` takes the effectful model function, got {type(fn).__name__}. Share inside "
            "the transform: `fx.transform(fx.share(fn, bindings))`."
        )
    handler = Share(bindings, tags=tags, state=state, strict=strict)

    def run(call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        with handle(handler) as (run,):
            active = run_local(_ActivePasses).runs
            active.append(run)
            try:
                out = call(*args, **kwargs)
            finally:
                active.remove(run)
        run.finish()
        return out

    if getattr(type(fn), "_effax_at_root", None) is not None:  # a module
        return _SharedModule(fn, run)

    @functools.wraps(fn)
    def shared(*args: Any, **kwargs: Any) -> Any:
        return run(fn, args, kwargs)

    return shared


class _SharedModule:
    """`fx.share(module, ...)`: called, the module under the pass; given to `fx.transform`, the module at
    the root scope under it, as `fx.transform(module)` runs it (its layers `enc/...`, not
    `Seq2Seq_0/enc/...`, so linen variables load). Its other methods are the module's (`method="encode"`)."""

    def __init__(self, module: Any, run: Callable[..., Any]):
        self.module, self.run = module, run
        functools.update_wrapper(self, module, updated=())  # the module's signature, for argument checks

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(self.module, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "module":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)

    def _effax_at_root(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        at_root = type(self.module)._effax_at_root(self.module, self.module if fn is self else fn)
        return functools.wraps(at_root)(lambda *args, **kwargs: self.run(at_root, args, kwargs))
