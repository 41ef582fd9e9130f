"""What every library's benchmark model shares: the model spec, the `Bench` interface, and the math.

Each library module in `benchmarks/libs/` builds the same model for a `Spec`
and returns a `Bench` of three pure functions. The math written here (the
batch-norm-like update, the loss, the SGD step, the attention core) is used
by pure JAX and the raw-effect effax model alike, so their programs can be
compared op for op.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

LR = 1e-3
DROP_RATE = 0.1
MOMENTUM = 0.9
EPS = 1e-5

# model names: the plain MLP, the MLP with dropout and a batch-norm-like running state, a transformer stack
MODELS = ("mlp", "mlp_stateful", "transformer")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One benchmarked model: `model` in `MODELS`, `depth` layers (MLP) or blocks (transformer)."""

    model: str
    depth: int
    width: int = 256  # MLP width; transformer model dim is `d_model`
    batch: int = 32
    seq: int = 32
    d_model: int = 128
    heads: int = 4
    mlp_dim: int = 512

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.model == "transformer":
            return (8, self.seq, self.d_model)
        return (self.batch, self.width)

    @property
    def stateful(self) -> bool:
        return self.model == "mlp_stateful"


@dataclasses.dataclass
class Bench:
    """Three pure functions of one model in one library.

    `init(key, x) -> variables`; `apply(variables, x) -> y` runs the model in
    eval mode; `train_step(variables, x, key) -> (variables, loss)` runs it in
    train mode (dropout on, running stats updated), takes `value_and_grad` of
    the loss with respect to the params and applies one SGD step.
    `abstract_init(key, x)` is the library's way of getting shapes without
    allocating (default `jax.eval_shape(init, key, x)`).
    """

    init: Callable[[jax.Array, jax.Array], Any]
    apply: Callable[[Any, jax.Array], jax.Array]
    train_step: Callable[[Any, jax.Array, jax.Array], tuple[Any, jax.Array]]
    abstract_init: Callable[[jax.Array, jax.Array], Any] | None = None

    def eval_shape_init(self, key: jax.Array, x: jax.Array) -> Any:
        if self.abstract_init is not None:
            return self.abstract_init(key, x)
        return jax.eval_shape(lambda k, x: self.init(k, x), key, x)  # a fresh function: no trace cache hit

    def eval_shape_apply(self, variables: Any, x: jax.Array) -> Any:
        """One abstract forward pass: what DESIGN's abstract-init bar adds to pure JAX's abstract init."""
        return jax.eval_shape(lambda v, x: self.apply(v, x), variables, x)  # a fresh function: no trace cache hit


def loss_of(y: jax.Array) -> jax.Array:
    """The benchmark loss: mean square of the output (the target is zero)."""
    return jnp.mean(y**2)


def sgd(params: Any, grads: Any) -> Any:
    return jax.tree.map(lambda p, g: p - LR * g, params, grads)


def batch_norm_like(h: jax.Array, mean: jax.Array, var: jax.Array, training: bool):
    """Normalize `h` by batch stats (training) or the running ones; return `(h, new_mean, new_var)`."""
    if training:
        m, v = h.mean(0), h.var(0)
        mean, var = MOMENTUM * mean + (1 - MOMENTUM) * m, MOMENTUM * var + (1 - MOMENTUM) * v
    else:
        m, v = mean, var
    return (h - m) * jax.lax.rsqrt(v + EPS), mean, var


def dropout(key: jax.Array, h: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, 1 - DROP_RATE, h.shape)
    return jnp.where(keep, h / (1 - DROP_RATE), 0.0)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    m = x.mean(-1, keepdims=True)
    v = x.var(-1, keepdims=True)
    return (x - m) * jax.lax.rsqrt(v + 1e-6) * scale + bias


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Multi-head dot-product attention core on `[batch, seq, d]` projections (no params)."""
    b, s, d = q.shape
    split = lambda t: t.reshape(b, s, heads, d // heads)
    q, k, v = split(q), split(k), split(v)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // heads).astype(q.dtype)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, d)


_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%\S+\s*=\s", re.MULTILINE)


def count_hlo_ops(compiled: Any) -> int:
    """Instructions in a compiled executable's optimized HLO, fused computations included."""
    return len(_INSTRUCTION.findall(compiled.as_text()))
