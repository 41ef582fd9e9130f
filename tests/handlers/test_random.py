"""Keys: per stream, per path, per draw, and strict about missing streams."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx
from effax.handlers import KeysFromRngs


def h(text, person):
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, person=person).digest(), "little")


def fold(key, d):
    return jax.random.fold_in(jax.random.fold_in(key, np.uint32(d & 0xFFFFFFFF)), np.uint32(d >> 32))


def data(k):
    return np.asarray(jax.random.key_data(k))


def draws():
    with fx.scope("layer"):
        return fx.next_key("dropout"), fx.next_key("dropout"), fx.stream_key("dropout")


def test_nth_draw_follows_the_pinned_derivation():
    k = jax.random.key(7)
    a, b, base = fx.transform(draws).apply({}, rngs={"dropout": k})
    expected_base = fold(k, h("layer", b"effax-path"))
    np.testing.assert_array_equal(data(base), data(expected_base))
    np.testing.assert_array_equal(data(a), data(jax.random.fold_in(expected_base, 0)))
    np.testing.assert_array_equal(data(b), data(jax.random.fold_in(expected_base, 1)))


def test_a_traced_draw_is_the_pinned_fold_in_primitives_inline():
    # the folds are jitted helpers (one eager dispatch each), inlined where traced: a program holds the
    # pinned `random_fold_in`s themselves (two for the path, one for the draw index), no nested jit
    k = jax.random.key(7)
    jaxpr = jax.make_jaxpr(lambda k: fx.transform(draws).apply({}, rngs={"dropout": k}))(k)
    names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert names.count("random_fold_in") == 4 and not {"jit", "pjit"} & set(names), names


def test_single_key_serves_params_as_given_and_other_streams_folded():
    k = jax.random.key(1)
    f = lambda: (fx.stream_key("params"), fx.stream_key("dropout"))
    p, d = fx.transform(f).apply({}, rngs=k)
    np.testing.assert_array_equal(data(p), data(k))
    np.testing.assert_array_equal(data(d), data(fold(k, h("dropout", b"effax-stream"))))


def test_stream_key_at_root_is_the_users_key():
    k = jax.random.key(3)
    out = fx.transform(lambda: fx.stream_key("dropout")).apply({}, rngs={"dropout": k})
    np.testing.assert_array_equal(data(out), data(k))


def test_raw_keys_are_accepted_and_keys_are_typed():
    raw = jax.random.PRNGKey(0)
    out = fx.transform(lambda: fx.next_key()).apply({}, rngs={"default": raw})
    assert jax.dtypes.issubdtype(out.dtype, jax.dtypes.prng_key)
    typed = fx.transform(lambda: fx.next_key()).apply({}, rngs={"default": jax.random.wrap_key_data(raw)})
    np.testing.assert_array_equal(data(out), data(typed))


def test_param_and_stream_hash_domains_never_meet():
    k = jax.random.key(0)

    def f():
        w = fx.param("dropout", lambda key, s, d: jax.random.key_data(key).astype(jnp.float32), (2,))
        return w

    w = fx.transform(f).init(k)["params"]["dropout"]
    stream = fx.transform(lambda: fx.stream_key("dropout")).apply({}, rngs=k)
    assert not np.array_equal(np.asarray(w, np.uint32), data(stream))


def test_missing_stream_names_stream_path_and_given_streams():
    with pytest.raises(fx.MissingRngError, match=r"'dropout' at `layer`.*names only \['params'\]"):
        fx.transform(draws).apply({}, rngs={"params": jax.random.key(0)})
    with pytest.raises(fx.MissingRngError, match=r"rngs is None"):
        fx.transform(draws).apply({})


def test_keys_are_distinct_across_paths_streams_and_draws():
    def f():
        ks = [fx.next_key("a"), fx.next_key("a"), fx.next_key("b")]
        with fx.scope("s"):
            ks.append(fx.next_key("a"))
        r = fx.random_stream("a")
        with fx.scope("elsewhere"):
            ks.append(r.next_key())  # belongs to the root path: the third draw there
        return ks

    ks = fx.transform(f).apply({}, rngs=jax.random.key(0))
    assert len({data(k).tobytes() for k in ks}) == 5


def test_draws_are_local():
    def f(extra):
        with fx.scope("x"):
            if extra:
                fx.next_key("s")
        with fx.scope("y"):
            return fx.next_key("s")

    t = fx.transform(f)
    a = t.apply({}, False, rngs=jax.random.key(0))
    b = t.apply({}, True, rngs=jax.random.key(0))
    np.testing.assert_array_equal(data(a), data(b))


def test_rngs_that_are_not_keys_are_refused():
    with pytest.raises(fx.EffaxError, match="not a key"):
        fx.transform(lambda: fx.next_key()).apply({}, rngs={"default": 1.5})


def test_keys_handler_directly_under_jit():
    @jax.jit
    def f(k):
        with fx.handle(KeysFromRngs({"s": k})):
            return jax.random.normal(fx.next_key("s"))

    assert f(jax.random.key(0)).shape == ()


def test_the_stream_names_a_run_serves():
    """A dict of rngs names its streams; one key serves any (None); no key, or the eval preset, none."""
    names = fx.transform(lambda: fx.effects.stream_names())
    assert names.apply({}, rngs={"dropout": jax.random.key(0), "noise": jax.random.key(1)}) == ("dropout", "noise")
    assert names.apply({}, rngs=jax.random.key(0)) is None
    assert names.apply({}) == ()
    assert names.apply({}, handlers=fx.handlers.eval()) == ()
    assert fx.effects.stream_names() is None  # unanswered: not known
