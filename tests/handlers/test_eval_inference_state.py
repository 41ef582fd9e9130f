"""`fx.handlers.eval(mutable=[...])`: inference state is written, training state and keys stay out."""

import jax
import jax.numpy as jnp
import pytest

import effax as fx


def counter_model(x):
    """A decode-style counter in "cache" and a BatchNorm (training state in "batch_stats")."""
    n = fx.local_state("n", lambda: jnp.zeros((), jnp.int32), collection="cache")
    n.set(n.get() + 1)
    return fx.nn.BatchNorm()(x) + n.get()


T = fx.transform(counter_model)
X = jnp.arange(6.0).reshape(3, 2)
V = T.init(jax.random.key(0), X)


def test_eval_with_mutable_writes_only_the_named_collections_and_returns_them():
    y, updates = T.apply(V, X, handlers=fx.handlers.eval(mutable=["cache"]))
    assert sorted(updates) == ["cache"]  # return shape follows the named collections
    assert int(updates["cache"]["n"]) == 1
    y2, updates2 = T.apply({**V, **updates}, X, handlers=fx.handlers.eval(mutable=("cache",)))
    assert int(updates2["cache"]["n"]) == 2
    # eval mode: BatchNorm reads its running stats, which stay out of the updates
    expected = fx.transform(lambda x: fx.nn.BatchNorm()(x)).apply(V, X, training=False)
    assert jnp.allclose(y, expected + 1)


def test_eval_with_mutable_is_jittable_and_creates_missing_inference_state():
    step = jax.jit(lambda v, x: T.apply(v, x, handlers=fx.handlers.eval(mutable="cache")))
    _, updates = step({"params": V["params"], "batch_stats": V["batch_stats"]}, X)
    assert int(updates["cache"]["n"]) == 1


def test_eval_with_mutable_still_freezes_training_state_and_draws_no_key():
    def writes_stats(x):
        fx.nn.BatchNorm(use_running_average=False)(x)
        return fx.local_state("n", lambda: 0, collection="cache").get()

    t = fx.transform(writes_stats)
    v = t.init(jax.random.key(0), X)
    with pytest.raises(fx.FrozenStateError, match="collection 'batch_stats' is frozen"):
        t.apply(v, X, handlers=fx.handlers.eval(mutable=["cache"]))

    def draws(x):
        fx.local_state("n", lambda: 0, collection="cache")
        return fx.next_key()

    with pytest.raises(fx.MissingRngError, match="eval preset"):
        fx.transform(draws).apply({}, X, handlers=fx.handlers.eval(mutable=["cache"]))


def test_frozen_state_advice_names_the_eval_option():
    with pytest.raises(fx.FrozenStateError, match=r"fx\.handlers\.eval\(mutable=\['cache'\]\)"):
        T.apply(V, X, handlers=fx.handlers.eval())
    with pytest.raises(fx.FrozenStateError, match=r"fx\.handlers\.eval\(mutable=\['cache'\]\)"):
        T.apply(V, X, training=False)  # plain apply, nothing mutable


def test_eval_mutable_refuses_everything_and_params_and_conflicts():
    with pytest.raises(fx.EffaxError, match="Name the inference-state collections"):
        fx.handlers.eval(mutable=True)
    with pytest.raises(fx.InvalidNameError, match="params"):
        fx.handlers.eval(mutable=["params"])
    with pytest.raises(fx.EffaxError, match="conflicts with the preset"):
        T.apply(V, X, handlers=fx.handlers.eval(mutable=["cache"]), mutable=["batch_stats"])
    assert repr(fx.handlers.eval(mutable=["cache"])) == "fx.handlers.eval(mutable=('cache',))"
    assert repr(fx.handlers.eval()) == "fx.handlers.eval()"


def test_eval_preset_installed_by_handle_lets_only_named_collections_through():
    with fx.handle(fx.handlers.FunctionalState({}, mutable=True), fx.handlers.eval(mutable=["cache"])) as runs:
        n = fx.local_state("n", lambda: 0, collection="cache")
        n.set(1)
        s = fx.local_state("s", lambda: 0, collection="batch_stats")
        with pytest.raises(fx.FrozenStateError, match=r"allows only \['cache'\].*eval\(mutable=\['batch_stats'\]\)"):
            s.set(1)
    assert runs[0].updates()["cache"]["n"] == 1


def test_mutable_beside_the_eval_preset_points_to_the_preset_option():
    with pytest.raises(fx.EffaxError, match=r"name it in the preset: `fx\.handlers\.eval\(mutable=\['cache'\]\)`"):
        T.apply(V, X, handlers=fx.handlers.eval(), mutable=["cache"])
