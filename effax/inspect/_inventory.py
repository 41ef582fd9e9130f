"""The effect inventory: every request a model performs, found by running it abstractly.

`fx.effects_of` is effax's analog of Penzai's `free_effect_types`: it answers
"what does this model ask for?" without allocating a single parameter, and it
is the basis of summaries (param counts, state, streams, tied weights).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from effax.core import EffaxError, Path, Request, path_str
from effax.discharge import MultiTransformed, Transformed, transform
from effax.discharge._transform import refuse_module_class
from effax.effects import ModuleCallRequest
from effax.handlers._random import looks_like_key
from effax.inspect._abstract import run_abstractly


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One request a model performed: its kind, where it went, and what it carries.

    `path` is where the request was answered (for a tied param, the canonical
    path); `origin` is where the model asked when a `fx.share` pass moved it,
    and `binding` names the binding(s) that did. `shape`/`dtype` describe the
    param, the state value, the drawn key or the sown value when it is one
    array (else None); `structure` keeps the whole abstract value.
    `by_handler` is True when one of the `handlers=` given answered the
    request itself, so it never reached effax's own (a param a handler
    serves, a side input): such a param or state is in no variables tree.

    >>> def model(x):
    ...     with fx.scope("dense"):
    ...         return x * fx.param("w", jax.nn.initializers.ones, (3,))
    >>> e = fx.effects_of(model, jnp.ones(3))[0]
    >>> e.kind, e.name, e.shape, e.dtype, e.collection
    ('param', 'dense/w', (3,), dtype('float32'), 'params')
    """

    kind: str
    path: Path
    shape: tuple[int, ...] | None = None
    dtype: Any = None
    collection: str | None = None
    stream: str | None = None
    tag: str | None = None
    origin: Path | None = None
    binding: str | None = None
    by_handler: bool = False
    structure: Any = dataclasses.field(default=None, repr=False, compare=False)
    request: Request | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        """The path as one string, `encoder/dense/kernel`."""
        return path_str(self.path)

    @property
    def size(self) -> int | None:
        """Number of elements of the array (None when it is not one array)."""
        return None if self.shape is None else math.prod(self.shape)


class Inventory(list):
    """What `fx.effects_of` returns: a list of `RequestRecord`s, in request order, that prints as a table.

    (A record of a request, not an "effect": in effax an effect is the protocol a
    request follows, `LocalStateEffect`, `RandomEffect`, ...)

    >>> def model(x):
    ...     return x * fx.param("w", jax.nn.initializers.ones, (3,))
    >>> fx.effects_of(model, jnp.ones(3))
    kind   path  shape  dtype    collection/stream  shared via
    param  w     (3,)   float32  params
    """

    def of_kind(self, *kinds: str) -> Inventory:
        """The effects of the given kinds (`"param"`, `"state"`, `"key"`, ...)."""
        return Inventory(e for e in self if e.kind in kinds)

    def table(self) -> str:
        header = ("kind", "path", "shape", "dtype", "collection/stream", "shared via")
        rows = [header] + [_row(e) for e in self]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()

    __str__ = __repr__


def dtype_name(dtype: Any) -> str:
    """`float32`, a key dtype's name, or "" for no dtype: how tables print a dtype."""
    return "" if dtype is None else getattr(dtype, "name", str(dtype))


def _row(e: RequestRecord) -> tuple[str, ...]:
    shape = "" if e.shape is None else str(e.shape)
    dtype = dtype_name(e.dtype)
    where = e.collection or e.stream or ""
    if e.tag is not None and e.kind in ("sow", "side_input"):
        where = f"{where}:{e.tag}" if where else e.tag
    via = ""
    if e.binding is not None:
        via = f"{e.binding} (asked at {path_str(e.origin or ())})"
    elif e.kind == "param" and e.tag is not None:
        via = f"shared={e.tag!r} (unbound)"
    return (e.kind, e.name, shape, dtype, where, via)


def _spec(x: Any) -> Any:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    if isinstance(x, (bool, int, float, complex)):
        return jax.ShapeDtypeStruct((), jnp.result_type(x))
    return x


def _abstract(value: Any) -> tuple[Any, tuple[int, ...] | None, Any]:
    """`(structure, shape, dtype)` of a value; shape and dtype only when it is one array."""
    structure = jax.tree.map(_spec, value)
    if isinstance(structure, jax.ShapeDtypeStruct):
        return structure, structure.shape, _dtype(structure.dtype)
    return structure, None, None


def _dtype(dtype: Any) -> Any:
    """A numpy dtype (compares equal to its name: `np.dtype("float32") == "float32"`); key dtypes as they are."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return dtype
    return jnp.dtype(dtype)


def _effect(request: Any, answer: Any, by_handler: bool = False) -> RequestRecord:
    kind = request.kind
    fields: dict[str, Any] = {}
    if kind == "param":
        fields = dict(
            shape=request.shape,
            dtype=_dtype(request.dtype),
            collection="params",
            tag=request.shared,
            structure=request.as_empty(),
        )
    elif kind == "state":
        structure, shape, dtype = _abstract(jax.eval_shape(request.init))
        fields = dict(structure=structure, shape=shape, dtype=dtype, collection=request.collection)
    elif kind in ("get", "set", "sow", "side_input", "key", "stream_key"):
        value = request.value if kind in ("set", "sow") else answer
        structure, shape, dtype = _abstract(value)
        fields = dict(structure=structure, shape=shape, dtype=dtype)
        fields["collection"] = getattr(request, "collection", None)
        fields["stream"] = getattr(request, "stream", None)
        fields["tag"] = getattr(request, "tag", None)
    via = getattr(request, "via", ()) if kind in ("param", "state") else ()
    if via:
        fields["origin"] = request.origin
        fields["binding"] = " ; ".join(str(b) for b in via)
    return RequestRecord(kind, request.path, by_handler=by_handler, request=_detached(request), **fields)


def _made_in_a_lift(*args: Any) -> Any:
    raise EffaxError(
        "this recorded param was made inside a lifted transform (fx.scan / fx.vmap / fx.remat) during the "
        "abstract run of `fx.summary`/`fx.effects_of`, whose values do not outlive it; its value is what "
        "`t.init` makes."
    )


def _detached(request: Any) -> Any:
    """The request as a record keeps it: the abstract run's values (a set or sown value, a value a lift made
    for a param's initializer) become their shapes, as a traced value kept past its trace is a leak (law 8)."""
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(request):
        value = getattr(request, field.name)
        if field.name == "init" and getattr(value, "from_lifted_body", False):
            changes["init"] = _made_in_a_lift
        elif any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value)):
            changes[field.name] = jax.tree.map(lambda x: _spec(x) if isinstance(x, jax.core.Tracer) else x, value)
    return dataclasses.replace(request, **changes) if changes else request


class _Inventory:
    """Record every request once: what the model asks (innermost) and what handlers create (inside storage).

    The inner run records what the model performs, as answered; the outer run,
    just inside the storage handlers, records requests that did not pass the
    inner one, e.g. the params an interceptor (a LoRA adapter) creates, so
    the inventory matches the tree `init` returns under the same handlers.
    """

    def __init__(self) -> None:
        self.effects = Inventory()
        self.recorded = 0  # requests the outer run recorded so far


class _ModelRequests:
    # It only watches: inside a lifted body, params, state, keys and sows pass it to the next run out, so an
    # interceptor outside it (`handlers=[LoRA]`) still runs inside the body, as under `t.init`. A request an
    # interceptor answers itself there is shown to it inside the body: listed `by_handler`, with the shape
    # one iteration sees.
    passes_lifted_requests = True

    def __init__(self, inventory: _Inventory):
        self.inventory = inventory

    def keeps(self, collection: str) -> bool:  # it lists sows, and keeps none (`fx.cond` asks)
        return False

    def begin(self) -> _ModelRequests:
        return _ModelRequests(self.inventory)  # a run of its own: lifted transforms show it stacked requests

    def handle(self, request: Any, forward: Any) -> Any:
        if type(request) is ModuleCallRequest:  # calls are not effects: what they request is recorded
            return forward(request)
        inv = self.inventory
        before = inv.recorded
        answer = forward(request)
        if inv.recorded == before:  # answered before reaching storage: record it here
            inv.effects.append(_effect(request, answer, by_handler=True))
        return answer


class _StoredRequests:

    def __init__(self, inventory: _Inventory):
        self.inventory = inventory

    def keeps(self, collection: str) -> bool:  # it lists sows, and keeps none (`fx.cond` asks)
        return False

    def begin(self) -> _StoredRequests:
        return _StoredRequests(self.inventory)

    def handle(self, request: Any, forward: Any) -> Any:
        answer = forward(request)
        if type(request) is ModuleCallRequest:
            return answer
        self.inventory.effects.append(_effect(request, answer))
        self.inventory.recorded += 1
        return answer


def _transformed(fn: Any, what: str, call: str = "fx.effects_of") -> Transformed:
    """The `Transformed` whose `init` a summary runs: `fn` itself, a `fx.multi_transform`'s template, or
    `fx.transform(fn)` of an effectful function; anything else (a module class too) is refused, by `call`."""
    if isinstance(fn, Transformed):
        return fn
    if isinstance(fn, MultiTransformed):
        return fn.init.__self__  # its `init` is the template's `Transformed.init`
    if not callable(fn):
        raise EffaxError(
            f"{what} take a model: what `fx.transform` or `fx.multi_transform` returned, or the effectful "
            f"function; got {type(fn).__name__}."
        )
    refuse_module_class(fn, call, f"{call}({{}}, x)")
    return transform(fn)


def check_arguments(
    t: Transformed, method: Any, args: tuple, kwargs: dict, call: str, usage: str | None = None
) -> None:
    """Refuse arguments the model's entry point cannot take, before running it: `fx.summary(t, key, x)`
    (`t.init`'s habit, a key first) was a raw `model() takes 1 positional argument but 2 were given`.
    `usage` is the right call (`fx.summary(t, x)` by default)."""
    entry = t._entry(method)
    try:
        signature = inspect.signature(entry)
    except (TypeError, ValueError):  # no signature to read: the call itself will say
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        key = (" Its first argument is a key, as `t.init(key, x)` takes: drop it; pass `rngs=key` if the draws "
               "should use it.") if args and looks_like_key(args[0]) else ""
        raise EffaxError(
            f"{call}: the model `{getattr(entry, '__name__', type(entry).__name__)}` cannot take these arguments "
            f"({e}). {call} takes the model's own arguments, `{usage or call + '(t, x)'}`, as "
            "`t.apply(variables, x)` passes "
            f"them, with no key (a dummy key serves every stream).{key}"
        ) from None


def effects_of(
    fn: Callable[..., Any] | Transformed | MultiTransformed,
    /,
    *args: Any,
    rngs: Any = None,
    training: bool = False,
    handlers: Any = (),
    mutable: Any = True,
    capture_intermediates: bool | Callable[[Any, str], bool] = False,
    method: Any = None,
    **kwargs: Any,
) -> Inventory:
    """Every request `fn(*args, **kwargs)` performs, found without allocating any parameter.

    The model runs under `jax.eval_shape` as `t.init` runs it, with the same
    options (`training`, `handlers=` with presets and interceptors,
    `capture_intermediates`, `method`), so it refuses what `init` refuses and
    the params those handlers create are listed too. `mutable` is `init`'s,
    except that its default, True, also collects every sow. Arrays and
    `jax.ShapeDtypeStruct`s in the arguments are traced, other values (Python
    numbers, flags) stay static. Without `rngs`, a dummy key serves every
    stream. Lifted transforms inside are traced once each (abstract mode).
    A request one of the `handlers=` answers itself (a param it serves) is
    marked `by_handler`: it is in no variables tree.

    >>> def model(x):
    ...     with fx.scope("dense"):
    ...         w = fx.param("kernel", jax.nn.initializers.ones, (x.shape[-1], 2))
    ...     fx.sow("h", x @ w)
    ...     return x @ w
    >>> effects = fx.effects_of(model, jax.ShapeDtypeStruct((4, 3), jnp.float32))
    >>> [(e.kind, e.name, e.tag, e.shape) for e in effects]
    [('param', 'dense/kernel', None, (3, 2)), ('sow', '<root>', 'h', (4, 2))]
    >>> sum(e.size for e in effects.of_kind("param"))
    6
    """
    t = _transformed(fn, "`fx.summary` and `fx.effects_of`")
    return inventory_of(
        t, args, kwargs, "fx.effects_of", rngs=rngs, training=training, handlers=handlers, mutable=mutable,
        capture_intermediates=capture_intermediates, method=method,
    )


def inventory_of(t: Transformed, args: tuple, kwargs: dict, call: str, **options: Any) -> Inventory:
    """`fx.effects_of` of a `Transformed` whose arguments `call` (`fx.summary` or `fx.effects_of`) checks."""
    check_arguments(t, options["method"], args, kwargs, call)
    inventory = _Inventory()

    def run(*a: Any, **k: Any) -> None:
        t._run_init(
            call, a, k, **options, around=_StoredRequests(inventory), inside=_ModelRequests(inventory),
            default_rngs=jax.random.key(0),
        )

    run_abstractly(run, *args, learn_only=True, **kwargs)
    return inventory.effects
