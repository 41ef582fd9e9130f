"""Combinators: `MLP` and `Sequential`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from effax.core import EffaxError
from effax.nn._fields import check_callables, check_layer
from effax.nn._linear import Dense, Initializer, check_sizes, default_kernel_init, zeros
from effax.nn._module import Module, where


class MLP(Module):
    """Dense layers of sizes `features` with `activation` between them (and after the last if `activate_final`).

    >>> t = fx.transform(lambda x: fx.nn.MLP([8, 2])(x))
    >>> v = t.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> jax.tree.map(jnp.shape, v["params"]["MLP_0"])
    {'Dense_0': {'bias': (8,), 'kernel': (3, 8)}, 'Dense_1': {'bias': (2,), 'kernel': (8, 2)}}

    `kernel_init` may also be a sequence, one initializer per layer, so each
    layer's kernel can carry its own logical axes (a transformer's MLP goes
    `("embed", "mlp")` then `("mlp", "embed")`):

    >>> part, lecun = fx.nn.with_logical_partitioning, jax.nn.initializers.lecun_normal()
    >>> mlp = fx.nn.MLP([8, 3], kernel_init=[part(lecun, ("embed", "mlp")), part(lecun, ("mlp", "embed"))])
    >>> axes = fx.sharding.logical_axes(fx.summary(fx.transform(mlp), jnp.ones((1, 3))))
    >>> axes["params"]["Dense_1"]
    {'bias': P('embed',), 'kernel': P('mlp', 'embed')}
    """

    features: Sequence[int]
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
    activate_final: bool = False
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer | Sequence[Initializer] = default_kernel_init
    bias_init: Initializer = zeros

    def __post_init__(self) -> None:
        check_sizes(self, several=("features",))
        check_layer(self, ("activate_final", "use_bias"))
        check_callables(self, "activation")

    def __call__(self, x: jax.Array) -> jax.Array:
        last = len(self.features) - 1
        inits = self.kernel_init if isinstance(self.kernel_init, Sequence) else [self.kernel_init] * len(self.features)
        if len(inits) != len(self.features):
            raise EffaxError(
                f"{where('MLP')}: {len(inits)} kernel initializers for {len(self.features)} layers; give one per "
                "layer, or a single one for all."
            )
        for i, n in enumerate(self.features):
            x = Dense(
                n,
                use_bias=self.use_bias,
                dtype=self.dtype,
                kernel_init=inits[i],
                bias_init=self.bias_init,
                param_dtype=self.param_dtype,
            )(x)
            if i < last or self.activate_final:
                x = self.activation(x)
        return x


class Sequential(Module):
    """Call `layers` in order, each on the previous output; extra arguments go to the first layer.

    As in Flax, an output that is a tuple is passed to the next layer as its
    positional arguments, and a dict as its keyword arguments.

    Layers may be modules or plain functions (`jax.nn.relu`). Modules made
    before the run are named by their place in `layers`, as Flax names them
    (`layers_0`, `layers_2`), so a linen `nn.Sequential`'s variables apply
    unchanged; modules made inside a model are named where they are made.

    >>> model = fx.nn.Sequential([fx.nn.Dense(4), jax.nn.relu, fx.nn.Dense(1)])
    >>> v = fx.transform(model).init(jax.random.key(0), jnp.ones((2, 3)))
    >>> sorted(v["params"])
    ['layers_0', 'layers_2']
    """

    layers: Sequence[Callable[..., Any]]

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Sequence) or isinstance(self.layers, str):
            name = type(self.layers).__name__
            raise EffaxError(
                f"Sequential(layers={name}(...)): `layers` must be a list of layers, got one {name}. "
                f"Write `fx.nn.Sequential([layer])`, or `fx.nn.Sequential([fx.nn.Dense(4), jax.nn.relu])` for several."
            )
        for i, layer in enumerate(self.layers):
            if not callable(layer):
                size = " (a size: a layer of that many units is `fx.nn.Dense(n)`)" if type(layer) is int else ""
                raise EffaxError(
                    f"Sequential(layers=[...]): layers[{i}] is {type(layer).__name__} {layer!r:.40}{size}, not a "
                    "layer; every entry is called on the previous output. Write e.g. "
                    "`fx.nn.Sequential([fx.nn.Dense(4), jax.nn.relu, fx.nn.Dense(1)])`."
                )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.layers:
            raise EffaxError(
                f"{where('Sequential')} needs at least one layer: `fx.nn.Sequential([fx.nn.Dense(4), jax.nn.relu])`."
            )
        out = self.layers[0](*args, **kwargs)
        for layer in self.layers[1:]:  # as Flax: a tuple is spread over the next layer's arguments, a dict too
            out = layer(*out) if isinstance(out, tuple) else layer(**out) if isinstance(out, dict) else layer(out)
        return out
