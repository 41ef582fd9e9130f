"""Layer fields are checked when the layer is built (`effax/nn/_fields.py`): a config mistake is an `EffaxError`
naming the layer, the field, what it got and the fix, never a raw JAX error from its first call or a silent
truthy string. Every layer with a field of one kind checks it alike."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx

KEY = jax.random.key(0)
nn = fx.nn
CELL = nn.LSTMCell(3)

# every layer, built with its required arguments (a field given below replaces the default)
LAYERS = {
    "Dense": lambda **kw: nn.Dense(3, **kw),
    "DenseGeneral": lambda **kw: nn.DenseGeneral(3, **kw),
    "Conv": lambda **kw: nn.Conv(3, (3,), **kw),
    "ConvTranspose": lambda **kw: nn.ConvTranspose(3, (3,), **kw),
    "Embed": lambda **kw: nn.Embed(5, 3, **kw),
    "LayerNorm": lambda **kw: nn.LayerNorm(**kw),
    "RMSNorm": lambda **kw: nn.RMSNorm(**kw),
    "BatchNorm": lambda **kw: nn.BatchNorm(**kw),
    "GroupNorm": lambda **kw: nn.GroupNorm(**kw),
    "MultiHeadAttention": lambda **kw: nn.MultiHeadAttention(2, **kw),
    "MLP": lambda **kw: nn.MLP([3], **kw),
    "LSTMCell": lambda **kw: nn.LSTMCell(3, **kw),
    "OptimizedLSTMCell": lambda **kw: nn.OptimizedLSTMCell(3, **kw),
    "GRUCell": lambda **kw: nn.GRUCell(3, **kw),
    "Dropout": lambda **kw: nn.Dropout(0.1, **kw),
    "RNN": lambda **kw: nn.RNN(CELL, **kw),
    "Bidirectional": lambda **kw: nn.Bidirectional(nn.RNN(CELL), nn.RNN(CELL), **kw),
}
DTYPED = [name for name in LAYERS if "dtype" in nn.__dict__[name].__dataclass_fields__]
FLAGS = [
    (name, field)
    for name in LAYERS
    for field, f in nn.__dict__[name].__dataclass_fields__.items()
    if f.type in ("bool", "bool | None")
]


def test_every_layer_with_dtypes_and_flags_is_covered():
    assert len(DTYPED) == 14 and len(FLAGS) >= 30  # a new layer or field joins the checks below by itself


@pytest.mark.parametrize("name", DTYPED)
@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
def test_an_unknown_dtype_is_refused_when_built_with_the_nearest_name(name, field):
    with pytest.raises(fx.EffaxError, match=rf"^{name}\({field}='floot32'\): `{field}` must be a dtype .*"
                                            r"Did you mean 'float32'\?"):
        LAYERS[name](**{field: "floot32"})
    for good in ("float32", jnp.bfloat16, np.dtype("float16"), jnp.float32):
        LAYERS[name](**{field: good})


@pytest.mark.parametrize(("name", "field"), FLAGS)
def test_a_flag_that_is_not_a_bool_is_refused_not_taken_as_truthy(name, field):
    with pytest.raises(fx.EffaxError, match=rf"`{field}` must be True or False.*so 'no' would mean True"):
        LAYERS[name](**{field: "no"})
    LAYERS[name](**{field: False})
    LAYERS[name](**{field: np.bool_(True)})


@pytest.mark.parametrize("layer", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("strides", 0, r"`strides` must be a positive int, or one per spatial dim .*got 0"),
        ("strides", (1.5,), r"`strides` must be a positive int"),
        ("kernel_dilation", -1, r"`kernel_dilation` must be a positive int"),
        ("padding", "SAEM", r"`padding` must be 'SAME', 'VALID'.*got str 'SAEM'\. Did you mean 'SAME'\?"),
        ("padding", ((1, 1, 1),), r"`padding` must be .*\(low, high\) pair per spatial dim"),
        ("padding", 1.5, r"`padding` must be"),
    ],
)
def test_conv_strides_dilations_and_padding_are_checked_when_built(layer, field, bad, message):
    with pytest.raises(fx.EffaxError, match=rf"^{layer}\({field}=.*{message}"):
        LAYERS[layer](**{field: bad})


def test_conv_fields_that_are_valid_still_build_and_run():
    x = jnp.ones((1, 6, 2))
    for kw in ({"padding": "same"}, {"padding": "CAUSAL"}, {"padding": 1}, {"padding": [(1, 0)]},
               {"strides": np.int64(2)}, {"strides": (2,)}, {"input_dilation": 2, "padding": 1},
               {"kernel_dilation": (2,)}):
        fx.transform(lambda x, kw=kw: nn.Conv(3, (3,), **kw)(x)).init(KEY, x)
    for kw in ({"strides": None}, {"strides": 2}, {"padding": "CIRCULAR"}, {"padding": ((1, 1),)}):
        fx.transform(lambda x, kw=kw: nn.ConvTranspose(3, (3,), **kw)(x)).init(KEY, x)
    with pytest.raises(fx.EffaxError, match=r"ConvTranspose\(padding='REFLECT'\).*'CIRCULAR' \(any case\)"):
        nn.ConvTranspose(3, (3,), padding="REFLECT")  # Conv's padding only: refused, not a raw lax error
    with pytest.raises(fx.EffaxError, match=r"Conv\(input_dilation=2, padding='SAME'\): .*`padding=\(\(1, 1\),\)`"):
        nn.Conv(3, (3,), input_dilation=2)  # JAX takes no padding name with a dilated input
    with pytest.raises(fx.EffaxError, match=r"Conv\(feature_group_count=0\): `feature_group_count` must be a positive"):
        nn.Conv(3, (3,), feature_group_count=0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: nn.Dropout("0.1"), r"Dropout\(rate='0.1'\): `rate` must be in \[0, 1\], got str '0.1'; .*float\("),
        (lambda: nn.Dropout(1.5), r"`rate` must be in \[0, 1\], got 1.5"),
        (lambda: nn.MultiHeadAttention(2, dropout_rate="0.1"), r"`dropout_rate` must be in \[0, 1\]"),
        (lambda: nn.Sequential([4]), r"layers\[0\] is int 4 \(a size: .*`fx.nn.Dense\(n\)`\), not a layer"),
        (lambda: nn.Sequential([nn.Dense(2), "relu"]), r"layers\[1\] is str 'relu'"),
        (lambda: nn.MLP([3], activation="relu"), r"MLP\(activation='relu'\): `activation` must be a function"),
        (lambda: nn.LSTMCell(3, gate_fn=None), r"`gate_fn` must be a function"),
        (lambda: nn.RNN(3), r"RNN\(cell=3\): `cell` must be a function"),
    ],
)
def test_rates_and_functions_are_checked_when_built(make, message):
    with pytest.raises(fx.EffaxError, match=message):
        make()


def test_an_error_inside_a_model_names_where_the_layer_is_built_and_the_fix_works():
    def model(x):
        with fx.scope("encoder"):
            return nn.Dense(3, dtype="floot32", name="proj")(x)

    with pytest.raises(fx.EffaxError, match=r"Dense\(dtype='floot32', name='proj'\), built at `encoder`,"):
        fx.transform(model).init(KEY, jnp.ones((1, 2)))
    fixed = fx.transform(lambda x: nn.Dense(3, dtype="float32")(x))
    assert fixed.apply(fixed.init(KEY, jnp.ones((1, 2))), jnp.ones((1, 2))).dtype == jnp.float32
    assert fx.transform(lambda x: nn.Sequential([nn.Dense(4), jax.nn.relu])(x)).init(KEY, jnp.ones((1, 2)))


def test_a_flag_traced_by_a_jax_transform_is_refused_as_traced_not_as_a_wrong_value():
    """`Dropout(deterministic=flag)` under `jax.jit(f)(True)`: the user wrote True; JAX made it an array."""
    model = lambda flag: fx.transform(lambda x: fx.nn.Dropout(0.5, deterministic=flag)(x))  # noqa: E731
    with pytest.raises(fx.EffaxError, match=r"`deterministic` must be a Python bool, but it is a traced array.*"
                                            r"static_argnames"):
        jax.jit(lambda flag: model(flag).apply({}, jnp.ones(2), rngs=jax.random.key(0)))(True)
    out = jax.jit(lambda x, flag: model(flag).apply({}, x, rngs=jax.random.key(0)), static_argnames="flag")
    assert jnp.array_equal(out(jnp.ones(2), flag=True), jnp.ones(2))
