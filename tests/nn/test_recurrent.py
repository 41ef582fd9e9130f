"""LSTMCell, GRUCell and RNN: Flax's names and layouts, and Flax's numbers on the same weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_parity import KEY, against_flax, rand, shapes

import effax as fx


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell"])
def test_cell_step_matches_flax(cell):
    ours, theirs = getattr(fx.nn, cell)(4), getattr(nn, cell)(4)
    x = rand(3, 5)
    carry = jax.tree.map(lambda a: a + 0.3, theirs.initialize_carry(KEY, x.shape))
    assert shapes(carry) == shapes(ours.initialize_carry(KEY, x.shape))
    against_flax(ours, theirs, carry, x)


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        *(pytest.param(k, marks=pytest.mark.slow)  # each a Flax compile: CI runs them all
          for k in (dict(return_carry=True), dict(time_major=True), dict(reverse=True))),
        dict(reverse=True, keep_order=True),
    ],
)
def test_rnn_matches_flax(cell, kwargs):
    x = rand(2, 6, 3)
    against_flax(fx.nn.RNN(getattr(fx.nn, cell)(4), **kwargs), nn.RNN(getattr(nn, cell)(4), **kwargs), x)


@pytest.mark.parametrize("kwargs", [dict(return_carry=True), dict(reverse=True, keep_order=True, return_carry=True)])
def test_rnn_with_seq_lengths_matches_flax(kwargs):
    x = rand(3, 5, 2)
    lengths = jnp.array([5, 2, 3])
    against_flax(fx.nn.RNN(fx.nn.LSTMCell(3), **kwargs), nn.RNN(nn.LSTMCell(3), **kwargs), x, seq_lengths=lengths)


def test_rnn_params_are_shared_over_time_and_named_cell():
    rnn = fx.nn.RNN(fx.nn.GRUCell(4))  # built outside the model: the RNN adopts its cell as `cell`, as Flax
    t = fx.transform(lambda x: rnn(x))
    short, long = jax.eval_shape(t.init, KEY, rand(2, 3, 5)), jax.eval_shape(t.init, KEY, rand(2, 50, 5))
    assert shapes(short) == shapes(long)  # no time axis on any param
    assert shapes(short["params"]["RNN_0"]["cell"]["ir"]) == {"kernel": (5, 4), "bias": (4,)}


@pytest.mark.slow  # seconds each: runs in CI (`--run-slow`)
def test_rnn_takes_an_initial_carry_and_differentiates():
    rnn = fx.nn.RNN(fx.nn.LSTMCell(4), return_carry=True)
    t = fx.transform(lambda x, c: rnn(x, initial_carry=c))
    x = rand(2, 6, 3)
    c0 = (jnp.ones((2, 4)), jnp.zeros((2, 4)))
    v = t.init(KEY, x, c0)
    (c, h), ys = jax.jit(t.apply)(v, x, c0)
    np.testing.assert_allclose(h, ys[:, -1], atol=1e-6)
    grads = jax.grad(lambda p: t.apply({"params": p}, x, c0)[1].sum())(v["params"])
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.slow  # seconds each: runs in CI (`--run-slow`)
def test_two_rnns_and_stacked_layers_get_their_own_params():
    def model(x):
        x = fx.nn.RNN(fx.nn.LSTMCell(4))(x)
        return fx.nn.RNN(fx.nn.GRUCell(3))(x)

    t = fx.transform(model)
    v = t.init(KEY, rand(2, 5, 3))
    assert sorted(v["params"]) == ["GRUCell_0", "LSTMCell_0"]  # cells built in the model keep their names
    assert t.apply(v, rand(2, 5, 3)).shape == (2, 5, 3)


def test_rnn_needs_a_time_axis():
    with pytest.raises(fx.EffaxError, match="no time axis"):
        fx.transform(lambda x: fx.nn.RNN(fx.nn.LSTMCell(2))(x)).init(KEY, jnp.ones(3))


@pytest.mark.slow  # seconds each: runs in CI (`--run-slow`)
def test_cells_built_inside_a_model_are_named_as_flax_names_them():
    """Flax binds a cell built in a compact method to that module (`LSTMCell_0`), not to the RNN."""

    class Theirs(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.RNN(nn.LSTMCell(4))(x)
            x = nn.RNN(nn.GRUCell(3))(x)
            return nn.RNN(nn.LSTMCell(2), reverse=True)(x)

    class Ours(fx.nn.Module):
        def __call__(self, x):
            x = fx.nn.RNN(fx.nn.LSTMCell(4))(x)
            x = fx.nn.RNN(fx.nn.GRUCell(3))(x)
            return fx.nn.RNN(fx.nn.LSTMCell(2), reverse=True)(x)

    x = rand(2, 5, 3)
    fv = Theirs().init(jax.random.key(1), x)
    t = fx.transform(Ours())
    assert shapes(jax.eval_shape(t.init, KEY, x)["params"]) == shapes(fv["params"])
    np.testing.assert_allclose(t.apply(fv, x), Theirs().apply(fv, x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # seconds of Flax and eager compiles: runs in CI (`--run-slow`)
def test_a_cell_passed_in_is_adopted_and_shared_as_flax_does():
    """One cell instance is one set of weights, under the first module holding it in a field, as linen adopts it."""
    x = rand(2, 5, 4)

    class Holder(fx.nn.Module):
        cell: fx.nn.Module

        def __call__(self, x):
            return fx.nn.RNN(self.cell)(fx.nn.RNN(self.cell)(x))

    class LinenHolder(nn.Module):
        cell: nn.Module

        @nn.compact
        def __call__(self, x):
            return nn.RNN(self.cell)(nn.RNN(self.cell)(x))

    flax_v = LinenHolder(nn.GRUCell(4)).init(KEY, x)
    t = fx.transform(Holder(fx.nn.GRUCell(4)))
    assert shapes(t.init(KEY, x)) == shapes(flax_v)  # {"params": {"cell": ...}}: one cell, at the holder's field
    np.testing.assert_allclose(t.apply(flax_v, x), LinenHolder(nn.GRUCell(4)).apply(flax_v, x), atol=1e-5)
    cell = fx.nn.GRUCell(4)
    stacked = fx.transform(fx.nn.Sequential([fx.nn.RNN(cell), fx.nn.RNN(cell)]))
    linen_cell = nn.GRUCell(4)
    assert shapes(stacked.init(KEY, x)) == shapes(nn.Sequential([nn.RNN(linen_cell), nn.RNN(linen_cell)]).init(KEY, x))
