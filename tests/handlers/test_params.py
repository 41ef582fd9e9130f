"""Params handlers: pinned key derivation, loading with checks, one path one variable."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx
from effax.handlers import AbstractParams, InitParams, LoadParams

normal = jax.nn.initializers.normal(1.0)


def pinned_fold(key, text, person):
    d = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, person=person).digest(), "little")
    key = jax.random.fold_in(key, np.uint32(d & 0xFFFFFFFF))
    return jax.random.fold_in(key, np.uint32(d >> 32))


def test_init_value_follows_the_pinned_hash():
    key = jax.random.key(42)

    def f():
        with fx.scope("encoder"), fx.scope("dense"):
            return fx.param("kernel", normal, (3, 2))

    value = fx.transform(f).init(key)["params"]["encoder"]["dense"]["kernel"]
    expected = normal(pinned_fold(key, "encoder/dense/kernel", b"effax-path"), (3, 2), jnp.float32)
    np.testing.assert_array_equal(value, expected)


def test_raw_and_typed_keys_give_the_same_params():
    f = lambda: fx.param("w", normal, (4,))
    t = fx.transform(f)
    a = t.init(jax.random.PRNGKey(3))["params"]["w"]
    b = t.init(jax.random.key(3))["params"]["w"]
    np.testing.assert_array_equal(a, b)


def test_init_params_with_explicit_key_matches_transform():
    key = jax.random.key(0)
    f = lambda: fx.param("w", normal, (4,))
    with fx.handle(InitParams(key)) as (run,):
        f()
    np.testing.assert_array_equal(run.params["w"], fx.transform(f).init(key)["params"]["w"])


def test_same_path_returns_same_array_first_initializer_wins():
    def f():
        a = fx.param("w", jax.nn.initializers.ones, (2,))
        b = fx.param("w", jax.nn.initializers.zeros, (2,))
        return a, b

    (a, b), v = fx.transform(f).init_with_output(jax.random.key(0))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(v["params"]["w"], jnp.ones(2))


def test_same_path_different_spec_conflicts_naming_both_specs():
    def f():
        fx.param("w", normal, (2,))
        fx.param("w", normal, (3,))

    for run in (lambda t: t.init(jax.random.key(0)), lambda t: t.apply({"params": {"w": jnp.ones(2)}})):
        with pytest.raises(fx.ParamConflictError, match=r"`w`.*shape \(2,\).*shape \(3,\)"):
            run(fx.transform(f))


def test_leaf_and_scope_of_same_name_conflict():
    def f():
        fx.param("a", normal, (2,))
        with fx.scope("a"):
            fx.param("kernel", normal, (2,))

    with pytest.raises(fx.ParamConflictError, match=r"`a` in params is a leaf.*`a/kernel`"):
        fx.transform(f).init(jax.random.key(0))

    def g():
        with fx.scope("a"):
            fx.param("kernel", normal, (2,))
        fx.param("a", normal, (2,))

    with pytest.raises(fx.ParamConflictError, match=r"`a` in params is a scope"):
        fx.transform(g).init(jax.random.key(0))


def test_params_passed_without_their_collection_say_so():
    t = fx.transform(lambda x: fx.nn.Dense(2)(x))
    x = jnp.ones((1, 3))
    params = t.init(jax.random.key(0), x)["params"]
    empty = r"variables\['params'\] is empty or missing: .*\{'params': params\}"
    with pytest.raises(fx.MissingVariableError, match=empty):
        t.apply(params, x)  # the params tree alone


def test_missing_param_names_path_and_nearest():
    def f():
        with fx.scope("encoder"), fx.scope("dense"):
            fx.param("kernel", normal, (2,))

    stored = {"params": {"encoder": {"dense_0": {"kernel": jnp.ones(2)}}}}
    message = r"no param `encoder/dense/kernel`.*nearest: 'encoder/dense_0/kernel'"
    with pytest.raises(fx.MissingVariableError, match=message):
        fx.transform(f).apply(stored)


def test_stored_shape_or_dtype_mismatch():
    f = lambda: fx.param("w", normal, (2,))
    with pytest.raises(fx.ShapeMismatchError, match=r"`w`.*shape \(2,\), float32.*shape \(3,\), float32"):
        fx.transform(f).apply({"params": {"w": jnp.ones(3)}})
    with pytest.raises(fx.ShapeMismatchError, match=r"int32"):
        fx.transform(f).apply({"params": {"w": jnp.ones(2, jnp.int32)}})


def test_initializer_returning_wrong_shape_is_reported():
    bad = lambda key, shape, dtype: jnp.zeros((5,), dtype)
    message = r"`w` is declared with shape \(2,\).*initializer returned shape \(5,\)"
    with pytest.raises(fx.ShapeMismatchError, match=message):
        fx.transform(lambda: fx.param("w", bad, (2,))).init(jax.random.key(0))


def test_float64_is_canonicalized():
    f = lambda: fx.param("w", jax.nn.initializers.zeros, (2,), jnp.float64)
    v = fx.transform(f).init(jax.random.key(0))
    assert v["params"]["w"].dtype == jnp.float32
    fx.transform(f).apply({"params": {"w": np.zeros(2, np.float64)}})


def test_load_params_handler_directly():
    with fx.handle(LoadParams({"w": jnp.ones(2)})):
        np.testing.assert_array_equal(fx.param("w", normal, (2,)), jnp.ones(2))


def test_abstract_params_record_shapes_and_allocate_nothing():
    def f():
        with fx.scope("d"):
            return fx.param("w", normal, (2, 3)).sum()

    def run():
        with fx.handle(AbstractParams()) as (r,):
            y = f()
        assert r.params == {"d": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}}
        return y

    assert jax.eval_shape(run) == jax.ShapeDtypeStruct((), jnp.float32)


def test_param_shape_and_axes_are_validated():
    with fx.handle(InitParams(jax.random.key(0))):
        with pytest.raises(fx.ShapeMismatchError, match="2 dims"):
            fx.param("w", normal, (2, 3), axes=("embed",))
        with pytest.raises(fx.InvalidNameError):
            fx.param("a/b", normal, (2,))
        assert fx.param("v", normal, 3).shape == (3,)


def test_param_unhandled_says_how_to_discharge():
    with pytest.raises(fx.UnhandledEffectError, match=r"param `w`.*fx.transform"):
        fx.param("w", normal, (2,))


def test_traced_init_equals_eager_init_for_any_initializer():
    class Unhashable:
        __hash__ = None

        def __call__(self, key, shape, dtype):
            return jax.random.normal(key, shape, dtype)

    def f():
        with fx.scope("a"):
            x = fx.param("w", normal, (3,))
        return x + fx.param("u", Unhashable(), (3,))

    t = fx.transform(f)
    eager = t.init(jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, jax.jit(t.init)(jax.random.key(0)), eager)
    assert jax.eval_shape(t.init, jax.random.key(0))["params"]["u"].shape == (3,)


def test_initializer_that_performs_effects_runs_in_the_models_trace():
    def effectful_init(key, shape, dtype):
        return jax.random.normal(fx.stream_key("params"), shape, dtype)

    t = fx.transform(lambda: fx.param("w", effectful_init, (2,)))
    eager = t.init(jax.random.key(0))
    np.testing.assert_array_equal(jax.jit(t.init)(jax.random.key(0))["params"]["w"], eager["params"]["w"])


def test_abstract_params_outside_eval_shape_are_refused_by_path():
    """`t.apply(jax.eval_shape(t.init, ...), x)` handed the model a ShapeDtypeStruct: a raw TypeError in its `@`."""

    def model(x):
        with fx.scope("dense"):
            return x @ fx.param("kernel", jax.nn.initializers.ones, (3, 4))

    t, x = fx.transform(model), jnp.ones((2, 3))
    abstract = jax.eval_shape(t.init, jax.random.key(0), x)
    with pytest.raises(fx.MissingVariableError, match=r"param `dense/kernel`: variables\['params'\] holds abstract "
                                                      r"values \(jax.ShapeDtypeStruct\).*jax.eval_shape\(t.init"):
        t.apply(abstract, x)
    assert jax.eval_shape(t.apply, abstract, x).shape == (2, 4)  # inside eval_shape they are tracers: fine
    assert t.apply(t.init(jax.random.key(0), x), x).shape == (2, 4)  # the fix: real arrays


def test_params_that_are_not_a_dict_are_refused_with_the_fix():
    """`t.apply({'params': array}, x)` and `LoadParams(array)` were a raw `truth value of an array` ValueError."""
    t, x = fx.transform(lambda x: x * fx.param("w", jax.nn.initializers.ones, (3,))), jnp.ones(3)
    fix = r"variables\['params'\].*is Array float32\[3\], not a nested dict.*`t.apply\(\{'params': \{'w': w\}\}, x\)`"
    with pytest.raises(fx.EffaxError, match=fix):
        t.apply({"params": jnp.ones(3)}, x)
    with pytest.raises(fx.EffaxError, match=fix):
        LoadParams(jnp.ones(3))
    np.testing.assert_array_equal(t.apply({"params": {"w": jnp.full(3, 2.0)}}, x), jnp.full(3, 2.0))  # the fix


def test_two_requests_with_different_axes_conflict_and_none_takes_the_others():
    """Two different non-None `axes=` of one param were no conflict: the first won, so its sharding depended on
    call order (also for params tied by `fx.share`)."""

    def same_path(first, second, third=None):
        fx.param("w", normal, (16, 8), axes=first)
        fx.param("w", normal, (16, 8), axes=second)
        return fx.param("w", normal, (16, 8), axes=third)

    with pytest.raises(fx.ParamConflictError, match=r"param `w` is requested twice with different logical axes: "
                                                    r"first axes=\('vocab', 'embed'\), now axes=\('embed', 'vocab'\)"):
        fx.transform(lambda: same_path(("vocab", "embed"), ("embed", "vocab"))).init(jax.random.key(0))
    with pytest.raises(fx.ParamConflictError, match=r"first axes=\('vocab', 'embed'\), now axes=\('embed', 'vocab'\)"):
        fx.transform(lambda: same_path(None, ("vocab", "embed"), ("embed", "vocab"))).init(jax.random.key(0))
    merged = fx.summary(fx.transform(lambda: same_path(None, ("vocab", "embed"))))  # None is unspecified: merges
    assert fx.sharding.logical_axes(merged) == {"params": {"w": jax.sharding.PartitionSpec("vocab", "embed")}}

    def tied(ids):
        with fx.scope("decoder"):  # the alias is used first
            d = fx.param("embed", normal, (16, 8), axes=("embed", "vocab"))
        with fx.scope("encoder"):
            e = fx.param("embed", normal, (16, 8), axes=("vocab", "embed"))
        return e[ids] @ d.T

    asked = r"\(asked at `decoder/embed`, via `decoder/embed -> encoder/embed`\)"
    both = rf"first axes=\('embed', 'vocab'\) {asked}, now axes=\('vocab', 'embed'\)"
    with pytest.raises(fx.ParamConflictError, match=r"param `encoder/embed` .* different logical axes: " + both):
        fx.summary(fx.transform(fx.share(tied, {"decoder/embed": "encoder/embed"})), jnp.arange(4))


def test_a_missing_param_without_a_near_name_reads_as_one_sentence():
    """It read "(asked for shape (2,), float32); Check the name": a capital after a semicolon."""
    t = fx.transform(lambda: fx.param("w", normal, (2,)))
    with pytest.raises(fx.MissingVariableError, match=r"^no param `w` in variables\['params'\] \(asked for shape "
                                                      r"\(2,\), float32\)\. Check the name and scope") as info:
        t.apply({"params": {"enc": {"dense": {"kernel": jnp.ones(2)}}}})
    assert "; Check" not in str(info.value)


def test_loading_reads_any_mapping_and_checks_what_the_fast_path_passes_on():
    """Loading and state requests walk down any mapping (by `get`) to an array of the asked spec in one frame;
    a leaf in the way, a repeat, a box, a cast and a mismatch go the checked way, with the same answers and
    errors."""
    import types

    def f():
        with fx.scope("enc"):
            w = fx.param("w", jax.nn.initializers.zeros, (2,))
            again = fx.param("w", jax.nn.initializers.zeros, (2,))
        n = fx.local_state("n", lambda: jnp.zeros(()))
        n.set(n.get() + 1)
        return w + again + n.get()

    t, w = fx.transform(f), jnp.arange(2.0)
    for params in ({"enc": {"w": w}}, types.MappingProxyType({"enc": types.MappingProxyType({"w": w})}),
                   {"enc": {"w": np.arange(2.0, dtype=np.float32)}}):
        for state in ({"n": jnp.ones(())}, types.MappingProxyType({"n": jnp.ones(())})):
            y, upd = t.apply({"params": params, "state": state}, mutable=True)
            assert y.tolist() == [2.0, 4.0] and upd["state"]["n"] == 2.0
    with pytest.raises(fx.MissingVariableError, match=r"no param `enc/w`.*nearest: 'enc/v'"):
        t.apply({"params": types.MappingProxyType({"enc": {"v": w}}), "state": {"n": jnp.ones(())}})
    with pytest.raises(fx.ShapeMismatchError, match=r"param `enc/w`: the model asks for .*float32.*int32"):
        t.apply({"params": {"enc": {"w": jnp.arange(2)}}, "state": {"n": jnp.ones(())}})
    with pytest.raises(fx.MissingVariableError, match=r"state `n` in collection 'state'"):
        t.apply({"params": {"enc": {"w": w}}, "state": types.MappingProxyType({"m": jnp.ones(())})})
    with pytest.raises(fx.MissingVariableError, match=r"no param `enc/w`"):  # a leaf where a scope is asked
        t.apply({"params": {"enc": w}, "state": {"n": jnp.ones(())}})

    def g():
        with fx.scope("n"):
            return fx.local_state("m", lambda: 0.0).get()

    with pytest.raises(fx.MissingVariableError, match=r"state `n/m` in collection 'state'"):
        fx.transform(g).apply({"state": {"n": jnp.ones(())}})
