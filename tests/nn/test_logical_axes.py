"""Logical axes on every `fx.nn` layer's params: `with_logical_partitioning` reaches `fx.summary` and sharding."""

import jax
import jax.numpy as jnp
import pytest

import effax as fx

part = fx.nn.with_logical_partitioning
lecun, ones, zeros = jax.nn.initializers.lecun_normal(), jax.nn.initializers.ones, jax.nn.initializers.zeros


def axes_of(layer, *args):
    """The logical axes of every param the layer makes, from `fx.summary`, as plain tuples."""
    s = fx.summary(fx.transform(lambda *a: layer(*a)), *args)
    tree = fx.sharding.logical_axes(s)["params"]
    return jax.tree.map(tuple, tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


X2 = jnp.ones((2, 4))


@pytest.mark.parametrize(
    "layer, args, expected",
    [
        (fx.nn.Dense(3, kernel_init=part(lecun, ("embed", "mlp"))), (X2,),
         {"Dense_0": {"kernel": ("embed", "mlp"), "bias": ("mlp",)}}),
        (fx.nn.Dense(3, kernel_init=part(lecun, ("embed", "mlp")), bias_init=part(zeros, (None,))), (X2,),
         {"Dense_0": {"kernel": ("embed", "mlp"), "bias": (None,)}}),
        (fx.nn.DenseGeneral((2, 3), kernel_init=part(lecun, ("embed", "heads", "kv"))), (X2,),
         {"DenseGeneral_0": {"kernel": ("embed", "heads", "kv"), "bias": ("heads", "kv")}}),
        (fx.nn.Conv(3, (3,), kernel_init=part(lecun, (None, "embed", "mlp"))), (jnp.ones((1, 5, 4)),),
         {"Conv_0": {"kernel": (None, "embed", "mlp"), "bias": ("mlp",)}}),
        (fx.nn.ConvTranspose(3, (3,), kernel_init=part(lecun, (None, "embed", "mlp"))), (jnp.ones((1, 5, 4)),),
         {"ConvTranspose_0": {"kernel": (None, "embed", "mlp"), "bias": ("mlp",)}}),
        (fx.nn.Embed(5, 4, embedding_init=part(lecun, ("vocab", "embed"))), (jnp.array([1, 2]),),
         {"Embed_0": {"embedding": ("vocab", "embed")}}),
        (fx.nn.LayerNorm(scale_init=part(ones, ("embed",)), bias_init=part(zeros, ("embed",))), (X2,),
         {"LayerNorm_0": {"scale": ("embed",), "bias": ("embed",)}}),
        (fx.nn.RMSNorm(scale_init=part(ones, ("embed",))), (X2,), {"RMSNorm_0": {"scale": ("embed",)}}),
        (fx.nn.BatchNorm(scale_init=part(ones, ("embed",)), bias_init=part(zeros, ("embed",))), (X2,),
         {"BatchNorm_0": {"scale": ("embed",), "bias": ("embed",)}}),
        (fx.nn.GroupNorm(2, scale_init=part(ones, ("embed",)), bias_init=part(zeros, ("embed",))), (X2,),
         {"GroupNorm_0": {"scale": ("embed",), "bias": ("embed",)}}),
    ],
)
def test_layer_params_carry_the_axes_of_their_initializers(layer, args, expected):
    assert axes_of(layer, *args) == expected


def test_attention_rotates_kernel_axes_for_the_out_projection():
    mha = fx.nn.MultiHeadAttention(2, kernel_init=part(lecun, ("embed", "heads", "kv")))
    got = axes_of(mha, jnp.ones((1, 3, 4)))["MultiHeadAttention_0"]
    assert got["query"] == {"kernel": ("embed", "heads", "kv"), "bias": ("heads", "kv")}
    assert got["out"] == {"kernel": ("heads", "kv", "embed"), "bias": ("embed",)}
    own = fx.nn.MultiHeadAttention(2, out_kernel_init=part(lecun, ("heads", None, "embed")))
    assert axes_of(own, jnp.ones((1, 3, 4)))["MultiHeadAttention_0"]["out"]["kernel"] == ("heads", None, "embed")


def test_recurrent_cells_take_axes_from_their_kernels():
    cell = fx.nn.LSTMCell(3, kernel_init=part(lecun, ("embed", "hidden")),
                          recurrent_kernel_init=part(jax.nn.initializers.orthogonal(), (None, "hidden")))
    got = axes_of(fx.nn.RNN(cell), jnp.ones((2, 5, 4)))["RNN_0"]["cell"]
    assert got["ii"] == {"kernel": ("embed", "hidden")}
    assert got["hi"] == {"kernel": (None, "hidden"), "bias": ("hidden",)}


def test_layers_without_axes_stay_replicated_and_summary_shows_axes():
    assert axes_of(fx.nn.Dense(3), X2) == {"Dense_0": {"kernel": (), "bias": ()}}
    s = fx.summary(fx.transform(lambda x: fx.nn.Dense(3, kernel_init=part(lecun, ("embed", "mlp")))(x)), X2)
    assert "axes (embed, mlp)" in str(s)


def test_logical_to_mesh_shards_an_nn_model():
    mesh = jax.make_mesh((1,), ("model",))
    t = fx.transform(lambda x: fx.nn.Dense(4, kernel_init=part(lecun, ("embed", "mlp")))(x))
    shardings = fx.sharding.logical_to_mesh(fx.summary(t, X2), mesh, [("embed", None), ("mlp", "model")])
    assert shardings["params"]["Dense_0"]["kernel"].spec == jax.sharding.PartitionSpec(None, "model")
    assert shardings["params"]["Dense_0"]["bias"].spec == jax.sharding.PartitionSpec("model")
    v = jax.jit(fx.transform(t.fn).init, out_shardings=shardings)(jax.random.key(0), X2)
    assert v["params"]["Dense_0"]["kernel"].shape == (4, 4)


def test_wrong_number_of_axes_is_an_error_naming_the_param():
    with pytest.raises(fx.ShapeMismatchError, match=r"param `Dense_0/kernel` has 2 dims .* 3 logical axes"):
        fx.transform(lambda x: fx.nn.Dense(3, kernel_init=part(lecun, ("a", "b", "c")))(x)).init(jax.random.key(0), X2)


def test_wrapped_initializer_gives_the_same_values():
    plain = fx.transform(lambda x: fx.nn.Dense(3)(x)).init(jax.random.key(0), X2)
    wrapped = fx.transform(lambda x: fx.nn.Dense(3, kernel_init=part(lecun, ("a", "b")))(x)).init(jax.random.key(0), X2)
    assert jnp.array_equal(plain["params"]["Dense_0"]["kernel"], wrapped["params"]["Dense_0"]["kernel"])
