"""DenseGeneral, ConvTranspose, GroupNorm and pooling: shapes, names, and numbers against flax.linen."""

import flax.linen as nn
import flax.linen.pooling as flax_pooling
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_parity import KEY, against_flax, rand, shapes

import effax as fx

# --- DenseGeneral


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(features=5), (2, 3)),
        (dict(features=(2, 3)), (4, 6)),
        (dict(features=4, axis=(-2, -1)), (3, 2, 5)),
        (dict(features=(2, 2), axis=(1, 2), use_bias=False), (3, 2, 5, 4)),
        (dict(features=3, axis=-1, batch_dims=(0,)), (2, 4, 5)),
        (dict(features=(3, 2), axis=(2,), batch_dims=(0, 1)), (2, 3, 4)),
    ],
)
def test_dense_general_matches_flax(kwargs, shape):
    against_flax(fx.nn.DenseGeneral(**kwargs), nn.DenseGeneral(**kwargs), rand(*shape))


def test_dense_general_initializes_on_the_flat_shape_as_flax():
    """Flax calls the kernel init on `(inputs, outputs)`: the same key gives the same kernel here."""
    x = rand(2, 3, 4)
    ours = fx.transform(lambda x: fx.nn.DenseGeneral((2, 5), axis=(-2, -1))(x)).init(KEY, x)
    kernel = ours["params"]["DenseGeneral_0"]["kernel"]
    assert kernel.shape == (3, 4, 2, 5)
    flat = jax.nn.initializers.lecun_normal()(jax.random.key(1), (12, 10))
    assert float(jnp.std(flat)) == pytest.approx(float(jnp.std(kernel)), rel=0.3)  # fan-in 12, not 4


def test_dense_general_rejects_bad_batch_dims():
    with pytest.raises(fx.EffaxError, match="consecutive leading axes"):
        fx.transform(lambda x: fx.nn.DenseGeneral(2, axis=-1, batch_dims=(1,))(x)).init(KEY, rand(2, 3, 4))


def test_attention_uses_dense_general_layout():
    x = rand(1, 5, 8)
    v = fx.transform(lambda x: fx.nn.MultiHeadAttention(2)(x)).init(KEY, x)
    assert shapes(v["params"]["MultiHeadAttention_0"]["out"]) == {"kernel": (2, 4, 8), "bias": (8,)}


# --- ConvTranspose


def _half_in_ci(cases):
    """Every other case marked slow: each is a Flax compile; the README's command runs half, CI all."""
    return [c if i % 2 == 0 else pytest.param(*c, marks=pytest.mark.slow) for i, c in enumerate(cases)]


@pytest.mark.parametrize(
    "kwargs, shape",
    _half_in_ci([
        (dict(features=4, kernel_size=(3,)), (2, 9, 3)),
        (dict(features=4, kernel_size=3, strides=2, padding="VALID"), (9, 3)),
        (dict(features=4, kernel_size=(2, 2), strides=(2, 2)), (2, 4, 4, 2)),
        (dict(features=3, kernel_size=(3, 3), strides=2, padding=1, kernel_dilation=2), (2, 5, 5, 2)),
        (dict(features=3, kernel_size=(3, 2), padding=[(1, 0), (0, 2)], transpose_kernel=True), (3, 2, 5, 5, 2)),
        (dict(features=2, kernel_size=(3,), strides=2, padding="CIRCULAR"), (2, 6, 3)),
        (dict(features=2, kernel_size=(4, 3), strides=(2, 1), padding="CIRCULAR", transpose_kernel=True), (1, 4, 5, 2)),
        (dict(features=4, kernel_size=(3,), use_bias=False), (2, 9, 3)),
    ]),
)
def test_conv_transpose_matches_flax(kwargs, shape):
    against_flax(fx.nn.ConvTranspose(**kwargs), nn.ConvTranspose(**kwargs), rand(*shape))


def test_conv_transpose_upsamples_and_names_as_flax():
    t = fx.transform(lambda x: fx.nn.ConvTranspose(5, (2, 2), strides=(2, 2))(x))
    v = jax.eval_shape(t.init, KEY, jnp.ones((3, 4, 4, 2)))
    assert shapes(v["params"]) == {"ConvTranspose_0": {"kernel": (2, 2, 2, 5), "bias": (5,)}}
    assert jax.eval_shape(t.apply, v, jnp.ones((3, 4, 4, 2))).shape == (3, 8, 8, 5)


def test_conv_transpose_mask_zeroes_kernel_entries():
    mask = jnp.zeros((3, 2, 4)).at[1].set(1.0)
    against_flax(fx.nn.ConvTranspose(4, (3,), mask=mask), nn.ConvTranspose(4, (3,), mask=mask), rand(2, 6, 2))
    with pytest.raises(fx.EffaxError, match="mask has shape"):
        fx.transform(lambda x: fx.nn.ConvTranspose(4, (3,), mask=jnp.ones((2, 2, 4)))(x)).init(KEY, rand(2, 6, 2))


# --- GroupNorm


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(num_groups=2), (2, 5, 5, 4)),
        (dict(num_groups=None, group_size=3), (2, 7, 6)),
        (dict(num_groups=4, use_bias=False, epsilon=1e-3), (3, 8)),
        (dict(num_groups=2, use_scale=False, reduction_axes=(1, -1)), (2, 3, 4, 6)),
    ],
)
def test_group_norm_matches_flax(kwargs, shape):
    x = rand(*shape) * 2 + 0.5
    against_flax(fx.nn.GroupNorm(**kwargs), nn.GroupNorm(**kwargs), x)


def test_group_norm_dtype_and_errors():
    x = rand(2, 4, 4).astype(jnp.bfloat16)
    t = fx.transform(lambda x: fx.nn.GroupNorm(num_groups=2)(x))
    v = t.init(KEY, x)
    assert v["params"]["GroupNorm_0"]["scale"].dtype == jnp.float32
    flax_out = nn.GroupNorm(num_groups=2).apply({"params": v["params"]["GroupNorm_0"]}, x)
    assert t.apply(v, x).dtype == flax_out.dtype
    with pytest.raises(fx.EffaxError, match="does not divide"):
        fx.transform(lambda x: fx.nn.GroupNorm(num_groups=3)(x)).init(KEY, rand(2, 4))
    with pytest.raises(fx.EffaxError, match="one of `num_groups` or `group_size`"):
        fx.transform(lambda x: fx.nn.GroupNorm(group_size=2)(x)).init(KEY, rand(2, 4))


# --- pooling


@pytest.mark.parametrize(
    "args, kwargs, shape",
    [
        (((2, 2),), dict(strides=(2, 2)), (2, 6, 6, 3)),
        (((3, 3),), dict(padding="SAME"), (2, 5, 5, 3)),
        (((3,),), dict(strides=(2,), padding=((1, 1),)), (4, 9, 2)),
        (((2, 2),), dict(), (5, 5, 3)),  # no batch dim
        (((2, 2),), dict(strides=(1, 2)), (2, 3, 6, 6, 1)),  # two batch dims
    ],
)
def test_pooling_matches_flax(args, kwargs, shape):
    x = rand(*shape)
    np.testing.assert_allclose(fx.nn.max_pool(x, *args, **kwargs), nn.max_pool(x, *args, **kwargs))
    np.testing.assert_allclose(fx.nn.min_pool(x, *args, **kwargs), flax_pooling.min_pool(x, *args, **kwargs))
    np.testing.assert_allclose(fx.nn.avg_pool(x, *args, **kwargs), nn.avg_pool(x, *args, **kwargs), atol=1e-6)
    ours = fx.nn.avg_pool(x, *args, count_include_pad=False, **kwargs)
    np.testing.assert_allclose(ours, nn.avg_pool(x, *args, count_include_pad=False, **kwargs), atol=1e-6)


def test_pooling_inside_a_model_and_errors():
    def model(x):
        return fx.nn.max_pool(fx.nn.Conv(2, (3, 3))(x), (2, 2), (2, 2))

    t = fx.transform(model)
    x = rand(1, 4, 4, 1)
    assert t.apply(t.init(KEY, x), x).shape == (1, 2, 2, 2)
    with pytest.raises(fx.EffaxError, match="one entry per window dim"):
        fx.nn.max_pool(x, (2, 2), (2,))
    with pytest.raises(fx.EffaxError, match="needs inputs"):
        fx.nn.avg_pool(jnp.ones(3), (2, 2))


def test_an_empty_length_axis_gives_empty_or_zero_outputs_as_flax():
    """Attention over no queries or no keys, and a transposed convolution of no positions, as linen gives them."""
    key = jax.random.key(0)
    cases = [
        (fx.nn.MultiHeadAttention(num_heads=2), nn.MultiHeadDotProductAttention(num_heads=2), (jnp.zeros((2, 0, 4)),)),
        (fx.nn.MultiHeadAttention(num_heads=2), nn.MultiHeadDotProductAttention(num_heads=2),
         (jnp.ones((2, 3, 4)), jnp.zeros((2, 0, 4)))),
        (fx.nn.ConvTranspose(2, (3,)), nn.ConvTranspose(2, (3,)), (jnp.zeros((2, 0, 3)),)),
    ]
    for ours, theirs, args in cases:
        v = theirs.init(key, *args)
        out = fx.transform(ours).apply(v, *args)
        assert out.shape == theirs.apply(v, *args).shape
        assert jnp.array_equal(out, theirs.apply(v, *args))


def test_a_transposed_convolution_refuses_same_lower_when_built():
    """JAX's transposed convolution has no SAME_LOWER: refused with the layer's paddings, not at the first call."""
    with pytest.raises(fx.EffaxError, match=r"ConvTranspose\(padding='SAME_LOWER'\): `padding` must be 'SAME'"):
        fx.nn.ConvTranspose(3, (3, 3), strides=2, padding="SAME_LOWER")


def test_conv_takes_a_kernel_mask_as_flax():
    x = rand(2, 5, 5, 3)
    mask = jnp.ones((3, 3, 3, 4)).at[2:].set(0.0)  # no weight on the last kernel row
    against_flax(fx.nn.Conv(4, (3, 3), mask=mask), nn.Conv(4, (3, 3), mask=mask), x)
    with pytest.raises(fx.EffaxError, match=r"mask has shape \(3, 3\), but the kernel is \(3, 3, 3, 4\)"):
        fx.transform(fx.nn.Conv(4, (3, 3), mask=jnp.ones((3, 3)))).init(KEY, x)
