"""Flax linen fields a porting user reaches for, run on linen's own variables: the numbers must be linen's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_parity import KEY, against_flax, rand, shapes

import effax as fx

# --- DenseGeneral sorts its axes, as linen's `_normalize_axes`


@pytest.mark.parametrize("shape", [(2, 4, 5), (2, 4, 4)])  # square: same shapes, transposed numbers
def test_dense_general_sorts_an_unsorted_axis_as_flax(shape):
    against_flax(fx.nn.DenseGeneral(3, axis=(-1, -2)), nn.DenseGeneral(3, axis=(-1, -2)), rand(*shape))
    against_flax(fx.nn.DenseGeneral((2, 3), axis=(2, 1)), nn.DenseGeneral((2, 3), axis=(2, 1)), rand(*shape))


# --- norms: output dtype, fast variance, feature axes


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("LayerNorm", dict(use_scale=False, use_bias=False)),
        ("RMSNorm", dict(use_scale=False)),
        ("GroupNorm", dict(num_groups=2, use_scale=False, use_bias=False)),
        ("BatchNorm", dict(use_running_average=True, use_scale=False, use_bias=False)),
        ("LayerNorm", dict(use_scale=False)),  # a bias alone still promotes to float32
    ],
)
def test_norm_without_params_keeps_the_input_dtype_as_flax(name, kwargs):
    x = rand(4, 2, 6).astype(jnp.bfloat16)
    flax_layer = getattr(nn, name)(**kwargs)
    fv = flax_layer.init(KEY, x)
    t = fx.transform(lambda x: getattr(fx.nn, name)(**kwargs)(x))
    v = {c: {f"{name}_0": tree} for c, tree in fv.items()} or {"params": {}}
    out, expected = t.apply(v, x), flax_layer.apply(fv, x)
    assert out.dtype == expected.dtype
    np.testing.assert_allclose(np.float32(out), np.float32(expected), atol=2e-2)


OFFSET = 300.0  # far from zero: E[x^2] - E[x]^2 and E[(x - mean)^2] differ by ~1e-2 in float32


@pytest.mark.parametrize("fast", [None, True, False])
def test_layer_norm_variance_formula_matches_flax(fast):
    x = OFFSET + rand(2, 3, 64)
    kwargs = {} if fast is None else dict(use_fast_variance=fast)
    against_flax(fx.nn.LayerNorm(**kwargs), nn.LayerNorm(**kwargs), x)
    against_flax(fx.nn.LayerNorm(reduction_axes=(1, 2), **kwargs), nn.LayerNorm(reduction_axes=(1, 2), **kwargs), x)


@pytest.mark.parametrize("fast", [None, True, False])
def test_group_norm_variance_formula_matches_flax(fast):
    x = OFFSET + rand(3, 5, 6)
    kwargs = dict(num_groups=2) if fast is None else dict(num_groups=2, use_fast_variance=fast)
    against_flax(fx.nn.GroupNorm(**kwargs), nn.GroupNorm(**kwargs), x)


def _batch_norm_pair(kwargs):
    """An effax and a linen BatchNorm with `kwargs`, and linen's variables with a random scale and bias."""
    flax_bn = nn.BatchNorm(momentum=0.9, **kwargs)
    fv = flax_bn.init(KEY, rand(16, 4), use_running_average=False)
    fv = jax.tree.map(lambda a: a + rand(*a.shape, seed=3), fv)  # running stats off their init values too
    layer = fx.nn.BatchNorm(momentum=0.9, **kwargs)
    return layer, flax_bn, fv, {c: {"BatchNorm_0": tree} for c, tree in fv.items()}


def _assert_batch_norm_step(ours, theirs):
    (y, updates), (fy, fupdates) = ours, theirs
    np.testing.assert_allclose(y, fy, atol=1e-5, rtol=1e-5)
    for stat in ("mean", "var"):
        np.testing.assert_allclose(updates["batch_stats"]["BatchNorm_0"][stat], fupdates["batch_stats"][stat],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fast", [None, True, False])
def test_batch_norm_variance_formula_matches_flax_in_outputs_and_running_stats(fast):
    """Features far from zero: linen's default one-pass variance and its two-pass one give other numbers."""
    x = OFFSET + rand(16, 4)
    layer, flax_bn, fv, v = _batch_norm_pair({} if fast is None else dict(use_fast_variance=fast))
    t = fx.transform(lambda x: layer(x))
    ours = t.apply(v, x, training=True, mutable=["batch_stats"])
    theirs = flax_bn.apply(fv, x, use_running_average=False, mutable=["batch_stats"])
    _assert_batch_norm_step(ours, theirs)
    stepped, flax_stepped = {**v, **ours[1]}, {**fv, **theirs[1]}  # eval on the updated running stats
    np.testing.assert_allclose(t.apply(stepped, x, training=False),
                               flax_bn.apply(flax_stepped, x, use_running_average=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fast", [True, False])
def test_batch_norm_variance_over_a_mapped_axis_matches_flax(fast):
    """`axis_name`: one `pmean` of both moments when fast, the mean first then the deviations when not."""
    x = OFFSET + rand(4, 4, 4)  # 4 shards of a batch of 16
    layer, flax_bn, fv, v = _batch_norm_pair(dict(axis_name="shards", use_fast_variance=fast))
    t = fx.transform(lambda x: layer(x))
    ours = jax.vmap(lambda x: t.apply(v, x, training=True, mutable=["batch_stats"]), axis_name="shards")(x)
    theirs = jax.vmap(lambda x: flax_bn.apply(fv, x, use_running_average=False, mutable=["batch_stats"]),
                      axis_name="shards")(x)
    _assert_batch_norm_step(ours, theirs)


def test_rms_norm_takes_use_fast_variance_and_it_changes_nothing_as_in_flax():
    x = OFFSET + rand(2, 16)
    against_flax(fx.nn.RMSNorm(use_fast_variance=False), nn.RMSNorm(use_fast_variance=False), x)
    against_flax(fx.nn.RMSNorm(use_fast_variance=True), nn.RMSNorm(use_fast_variance=True), x)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(feature_axes=-1),
        dict(reduction_axes=(1, 2), feature_axes=(1, 2)),
        dict(reduction_axes=(-2, -1), feature_axes=-2),
        dict(feature_axes=(1, -1)),
    ],
)
@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_norm_feature_axes_shape_the_params_as_flax(name, kwargs):
    """Random scale and bias (not the ones/zeros of init), so a wrong broadcast shows in the numbers."""
    x = rand(2, 3, 4) * 2 + 1
    flax_layer = getattr(nn, name)(**kwargs)
    fv = flax_layer.init(KEY, x)
    fv = jax.tree.map(lambda a: a + rand(*a.shape, seed=3), fv)
    t = fx.transform(lambda x: getattr(fx.nn, name)(**kwargs)(x))
    assert shapes(t.init(KEY, x)["params"][f"{name}_0"]) == shapes(fv["params"])
    out = t.apply({"params": {f"{name}_0": fv["params"]}}, x)
    np.testing.assert_allclose(out, flax_layer.apply(fv, x), atol=1e-5, rtol=1e-5)


# --- Conv and ConvTranspose read an int kernel_size as linen does: `k` is `(k,)`, a 1-D kernel


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(features=4, kernel_size=3), (2, 9, 3)),
        (dict(features=4, kernel_size=3, strides=2, kernel_dilation=2, padding="VALID"), (9, 3)),
        (dict(features=4, kernel_size=2, input_dilation=2, padding=1), (2, 9, 3)),
        (dict(features=4, kernel_size=3), (2, 6, 6, 2)),  # 1-D over the last spatial dim, not a 3x3 kernel
        (dict(features=4, kernel_size=(3, 3), strides=None, kernel_dilation=None, input_dilation=None), (2, 6, 6, 2)),
    ],
)
def test_conv_int_kernel_size_is_one_dimensional_as_flax(kwargs, shape):
    against_flax(fx.nn.Conv(**kwargs), nn.Conv(**kwargs), rand(*shape))


def test_conv_takes_a_numpy_int_kernel_size_as_an_int():
    """What `check_sizes` lets through when built (a size read from an array) runs, where linen's `tuple()` fails."""
    x = rand(2, 9, 3)
    t_np, t_int = (fx.transform(lambda x, k=k: fx.nn.Conv(4, k)(x)) for k in (np.int64(3), 3))
    v = t_int.init(KEY, x)
    assert shapes(t_np.init(KEY, x)) == shapes(v) == {"params": {"Conv_0": {"bias": (4,), "kernel": (3, 3, 4)}}}
    np.testing.assert_array_equal(t_np.apply(v, x), t_int.apply(v, x))


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(features=3, kernel_size=2, strides=2), (2, 5, 2)),
        (dict(features=3, kernel_size=3), (2, 4, 4, 2)),
    ],
)
def test_conv_transpose_int_kernel_size_is_one_dimensional_as_flax(kwargs, shape):
    against_flax(fx.nn.ConvTranspose(**kwargs), nn.ConvTranspose(**kwargs), rand(*shape))


@pytest.mark.parametrize("layer", [fx.nn.Conv, fx.nn.ConvTranspose])
@pytest.mark.parametrize("bad", [0, -3, True, 3.0, "3", (3, 0), ()])
def test_a_wrong_kernel_size_is_still_refused_when_built(layer, bad):
    with pytest.raises(fx.EffaxError, match=r"`kernel_size` must be a positive int or a sequence of them"):
        layer(4, bad)


# --- precision


@pytest.mark.parametrize(
    "layer, flax_layer, shape",
    [
        (fx.nn.Dense(3, precision="highest"), nn.Dense(3, precision="highest"), (2, 4)),
        (fx.nn.DenseGeneral((2, 3), precision="highest"), nn.DenseGeneral((2, 3), precision="highest"), (2, 4)),
        (fx.nn.Conv(3, (3,), precision="highest"), nn.Conv(3, (3,), precision="highest"), (2, 5, 2)),
        (
            fx.nn.ConvTranspose(3, (2,), strides=(2,), precision="highest"),
            nn.ConvTranspose(3, (2,), strides=(2,), precision="highest"),
            (2, 5, 2),
        ),
    ],
)
def test_precision_is_taken_and_reaches_the_product(layer, flax_layer, shape):
    x = rand(*shape)
    t, v = against_flax(layer, flax_layer, x)
    lowered = jax.jit(t.apply).lower(v, x).as_text()
    assert "HIGHEST" in lowered


# --- MultiHeadAttention


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(normalize_qk=True),
        dict(force_fp32_for_softmax=True),
        dict(precision="highest"),
        dict(attention_fn=nn.dot_product_attention),
    ],
)
def test_attention_flax_fields_match_flax(kwargs):
    x = rand(2, 5, 8)
    against_flax(fx.nn.MultiHeadAttention(2, **kwargs), nn.MultiHeadAttention(2, **kwargs), x)


def test_attention_normalize_qk_names_the_norms_as_flax():
    x = rand(2, 5, 8)
    v = fx.transform(lambda x: fx.nn.MultiHeadAttention(2, normalize_qk=True)(x)).init(KEY, x)
    assert shapes(v["params"]["MultiHeadAttention_0"]["query_ln"]) == {"scale": (4,)}
    assert shapes(v["params"]["MultiHeadAttention_0"]["key_ln"]) == {"scale": (4,)}


def test_attention_force_fp32_for_softmax_matches_flax_in_bfloat16():
    x = rand(2, 5, 8).astype(jnp.bfloat16)
    kwargs = dict(force_fp32_for_softmax=True, dtype=jnp.bfloat16)
    against_flax(fx.nn.MultiHeadAttention(2, **kwargs), nn.MultiHeadAttention(2, **kwargs), x, atol=2e-2)


@pytest.mark.parametrize("attention_fn", [None, nn.dot_product_attention])
def test_attention_sow_weights_sows_flax_weights_at_the_layer_path(attention_fn):
    x, mask = rand(2, 5, 8), jnp.tril(jnp.ones((5, 5), bool))
    flax_layer = nn.MultiHeadAttention(2)
    fv = flax_layer.init(KEY, x)
    _, flax_sown = flax_layer.apply(fv, x, mask=mask, sow_weights=True, mutable=["intermediates"])
    layer = fx.nn.MultiHeadAttention(2, attention_fn=attention_fn)
    t = fx.transform(lambda x: layer(x, mask=mask, sow_weights=True))
    _, sown = t.apply({"params": {"MultiHeadAttention_0": fv["params"]}}, x, mutable="intermediates")
    (ours,) = sown["intermediates"]["MultiHeadAttention_0"]["attention_weights"]
    np.testing.assert_allclose(ours, flax_sown["intermediates"]["attention_weights"][0], atol=1e-6)
    _, nothing = t.apply({"params": {"MultiHeadAttention_0": fv["params"]}}, x, mutable="cache")
    assert "intermediates" not in nothing


def test_attention_fn_gets_the_dropout_key_only_when_training():
    seen = []

    def attention_fn(query, key, value, mask=None, dropout_rng=None, deterministic=False):
        seen.append((dropout_rng is None, deterministic))
        return nn.dot_product_attention(query, key, value, mask=mask)

    x = rand(1, 3, 4)
    t = fx.transform(lambda x: fx.nn.MultiHeadAttention(2, dropout_rate=0.5, attention_fn=attention_fn)(x))
    v = t.init(KEY, x)
    seen.clear()
    t.apply(v, x, training=False)
    t.apply(v, x, rngs=KEY, training=True)
    assert seen == [(True, True), (False, False)]


# --- recurrent


@pytest.mark.slow  # seconds of Flax compiles: CI runs it
def test_optimized_lstm_cell_matches_flax_and_loads_lstm_cell_params():
    x = rand(3, 6, 5)
    against_flax(fx.nn.RNN(fx.nn.OptimizedLSTMCell(4)), nn.RNN(nn.OptimizedLSTMCell(4)), x)
    # the same param tree as LSTMCell's, so the two cells give the same numbers on the same variables
    lstm, optimized = fx.nn.RNN(fx.nn.LSTMCell(4)), fx.nn.RNN(fx.nn.OptimizedLSTMCell(4))  # both at `RNN_0/cell`
    t_lstm, t_opt = fx.transform(lambda x: lstm(x)), fx.transform(lambda x: optimized(x))
    v = t_lstm.init(KEY, x)
    np.testing.assert_allclose(t_opt.apply(v, x), t_lstm.apply(v, x), atol=1e-5)


@pytest.mark.slow  # a Flax compile of both directions (9 s on 2 cores); CI runs both, the doctest runs one here
@pytest.mark.parametrize("return_carry", [False, True])
def test_bidirectional_matches_flax_with_padded_sequences(return_carry):
    x, lengths = rand(2, 7, 3), jnp.array([7, 4])
    layer = fx.nn.Bidirectional(
        fx.nn.RNN(fx.nn.GRUCell(4)), fx.nn.RNN(fx.nn.OptimizedLSTMCell(5)), return_carry=return_carry
    )
    flax_layer = nn.Bidirectional(nn.RNN(nn.GRUCell(4)), nn.RNN(nn.OptimizedLSTMCell(5)), return_carry=return_carry)
    t, _ = against_flax(layer, flax_layer, x, seq_lengths=lengths)
    out = t.apply(t.init(KEY, x, seq_lengths=lengths), x, seq_lengths=lengths)
    assert (out[1] if return_carry else out).shape == (2, 7, 9)


@pytest.mark.slow  # a Flax compile of both directions: CI runs it
def test_bidirectional_takes_a_pair_of_initial_carries():
    x = rand(2, 7, 3)
    fwd, bwd = fx.nn.GRUCell(4), fx.nn.GRUCell(4)
    layer = fx.nn.Bidirectional(fx.nn.RNN(fwd), fx.nn.RNN(bwd), merge_fn=lambda a, b: a + b)
    carry = (jnp.ones((2, 4)), jnp.zeros((2, 4)))
    t = fx.transform(lambda x, c: layer(x, initial_carry=c))
    v = t.init(KEY, x, carry)
    assert t.apply(v, x, carry).shape == (2, 7, 4)
    with pytest.raises(fx.EffaxError, match=r"Bidirectional `Bidirectional_0`: initial_carry must be a pair"):
        fx.transform(lambda x: layer(x, initial_carry=jnp.ones((2, 4)))).init(KEY, x)
