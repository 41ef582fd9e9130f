"""Small Flax linen modules that exercise the features `fx.from_flax` must map."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class Block(nn.Module):
    """Dense -> BatchNorm -> sow -> Dropout -> Dense: params, state, a stream and a sown value."""

    features: int = 8

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(self.features)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        self.sow("intermediates", "hidden", x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(2)(nn.relu(x))


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.LayerNorm()(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Conv(2, (1, 1), strides=2)(nn.relu(x))


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, dropout_rate=0.3)(x, deterministic=not train)
        return nn.LayerNorm()(x)


class ScanLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(x.shape[-1])(x)
        h = nn.BatchNorm(use_running_average=False)(h)
        h = nn.Dropout(0.2, deterministic=False)(h)
        return x + nn.tanh(h), None


class ScanStack(nn.Module):
    """Three layers through `nn.scan`: params and batch stats stacked, dropout keys split per layer."""

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            ScanLayer,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True, "dropout": True},
            length=3,
        )
        return stack(name="layers")(x, None)[0]


class RematBlock(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        inner = nn.remat(Block, static_argnums=(2,))
        return inner(features=6)(x, train)


class VmapJitShare(nn.Module):
    """`nn.vmap` over an ensemble axis, `nn.jit` around a Dense, and `nn.share_scope`."""

    @nn.compact
    def __call__(self, x):
        ensemble = nn.vmap(
            nn.Dense, in_axes=None, out_axes=0, axis_size=2, variable_axes={"params": 0},
            split_rngs={"params": True},
        )
        y = ensemble(3, name="ensemble")(x).mean(0)
        y = nn.jit(nn.Dense)(3, name="jitted")(y)
        return Shared(name="shared")(y)


class Shared(nn.Module):
    def setup(self):
        self.inner = nn.Dense(3)
        nn.share_scope(self, self.inner)
        self.extra = self.param("extra", nn.initializers.ones, (3,))

    def __call__(self, x):
        return self.inner(x) + self.extra


class AutoEncoder(nn.Module):
    def setup(self):
        self.encoder = nn.Dense(2)
        self.decoder = nn.Dense(5)

    def __call__(self, x):
        return self.decode(self.encode(x))

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)


class Losses(nn.Module):
    """Sows into a custom collection and keeps a counter in another."""

    @nn.compact
    def __call__(self, x):
        count = self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
        if not self.is_initializing():
            count.value += 1
        y = nn.Dense(2)(x)
        self.sow("losses", "l2", jnp.sum(y**2))
        return y


class Partitioned(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        return nn.Dense(4, kernel_init=init)(x)


class Decoder(nn.Module):
    """A small decoder-only Transformer written like Flax's lm1b: learned positions (a `cache_index`
    in decode mode, created under `has_variable`), causal self-attention with a decode cache."""

    vocab: int = 11
    features: int = 16
    max_len: int = 8
    decode: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.features, name="embed")(tokens)
        table = self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.features))
        if self.decode:
            is_initialized = self.has_variable("cache", "cache_index")
            index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            if is_initialized:
                i = index.value
                index.value = i + 1
                x = x + jax.lax.dynamic_slice_in_dim(table, i, 1)[None]
            else:
                x = x + table[None, : tokens.shape[1]]
            mask = None
        else:
            x = x + table[None, : tokens.shape[1]]
            mask = nn.make_causal_mask(tokens)
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=self.features, decode=self.decode)(
            nn.LayerNorm()(x), mask=mask
        )
        x = x + h
        x = x + nn.Dense(self.features)(nn.gelu(nn.Dense(2 * self.features)(nn.LayerNorm()(x))))
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


class Critic(nn.Module):
    """An RL critic whose `__call__` takes a `training` keyword, like many real codebases."""

    @nn.compact
    def __call__(self, x, training: bool = False):
        x = nn.relu(nn.Dense(8)(x))
        x = nn.Dropout(0.5, deterministic=not training)(x)
        return nn.Dense(1)(x)


class Classifier(nn.Module):
    """Two Dense layers, used as a whole model (Flax's top-level module has no scope of its own)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(6)(x)))
