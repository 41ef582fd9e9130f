"""Layers: shapes, param names, train/eval behaviour, and numerics against flax.linen on the same weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_parity import KEY, against_flax, rand, shapes  # the one Flax comparison helper of tests/nn

import effax as fx
from effax.nn._attention import _attention, attention_with_dropout

# --- Dense, Conv, Embed


def test_dense_matches_flax():
    against_flax(fx.nn.Dense(5), nn.Dense(5), rand(2, 7, 3))
    against_flax(fx.nn.Dense(4, use_bias=False), nn.Dense(4, use_bias=False), rand(3))


def test_dense_dtype_promotion():
    t = fx.transform(lambda x: fx.nn.Dense(2, dtype=jnp.bfloat16)(x))
    x = rand(1, 3)
    v = t.init(KEY, x)
    assert v["params"]["Dense_0"]["kernel"].dtype == jnp.float32
    assert t.apply(v, x).dtype == jnp.bfloat16


def _half_in_ci(cases):
    """Every other case marked slow: each is a Flax compile; the README's command runs half, CI all."""
    return [c if i % 2 == 0 else pytest.param(*c, marks=pytest.mark.slow) for i, c in enumerate(cases)]


@pytest.mark.parametrize(
    "kwargs, shape",
    _half_in_ci([
        (dict(features=4, kernel_size=(3,)), (2, 9, 3)),
        (dict(features=4, kernel_size=(3,), padding="CAUSAL", kernel_dilation=2), (2, 9, 3)),
        (dict(features=4, kernel_size=(3,), strides=2, padding="VALID"), (9, 3)),
        (dict(features=4, kernel_size=(3, 3)), (2, 6, 6, 2)),
        (dict(features=6, kernel_size=(2, 3), strides=(2, 1), padding=1, feature_group_count=2), (2, 6, 6, 4)),
        (dict(features=4, kernel_size=(3, 3), padding=[(1, 0), (0, 2)], input_dilation=2), (3, 2, 5, 5, 2)),
        (dict(features=3, kernel_size=(3, 3), padding="CIRCULAR"), (2, 7, 6, 4)),
        (dict(features=3, kernel_size=(2, 3), padding="CIRCULAR", strides=2), (1, 7, 6, 2)),
        (dict(features=3, kernel_size=(3,), padding="REFLECT", kernel_dilation=2), (2, 9, 3)),
        (dict(features=3, kernel_size=(4, 3), padding="REFLECT"), (6, 6, 2)),
    ]),
)
def test_conv_matches_flax(kwargs, shape):
    against_flax(fx.nn.Conv(**kwargs), nn.Conv(**kwargs), rand(*shape))


def test_conv_errors_say_how_to_fix():
    def init(layer, shape):
        return jax.eval_shape(fx.transform(lambda x: layer(x)).init, KEY, jax.ShapeDtypeStruct(shape, jnp.float32))

    with pytest.raises(fx.EffaxError, match=r"needs inputs .*got shape \(5,\)"):
        init(fx.nn.Conv(2, 3), (5,))  # an int kernel_size is 1-D, as Flax's: (3,)
    with pytest.raises(fx.EffaxError, match="not divisible by feature_group_count=2"):
        init(fx.nn.Conv(2, (3,), feature_group_count=2), (1, 5, 3))
    with pytest.raises(fx.EffaxError, match=r"needs inputs .*got shape \(5, 2\)"):
        init(fx.nn.Conv(2, (3, 3)), (5, 2))
    with pytest.raises(fx.EffaxError, match="strides .* has 3 entries"):
        init(fx.nn.Conv(2, (3, 3), strides=(1, 1, 1)), (1, 5, 5, 2))


class _Net(fx.nn.Module):
    def __call__(self, x):
        x = fx.nn.Conv(4, (3, 3))(x)
        return fx.nn.Conv(4, (3, 3))(x.reshape(-1, 4))  # the wrong rank, at `block/Conv_1`


@pytest.mark.parametrize(
    "layer, shape, message",
    [
        (_Net(name="block"), (1, 5, 5, 2), r"Conv `block/Conv_1` with kernel_size \(3, 3\) needs inputs"),
        (fx.nn.MultiHeadAttention(2, name="attn"), (4,), r"MultiHeadAttention `attn` takes inputs \(batch"),
        (fx.nn.Dense(3, name="head"), (), r"Dense `head` maps the last axis of its input, but got a scalar"),
        (fx.nn.GroupNorm(num_groups=3, name="gn"), (2, 4), r"GroupNorm `gn`: num_groups=3 does not divide"),
        (fx.nn.Embed(3, 2, name="emb"), (2,), r"Embed `emb` takes integer ids"),
    ],
)
def test_errors_about_inputs_name_the_layer(layer, shape, message):
    """A wrong input names the layer that refused it, never a bare IndexError from inside."""
    with pytest.raises(fx.EffaxError, match=message):
        fx.transform(lambda x: layer(x)).init(KEY, jnp.ones(shape))


@pytest.mark.parametrize(
    "layer, flax_layer",
    [
        (fx.nn.DenseGeneral(3, axis=5), nn.DenseGeneral(3, axis=5)),
        (fx.nn.DenseGeneral(3, axis=(1, -3)), nn.DenseGeneral(3, axis=(1, -3))),
        (fx.nn.LayerNorm(reduction_axes=3), nn.LayerNorm(reduction_axes=3)),
        (fx.nn.RMSNorm(reduction_axes=(0, 2)), nn.RMSNorm(reduction_axes=(0, 2))),
        (fx.nn.GroupNorm(num_groups=1, reduction_axes=(-4, -1)), nn.GroupNorm(num_groups=1, reduction_axes=(-4, -1))),
        (fx.nn.BatchNorm(axis=2), nn.BatchNorm(axis=2, use_running_average=True)),
    ],
)
def test_axes_out_of_range_are_refused_as_flax_does(layer, flax_layer):
    """An axis beyond the input's rank would otherwise wrap round onto another axis, silently."""
    x = rand(2, 4)
    with pytest.raises((IndexError, TypeError, ValueError)):  # Flax refuses too, wherever the axis is first used
        flax_layer.init(KEY, x)
    with pytest.raises(fx.EffaxError, match=r"is out of range for an input of (rank 2|shape \(2, 4\))"):
        fx.transform(lambda x: layer(x)).init(KEY, x)


def test_embed_and_attend_match_flax():
    ids = jnp.array([[0, 3, 9], [2, 2, 1]])
    t, v = against_flax(fx.nn.Embed(10, 4), nn.Embed(10, 4), ids)
    query = rand(2, 4)
    ours = fx.transform(lambda q: fx.nn.Embed(10, 4).attend(q)).apply(v, query)
    theirs = nn.Embed(10, 4).apply({"params": v["params"]["Embed_0"]}, query, method="attend")
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_embed_attend_ties_the_output_projection_to_the_table():
    def lm(ids):
        embed = fx.nn.Embed(6, 3)
        return embed.attend(embed(ids))

    t = fx.transform(lm)
    ids = jnp.array([1, 4])
    v = t.init(KEY, ids)
    assert shapes(v["params"]) == {"Embed_0": {"embedding": (6, 3)}}
    table = v["params"]["Embed_0"]["embedding"]
    grads = jax.grad(lambda p: t.apply({"params": p}, ids).sum())(v["params"])
    # the table gets gradient from both uses: lookup rows and the output projection
    expected = jax.grad(lambda w: (w[ids] @ w.T).sum())(table)
    np.testing.assert_allclose(grads["Embed_0"]["embedding"], expected, atol=1e-6)


def test_embed_refuses_float_ids():
    with pytest.raises(fx.EffaxError, match=r"integer ids, got float32.*astype\(jnp.int32\)"):
        fx.transform(lambda x: fx.nn.Embed(4, 2)(x)).init(KEY, jnp.ones(3))


# --- normalization


def test_layer_norm_matches_flax():
    x = rand(2, 5, 6) * 3 + 1
    against_flax(fx.nn.LayerNorm(), nn.LayerNorm(), x)
    against_flax(fx.nn.LayerNorm(use_bias=False, epsilon=1e-3), nn.LayerNorm(use_bias=False, epsilon=1e-3), x)
    against_flax(fx.nn.LayerNorm(reduction_axes=(1, 2)), nn.LayerNorm(reduction_axes=(1, 2)), x)


def test_rms_norm_matches_flax():
    against_flax(fx.nn.RMSNorm(), nn.RMSNorm(), rand(3, 8) * 2)


def test_norm_output_dtype_follows_flax():
    x = rand(2, 4).astype(jnp.bfloat16)
    t = fx.transform(lambda x: fx.nn.LayerNorm()(x))
    v = t.init(KEY, x)
    assert t.apply(v, x).dtype == nn.LayerNorm().apply(nn.LayerNorm().init(KEY, x), x).dtype


def bn_model(x):
    return fx.nn.BatchNorm(momentum=0.9)(x)


def test_batch_norm_matches_flax_in_train_and_eval():
    x = rand(8, 5) * 2 + 3
    t = fx.transform(bn_model)
    v = t.init(KEY, x)
    assert shapes(v) == {
        "params": {"BatchNorm_0": {"bias": (5,), "scale": (5,)}},
        "batch_stats": {"BatchNorm_0": {"mean": (5,), "var": (5,)}},
    }
    flax_bn = nn.BatchNorm(momentum=0.9)
    fv = flax_bn.init(KEY, x, use_running_average=False)
    fv = {c: {"BatchNorm_0": tree} for c, tree in fv.items()}
    fv["params"]["BatchNorm_0"]["scale"] = rand(5, seed=3)
    fv["params"]["BatchNorm_0"]["bias"] = rand(5, seed=4)
    flax_v = {c: tree["BatchNorm_0"] for c, tree in fv.items()}

    y, updates = t.apply(fv, x, training=True, mutable=["batch_stats"])
    fy, fupdates = flax_bn.apply(flax_v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, fy, atol=1e-5)
    ours = updates["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(ours["mean"], fupdates["batch_stats"]["mean"], atol=1e-6)
    np.testing.assert_allclose(ours["var"], fupdates["batch_stats"]["var"], atol=1e-5)

    stepped = {**fv, **updates}
    flax_stepped = {**flax_v, **fupdates}
    np.testing.assert_allclose(
        t.apply(stepped, x, training=False),
        flax_bn.apply(flax_stepped, x, use_running_average=True),
        atol=1e-5,
    )


def test_batch_norm_updates_stats_only_in_train():
    x = rand(6, 3) + 5
    t = fx.transform(bn_model)
    v = t.init(KEY, x)
    _, updates = t.apply(v, x, training=True, mutable=True)
    assert not np.allclose(updates["batch_stats"]["BatchNorm_0"]["mean"], 0.0)
    _, eval_updates = t.apply(v, x, training=False, mutable=True)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, eval_updates["batch_stats"], v["batch_stats"]))
    # eval reads the running stats (zeros/ones here), so it does not normalize the batch
    np.testing.assert_allclose(t.apply(v, x, training=False), x / np.sqrt(1 + 1e-5), atol=1e-5)
    with pytest.raises(fx.FrozenStateError, match="batch_stats"):
        t.apply(v, x, training=True)  # training writes the stats: batch_stats must be mutable


def test_batch_norm_takes_float64_stats_read_back_from_numpy_as_float32():
    x = rand(6, 3)
    t = fx.transform(bn_model)
    v = t.init(KEY, x)
    from_numpy = jax.tree.map(lambda a: np.asarray(a, np.float64), v)  # what np.load gives back
    np.testing.assert_allclose(t.apply(from_numpy, x, training=False), t.apply(v, x, training=False), rtol=1e-6)
    assert fx.check_variables(t, from_numpy, x).ok
    wrong = {**v, "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}}
    with pytest.raises(fx.ShapeMismatchError, match=r"holds float32\[4\], but this BatchNorm needs float32\[3\]"):
        t.apply(wrong, x, training=False)


def test_batch_norm_use_running_average_overrides_the_mode():
    x = rand(4, 2) + 5
    t = fx.transform(lambda x: fx.nn.BatchNorm()(x, use_running_average=True))
    v = t.init(KEY, x)
    assert np.allclose(t.apply(v, x, training=True), x / np.sqrt(1 + 1e-5), atol=1e-5)
    t2 = fx.transform(lambda x: fx.nn.BatchNorm(use_running_average=False)(x))
    y, _ = t2.apply(v, x, mutable=True)
    assert abs(float(y.mean())) < 1e-5  # batch statistics without asking for the mode


def test_batch_norm_over_a_channel_axis_of_images():
    x = rand(2, 4, 4, 3)
    against_flax(fx.nn.BatchNorm(use_running_average=True), nn.BatchNorm(use_running_average=True), x)


# --- Dropout


def dropout_model(x):
    x = fx.nn.Dropout(0.5)(x)
    return fx.nn.Dropout(0.5)(x)


def test_dropout_is_the_identity_in_eval_and_draws_no_key():
    x = jnp.ones((4, 8))
    assert jnp.array_equal(fx.transform(dropout_model).apply({}, x, training=False), x)  # rngs=None works


def test_dropout_drops_and_rescales_in_train():
    x = jnp.ones((50, 40))
    t = fx.transform(lambda x: fx.nn.Dropout(0.25)(x))
    y = t.apply({}, x, training=True, rngs={"dropout": KEY})
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.75])
    assert 0.2 < float((y == 0).mean()) < 0.3
    assert jnp.array_equal(y, t.apply({}, x, training=True, rngs={"dropout": KEY}))
    assert not jnp.array_equal(y, t.apply({}, x, training=True, rngs={"dropout": jax.random.key(1)}))


def test_dropout_layers_draw_different_masks():
    t = fx.transform(lambda x: (fx.nn.Dropout(0.5)(x), fx.nn.Dropout(0.5)(x)))
    a, b = t.apply({}, jnp.ones(64), training=True, rngs={"dropout": KEY})
    assert not jnp.array_equal(a, b)


def test_dropout_needs_the_dropout_stream_when_training():
    with pytest.raises(fx.MissingRngError, match="'dropout'.*Dropout_0"):
        fx.transform(dropout_model).apply({}, jnp.ones(3), training=True, rngs={"params": KEY})


def test_dropout_overrides_and_edge_rates():
    x = jnp.ones((3, 8))
    t = fx.transform(lambda x: fx.nn.Dropout(0.5, deterministic=True)(x))
    assert jnp.array_equal(t.apply({}, x, training=True), x)
    t = fx.transform(lambda x: fx.nn.Dropout(0.5)(x, deterministic=False))
    assert not jnp.array_equal(t.apply({}, x, training=False, rngs=KEY), x)
    assert jnp.array_equal(fx.transform(lambda x: fx.nn.Dropout(0.0)(x)).apply({}, x), x)  # no mode needed
    assert jnp.array_equal(fx.transform(lambda x: fx.nn.Dropout(1.0)(x)).apply({}, x, training=True), 0 * x)
    t = fx.transform(lambda x: fx.nn.Dropout(0.5, broadcast_dims=(0,))(x))
    y = t.apply({}, x, training=True, rngs=KEY)
    assert jnp.array_equal(y, jnp.broadcast_to(y[0], y.shape))  # one mask shared along dim 0
    with pytest.raises(fx.EffaxError, match=r"`rate` must be in \[0, 1\], got 1.5"):
        fx.transform(lambda x: fx.nn.Dropout(1.5)(x)).apply({}, x, training=False)


# --- attention


def test_attention_matches_flax_self_and_cross():
    x, ctx = rand(2, 5, 8), rand(2, 3, 6, seed=2)
    against_flax(fx.nn.MultiHeadAttention(num_heads=2), nn.MultiHeadDotProductAttention(num_heads=2), x)
    against_flax(
        fx.nn.MultiHeadAttention(num_heads=4, qkv_features=12, out_features=5),
        nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=12, out_features=5),
        x,
        ctx,
    )


@pytest.mark.slow  # a Flax compile; self and cross attention stay in the quick run
def test_causal_attention_matches_flax_with_a_causal_mask():
    x = rand(2, 6, 8)
    causal = nn.make_causal_mask(jnp.ones((2, 6)))
    fv = nn.MultiHeadDotProductAttention(num_heads=2).init(KEY, x)
    v = {"params": {"MultiHeadAttention_0": fv["params"]}}
    ours = fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=2, causal=True)(x)).apply(v, x)
    theirs = nn.MultiHeadDotProductAttention(num_heads=2).apply(fv, x, mask=causal)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # the mask as an argument, and as a side input, give the same result
    by_arg = fx.transform(lambda x, m: fx.nn.MultiHeadAttention(num_heads=2)(x, mask=m)).apply(v, x, causal)
    np.testing.assert_allclose(by_arg, theirs, atol=1e-5)
    side = fx.handlers.SideInputs({"attention_mask": causal})
    by_side = fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=2)(x)).apply(v, x, handlers=[side])
    np.testing.assert_allclose(by_side, theirs, atol=1e-5)


def test_causal_attention_ignores_the_future():
    t = fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=2, causal=True)(x))
    x = rand(1, 6, 4)
    v = jax.jit(t.init)(KEY, x)
    apply = jax.jit(t.apply)
    changed = x.at[:, 4:].set(9.0)
    np.testing.assert_allclose(apply(v, x)[:, :4], apply(v, changed)[:, :4], atol=1e-6)
    assert not np.allclose(apply(v, x)[:, 4:], apply(v, changed)[:, 4:])


def test_attention_without_batch_dims_and_with_two():
    t = fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=2, causal=True)(x))
    x = rand(3, 2, 5, 4)
    v = jax.jit(t.init)(KEY, x)
    np.testing.assert_allclose(jax.jit(t.apply)(v, x)[1, 0], jax.jit(t.apply)(v, x[1, 0]), atol=1e-6)


def test_attention_dropout_path_equals_the_fused_path_at_rate_zero():
    q, k, val = rand(2, 5, 3, 4), rand(2, 7, 3, 4, seed=2), rand(2, 7, 3, 4, seed=3)
    mask = np.random.default_rng(0).random((2, 1, 5, 7)) < 0.7
    mask[..., 0] = True
    ours = jax.jit(attention_with_dropout, static_argnums=(4, 6))(q, k, val, mask, 0.0, KEY, True)
    np.testing.assert_allclose(ours, jax.jit(_attention)(q, k, val, mask), atol=1e-5)


def test_attention_dropout_only_when_training():
    layer = lambda x: fx.nn.MultiHeadAttention(num_heads=2, dropout_rate=0.5)(x)
    t = fx.transform(layer)
    x = rand(2, 5, 4)
    v = jax.jit(t.init)(KEY, x)
    eval_out = jax.jit(lambda v, x: t.apply(v, x, training=False))(v, x)  # no rngs: nothing drawn
    train_out = jax.jit(lambda v, x: t.apply(v, x, training=True, rngs={"dropout": KEY}))(v, x)
    assert not np.allclose(eval_out, train_out)
    with pytest.raises(fx.MissingRngError, match="'dropout'"):
        t.apply(v, x, training=True)


def test_attention_rejects_indivisible_heads():
    with pytest.raises(fx.EffaxError, match="qkv_features=6 is not divisible by num_heads=4"):
        jax.eval_shape(fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=4)(x)).init, KEY, rand(1, 2, 6))


# --- combinators


def test_mlp_layers_and_activations():
    t = fx.transform(lambda x: fx.nn.MLP([4, 2], activate_final=True)(x))
    x = rand(3, 5)
    v = t.init(KEY, x)
    p = v["params"]["MLP_0"]
    assert shapes(p) == {"Dense_0": {"bias": (4,), "kernel": (5, 4)}, "Dense_1": {"bias": (2,), "kernel": (4, 2)}}
    h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    np.testing.assert_allclose(t.apply(v, x), jax.nn.relu(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]), atol=1e-6)


def test_sequential_chains_modules_and_functions():
    model = fx.nn.Sequential([fx.nn.Dense(4), jax.nn.relu, fx.nn.Dropout(0.5), fx.nn.Dense(1)])
    t = fx.transform(model)
    x = rand(2, 3)
    v = t.init(KEY, x)
    # `fx.transform(module)` runs the module at the root scope, as Flax's top-level module, and layers made
    # before the run are named by their place in `layers`, as Flax names them
    assert sorted(v["params"]) == ["layers_0", "layers_3"]
    assert t.apply(v, x, training=False).shape == (2, 1)
    with pytest.raises(fx.EffaxError, match="at least one layer"):
        fx.nn.Sequential([])(x)


def test_sequential_takes_a_linen_sequentials_variables():
    linen = nn.Sequential([nn.Dense(5), nn.relu, nn.Dense(2)])
    x = rand(2, 4)
    v = linen.init(KEY, x)
    t = fx.transform(fx.nn.Sequential([fx.nn.Dense(5), jax.nn.relu, fx.nn.Dense(2)]))
    assert shapes(t.init(KEY, x)) == shapes(v)
    np.testing.assert_allclose(t.apply(v, x), linen.apply(v, x), atol=1e-6)


def test_sequential_spreads_tuples_and_dicts_over_the_next_layer():
    """As Flax's: a tuple output becomes the next layer's arguments, a dict its keyword arguments."""
    x = rand(2, 4)
    layers = [lambda x: (x[:, :2], x[:, 2:]), lambda a, b: {"a": a, "b": b}, lambda a, b: a * b]
    out = fx.transform(fx.nn.Sequential(layers)).apply({}, x)
    np.testing.assert_array_equal(out, nn.Sequential(layers).apply({}, x))
