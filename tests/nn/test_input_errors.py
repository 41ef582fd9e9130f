"""Common mistakes a Flax user makes are refused with an `EffaxError` naming the layer, what it got and the fix,
never a raw JAX or Python error from deep inside (a broadcast, a scan, a `%` on a string)."""

import jax.numpy as jnp
import pytest
from flax_parity import KEY, rand

import effax as fx

X = jnp.ones((2, 5, 4))


def init(fn, *args):
    return fx.transform(fn).init(KEY, *args)


@pytest.mark.parametrize(
    "fn, args, message",
    [
        (  # a mask for 4 positions on a 5-long sequence
            lambda x: fx.nn.MultiHeadAttention(2, name="attn")(x, mask=jnp.ones((2, 1, 4, 4), bool)),
            (X,),
            r"MultiHeadAttention `attn`: mask of shape \(2, 1, 4, 4\) does not broadcast to .* = \(2, 2, 5, 5\)"
            r".*keep\[:, None, None, :\]",
        ),
        (
            lambda q, kv: fx.nn.MultiHeadAttention(2, name="attn")(q, kv),
            (X, jnp.ones((3, 5, 4))),
            r"MultiHeadAttention `attn`: query, key and value must share their batch dims.*\(2, 5, 4\), \(3, 5, 4\)",
        ),
        (
            lambda q, k, v: fx.nn.MultiHeadAttention(2, name="attn")(q, k, v),
            (X, X, jnp.ones((2, 6, 4))),
            r"key and value their length too",
        ),
        (
            lambda q: fx.nn.Embed(10, 3, name="emb").attend(q),
            (jnp.ones((2, 4)),),
            r"Embed `emb`.attend: the query's last axis must be the embedding width, features=3.*\(2, 4\)",
        ),
        (
            lambda x: fx.nn.RNN(fx.nn.LSTMCell(4), name="rnn")(x, initial_carry=jnp.zeros((2, 4))),
            (X,),
            r"RNN `rnn`: initial_carry is float32\[2, 4\], but LSTMCell carries \('float32\[2, 4\]', "
            r"'float32\[2, 4\]'\).*cell.initialize_carry\(key, \(2, 4\)\)",
        ),
        (
            lambda x: fx.nn.RNN(fx.nn.GRUCell(4), name="rnn")(x, initial_carry=jnp.zeros((3, 4))),
            (X,),
            r"RNN `rnn`: initial_carry is float32\[3, 4\], but GRUCell carries float32\[2, 4\]",
        ),
        (
            lambda x: fx.nn.RNN(fx.nn.GRUCell(4), name="rnn")(x, seq_lengths=jnp.array([1, 2, 3]), return_carry=True),
            (X,),
            r"RNN `rnn`: seq_lengths has shape \(3,\), but .* batch shape \(2,\): give one length per sequence",
        ),
        (
            lambda x: fx.nn.DenseGeneral(3, axis=(1, -2), name="dg")(x),
            (X,),
            r"DenseGeneral `dg`: axis=\(1, -2\) names the same axis of this rank-3 input twice",
        ),
    ],
)
def test_wrong_inputs_are_refused_naming_the_layer_and_the_fix(fn, args, message):
    with pytest.raises(fx.EffaxError, match=message):
        init(fn, *args)


def test_a_given_initial_carry_of_the_right_shape_still_runs():
    rnn = fx.nn.RNN(fx.nn.LSTMCell(4))
    carry = (jnp.ones((2, 4)), jnp.zeros((2, 4)))
    t = fx.transform(lambda x, c: rnn(x, initial_carry=c))
    assert t.apply(t.init(KEY, X, carry), X, carry).shape == (2, 5, 4)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: fx.nn.MultiHeadAttention("2"), r"MultiHeadAttention\(num_heads='2'\): `num_heads` must be a positive"),
        (lambda: fx.nn.MultiHeadAttention(2, qkv_features=2.0), r"`qkv_features` must be a positive int"),
        (lambda: fx.nn.LSTMCell("4"), r"LSTMCell\(features='4'\): `features` must be a positive int.*int\(\.\.\.\)"),
        (lambda: fx.nn.OptimizedLSTMCell(0), r"OptimizedLSTMCell\(features=0\)"),
        (lambda: fx.nn.GRUCell(2.5), r"GRUCell\(features=2.5\)"),
        (lambda: fx.nn.Sequential(fx.nn.Dense(2)), r"`layers` must be a list of layers, got one Dense.*Sequential\(\["),
    ],
)
def test_bad_sizes_and_configs_are_refused_when_the_layer_is_built(make, message):
    with pytest.raises(fx.EffaxError, match=message):
        make()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: fx.nn.max_pool(x, 2), r"window_shape=2 must be a tuple.*`window_shape=\(2, 2\)`"),
        (lambda x: fx.nn.avg_pool(x, (2, 2), strides=2), r"strides=2 must be a tuple.*`strides=\(2, 2\)`"),
        (lambda x: fx.nn.min_pool(x, (2, 2), padding="FULL"), r"padding='FULL' is not one of 'SAME', 'VALID'"),
    ],
)
def test_pooling_refuses_ints_and_unknown_padding_as_flax_does(call, message):
    """Flax takes tuples only (`len(window_shape)` on an int fails there too); here the error says the fix."""
    with pytest.raises(fx.EffaxError, match=message):
        call(rand(1, 4, 4, 3))


def test_pooling_still_takes_lowercase_padding():
    x = rand(1, 4, 4, 3)
    assert fx.nn.max_pool(x, (2, 2), padding="same").shape == (1, 4, 4, 3)
