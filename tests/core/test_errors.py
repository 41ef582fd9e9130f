"""Each of the core's errors, raised by a real call: its type, its module, and a message that names the fix.

(The core's error classes keep one-line docstrings to hold the core under 400 lines; this file is their
example, one per class.)
"""

import jax
import jax.numpy as jnp
import pytest

import effax as fx

KEY = jax.random.key(0)
zeros = jax.nn.initializers.zeros


def raises(error, match, fn):
    with pytest.raises(error, match=match) as info:
        fn()
    assert type(info.value).__module__ == "effax" and isinstance(info.value, fx.EffaxError)
    return info.value


def test_unhandled_effect_error_says_what_answers_it():
    raises(fx.UnhandledEffectError, "no handler answered param `w`.*fx.transform", lambda: fx.param("w", zeros, (2,)))


def test_missing_variable_error_names_the_nearest_path():
    t = fx.transform(lambda: fx.param("kernel", zeros, (2,)))
    stored = {"params": {"kernal": jnp.zeros(2)}}
    e = raises(fx.MissingVariableError, "no param `kernel`.*nearest: 'kernal'", lambda: t.apply(stored))
    assert isinstance(e, LookupError)


def test_shape_mismatch_error_shows_both_shapes():
    t = fx.transform(lambda: fx.param("w", zeros, (2,)))
    e = raises(fx.ShapeMismatchError, r"shape \(2,\).*\(3,\)", lambda: t.apply({"params": {"w": jnp.zeros(3)}}))
    assert isinstance(e, ValueError)


def test_param_conflict_error_shows_both_specs():
    def f():
        fx.param("w", zeros, (2,))
        fx.param("w", zeros, (3,))

    raises(fx.ParamConflictError, r"requested twice with different specs", lambda: fx.transform(f).init(KEY))


def test_frozen_state_error_says_how_to_make_it_mutable():
    def f():
        fx.local_state("n", lambda: 0.0).set(1.0)

    t = fx.transform(f)
    raises(fx.FrozenStateError, r"mutable=\['state'\]", lambda: t.apply(t.init(KEY)))


def test_missing_rng_error_names_the_stream_and_the_given_ones():
    t = fx.transform(lambda: fx.next_key("dropout"))
    raises(fx.MissingRngError, r"stream 'dropout'.*names only \['params'\]", lambda: t.apply({}, rngs={"params": KEY}))


def test_share_error_names_the_binding():
    t = fx.transform(fx.share(lambda: fx.param("w", zeros, (2,)), {"b": "a"}))
    raises(fx.ShareError, "`b -> a` matched nothing", lambda: t.init(KEY))


def test_invalid_name_error_says_what_is_wrong_with_the_name():
    e = raises(fx.InvalidNameError, "contains '/'.*'a_b'", lambda: fx.scope("a/b"))
    assert isinstance(e, ValueError)


def test_trace_mismatch_error_points_to_the_lifted_transforms():
    def f(x):
        return jax.vmap(lambda xi: xi * jax.random.normal(fx.next_key("noise")))(x)

    raises(fx.TraceMismatchError, "fx.vmap", lambda: fx.transform(f).apply({}, jnp.ones(2), rngs=KEY))


def test_effax_error_is_the_base_of_all():
    assert all(issubclass(getattr(fx, name), fx.EffaxError) for name in fx.core.__all__ if name.endswith("Error"))
