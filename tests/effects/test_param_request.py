"""The param request as Penzai's uninitialized parameter, and the `shared=` tag on `fx.param`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx

KEY = jax.random.key(3)
NORMAL = jax.nn.initializers.normal(1.0)


def request(shape=(2, 3), dtype=jnp.float32, init=NORMAL, **kw):
    return fx.ParamRequest(("dense", "kernel"), init, shape, dtype, **kw)


def captured(fn):
    """The param requests `fn` makes, answered with zeros."""
    seen = []

    class Capture(fx.Handler):
        def handle(self, r, forward):
            if isinstance(r, fx.ParamRequest):
                seen.append(r)
                return jnp.zeros(r.shape, r.dtype)
            return forward(r)

    with fx.handle(Capture()):
        fn()
    return seen


def test_name_and_initializer():
    init = jax.nn.initializers.zeros
    r = request(init=init)
    assert r.name == "dense/kernel"
    assert r.initializer is init


def test_value_structure_is_inferred_abstractly():
    calls = []

    def init(key, shape, dtype):
        calls.append(isinstance(key, jax.core.Tracer))
        return jnp.ones(shape, dtype)

    r = request(init=init, dtype=jnp.bfloat16)
    assert r.value_structure == jax.ShapeDtypeStruct((2, 3), jnp.bfloat16)
    assert calls == [True]  # traced by jax.eval_shape, never run on a concrete key


def test_value_structure_reports_what_the_initializer_makes():
    r = request(init=lambda k, s, d: jnp.ones((7,), d))
    assert r.value_structure.shape == (7,)


def test_as_empty_does_not_run_the_initializer():
    def init(key, shape, dtype):
        raise AssertionError("called")

    assert request(init=init).as_empty() == jax.ShapeDtypeStruct((2, 3), jnp.float32)


def test_initialize_passes_the_key_as_given():
    init = jax.nn.initializers.normal(1.0)
    np.testing.assert_array_equal(request().initialize(KEY), init(KEY, (2, 3), jnp.float32))


def test_initialize_checks_what_the_initializer_made():
    r = request(init=lambda k, s, d: jnp.ones((3, 2), d))
    with pytest.raises(fx.ShapeMismatchError) as e:
        r.initialize(KEY)
    msg = str(e.value)
    assert "`dense/kernel`" in msg and "shape (2, 3), float32" in msg and "shape (3, 2)" in msg
    assert "its initializer returned" in msg


def test_initialize_checks_the_dtype_too():
    r = request(init=lambda k, s, d: jnp.ones(s, jnp.int32))
    with pytest.raises(fx.ShapeMismatchError, match="int32"):
        r.initialize(KEY)


def test_initialize_with_value_returns_the_value():
    v = jnp.arange(6.0).reshape(2, 3)
    assert request().initialize_with_value(v) is v


def test_initialize_with_value_shape_mismatch():
    with pytest.raises(fx.ShapeMismatchError) as e:
        request().initialize_with_value(jnp.zeros((3, 3)))
    msg = str(e.value)
    assert "declared with shape (2, 3), float32" in msg and "given value has shape (3, 3)" in msg


def test_initialize_with_value_strict_dtype():
    v = jnp.zeros((2, 3), jnp.bfloat16)
    with pytest.raises(fx.ShapeMismatchError, match="bfloat16"):
        request().initialize_with_value(v)
    assert request().initialize_with_value(v, strict_dtype=False) is v


def test_initialize_with_value_without_checks_takes_anything():
    v = {"not": "an array"}
    assert request().initialize_with_value(v, check_structure=False) is v


def test_initialize_with_value_refuses_a_tree():
    with pytest.raises(fx.ShapeMismatchError, match="one array .* a dict"):
        request().initialize_with_value({"w": jnp.zeros((2, 3))})


def test_reading_the_value_of_a_request_raises():
    with pytest.raises(fx.UninitializedParamError) as e:
        _ = request().value
    msg = str(e.value)
    assert "`dense/kernel`" in msg and "initialize(key)" in msg and "fx.transform" in msg
    assert isinstance(e.value, fx.EffaxError) and type(e.value).__module__ == "effax"


def test_param_carries_its_shared_tag():
    (r,) = captured(lambda: fx.param("w", jax.nn.initializers.zeros, (2,), shared="embed"))
    assert r.shared == "embed" and r.unbound_tag == "embed"
    assert r.origin is None and r.via == () and r.original_path == ("w",)


def test_param_without_tag():
    (r,) = captured(lambda: fx.param("w", jax.nn.initializers.zeros, (2,)))
    assert r.shared is None and r.unbound_tag is None


@pytest.mark.parametrize("tag", ["a/b", "", 3])
def test_shared_tag_is_a_name(tag):
    with pytest.raises(fx.InvalidNameError, match="shared tag"):
        captured(lambda: fx.param("w", jax.nn.initializers.zeros, (2,), shared=tag))


def test_a_moved_request_knows_where_it_was_asked():
    binding = fx.ShareBinding(("decoder",), ("encoder",))
    r = request(origin=("decoder", "kernel"), via=(binding,))
    assert r.original_path == ("decoder", "kernel")
    assert "asked at `decoder/kernel`" in r.describe()


def test_a_tag_bound_by_a_pass_is_no_longer_unbound():
    r = request(shared="embed", via=(fx.ShareBinding(None, ("embed",), "embed"),))
    assert r.unbound_tag is None
    other = request(shared="embed", via=(fx.ShareBinding(None, ("x",), "other"),))
    assert other.unbound_tag == "embed"


def test_a_bool_dimension_is_refused_even_after_the_same_int_shape_was_checked():
    """`(True,)` hashes like `(1,)`: the memo of checked shapes must not let it through."""
    zeros = jax.nn.initializers.zeros
    fx.transform(lambda: fx.param("w", zeros, (1,))).init(jax.random.key(0))
    with pytest.raises(fx.ShapeMismatchError, match="non-negative ints"):
        fx.transform(lambda: fx.param("w", zeros, (True,))).init(jax.random.key(0))


@pytest.mark.parametrize(
    "axes, shape, what",
    [
        ("mlp", (8,), r"`axes` must be a tuple of names, got str 'mlp'.*`axes=\('mlp',\)`"),
        (("embed", 1), (8, 8), r"`axes=\('embed', 1\)` holds int 1"),
        (("", "mlp"), (8, 8), r"`axes=\('', 'mlp'\)` holds an empty name ''"),
        ((("embed", ""), None), (8, 8), r"`axes=.*` holds tuple \('embed', ''\)"),
        (("embed", ["a", "b"]), (8, 8), r"`axes=.*` holds list \['a', 'b'\]"),
    ],
    ids=["str", "int-entry", "empty-name", "empty-name-in-tuple", "list-entry"],
)
def test_param_axes_are_checked_at_the_param_naming_its_full_path(axes, shape, what):
    def model():
        with fx.scope("encoder"), fx.scope("dense"):
            return fx.param("kernel", jax.nn.initializers.ones, shape, axes=axes)

    with pytest.raises(fx.InvalidNameError, match=r"param `encoder/dense/kernel`: " + what) as info:
        fx.transform(model).init(KEY)
    assert "one logical name (or None) per dimension" in str(info.value)


def test_param_axes_count_error_names_the_full_path():
    def model():
        with fx.scope("encoder"), fx.scope("dense"):
            return fx.param("kernel", jax.nn.initializers.ones, (8, 8), axes=("embed",))

    with pytest.raises(fx.ShapeMismatchError, match=r"param `encoder/dense/kernel` has 2 dims \(8, 8\) but 1 logical"):
        fx.transform(model).init(KEY)


def test_param_axes_entries_that_are_kept():
    """None, names, and a tuple of names (one dimension split over several) reach the request as given."""
    axes = [("embed", None), (("data", "model"), "mlp"), ["embed", "mlp"]]
    seen = captured(lambda: [fx.param(f"w{i}", NORMAL, (2, 2), axes=a) for i, a in enumerate(axes)])
    assert [r.axes for r in seen] == [("embed", None), (("data", "model"), "mlp"), ("embed", "mlp")]


def test_an_initializer_that_cannot_take_a_key_is_named_with_the_fix():
    haiku_style = lambda shape, dtype: jnp.zeros(shape, dtype)  # noqa: E731
    t = fx.transform(lambda: fx.param("w", haiku_style, (2,)))
    for init in (lambda: t.init(jax.random.key(0)), lambda: jax.eval_shape(t.init, jax.random.key(0))):
        no_key = r"param `w`: its initializer .* cannot be called as `init\(key, shape, dtype\)`"
        with pytest.raises(fx.EffaxError, match=no_key):
            init()
    broken = lambda key, shape, dtype: jnp.zeros(shape, dtype) + "a"  # noqa: E731  # a TypeError of its own
    with pytest.raises(TypeError):
        fx.transform(lambda: fx.param("w", broken, (2,))).init(jax.random.key(0))


def test_an_unknown_dtype_is_named_at_the_param():
    with fx.scope("enc"), pytest.raises(fx.EffaxError, match=r"param `enc/w`: dtype='flaot32' is not a dtype"):
        with fx.handle(fx.handlers.InitParams(jax.random.key(0))):
            fx.param("w", jax.nn.initializers.zeros, (2,), "flaot32")


# --- a handler's answer is checked where the model receives it


def _dense(x):
    with fx.scope("dense"):
        return x @ fx.param("kernel", jax.nn.initializers.ones, (3, 4))


class _Answer(fx.Handler):
    answers = (fx.ParamRequest,)

    def __init__(self, change):
        self.change = change

    def handle(self, request, forward):
        return self.change(forward(request))


def test_a_handler_answering_none_or_another_shape_or_dtype_is_named_at_the_param():
    """A handler that forgot `return` handed the model None (a raw TypeError in its `@`); one answering (3, 2) for
    (3, 4) gave a silently wrong output shape."""
    t, x = fx.transform(_dense), jnp.ones((2, 3))
    v = t.init(KEY, x)
    where = r"param `dense/kernel` \(shape \(3, 4\), float32\): a handler answered "
    with pytest.raises(fx.ShapeMismatchError, match=where + r"None; did `handle` forget `return forward\(request\)`\?"):
        t.apply(v, x, handlers=[_Answer(lambda w: None)])
    eager = lambda h: t.apply(v, x, handlers=[h])  # noqa: E731
    jitted = lambda h: jax.jit(lambda v: t.apply(v, x, handlers=[h]))(v)  # noqa: E731
    for change, got in [(lambda w: w[..., :2], r"shape \(3, 2\), float32"),
                        (lambda w: w.astype(jnp.bfloat16), r"shape \(3, 4\), bfloat16"),
                        (lambda w: "w", r"a str, not an array")]:
        for run in (eager, jitted):
            with pytest.raises(fx.ShapeMismatchError, match=where + got):
                run(_Answer(change))
    rounded = _Answer(lambda w: w.astype(jnp.bfloat16).astype(w.dtype))  # the fix: keep the declared dtype
    np.testing.assert_array_equal(t.apply(v, x, handlers=[rounded]), t.apply(v, x))


def test_answers_that_are_arrays_in_effect_pass():
    """NumPy params (float64 without x64 canonicalizes to the declared float32), numbers, shape-only answers under
    eval_shape, and per-example values under vmap all reach the model."""
    t, x = fx.transform(_dense), jnp.ones((2, 3))
    v = t.init(KEY, x)
    stored = {"params": {"dense": {"kernel": np.ones((3, 4), np.float64)}}}
    np.testing.assert_array_equal(t.apply(stored, x), t.apply(v, x))
    scalar = fx.transform(lambda x: x * fx.param("s", jax.nn.initializers.ones, ()))
    assert scalar.apply({}, 2.0, handlers=[fx.handlers.AbstractParams(), _Answer(lambda w: 3.0)]) == 6.0
    assert jax.eval_shape(t.apply, jax.eval_shape(t.init, KEY, x), x).shape == (2, 4)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), v)
    assert jax.vmap(lambda v: t.apply(v, x))(stacked).shape == (2, 2, 4)


@pytest.mark.parametrize("axes, shared", [(None, None), (("embed", None), "tied")])
def test_the_requests_effects_build_are_their_dataclasses_own(axes, shared):
    """`fx.param`, `fx.local_state` and a state read build their requests without the dataclass's `__init__`
    (and leave defaults unstored, read off the class): each still equals, hashes, prints and `replace`s as
    the one the dataclass builds, with every field readable."""
    init, state_init = jax.nn.initializers.zeros, lambda: jnp.zeros(2)
    seen = []

    class Capture(fx.Handler):
        def handle(self, r, forward):
            seen.append(r)
            if isinstance(r, fx.ParamRequest):
                return jnp.zeros(r.shape, r.dtype)
            return jnp.zeros(2) if isinstance(r, fx.GetStateRequest) else None

    with fx.handle(Capture()), fx.scope("block"):
        fx.param("w", init, (2, 3), axes=axes, shared=shared)
        fx.local_state("n", state_init, collection="stats", axes=None if axes is None else ("embed",)).get()
    param, declare, get = seen
    expected = (
        fx.ParamRequest(("block", "w"), init, (2, 3), jnp.dtype(jnp.float32), axes=axes, shared=shared),
        fx.LocalStateRequest(("block", "n"), "stats", state_init, axes=None if axes is None else ("embed",)),
        fx.GetStateRequest(("block", "n"), "stats"),
    )
    for built, made in zip((param, declare, get), expected, strict=True):
        assert built == made and hash(built) == hash(made) and repr(built) == repr(made)
        assert dataclasses.replace(built, path=("x",)) == dataclasses.replace(made, path=("x",))
        assert {f.name: getattr(built, f.name) for f in dataclasses.fields(built)} == dataclasses.asdict(made)
        with pytest.raises(dataclasses.FrozenInstanceError):
            built.path = ("x",)
