"""Flax's remaining init/apply options: capture_intermediates, init(mutable=...), method=, and multi_transform."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx

KEY = jax.random.key(0)
X = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def assert_trees_close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6), a, b)


# --- capture_intermediates, against Flax's


class FlaxTwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(3)(x))
        return nn.Dense(2)(x)


class TwoLayer(fx.nn.Module):
    def __call__(self, x):
        x = jax.nn.relu(fx.nn.Dense(3)(x))
        return fx.nn.Dense(2)(x)


@pytest.fixture(scope="module")
def flax_variables():
    return FlaxTwoLayer().init(KEY, X)


def test_capture_layout_and_values_match_flax(flax_variables):
    _, flax_updates = FlaxTwoLayer().apply(flax_variables, X, capture_intermediates=True, mutable=["intermediates"])
    t = fx.transform(TwoLayer())
    y, updates = t.apply(flax_variables, X, capture_intermediates=True)
    assert list(updates) == ["intermediates"]
    # `fx.transform(module)` puts the module at the root, as Flax's top module (it was `TwoLayer_0` before)
    assert_trees_close(updates["intermediates"], flax_updates["intermediates"])
    assert shapes(updates["intermediates"]) == {
        "Dense_0": {"__call__": ((2, 3),)},
        "Dense_1": {"__call__": ((2, 2),)},
        "__call__": ((2, 2),),
    }


def test_capture_filter_matches_flax(flax_variables):
    _, flax_updates = FlaxTwoLayer().apply(
        flax_variables,
        X,
        capture_intermediates=lambda mdl, method: isinstance(mdl, nn.Dense),
        mutable=["intermediates"],
    )
    t = fx.transform(TwoLayer())
    _, updates = t.apply(
        flax_variables,
        X,
        capture_intermediates=lambda module, method: isinstance(module, fx.nn.Dense),
    )
    assert_trees_close(updates["intermediates"], flax_updates["intermediates"])


def test_init_with_capture_returns_intermediates_like_flax(flax_variables):
    flax_init = FlaxTwoLayer().init(KEY, X, capture_intermediates=True)
    v = fx.transform(TwoLayer()).init(KEY, X, capture_intermediates=True)
    assert sorted(v) == sorted(flax_init) == ["intermediates", "params"]
    assert shapes(v["intermediates"]) == shapes(flax_init["intermediates"])


def test_capture_of_a_plain_function_model_is_keyed_by_layer():
    t = fx.transform(lambda x: fx.nn.Dense(2)(fx.nn.Dense(3)(x)))
    v = t.init(KEY, X)
    y, updates = t.apply(v, X, capture_intermediates=True)
    # named at construction, as Flax: the outer Dense(2) is built first (it was Dense_1 when named at first call)
    assert shapes(updates) == {
        "intermediates": {"Dense_0": {"__call__": ((2, 2),)}, "Dense_1": {"__call__": ((2, 3),)}}
    }
    assert updates["intermediates"]["Dense_0"]["__call__"][0] is y


def test_capture_joins_the_other_mutable_collections_and_model_sows():
    def f(x):
        h = fx.nn.BatchNorm()(fx.nn.Dense(3)(x))
        fx.sow("h", h)
        return h

    t = fx.transform(f)
    v = t.init(KEY, X)
    _, updates = t.apply(v, X, training=True, mutable=["batch_stats"], capture_intermediates=True)
    assert sorted(updates) == ["batch_stats", "intermediates"]
    assert sorted(updates["intermediates"]) == ["BatchNorm_0", "Dense_0", "h"]
    # with no capture, apply returns what it did before
    assert sorted(t.apply(v, X, training=True, mutable=["batch_stats"])[1]) == ["batch_stats"]
    assert t.apply(v, X, training=False).shape == (2, 3)


def test_capture_under_jit_and_with_the_eval_preset():
    t = fx.transform(lambda x: fx.nn.Dense(2)(x))
    v = t.init(KEY, X)
    y, updates = jax.jit(lambda v, x: t.apply(v, x, capture_intermediates=True))(v, X)
    np.testing.assert_allclose(updates["intermediates"]["Dense_0"]["__call__"][0], y)
    y, updates = t.apply(v, X, handlers=fx.handlers.eval(), capture_intermediates=True)
    assert list(updates) == ["intermediates"]


def test_capture_sees_what_the_caller_receives_after_an_interceptor():
    t = fx.transform(lambda x: fx.nn.Dense(2)(x))
    v = t.init(KEY, X)
    double = fx.handlers.InterceptMethods(lambda nxt, args, kwargs, ctx: 2 * nxt(*args, **kwargs))
    y, updates = t.apply(v, X, capture_intermediates=True, handlers=[double])
    np.testing.assert_allclose(updates["intermediates"]["Dense_0"]["__call__"][0], y)
    np.testing.assert_allclose(y, 2 * t.apply(v, X))


# --- init(mutable=...)


def sowing_stateful(x):
    fx.sow("h", x)
    h = fx.nn.BatchNorm()(x)
    count = fx.local_state("count", lambda: jnp.zeros(()), collection="counter")
    count.set(count.get() + 1)
    return h


def test_init_default_returns_every_state_collection_and_no_sown_values():
    v = fx.transform(sowing_stateful).init(KEY, X)
    assert sorted(v) == ["batch_stats", "counter", "params"]
    assert v["counter"]["count"] == 0  # init creates, it does not step


def test_init_mutable_true_also_returns_sown_values():
    v = fx.transform(sowing_stateful).init(KEY, X, mutable=True)
    assert sorted(v) == ["batch_stats", "counter", "intermediates", "params"]
    np.testing.assert_array_equal(v["intermediates"]["h"][0], X)


def test_init_mutable_names_the_collections_returned_and_accepts_params():
    t = fx.transform(lambda x: fx.nn.BatchNorm()(x))
    assert sorted(t.init(KEY, X, mutable=["params", "batch_stats"])) == ["batch_stats", "params"]
    v = fx.transform(sowing_stateful).init(KEY, X, mutable=("batch_stats", "counter", "intermediates"))
    assert sorted(v) == ["batch_stats", "counter", "intermediates", "params"]


def test_init_mutable_leaving_out_a_state_collection_raises_like_flax():
    with pytest.raises(fx.MissingVariableError, match="batch_stats"):
        fx.transform(sowing_stateful).init(KEY, X, mutable=["params", "counter"])


def test_init_mutable_false_or_params_only_returns_params_of_a_stateless_model():
    t = fx.transform(lambda x: fx.nn.Dense(2)(x))
    assert list(t.init(KEY, X, mutable=False)) == ["params"]
    assert list(t.init(KEY, X, mutable="params")) == ["params"]


def test_init_mutable_refuses_one_collection_holding_state_and_sows():
    def f(x):
        fx.local_state("n", lambda: jnp.zeros(()), collection="stats")
        fx.sow("h", x, collection="stats")
        return x

    fx.transform(f).init(KEY, X)  # sows are not collected by default, so no clash
    with pytest.raises(fx.ParamConflictError, match="'stats' holds local state and sown values"):
        fx.transform(f).init(KEY, X, mutable=True)


# --- method=


class AutoEncoder(fx.nn.Module):
    latent: int = 2

    def encode(self, x):
        return fx.nn.Dense(self.latent, name="encoder")(x)

    def decode(self, z):
        return fx.nn.Dense(4, name="decoder")(z)

    def __call__(self, x):
        return self.decode(self.encode(x))


def test_method_picks_the_entry_point_in_init_and_apply():
    ae = AutoEncoder()
    t = fx.transform(ae)
    v = t.init(KEY, X)
    assert shapes(v["params"]) == {  # the module is the root scope, as Flax's top module
        "encoder": {"bias": (2,), "kernel": (4, 2)},
        "decoder": {"bias": (4,), "kernel": (2, 4)},
    }
    z = t.apply(v, X, method="encode")
    assert z.shape == (2, 2)
    np.testing.assert_allclose(t.apply(v, z, method="decode"), t.apply(v, X), rtol=1e-6)
    # a function called with the module, or the class's method, as in Flax
    np.testing.assert_allclose(t.apply(v, X, method=lambda m, x: m.encode(x)), z)
    np.testing.assert_allclose(t.apply(v, X, method=AutoEncoder.encode), z)
    np.testing.assert_allclose(t.apply(v, X, method=ae.encode), z)


def test_init_through_one_method_creates_only_its_variables():
    v = fx.transform(AutoEncoder()).init(KEY, X, method="encode")
    assert list(v["params"]) == ["encoder"]


def test_transform_with_a_default_method_and_an_override():
    ae = AutoEncoder()
    t = fx.transform(ae, method="encode")
    v = fx.transform(ae).init(KEY, X)
    z = t.apply(v, X)
    assert z.shape == (2, 2)
    assert t.apply(v, z, method="decode").shape == (2, 4)
    assert t.apply(v, X, method="__call__").shape == (2, 4)
    report = fx.check_variables(t, v, X)  # the default entry runs: the decoder is unused by `encode`
    assert report.unused and all(u.startswith("params:decoder") for u in report.unused)  # the whole decoder
    assert not report.missing


def test_an_unknown_method_names_the_public_methods():
    t = fx.transform(AutoEncoder())
    with pytest.raises(fx.EffaxError, match=r"no method 'decoder' \(its public methods: \['decode', 'encode'\]\)"):
        t.init(KEY, X, method="decoder")
    with pytest.raises(fx.EffaxError, match="fx.multi_transform"):
        fx.transform(lambda x: x, method="encode")
    with pytest.raises(fx.EffaxError, match="method= takes a method name or a function"):
        t.init(KEY, X, method=3)


# --- multi_transform


def encoder_decoder():
    encoder = fx.nn.Dense(2, name="encoder")
    decoder = fx.nn.Dense(4, name="decoder")

    def encode(x):
        return encoder(x)

    def decode(z):
        return decoder(z)

    return (lambda x: decode(encode(x))), {"encode": encode, "decode": decode}


def test_multi_transform_entries_share_the_template_variables():
    ae = fx.multi_transform(encoder_decoder)
    v = ae.init(KEY, X)
    assert sorted(v["params"]) == ["decoder", "encoder"]
    assert sorted(ae.apply) == ["decode", "encode"]
    z = ae.apply["encode"](v, X)
    out, v2 = ae.init_with_output(KEY, X)
    np.testing.assert_allclose(ae.apply["decode"](v, z), out, rtol=1e-6)

    def loss(params):
        return jnp.sum(ae.apply["decode"]({"params": params}, z) ** 2)

    grads = jax.jit(jax.grad(loss))(v["params"])
    assert not jnp.any(grads["encoder"]["kernel"])  # decode alone does not reach the encoder
    assert jnp.any(grads["decoder"]["kernel"])


def test_multi_transform_entries_take_apply_options_and_any_tree():
    def f():
        bn = fx.nn.BatchNorm(name="bn")
        return (lambda x: bn(x)), (bn, lambda x: 2 * bn(x))

    mt = fx.multi_transform(f)
    v = mt.init(KEY, X)
    plain, doubled = mt.apply
    y, updates = plain(v, X, training=True, mutable=["batch_stats"])
    assert list(updates) == ["batch_stats"]
    np.testing.assert_allclose(doubled(v, X, training=False), 2 * plain(v, X, training=False))


def test_multi_transform_reports_a_bad_f():
    with pytest.raises(fx.EffaxError, match=r"`f\(\)` must return `\(template, entries\)`"):
        fx.multi_transform(lambda: {"encode": abs})
    with pytest.raises(fx.EffaxError, match="entry 3 of `f\\(\\)\\[1\\]` is not a function"):
        fx.multi_transform(lambda: (abs, {"encode": 3}))
    with pytest.raises(fx.EffaxError, match="takes a function"):
        fx.multi_transform(3)


# --- an option clash in a module: the fix keeps it at the root scope


class LinenCritic(nn.Module):
    @nn.compact
    def __call__(self, x, training=False):
        return nn.Dropout(0.5, deterministic=not training)(nn.Dense(4)(x))


class Critic(fx.nn.Module):
    def __call__(self, x, training=False):
        return fx.nn.Dropout(0.5)(fx.nn.Dense(4)(x), deterministic=not training)


def test_a_module_option_clash_suggests_method_which_keeps_linen_names():
    """The suggested `lambda x: critic(x, training=fx.is_training())` moved the params to `Critic_0/...`, so the
    linen critic's variables, which the user was porting, no longer loaded."""
    linen_vars = LinenCritic().init(KEY, X)
    critic = Critic()
    with pytest.raises(fx.EffaxError, match=r"'training'.*keeps the module at the root scope.*"
                                            r"`fx.transform\(model, method=lambda m, x: m\(x, "
                                            r"training=fx.is_training\(\)\)\)`"):
        fx.transform(critic).apply(linen_vars, X, training=False)
    fixed = fx.transform(critic, method=lambda m, x: m(x, training=fx.is_training()))  # the fix, as written
    assert shapes(fixed.init(KEY, X)) == shapes(linen_vars)
    assert_trees_close(fixed.apply(linen_vars, X, training=False), LinenCritic().apply(linen_vars, X))
    dropped = fixed.apply(linen_vars, X, training=True, rngs={"dropout": jax.random.key(2)})
    assert (dropped == 0).any() and dropped.shape == (2, 4)  # the mode reaches the module
