"""Train/eval presets: one argument sets training, rngs and mutable; eval draws nothing and writes nothing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx

KEY = jax.random.key(0)
X = jnp.arange(12.0).reshape(4, 3)


def model(x):
    x = fx.nn.BatchNorm()(x)
    return fx.nn.Dropout(0.5)(x)


T = fx.transform(model)
V = T.init(KEY, X)


def counter():
    n = fx.local_state("n", lambda: jnp.zeros((), jnp.int32))
    n.set(n.get() + 1)
    return n.get()


def test_train_preset_equals_the_options_one_by_one():
    preset = fx.handlers.train(jax.random.key(1), mutable=["batch_stats"])
    y, updates = T.apply(V, X, handlers=preset)
    y2, updates2 = T.apply(V, X, training=True, rngs=jax.random.key(1), mutable=["batch_stats"])
    np.testing.assert_array_equal(y, y2)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, updates, updates2))
    assert sorted(updates) == ["batch_stats"]


def test_train_preset_without_mutable_leaves_it_to_apply():
    preset = fx.handlers.train(KEY)
    with pytest.raises(fx.FrozenStateError, match="batch_stats"):
        T.apply(V, X, handlers=preset)
    y, updates = T.apply(V, X, mutable=["batch_stats"], handlers=preset)
    assert sorted(updates) == ["batch_stats"]


def test_eval_preset_returns_only_the_output_and_uses_running_stats():
    y = T.apply(V, X, handlers=fx.handlers.eval())
    assert isinstance(y, jax.Array)
    np.testing.assert_allclose(y, T.apply(V, X, training=False), atol=1e-6)
    np.testing.assert_allclose(y, X / np.sqrt(1 + 1e-5), atol=1e-5)  # initial running stats, no dropout


def test_eval_preset_draws_no_randomness():
    t = fx.transform(lambda: fx.next_key("noise"))
    with pytest.raises(fx.MissingRngError, match="key draw from stream 'noise' at `<root>` under the eval preset"):
        t.apply({}, handlers=fx.handlers.eval())
    with pytest.raises(fx.MissingRngError, match="eval preset"):
        fx.transform(lambda: fx.stream_key("noise")).apply({}, handlers=fx.handlers.eval())


def test_eval_preset_writes_no_state():
    t = fx.transform(counter)
    v = t.init(None)
    with pytest.raises(fx.FrozenStateError, match="collection 'state' is frozen"):
        t.apply(v, handlers=fx.handlers.eval())


def test_presets_under_a_plain_handle_block():
    with fx.handle(fx.handlers.train({"noise": KEY})):
        assert fx.is_training()
        key = fx.next_key("noise")
    with fx.handle(fx.handlers.KeysFromRngs({"noise": KEY})):
        expected = fx.next_key("noise")
    assert jnp.array_equal(jax.random.key_data(key), jax.random.key_data(expected))

    with fx.handle(fx.handlers.FunctionalState({}, mutable=True), fx.handlers.eval()):
        assert not fx.is_training()
        n = fx.local_state("n", lambda: 0.0)  # reading and creating is fine
        assert n.get() == 0.0
        with pytest.raises(fx.FrozenStateError, match="under the eval preset"):
            n.set(1.0)
        with pytest.raises(fx.MissingRngError, match="under the eval preset"):
            fx.next_key("dropout")
    with fx.handle(fx.handlers.KeysFromRngs(KEY), fx.handlers.eval()):
        with pytest.raises(fx.MissingRngError):  # eval wins over keys outside it
            fx.next_key()


def test_same_model_train_then_eval_is_a_one_line_swap():
    step = jax.jit(lambda v, x, k: T.apply(v, x, handlers=fx.handlers.train(k, mutable=["batch_stats"])))
    evaluate = jax.jit(lambda v, x: T.apply(v, x, handlers=fx.handlers.eval()))
    _, updates = step(V, X, KEY)
    v = {**V, **updates}
    assert not np.allclose(v["batch_stats"]["BatchNorm_0"]["mean"], 0.0)
    np.testing.assert_allclose(evaluate(v, X), T.apply(v, X, training=False), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, what",
    [
        (dict(training=False), "training=False"),
        (dict(rngs=jax.random.key(3)), "rngs="),
        (dict(mutable=["state"]), "mutable=\\['state'\\]"),
    ],
)
def test_a_conflicting_explicit_argument_raises(kwargs, what):
    with pytest.raises(fx.EffaxError, match=f"{what}.* conflicts with the preset fx.handlers.train"):
        T.apply(V, X, handlers=fx.handlers.train(KEY, mutable=["batch_stats"]), **kwargs)


def test_eval_conflicts_with_rngs_mutable_and_training():
    for kwargs in (dict(rngs=KEY), dict(mutable=True), dict(training=True)):
        with pytest.raises(fx.EffaxError, match=r"conflicts with the preset fx.handlers.eval\(\)"):
            T.apply(V, X, handlers=fx.handlers.eval(), **kwargs)


def test_agreeing_explicit_arguments_are_fine():
    preset = fx.handlers.train(KEY, mutable=["batch_stats"])
    y, _ = T.apply(V, X, training=True, rngs=preset.rngs, mutable="batch_stats", handlers=preset)
    assert y.shape == X.shape
    assert T.apply(V, X, training=False, mutable=False, handlers=fx.handlers.eval()).shape == X.shape


def test_one_preset_per_run():
    with pytest.raises(fx.EffaxError, match="2 presets"):
        T.apply(V, X, handlers=[fx.handlers.eval(), [fx.handlers.train(KEY)]])


def test_presets_sit_among_other_handlers():
    t = fx.transform(lambda: fx.side_input("scale") * (2.0 if fx.is_training() else 1.0))
    side = fx.handlers.SideInputs({"scale": 3.0})
    assert t.apply({}, handlers=[side, fx.handlers.eval()]) == 3.0
    assert t.apply({}, handlers=(fx.handlers.train(None), side)) == 6.0


def test_a_preset_spread_into_a_list_is_still_the_preset():
    """`handlers=[*preset, lora]` keeps the preset's mutable collections and mode (its handlers name it)."""
    t = fx.transform(lambda x: fx.nn.Dropout(0.5)(x) + counter())
    side = fx.handlers.SideInputs({})
    eval_ = fx.handlers.eval(mutable=["state"])
    assert t.apply({}, 1.0, handlers=[*eval_, side]) == t.apply({}, 1.0, handlers=(eval_, side))
    out, updates = t.apply({}, jnp.ones(2), handlers=[side, *fx.handlers.train(KEY, mutable=["state"])])
    assert updates == {"state": {"n": 1}} and out.shape == (2,)
    with pytest.raises(fx.EffaxError, match="2 presets"):
        t.apply({}, 1.0, handlers=[*eval_, *fx.handlers.eval()])
    assert t.apply({}, 1.0, handlers=[*eval_, eval_])[1] == {"state": {"n": 1}}  # the same one twice: one


def test_init_takes_the_preset_mode_and_rngs():
    def f():
        return fx.param("w", jax.nn.initializers.zeros, (2 if fx.is_training() else 3,))

    t = fx.transform(f)
    assert t.init(KEY)["params"]["w"].shape == (3,)
    assert t.init(KEY, handlers=fx.handlers.eval())["params"]["w"].shape == (3,)  # init still draws param keys
    assert t.init(None, handlers=fx.handlers.train(KEY))["params"]["w"].shape == (2,)
    with pytest.raises(fx.EffaxError, match="training=True conflicts"):
        t.init(KEY, training=True, handlers=fx.handlers.eval())
    # init's own key always wins: the preset's rngs serve apply's draws (one rule, no identity check)
    g = fx.transform(lambda: fx.param("w", jax.nn.initializers.normal(), (2,)))
    with_preset = g.init(jax.random.key(5), handlers=fx.handlers.train(KEY))["params"]["w"]
    assert (with_preset == g.init(jax.random.key(5), training=True)["params"]["w"]).all()
    assert not (with_preset == g.init(KEY)["params"]["w"]).all()


def test_init_with_the_train_preset_returns_initial_state():
    v = fx.transform(counter).init(None, handlers=fx.handlers.train(None))
    assert int(v["state"]["n"]) == 0


def test_preset_is_a_tuple_of_handlers_with_its_options():
    preset = fx.handlers.train(KEY, mutable=("b", "a"))
    assert isinstance(preset, fx.handlers.Preset) and isinstance(preset, tuple)
    assert preset.training and preset.mutable == frozenset({"a", "b"}) and preset.rngs is KEY
    assert [type(h).__name__ for h in preset] == ["Mode", "KeysFromRngs"]
    assert repr(preset).endswith("mutable=('a', 'b'))")
    assert repr(fx.handlers.eval()) == "fx.handlers.eval()"
    assert repr(fx.handlers.train({"dropout": KEY})) == "fx.handlers.train(rngs={'dropout': <key>}, mutable=None)"
    with pytest.raises(fx.InvalidNameError, match="params"):
        fx.handlers.train(KEY, mutable=["params"])


@pytest.mark.parametrize(("call", "given"), [
    (lambda: fx.handlers.eval(KEY), "key"),
    (lambda: fx.handlers.eval(jax.random.PRNGKey(0)), "key"),
    (lambda: fx.handlers.eval({"dropout": KEY}), "key"),
    (lambda: fx.handlers.eval(rngs=KEY), r"rngs=\.\.\."),
])
def test_eval_given_a_key_says_it_draws_none(call, given):
    """`eval(key)`, by symmetry with `train(key)`, took the key for `mutable` (and dumped it over two lines);
    `eval(rngs=k)` was a raw TypeError."""
    with pytest.raises(fx.EffaxError, match=rf"fx.handlers.eval\({given}\): eval draws no keys, as dropout is off in "
                                            r"eval.*takes only mutable=\[\.\.\.\]") as info:
        call()
    assert "\n" not in str(info.value)
    assert T.apply(V, X, handlers=fx.handlers.eval()).shape == X.shape  # the fix
    mc = T.apply(V, X, training=False, rngs={"dropout": KEY})  # draws at eval time, as the message says
    np.testing.assert_array_equal(mc, T.apply(V, X, handlers=fx.handlers.eval()))


@pytest.mark.parametrize("option", ["rngs", "mutable"])
@pytest.mark.parametrize(
    "preset", [fx.handlers.train(KEY, mutable=["batch_stats"]), fx.handlers.eval()], ids=["train", "eval"]
)
def test_a_preset_given_for_rngs_or_mutable_says_to_pass_it_as_handlers(option, preset):
    """Was a truncated `rngs is Preset fx.handlers.train(rngs=<key>, mutable=No` or an InvalidNameError on a Mode."""
    with pytest.raises(fx.EffaxError, match=rf"`{option}=` got {re.escape(repr(preset))}: pass presets and "
                                            r"handlers as `handlers=`"):
        T.apply(V, X, **{option: preset})
    with pytest.raises(fx.EffaxError, match=rf"`{option}=` got the handler Mode: pass presets and handlers as"):
        T.apply(V, X, **{option: fx.handlers.Mode(True)})
    T.apply(V, X, handlers=preset)  # the fix


def test_a_preset_passes_through_jit_with_its_keys_traced():
    """`jax.jit(t.apply)(v, x, handlers=fx.handlers.eval())` was a raw JAX error: a Preset is no array. A preset is
    a pytree: the train preset's keys are traced, the mode and mutable collections static, so a fresh key (and a
    fresh preset object) each step reuses one compiled program."""
    traces = []

    def step(v, x, handlers):
        traces.append(1)
        return T.apply(v, x, handlers=handlers)

    jitted = jax.jit(step)
    for seed in range(3):
        preset = fx.handlers.train(jax.random.key(seed), mutable=["batch_stats"])
        got, expected = jitted(V, X, preset), T.apply(V, X, handlers=preset)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)
    assert len(traces) == 1
    np.testing.assert_allclose(jax.jit(T.apply)(V, X, handlers=fx.handlers.eval()),
                               T.apply(V, X, handlers=fx.handlers.eval()), rtol=1e-6)
    assert jax.tree.leaves(fx.handlers.eval()) == [] and len(jax.tree.leaves(fx.handlers.train(KEY))) == 1


def test_a_frozen_write_under_a_preset_shows_the_run_s_mutable_and_the_preset_fix():
    """A typo in the preset's `mutable` read as "pass `mutable=` to t.apply", which the preset then refused."""
    t = fx.transform(lambda x: fx.nn.BatchNorm()(x))
    x, key = jnp.ones((4, 3)), jax.random.key(0)
    v = t.init(key, x)
    with pytest.raises(fx.FrozenStateError, match=r"\(mutable: \['batch_stat'\]\).*"
                                                   r"fx\.handlers\.train\(rngs, mutable=\['batch_stats'\]\)"):
        t.apply(v, x, handlers=fx.handlers.train(key, mutable=["batch_stat"]))
    t.apply(v, x, handlers=fx.handlers.train(key, mutable=["batch_stats"]))  # the fix works
