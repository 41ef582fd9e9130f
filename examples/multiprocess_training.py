"""Data-parallel training over several processes, on JAX's own distributed runtime.

Run: python examples/multiprocess_training.py [--processes 2] [--devices 4] [--steps 20]

The script launches itself as `--processes` local processes, each with
`--devices` CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count`),
joined by `jax.distributed.initialize` over CPU collectives (gloo). Every
process then does what a process of a real cluster does:

1. build one mesh over all devices of all processes, `("data", "model")`;
2. shard the params by their logical axes (`fx.sharding.logical_to_mesh` of
   `fx.summary`) and create them already sharded with
   `jax.jit(t.init, out_shardings=...)`;
3. feed its own slice of each global batch
   (`jax.make_array_from_process_local_data`);
4. train a model with `BatchNorm`: under `jax.jit` the batch statistics are
   reduced over the whole sharded batch, so they equal one device's;
5. save a checkpoint from all processes (`fx.checkpoint.save`), restore it,
   and print its loss, which every process agrees on.

On a real cluster only the launch differs: each host runs one process with
the coordinator address, process count and id taken from the cluster
environment (`jax.distributed.initialize()` reads them on Slurm, GKE/TPU
pods, ...), and checkpoints go to storage every host can reach.

Flags for tests: `--out DIR` writes each process's losses and final
variables; `--restore CKPT --expect FILE` restores a checkpoint written by
another topology and checks it bit for bit; `--die-at STEP` kills process 1
there (the others fail with a clear error instead of hanging).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

GLOBAL_BATCH, FEATURES, HIDDEN, LR = 64, 8, 32, 0.1


# --- the launcher: start N copies of this script, watch them, never hang


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, forward: list[str]) -> int:
    """Start one process per id; if one fails, stop the others and say which failed and how."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *forward, "--process-id", str(i), "--port", str(port)],
            env=env,
        )
        for i in range(args.processes)
    ]
    deadline = time.monotonic() + args.timeout
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if p.poll() not in (None, 0):
                    failed = (i, p.returncode)
                    break
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if failed is not None:
        print(f"launcher: process {failed[0]} exited with code {failed[1]}; stopped the others", file=sys.stderr)
        return 1
    if time.monotonic() > deadline:
        print(f"launcher: timed out after {args.timeout} s; stopped every process", file=sys.stderr)
        return 1
    codes = [p.returncode for p in procs]
    return 0 if all(c == 0 for c in codes) else 1


# --- one process


def worker(args: argparse.Namespace) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
            initialization_timeout=60,
            heartbeat_timeout_seconds=10,  # a dead peer fails the others within seconds
        )
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import effax as fx

    axes = fx.nn.with_logical_partitioning

    def model(x):
        h = fx.nn.Dense(HIDDEN, kernel_init=axes(jax.nn.initializers.lecun_normal(), ("embed", "hidden")))(x)
        h = jax.nn.relu(fx.nn.BatchNorm(momentum=0.9)(h))
        return fx.nn.Dense(1, kernel_init=axes(jax.nn.initializers.lecun_normal(), ("hidden", None)))(h)[:, 0]

    devices = np.array(jax.devices())
    model_axis = 2 if devices.size % 2 == 0 and devices.size > 1 else 1
    mesh = jax.sharding.Mesh(devices.reshape(-1, model_axis), ("data", "model"))
    t = fx.transform(model)
    x_spec = jax.ShapeDtypeStruct((GLOBAL_BATCH, FEATURES), jnp.float32)
    shardings = fx.sharding.logical_to_mesh(fx.summary(t, x_spec), mesh, [("embed", None), ("hidden", "model")])
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    host = lambda tree: jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))  # noqa: E731

    def by_name(tree):  # {"params/Dense_0/kernel": array}: how variables.npz stores them
        return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in jax.tree.leaves_with_path(tree)}
    if args.restore:  # check a checkpoint written by another topology, then stop
        abstract = jax.eval_shape(t.init, jax.random.key(0), x_spec)
        like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        like["progress"] = {"step": jax.ShapeDtypeStruct((), jnp.int32)}
        restored = fx.checkpoint.restore(args.restore, like=like)
        step = int(restored.pop("progress")["step"])
        restored = host(restored)
        expected = np.load(args.expect)
        flat = by_name(restored)
        bad = [k for k in expected.files if not np.array_equal(expected[k], flat[k])]
        assert not bad and sorted(expected.files) == sorted(flat), f"restore differs at {bad}"
        print(f"process {jax.process_index()}: restored {len(flat)} arrays bit for bit on {devices.size} devices "
              f"(saved at step {step})")
        if args.processes > 1:
            jax.distributed.shutdown()
        return

    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(FEATURES,)).astype(np.float32)
    xs = rng.normal(size=(args.steps, GLOBAL_BATCH, FEATURES)).astype(np.float32)
    ys = np.sin(xs @ w_true)
    rows = GLOBAL_BATCH // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)

    def global_batch(step: int):
        x = jax.make_array_from_process_local_data(batch, xs[step, mine], (GLOBAL_BATCH, FEATURES))
        y = jax.make_array_from_process_local_data(batch, ys[step, mine], (GLOBAL_BATCH,))
        return x, y

    variables = jax.jit(t.init, out_shardings=shardings)(jax.random.key(0), global_batch(0)[0])

    def step(variables, x, y):
        def loss_fn(params):
            pred, updates = t.apply({**variables, "params": params}, x, training=True, mutable=["batch_stats"])
            return jnp.mean((pred - y) ** 2), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - LR * g, variables["params"], grads)
        return {**variables, **updates, "params": params}, loss

    step = jax.jit(step, out_shardings=(shardings, replicated))
    losses = []
    for i in range(args.steps):
        if args.die_at is not None and i == args.die_at and jax.process_index() == 1:
            os._exit(3)  # a crash: no cleanup, no goodbye to the coordinator
        variables, loss = step(variables, *global_batch(i))
        losses.append(float(loss))
        print(f"process {jax.process_index()}: step {i:3d} loss {losses[-1]:.6f}", flush=True)

    if args.ckpt:  # every process saves its part, beside a step counter each process holds alone
        fx.checkpoint.save(args.ckpt, {**variables, "progress": {"step": args.steps}}, step=args.steps)
        like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), variables, shardings)
        like["progress"] = {"step": jax.ShapeDtypeStruct((), jnp.int32)}
        restored = fx.checkpoint.restore(args.ckpt, like=like, step=args.steps)
        assert int(restored.pop("progress")["step"]) == args.steps
        same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), host(restored), host(variables))
        assert all(jax.tree.leaves(same)), "the restored checkpoint differs from the trained variables"
        print(f"process {jax.process_index()}: checkpoint saved and restored bit for bit", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        flat = by_name(host(variables))
        if jax.process_index() == 0:
            np.savez(out / "variables.npz", **flat)
        (out / f"losses_{jax.process_index()}.json").write_text(json.dumps(losses))
    if args.processes > 1:
        jax.distributed.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4, help="CPU devices per process")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ckpt", help="checkpoint directory (saved and restored by every process)")
    parser.add_argument("--out", help="write each process's losses and the final variables here")
    parser.add_argument("--restore", help="restore this checkpoint (written by any topology) and check it")
    parser.add_argument("--expect", help="with --restore: the variables.npz it must equal")
    parser.add_argument("--die-at", type=int, help="process 1 exits abruptly at this step (a test of failure)")
    parser.add_argument("--timeout", type=float, default=240, help="the launcher stops every process after this")
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.process_id is None:
        return launch(args, sys.argv[1:])
    worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
