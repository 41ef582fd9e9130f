"""fx.checkpoint: round trips, every restore error at once, atomic saves, sharded restores, Flax checkpoints."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx
from effax.checkpoint import CheckpointMismatchError, CheckpointNotFoundError

ocp = pytest.importorskip("orbax.checkpoint")
init = jax.nn.initializers


def model(x):
    with fx.scope("dense"):
        w = fx.param("kernel", init.lecun_normal(), (3, 4))
        b = fx.param("bias", init.normal(), (4,), jnp.bfloat16)
    n = fx.local_state("count", lambda: jnp.zeros((), jnp.int32), collection="stats")
    if fx.is_training():
        n.set(n.get() + 1)
    return x @ w + b


T = fx.transform(model)
X = jnp.ones((2, 3))
KEY = jax.random.key(0)


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def variables():
    v = T.init(KEY, X)
    _, updates = T.apply(v, X, training=True, mutable=True)
    return {**v, **updates}


def test_round_trip_into_abstract_variables(tmp_path, variables):
    written = fx.checkpoint.save(tmp_path / "ckpt", variables)
    assert os.fspath(written) == str(tmp_path / "ckpt")
    restored = fx.checkpoint.restore(tmp_path / "ckpt", like=jax.eval_shape(T.init, KEY, X))
    assert_same(restored, variables)
    assert restored["stats"]["count"] == 1
    assert restored["params"]["dense"]["bias"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(T.apply(restored, X, training=False), T.apply(variables, X, training=False))


def test_round_trip_into_concrete_variables_and_empty_collections(tmp_path):
    v = {"params": {}, "state": {"a": {"b": jnp.arange(3)}}}
    fx.checkpoint.save(str(tmp_path / "c"), v)
    assert_same(fx.checkpoint.restore(str(tmp_path / "c"), like=v), v)
    fx.checkpoint.save(tmp_path / "s", {"step": jnp.array(3)})
    assert fx.checkpoint.restore(tmp_path / "s", like={"step": 0})["step"] == 3  # Python scalars work as `like`


def test_restore_places_arrays_on_the_like_sharding(tmp_path, variables):
    fx.checkpoint.save(tmp_path / "c", variables)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), jax.eval_shape(T.init, KEY, X)
    )
    restored = fx.checkpoint.restore(tmp_path / "c", like=like)
    assert all(a.sharding == device for a in jax.tree.leaves(restored))


def test_steps_and_latest(tmp_path, variables):
    one = jax.tree.map(jnp.ones_like, variables)
    fx.checkpoint.save(tmp_path, variables, step=1)
    fx.checkpoint.save(tmp_path, one, step=12)
    fx.checkpoint.save(tmp_path, variables, step=3)
    assert fx.checkpoint.steps(tmp_path) == [1, 3, 12]
    assert fx.checkpoint.steps(tmp_path / "nothing") == []
    assert_same(fx.checkpoint.restore(tmp_path, like=variables), one)
    assert_same(fx.checkpoint.restore(tmp_path, like=variables, step=3), variables)


def test_every_mismatch_is_reported_at_once(tmp_path, variables):
    fx.checkpoint.save(tmp_path / "c", variables)
    like = jax.eval_shape(T.init, KEY, X)
    like["params"]["dense"]["kernal"] = like["params"]["dense"].pop("kernel")  # a typo: missing + unexpected
    like["params"]["dense"]["bias"] = jax.ShapeDtypeStruct((4,), jnp.float32)  # mis-typed
    like["stats"]["count"] = jax.ShapeDtypeStruct((2,), jnp.int32)  # mis-shaped
    with pytest.raises(CheckpointMismatchError) as info:
        fx.checkpoint.restore(tmp_path / "c", like=like)
    e = info.value
    assert isinstance(e, fx.EffaxError) and isinstance(e, ValueError)
    assert e.missing == ["params:dense/kernal (float32[3, 4]); the checkpoint has 'params:dense/kernel'"]
    assert e.unexpected == ["params:dense/kernel (float32[3, 4])"]
    assert e.mis_shaped == ["stats:count: like (2,), checkpoint ()"]
    assert e.mis_typed == ["params:dense/bias: like float32, checkpoint bfloat16"]
    message = str(e)
    assert "does not match `like` (4 problems)" in message
    for line in ("  missing: params:dense/kernal", "  unexpected: params:dense/kernel",
                 "  mis-shaped: stats:count", "  mis-typed: params:dense/bias"):
        assert line in message
    assert "strict=False" in message and "jax.eval_shape(t.init" in message
    assert type(e).__module__ == "effax"


def test_strict_false_skips_entries_like_does_not_name(tmp_path, variables):
    train_state = {"step": jnp.array(7), "params": variables["params"], "opt_state": {"mu": jnp.ones(3)}}
    fx.checkpoint.save(tmp_path / "c", train_state)
    like = {"params": jax.eval_shape(T.init, KEY, X)["params"]}
    with pytest.raises(CheckpointMismatchError, match="unexpected: opt_state:mu"):
        fx.checkpoint.restore(tmp_path / "c", like=like)
    restored = fx.checkpoint.restore(tmp_path / "c", like=like, strict=False)
    assert_same(restored, {"params": variables["params"]})
    with pytest.raises(CheckpointMismatchError, match="missing: stats:count"):
        fx.checkpoint.restore(tmp_path / "c", like=jax.eval_shape(T.init, KEY, X), strict=False)


def test_not_found(tmp_path, variables):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at `.*nowhere`"):
        fx.checkpoint.restore(tmp_path / "nowhere", like=variables)
    fx.checkpoint.save(tmp_path / "run", variables, step=5)
    with pytest.raises(CheckpointNotFoundError, match=r"steps saved under `.*run`: \[5\]"):
        fx.checkpoint.restore(tmp_path / "run", like=variables, step=4)
    assert isinstance(CheckpointNotFoundError("x"), FileNotFoundError)


def test_save_needs_a_dict(tmp_path):
    with pytest.raises(fx.EffaxError, match="must be a dict"):
        fx.checkpoint.save(tmp_path / "c", [jnp.ones(2)])


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, variables, monkeypatch):
    path = tmp_path / "c"
    fx.checkpoint.save(path, variables)
    real_save = ocp.Checkpointer.save

    def write_then_fail(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)  # the new checkpoint is fully written...
        raise OSError("disk full")  # ...and then the save fails

    def fail_at_once(self, directory, *args, **kwargs):
        raise KeyboardInterrupt

    newer = jax.tree.map(jnp.zeros_like, variables)
    for broken in (write_then_fail, fail_at_once):
        monkeypatch.setattr(ocp.Checkpointer, "save", broken)
        with pytest.raises((OSError, KeyboardInterrupt)):
            fx.checkpoint.save(path, newer)
        assert sorted(os.listdir(tmp_path)) == ["c"]  # no temp directories left behind
        assert_same(fx.checkpoint.restore(path, like=variables), variables)
    monkeypatch.setattr(ocp.Checkpointer, "save", real_save)
    fx.checkpoint.save(path, newer)
    assert_same(fx.checkpoint.restore(path, like=variables), newer)


def test_interrupted_swap_keeps_the_previous_checkpoint(tmp_path, variables, monkeypatch):
    """A crash between moving the old checkpoint aside and moving the new one in: restore finds the old."""
    path = tmp_path / "c"
    fx.checkpoint.save(path, variables)
    target_type = type(fx.checkpoint._path(path))
    real_rename = target_type.rename

    def crash_on_second_rename(self, target):
        if str(self).endswith(".effax-tmp"):
            raise SystemExit("killed")
        return real_rename(self, target)

    monkeypatch.setattr(target_type, "rename", crash_on_second_rename)
    with pytest.raises(SystemExit):
        fx.checkpoint.save(path, jax.tree.map(jnp.zeros_like, variables))
    assert not path.exists()
    assert_same(fx.checkpoint.restore(path, like=variables), variables)


def flax_mlp():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(5)(x))
            return nn.Dense(2)(h)

    return MLP()


def effax_mlp(x):
    """The same MLP as `flax_mlp`, with the paths Flax gives it."""
    for i, width in enumerate((5, 2)):
        with fx.scope(f"Dense_{i}"):
            w = fx.param("kernel", init.lecun_normal(), (x.shape[-1], width))
            x = x @ w + fx.param("bias", init.zeros, (width,))
        x = jax.nn.relu(x) if i == 0 else x
    return x


def test_flax_checkpoints_load_into_effax_variables(tmp_path):
    module = flax_mlp()
    flax_variables = module.init(jax.random.key(1), X)
    checkpointer = ocp.StandardCheckpointer()  # what the Flax docs use
    checkpointer.save(tmp_path / "flax", flax_variables)
    checkpointer.wait_until_finished()
    t = fx.transform(effax_mlp)
    restored = fx.checkpoint.restore(tmp_path / "flax", like=jax.eval_shape(t.init, KEY, X))
    np.testing.assert_allclose(t.apply(restored, X), module.apply(flax_variables, X), rtol=1e-6)


def test_flax_checkpoints_load_into_from_flax_models(tmp_path):
    module = flax_mlp()
    flax_variables = module.init(jax.random.key(1), X)
    ocp.PyTreeCheckpointer().save(tmp_path / "flax", flax_variables)  # the older Flax recipe
    t = fx.transform(fx.from_flax(module))
    restored = fx.checkpoint.restore(tmp_path / "flax", like=jax.eval_shape(t.init, KEY, X))
    np.testing.assert_array_equal(t.apply(restored, X), module.apply(flax_variables, X))


def test_flax_checkpoint_manager_layout_loads(tmp_path):
    module = flax_mlp()
    flax_variables = module.init(jax.random.key(1), X)
    with ocp.CheckpointManager(tmp_path / "run") as manager:
        for step in (1, 2):
            manager.save(step, args=ocp.args.StandardSave(flax_variables))
        manager.wait_until_finished()
    t = fx.transform(effax_mlp)
    restored = fx.checkpoint.restore(tmp_path / "run", like=jax.eval_shape(t.init, KEY, X))
    np.testing.assert_allclose(t.apply(restored, X), module.apply(flax_variables, X), rtol=1e-6)


def test_import_effax_does_not_import_orbax():
    code = "import sys, effax; assert not [m for m in sys.modules if m.startswith('orbax')]; print('OK')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "OK", done.stderr[-2000:]


EIGHT_DEVICES = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np
    import effax as fx
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    variables = {"params": {"w": put(jnp.arange(64.0).reshape(8, 8), "data", "model"),
                            "b": put(jnp.arange(8.0), "model")}}
    fx.checkpoint.save(sys.argv[1], variables)
    # restore onto other shardings than it was saved with
    like = {"params": {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh, P("model", None))),
                       "b": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=NamedSharding(mesh, P()))}}
    restored = fx.checkpoint.restore(sys.argv[1], like=like)
    for name in ("w", "b"):
        a = restored["params"][name]
        assert a.sharding == like["params"][name].sharding, a.sharding
        assert np.array_equal(np.asarray(a), np.asarray(variables["params"][name]))
    assert {s.data.shape for s in restored["params"]["w"].addressable_shards} == {(4, 8)}
    print("OK")
    """
)


def test_sharded_save_and_restore_on_eight_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, str(tmp_path / "sharded")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]
