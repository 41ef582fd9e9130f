"""Cross-device BatchNorm: `axis_name=` averages the statistics over a mapped axis, equal to the full batch's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import effax as fx

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (8, 3)) * 3 + 1


def bn(axis_name=None):
    return fx.transform(lambda x: fx.nn.BatchNorm(momentum=0.5, axis_name=axis_name)(x))


def full_batch():
    t = bn()
    v = t.init(KEY, X)
    return v, t.apply(v, X, training=True, mutable=["batch_stats"])


def test_fx_vmap_over_shards_equals_the_full_batch():
    v, (y, updates) = full_batch()
    t = bn("shards")
    assert jax.tree.map(jnp.shape, t.init(KEY, X)) == jax.tree.map(jnp.shape, v)  # init outside the axis works
    mapped = fx.transform(fx.vmap(lambda x: fx.nn.BatchNorm(momentum=0.5, axis_name="shards")(x),
                                  axis_name="shards", params="broadcast"))
    ys, ups = mapped.apply(v, X.reshape(4, 2, 3), training=True, mutable=["batch_stats"])
    np.testing.assert_allclose(ys.reshape(8, 3), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ups["batch_stats"]["BatchNorm_0"]["mean"], updates["batch_stats"]["BatchNorm_0"]["mean"],
                               rtol=1e-5)
    np.testing.assert_allclose(ups["batch_stats"]["BatchNorm_0"]["var"], updates["batch_stats"]["BatchNorm_0"]["var"],
                               rtol=1e-5)


def test_shard_map_over_devices_equals_the_full_batch():
    v, (y, updates) = full_batch()
    t = bn("data")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))

    def step(v, x):
        return t.apply(v, x, training=True, mutable=["batch_stats"])

    ys, ups = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P())))(v, X)
    np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ups["batch_stats"]["BatchNorm_0"]["var"], updates["batch_stats"]["BatchNorm_0"]["var"],
                               rtol=1e-5)


def test_fx_vmap_over_shards_initializes_in_training_as_flax_does():
    """Init does not step the running averages (Flax skips it): members of an `fx.vmap` that broadcasts them
    would otherwise write different values, which the lift refuses."""
    mapped = fx.transform(fx.vmap(lambda x: fx.nn.BatchNorm(momentum=0.5, axis_name="shards")(x),
                                  axis_name="shards", params="broadcast"))
    v = mapped.init(KEY, X.reshape(4, 2, 3), training=True)
    np.testing.assert_array_equal(v["batch_stats"]["BatchNorm_0"]["mean"], jnp.zeros(3))
    np.testing.assert_array_equal(v["batch_stats"]["BatchNorm_0"]["var"], jnp.ones(3))
