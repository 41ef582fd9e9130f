"""Two local processes x 4 CPU devices on JAX's distributed runtime, against one device (issue: beyond one process).

Marked slow: it runs in CI (`.ci/run` passes `--run-slow`), each launch bounded by a timeout that kills every
process it started, on a free port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parents[2] / "examples" / "multiprocess_training.py"


def run(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    """Run the example's launcher; it stops its own processes, and `subprocess.run` kills it past `timeout`."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--timeout", str(timeout - 10)],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    done = {}
    for name, processes, devices in (("two_by_four", "2", "4"), ("one_device", "1", "1")):
        out = run("--processes", processes, "--devices", devices, "--steps", "20",
                  "--ckpt", str(root / name / "ckpt"), "--out", str(root / name / "out"))
        assert out.returncode == 0, out.stderr[-3000:]
        done[name] = root / name
    return done


def test_two_processes_train_like_one_device(runs):
    many, one = runs["two_by_four"] / "out", runs["one_device"] / "out"
    losses = [json.loads((many / f"losses_{i}.json").read_text()) for i in range(2)]
    assert losses[0] == losses[1]  # every process agrees
    np.testing.assert_allclose(losses[0], json.loads((one / "losses_0.json").read_text()), rtol=1e-5, atol=1e-6)
    a, b = np.load(many / "variables.npz"), np.load(one / "variables.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:  # params and the BatchNorm statistics, reduced over all 8 devices
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    "written,processes,devices",
    [("two_by_four", "1", "1"), ("two_by_four", "1", "8"), ("one_device", "2", "4")],
    ids=["2x4->1x1", "2x4->1x8", "1x1->2x4"],
)
def test_checkpoints_restore_bit_exact_on_another_topology(runs, written, processes, devices):
    out = run("--processes", processes, "--devices", devices, "--restore", str(runs[written] / "ckpt"),
              "--expect", str(runs[written] / "out" / "variables.npz"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bit for bit" in out.stdout


def test_a_process_that_dies_fails_the_run_instead_of_hanging():
    out = run("--processes", "2", "--devices", "4", "--steps", "20", "--die-at", "3", timeout=120)
    assert out.returncode == 1
    assert "process 1 exited with code 3; stopped the others" in out.stderr


def test_batchnorm_axis_name_under_shard_map_on_8_devices_equals_the_full_batch():
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import PartitionSpec as P
        import effax as fx
        assert len(jax.devices()) == 8
        x = jax.random.normal(jax.random.key(1), (16, 3)) * 3 + 1
        full = fx.transform(lambda x: fx.nn.BatchNorm(momentum=0.5)(x))
        t = fx.transform(lambda x: fx.nn.BatchNorm(momentum=0.5, axis_name="data")(x))
        v = t.init(jax.random.key(0), x)
        y, upd = full.apply(v, x, training=True, mutable=["batch_stats"])
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        step = lambda v, x: t.apply(v, x, training=True, mutable=["batch_stats"])
        ys, ups = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P())))(v, x)
        np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-5)
        for k in ("mean", "var"):
            np.testing.assert_allclose(ups["batch_stats"]["BatchNorm_0"][k], upd["batch_stats"]["BatchNorm_0"][k],
                                       rtol=1e-5)
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


SAVE_WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process, port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process,
                               initialization_timeout=60, heartbeat_timeout_seconds=10)
    import jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import effax as fx
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    w = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("data", "model")))
    # a step counter, a NumPy array and a key held by each process alone, beside a global array
    same = {"params": {"w": w}, "progress": {"step": 7, "seen": np.arange(3), "key": jax.random.key(1)}}
    fx.checkpoint.save(path, same, step=1)
    back = fx.checkpoint.restore(path, like=same, step=1)
    assert int(back["progress"]["step"]) == 7 and np.array_equal(back["progress"]["seen"], np.arange(3))
    assert np.array_equal(jax.random.key_data(back["progress"]["key"]), jax.random.key_data(jax.random.key(1)))
    try:
        fx.checkpoint.save(path, {**same, "progress": {"step": process}}, step=2)
    except fx.EffaxError as e:
        print("REFUSED", e)
    assert fx.checkpoint.steps(path) == [1]
    print("ok")
    jax.distributed.shutdown()
""")


def test_a_leaf_each_process_holds_alone_is_saved_replicated_and_must_agree(tmp_path):
    """A step counter, a NumPy array, a key beside global arrays: saved once, restored on every process; a
    value that differs between processes is refused by name, and nothing is written."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, "-c", SAVE_WORKER, str(i), port, str(tmp_path / "ckpt")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
        outs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.strip().endswith("ok"), err[-3000:]
        assert "REFUSED `progress:step` in `variables` differ between processes" in out
