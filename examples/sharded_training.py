"""Train a small MLP data + model parallel on 8 devices, and check it matches one device.

The model is built from `fx.nn` layers; each names its params' dimensions
once, through its initializer (`fx.nn.with_logical_partitioning(init,
("embed", "mlp"))`, Flax's spelling; a bias takes its kernel's output axis).
`fx.summary` records those names, and rules map them to a mesh of 4 (data)
x 2 (model) devices. `jax.jit(t.init, out_shardings=...)` creates every
param directly on its shards, so no device ever holds the whole model;
batches are split over "data". JAX's SPMD partitioner does the rest. Runs
on a laptop: the 8 devices are simulated CPU devices.

    python examples/sharded_training.py --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding

import effax as fx

D_IN, HIDDEN, D_OUT, BATCH = 16, 64, 8, 64
RULES = [("batch", "data"), ("embed", None), ("mlp", "model")]


class MLP(fx.nn.Module):
    """A two-layer MLP of `fx.nn.Dense`; the hidden ("mlp") dimension is split over "model"."""

    def __call__(self, x: jax.Array) -> jax.Array:
        lecun, axes = jax.nn.initializers.lecun_normal(), fx.nn.with_logical_partitioning
        h = fx.nn.Dense(HIDDEN, kernel_init=axes(lecun, ("embed", "mlp")), name="up")(x)
        return fx.nn.Dense(D_OUT, kernel_init=axes(lecun, ("mlp", "embed")), name="down")(jax.nn.gelu(h))


t = fx.transform(MLP())


def data(step: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed teacher: y = sin(x @ A), fresh x each step."""
    rng = np.random.default_rng(step)
    teacher = np.random.default_rng(1234).normal(size=(D_IN, D_OUT)) / np.sqrt(D_IN)
    x = rng.normal(size=(BATCH, D_IN)).astype(np.float32)
    return x, np.sin(x @ teacher).astype(np.float32)


def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((t.apply({"params": params}, x) - y) ** 2)


def train_step(params: Any, x: jax.Array, y: jax.Array, lr: float = 0.1) -> tuple[Any, jax.Array]:
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss


def train(steps: int, mesh: jax.sharding.Mesh | None) -> tuple[Any, list[float]]:
    """Train from the same key on the same batches: sharded over `mesh`, or on one device if None."""
    key = jax.random.key(0)
    x0 = jnp.zeros((BATCH, D_IN))
    if mesh is None:
        params = jax.jit(t.init)(key, x0)["params"]
        step = jax.jit(train_step)
        put = jnp.asarray
    else:
        shardings = fx.sharding.logical_to_mesh(fx.summary(t, x0), mesh, RULES)
        params = jax.jit(t.init, out_shardings=shardings)(key, x0)["params"]
        batch = NamedSharding(mesh, fx.sharding.logical_to_spec(("batch", None), mesh, RULES))
        step = jax.jit(train_step, out_shardings=(shardings["params"], None))
        put = lambda a: jax.device_put(a, batch)
    losses = []
    for i in range(steps):
        x, y = data(i)
        params, loss = step(params, put(x), put(y))
        losses.append(float(loss))
    return params, losses


def largest_share(params: Any) -> float:
    """The largest fraction of the model's bytes that any one device holds."""
    per_device: dict[Any, int] = {}
    for a in jax.tree.leaves(params):
        for shard in a.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values()) / sum(a.nbytes for a in jax.tree.leaves(params))


def main(steps: int = 100, verbose: bool = True) -> dict[str, Any]:
    if len(jax.devices()) < 8:
        raise SystemExit(
            f"this example needs 8 devices and JAX sees {len(jax.devices())}: run it as a script, or "
            "set XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts."
        )
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    if verbose:
        print(fx.summary(t, jnp.zeros((BATCH, D_IN))), "\n")
    sharded, sharded_losses = train(steps, mesh)
    single, single_losses = train(steps, None)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(np.asarray(a) - np.asarray(b)))), sharded, single)
    report = {
        "devices": len(jax.devices()),
        "mesh": dict(mesh.shape),
        "steps": steps,
        "loss_first": sharded_losses[0],
        "loss_last_sharded": sharded_losses[-1],
        "loss_last_single": single_losses[-1],
        "max_loss_diff": max(abs(a - b) for a, b in zip(sharded_losses, single_losses, strict=True)),
        "max_param_diff": max(jax.tree.leaves(diff)),
        "largest_share_on_one_device": largest_share(sharded),
        "kernel_sharding": str(sharded["up"]["kernel"].sharding.spec),
    }
    if verbose:
        for name, value in report.items():
            print(f"{name:>28}: {value}")
    return report


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before JAX starts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line only")
    args = parser.parse_args()
    result = main(args.steps, verbose=not args.json)
    if args.json:
        print(json.dumps(result))
