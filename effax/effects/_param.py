"""The param effect: a named, initialized, trainable array (Penzai's uninitialized parameter)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from effax.core import (
    EffaxError,
    InvalidNameError,
    Path,
    Request,
    ShapeMismatchError,
    check_name,
    current_path,
    path_now,
    path_str,
    send,
)

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def shape_dtype(value: Any) -> tuple[tuple[int, ...], Any]:
    """`(shape, canonical dtype)` of an array, tracer or Python scalar."""
    shape = getattr(value, "shape", None)
    if shape is None:
        value = jnp.asarray(value)
        shape = value.shape
    return tuple(shape), jax.dtypes.canonicalize_dtype(value.dtype)


class UninitializedParamError(EffaxError):
    """The value of a param request was read before any handler gave it one (Penzai's error).

    >>> r = fx.ParamRequest(("dense", "bias"), jax.nn.initializers.zeros, (3,), jnp.float32)
    >>> r.value
    Traceback (most recent call last):
    effax.UninitializedParamError: param `dense/bias` (shape (3,), float32) is a request, not a value: ...
    >>> r.initialize(jax.random.key(0))  # a value built without a handler
    Array([0., 0., 0.], dtype=float32)
    """



@dataclasses.dataclass(frozen=True)
class ParamRequest(Request):
    """Ask for the param at `path`: its initializer, shape, dtype and logical `axes`.

    It doubles as Penzai's uninitialized parameter: `initialize(key)`,
    `initialize_with_value(value)` and `as_empty()` build its value without
    any handler, and reading `value` raises `UninitializedParamError`.
    `shared` is the tag of `fx.param(..., shared=tag)`; a `fx.share` pass that
    moves the request to another path keeps where the model asked in `origin`
    and the bindings that moved it in `via`.

    >>> import jax, jax.numpy as jnp
    >>> r = fx.ParamRequest(("dense", "bias"), jax.nn.initializers.zeros, (3,), jnp.float32)
    >>> r.as_empty()
    ShapeDtypeStruct(shape=(3,), dtype=float32)
    >>> r.initialize(jax.random.key(0))
    Array([0., 0., 0.], dtype=float32)
    """

    kind: ClassVar[str] = "param"  # the one name of this request, in errors, tables and the testing kit
    effect: ClassVar[str] = "param"  # the effect (family of requests) it belongs to

    init: Initializer
    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...] | None = None
    shared: str | None = None
    origin: Path | None = None
    via: tuple[Any, ...] = ()

    hint: ClassVar[str] = (
        "discharge the model with `t = fx.transform(fn)` and call `t.init(key, ...)` or "
        "`t.apply(variables, ...)`, or install a params handler: "
        "`with fx.handle(fx.handlers.LoadParams(variables['params'])): ...`."
    )

    def describe(self) -> str:
        moved = f", asked at `{path_str(self.origin)}`" if self.origin is not None else ""
        return f"param `{path_str(self.path)}` ({self.spec()}{moved})"

    def spec(self) -> str:
        return f"shape {self.shape}, {jnp.dtype(self.dtype).name}"

    # --- Penzai's uninitialized-parameter API
    @property
    def name(self) -> str:
        """The full path as one string, `encoder/dense/kernel`."""
        return path_str(self.path)

    @property
    def initializer(self) -> Initializer:
        return self.init

    @property
    def original_path(self) -> Path:
        """Where the model asked for this param, before any `fx.share` pass moved it."""
        return self.path if self.origin is None else self.origin

    @property
    def unbound_tag(self) -> str | None:
        """The `shared=` tag, unless a `fx.share` pass already bound it."""
        tag = self.shared
        if tag is None or any(getattr(b, "tag", None) == tag for b in self.via):
            return None
        return tag

    @property
    def value(self) -> Any:
        """Always raises: a request has no value until a handler answers it (Penzai's rule)."""
        raise UninitializedParamError(
            f"{self.describe()} is a request, not a value: it has none until a handler answers "
            "it. Run the model under `fx.transform(fn).init`/`apply`, or build a value yourself "
            "with `request.initialize(key)` or `request.initialize_with_value(array)`."
        )

    @property
    def value_structure(self) -> jax.ShapeDtypeStruct:
        """What `initialize` would return, computed abstractly (no memory allocated)."""
        return jax.eval_shape(lambda k: self.init(k, self.shape, self.dtype), jax.random.key(0))

    def as_empty(self) -> jax.ShapeDtypeStruct:
        """The declared shape and dtype, without running the initializer."""
        return jax.ShapeDtypeStruct(self.shape, self.dtype)

    def initialize(self, key: jax.Array) -> jax.Array:
        """Run the initializer on `key` as given, and check it made the declared shape and dtype."""
        try:
            value = self.init(key, self.shape, self.dtype)
        except TypeError as e:
            raise self.init_error(e) from None
        self._check(value, "its initializer returned", strict_dtype=True)
        if not isinstance(value, jax.Array):  # a NumPy array or number: stored as a JAX array of the declared
            value = jnp.asarray(value, self.dtype)  # dtype, as `jit(t.init)` stores it (float64 is float32)
        return value

    def init_error(self, error: TypeError) -> Exception:
        """What a `TypeError` from calling the initializer means: an `EffaxError` when `init` cannot take
        `(key, shape, dtype)` at all (a Haiku-style `init(shape, dtype)`), else the error itself."""
        try:
            inspect.signature(self.init).bind(None, self.shape, self.dtype)
            return error
        except TypeError:
            pass
        except ValueError:  # no signature to read (a builtin)
            return error
        return EffaxError(
            f"param `{self.name}`: its initializer {getattr(self.init, '__name__', type(self.init).__name__)} "
            f"cannot be called as `init(key, shape, dtype)`, as `fx.param` calls it ({error}). A Haiku-style "
            "`init(shape, dtype)` takes the key first in effax: `lambda key, shape, dtype: ...`, or use "
            "`jax.nn.initializers`."
        )

    def initialize_with_value(
        self, value: Any, check_structure: bool = True, strict_dtype: bool = True
    ) -> Any:
        """Use `value` as this param's value, checked against the declared shape and dtype."""
        if check_structure:
            self._check(value, "the given value has", strict_dtype=strict_dtype)
        return value

    def _check(self, value: Any, what: str, strict_dtype: bool) -> None:
        if not hasattr(value, "shape") and not isinstance(value, (bool, int, float, complex)):
            raise ShapeMismatchError(
                f"param `{self.name}` is declared as one array ({self.spec()}), but {what} a "
                f"{type(value).__name__}. Pass an array of that shape and dtype."
            )
        shape, dtype = shape_dtype(value)
        if shape != self.shape or (strict_dtype and dtype != self.dtype):
            raise ShapeMismatchError(
                f"param `{self.name}` is declared with {self.spec()}, but {what} shape {shape}, "
                f"{jnp.dtype(dtype).name}. Make the value match the declaration, or change the "
                "shape/dtype passed to `fx.param`."
            )


_FLOAT32 = jnp.dtype(jnp.float32)


@functools.lru_cache(maxsize=256)
def canonical_dtype(dtype: Any) -> Any:
    """`jax.dtypes.canonicalize_dtype`, memoized: it runs on every `fx.param`."""
    return jax.dtypes.canonicalize_dtype(dtype)


def canonical_shape(shape: Any, name: str) -> tuple[int, ...]:
    """`shape` as a tuple of non-negative ints; a bare int is one dimension.

    Each dimension goes through `operator.index`, so ints and NumPy ints pass
    and a float (`2.5`), a string (`"ab"`, `"4"`) or a bool is refused, never
    truncated or split into characters.
    """
    one = isinstance(shape, str) or not hasattr(shape, "__iter__") or getattr(shape, "ndim", None) == 0
    given = (shape,) if one else shape
    try:
        dims = tuple(map(operator.index, given))
    except TypeError:
        dims = None
    if dims is None or isinstance(shape, str) or bool in map(type, given) or (dims and min(dims) < 0):
        raise ShapeMismatchError(
            f"param `{path_str(current_path() + (name,))}`: shape must be a tuple of non-negative ints, "
            f"got {shape!r} "
            f"({type(shape).__name__}). Pass e.g. `fx.param({name!r}, init, (3, 4))`; sizes read from "
            "config or strings need `int(...)` first."
        )
    return dims


def is_axis(a: Any) -> bool:
    """One dimension's logical axis: None (replicated), a non-empty name, or a non-empty tuple of names (a
    dimension split over several); what `fx.param(axes=...)` takes and `fx.from_flax`/`from_nnx` keep."""
    return a is None or (type(a) is str and a != "") or (
        type(a) is tuple and len(a) > 0 and all(type(n) is str and n != "" for n in a)
    )


def check_axes(axes: Any, shape: tuple[int, ...] | None, where: str) -> tuple[Any, ...]:
    """`axes` of `fx.param(..., shape, axes=axes)` (or `fx.local_state`) as a tuple; an error naming `where`
    (the variable) if not. A str or a bad entry raises `InvalidNameError`, a wrong count (for a known
    `shape`) `ShapeMismatchError`.

    Each entry is a non-empty name, None (replicated), or a non-empty tuple of
    names: a dimension split over several, as a `PartitionSpec` entry splits
    one over several mesh axes (`fx.sharding` maps them name by name).
    """
    fix = "Give one logical name (or None) per dimension, e.g. `axes=('embed', 'mlp')`"
    if isinstance(axes, str) or not hasattr(axes, "__iter__"):
        one = f" (`axes=({axes!r},)` for one dimension)" if isinstance(axes, str) else ""
        raise InvalidNameError(
            f"{where}: `axes` must be a tuple of names, got {type(axes).__name__} {axes!r:.40}. {fix}{one}."
        )
    axes = tuple(axes)
    for a in axes:
        if is_axis(a):
            continue
        what = "an empty name ''" if a == "" else f"{type(a).__name__} {a!r:.40}"
        raise InvalidNameError(
            f"{where}: `axes={axes!r:.80}` holds {what}; each entry is a non-empty str, None (replicated), "
            f"or a tuple of names (one dimension split over several). {fix}."
        )
    if shape is not None and len(axes) != len(shape):
        raise ShapeMismatchError(
            f"{where} has {len(shape)} dims {shape} but {len(axes)} logical axes {axes}: "
            "give one axis name (or None) per dimension."
        )
    return axes


def param(
    name: str,
    init: Initializer,
    shape: tuple[int, ...],
    dtype: Any = jnp.float32,
    *,
    axes: tuple[str | None, ...] | None = None,
    shared: str | None = None,
) -> jax.Array:
    """Request the param `name` at the current path; `init(key, shape, dtype)` makes it under init.

    `axes` names each dimension for `fx.sharding`: a non-empty str, None
    (replicated), or a tuple of names for a dimension split over several
    (`(("data", "model"), None)`, Flax's `nn.with_partitioning` spelling).

    `shared=tag` declares the param shareable, as Penzai's `mark_shareable`:
    every use with the same tag becomes one param once a `fx.share(fn,
    tags=...)` pass binds the tag; unbound, two uses at different paths raise
    `ParamConflictError`.

    >>> def f(x):
    ...     w = fx.param("w", jax.nn.initializers.ones, (2,))
    ...     return x * w
    >>> t = fx.transform(f)
    >>> t.init(jax.random.key(0), 1.0)["params"]["w"]
    Array([1., 1.], dtype=float32)
    """
    if type(name) is not str or not name or "/" in name:
        check_name(name, "param")  # raises
    if not callable(init):
        raise EffaxError(
            f"param `{path_str(current_path() + (name,))}`: `init` must be a function "
            "`init(key, shape, dtype) -> array`, got "
            f"{type(init).__name__} {init!r:.40}. Pass an initializer: `jax.nn.initializers.zeros`, "
            "or `jax.nn.initializers.constant(value)` for a fixed starting value."
        )
    if shared is not None:
        check_name(shared, "shared tag")
    if type(shape) is tuple:  # the usual case, checked inline: it runs on every `fx.param`
        for d in shape:
            if type(d) is not int or d < 0:  # (a bool is not an int here, so `(True,)` is refused)
                shape = canonical_shape(shape, name)
                break
    else:
        shape = canonical_shape(shape, name)
    if axes is not None:  # checked inline, as the shape: a helper runs only for a tuple entry or a mistake
        unusual = type(axes) is not tuple or len(axes) != len(shape)
        for a in () if unusual else axes:
            if (type(a) is not str or not a) and a is not None:
                unusual = True
                break
        if unusual:
            axes = check_axes(axes, shape, f"param `{path_str(current_path() + (name,))}`")
    if dtype is jnp.float32:
        dtype = _FLOAT32
    else:
        try:
            dtype = canonical_dtype(dtype)
        except TypeError:  # not a dtype: `"flaot32"`
            raise EffaxError(
                f"param `{path_str(current_path() + (name,))}`: dtype={dtype!r} is not a dtype JAX knows. "
                "Pass one such as `jnp.float32`, `jnp.bfloat16` or `'float32'`."
            ) from None
    # `ParamRequest(...)` of the checked arguments, built without the frozen dataclass's `object.__setattr__`
    # per field: an eager model builds one per param per call, its hottest path. A field left at its default
    # is not stored: it reads the class's default, as a dataclass field's default is a class attribute.
    request = object.__new__(ParamRequest)
    fields = request.__dict__
    fields["path"], fields["init"], fields["shape"], fields["dtype"] = path_now() + (name,), init, shape, dtype
    if axes is not None:
        fields["axes"] = axes
    if shared is not None:
        fields["shared"] = shared
    value = send(request)
    try:  # the usual answer, an array or tracer of the declared shape and dtype: one aval read, two compares
        aval = value.aval
        if aval.shape == shape and (aval.dtype is dtype or aval.dtype == dtype):
            return value
    except AttributeError:  # no aval: a NumPy array, a number, or a handler's mistake (None)
        pass
    return checked_answer(request, value)


# The likely slip of a handler whose answer is None (or of no kind the request could take), in every effect's check
NO_ANSWER = (
    "did `handle` forget `return forward(request)`? A handler answers each request it sees: with a value, or "
    "with what `forward(request)` returns."
)


def checked_answer(request: ParamRequest, value: Any) -> Any:
    """`value`, the answer to `request` that is not an array of its exact shape and dtype, if it still is one
    in effect (a NumPy array or number of that shape whose dtype canonicalizes to it, a `jax.ShapeDtypeStruct`
    of a shape-only run); otherwise a `ShapeMismatchError` naming the param and the handler's likely slip."""
    if value is None or not hasattr(value, "shape") and not isinstance(value, (bool, int, float, complex)):
        what = "None" if value is None else f"a {type(value).__name__}, not an array"
        raise ShapeMismatchError(f"{request.describe()}: a handler answered {what}; {NO_ANSWER}")
    shape, dtype = shape_dtype(value)
    if shape != request.shape or dtype != request.dtype:
        raise ShapeMismatchError(
            f"{request.describe()}: a handler answered shape {shape}, {jnp.dtype(dtype).name}. A param's answer "
            "has its declared shape and dtype: return `forward(request)`, or cast or reshape the value in "
            "`handle` (`value.astype(request.dtype)`)."
        )
    return value
