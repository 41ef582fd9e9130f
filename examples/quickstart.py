"""effax in one page: a model that requests params, a running mean, dropout and the mode.

Run: python examples/quickstart.py
It fits a noisy linear target for a few hundred steps in train mode (dropout
on, running mean updated), then evaluates in eval mode (no keys, state frozen).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import effax as fx


def model(x: jax.Array) -> jax.Array:
    """A two-layer MLP with a running mean of its hidden activations and dropout."""
    with fx.scope("hidden"):
        w = fx.param("kernel", jax.nn.initializers.lecun_normal(), (x.shape[-1], 32))
        b = fx.param("bias", jax.nn.initializers.zeros, (32,))
        h = jax.nn.gelu(x @ w + b)
        mean = fx.local_state("mean", lambda: jnp.zeros(32), collection="stats")
        if fx.is_training():
            mean.set(0.99 * mean.get() + 0.01 * h.mean(0))
            keep = jax.random.bernoulli(fx.next_key("dropout"), 0.9, h.shape)
            h = jnp.where(keep, h / 0.9, 0.0)
    with fx.scope("out"):
        w = fx.param("kernel", jax.nn.initializers.lecun_normal(), (32, 1))
        return (h @ w)[:, 0]


def main(steps: int = 300, seed: int = 0, verbose: bool = True) -> dict[str, float]:
    t = fx.transform(model)
    key_data, key_init, key_train = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(key_data, (256, 4))
    y = x @ jnp.array([1.0, -2.0, 0.5, 3.0]) + 0.1 * jax.random.normal(key_train, (256,))

    variables = t.init(key_init, x)
    params, stats = variables["params"], {"stats": variables["stats"]}
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    def loss_fn(params, stats, key):
        pred, updates = t.apply(
            {"params": params, **stats}, x, training=True, rngs={"dropout": key}, mutable=["stats"]
        )
        return jnp.mean((pred - y) ** 2), updates

    @jax.jit
    def step(params, stats, opt_state, key):
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, key)
        changes, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, changes), updates, opt_state, loss

    @jax.jit
    def evaluate(params, stats):
        pred = t.apply({"params": params, **stats}, x, training=False)
        return jnp.mean((pred - y) ** 2)

    first = float(evaluate(params, stats))
    for i in range(steps):
        params, stats, opt_state, loss = step(params, stats, opt_state, jax.random.fold_in(key_train, i))
    final = float(evaluate(params, stats))

    n_params = sum(p.size for p in jax.tree.leaves(params))
    report = {"eval_mse_before": first, "eval_mse_after": final, "params": float(n_params)}
    if verbose:
        print("effax quickstart")
        print(f"  params:            {n_params} in {sorted(params)}")
        print(f"  collections:       {sorted(variables)}")
        print(f"  eval MSE:          {first:.4f} -> {final:.4f} after {steps} train steps")
        print(f"  running mean[:4]:  {[round(float(m), 3) for m in stats['stats']['hidden']['mean'][:4]]}")
        variables = {"params": params, **stats}
        for label, call in [
            ("train, stats frozen", lambda: t.apply(variables, x, training=True, rngs={"dropout": key_train})),
            ("train, no rngs", lambda: t.apply(variables, x, training=True, mutable=["stats"])),
        ]:
            try:
                call()
            except fx.EffaxError as e:
                print(f"  {label:20s} -> {type(e).__name__}: {str(e).split('. ')[0]}")
        print("  next: python examples/train_digits.py")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.seed)
