"""Every plausible mistake at the boundary is a typed error that names the culprit and the fix.

One row per mistake: the call, the error type, and words the message must hold
(the argument or path, and the fix). Valid spellings of the same arguments
still work (the second half of the file).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx

KEY = jax.random.key(0)
X = jnp.ones((4, 3))
zeros = jax.nn.initializers.zeros

bn = fx.transform(lambda x: fx.nn.BatchNorm()(x))
BN = bn.init(KEY, X)
dense = fx.transform(lambda x: fx.nn.Dense(2)(x))
DENSE = dense.init(KEY, X)
noisy = fx.transform(lambda x: x + jax.random.normal(fx.next_key("noise"), x.shape))
inner = fx.transform(lambda x: fx.nn.Dense(2)(x))


def stats(mean, var):
    return {**BN, "batch_stats": {"BatchNorm_0": {"mean": mean, "var": var}}}


def with_kernel(value):
    return {"params": {"Dense_0": {"kernel": value, "bias": jnp.zeros(2)}}}


def nested_init(x):
    return inner.apply(inner.init(jax.random.key(1), x), x)


def nested_apply(x):
    return inner.apply(DENSE, x)


def param_model(init=zeros, shape=(2,)):
    return fx.transform(lambda: fx.param("w", init, shape))


def scoped_str_shape():
    with fx.scope("encoder"):
        return fx.param("w", zeros, "4")


MISTAKES = [
    # stored state of the wrong shape or dtype: an error with the path, not a reshape TypeError
    ("bn-stats-shape-eval", lambda: bn.apply(stats(jnp.zeros(5), jnp.ones(5)), X, training=False),
     fx.ShapeMismatchError,
     r"state `BatchNorm_0/mean` in collection 'batch_stats' holds float32\[5\].*needs float32\[3\].*t.init"),
    ("bn-stats-broadcastable-shape", lambda: bn.apply(stats(jnp.zeros(1), jnp.ones(1)), X, training=False),
     fx.ShapeMismatchError, r"`BatchNorm_0/mean`.*holds float32\[1\]"),
    ("bn-stats-shape-train", lambda: bn.apply(stats(jnp.zeros(5), jnp.ones(5)), X, training=True, mutable=True),
     fx.ShapeMismatchError, r"`BatchNorm_0/mean`.*holds float32\[5\]"),
    ("bn-stats-dtype-eval",
     lambda: bn.apply(stats(jnp.zeros(3, jnp.float16), jnp.ones(3, jnp.float16)), X, training=False),
     fx.ShapeMismatchError, r"`BatchNorm_0/mean`.*holds float16\[3\].*needs float32\[3\]"),
    ("bn-stats-dtype-train",
     lambda: bn.apply(stats(jnp.zeros(3, jnp.int32), jnp.ones(3)), X, training=True, mutable=True),
     fx.ShapeMismatchError, r"`BatchNorm_0/mean`.*holds int32\[3\]"),
    # param leaves that are not arrays
    ("str-param", lambda: dense.apply(with_kernel("abc"), X),
     fx.ShapeMismatchError, r"param `Dense_0/kernel`: variables\['params'\] holds a str, not an array"),
    ("None-param", lambda: dense.apply(with_kernel(None), X),
     fx.ShapeMismatchError, r"param `Dense_0/kernel`: variables\['params'\] holds a NoneType, not an array"),
    # rngs that are not one key
    ("rngs-uint32[3]", lambda: noisy.apply({}, X, rngs=jnp.zeros(3, jnp.uint32)),
     fx.EffaxError, r"`rngs` is uint32\[3\], not a key: a raw key is uint32\[2\]"),
    ("rngs-dict-uint32[3]", lambda: noisy.apply({}, X, rngs={"noise": jnp.zeros(3, jnp.uint32)}),
     fx.EffaxError, r"rngs for stream 'noise' is uint32\[3\], not a key"),
    ("rngs-2-typed-keys", lambda: noisy.apply({}, X, rngs=jax.random.split(KEY, 2)),
     fx.EffaxError, r"`rngs` is a batch of 2 keys \(key<fry>\[2\]\).*Pass one key.*jax.vmap"),
    ("rngs-2-raw-keys", lambda: noisy.apply({}, X, rngs=jnp.zeros((2, 2), jnp.uint32)),
     fx.EffaxError, r"`rngs` is a batch of 2 keys \(uint32\[2, 2\]\)"),
    ("rngs-float", lambda: noisy.apply({}, X, rngs=jnp.ones(2)),
     fx.EffaxError, r"`rngs` is float32\[2\], not a key: pass `jax.random.key\(seed\)`"),
    ("init-without-key", lambda: dense.init(X),
     fx.EffaxError,
     r"`t.init\(rngs, \*args\)` takes the key first; `rngs` is float32\[4, 3\].*t.init\(jax.random.key\(0\), x\)"),
    # mutable
    ("mutable=1", lambda: bn.apply(BN, X, training=True, mutable=1),
     fx.EffaxError, r"`mutable=1` \(int\) is not an option.*`mutable=True` updates every collection"),
    ("mutable-dict", lambda: bn.apply(BN, X, training=True, mutable={"batch_stats": False}),
     fx.EffaxError, r"`mutable=\{'batch_stats': False\}` \(dict\).*whatever its value.*`mutable=False`"),
    ("init-mutable=1", lambda: dense.init(KEY, X, mutable=1), fx.EffaxError, r"`mutable=1` \(int\)"),
    ("init-mutable-list-speaks-of-init",
     lambda: fx.transform(lambda: fx.local_state("s", lambda: 0.0, collection="other").get()).init(
         KEY, mutable=["state"]),
     fx.MissingVariableError,
     r"state `s` in collection 'other' is not created: `t.init\(..., mutable=...\)` leaves collection 'other' out"),
    # param shapes and layer sizes
    ("shape-str", lambda: param_model(shape="ab").init(KEY),
     fx.ShapeMismatchError, r"param `w`: shape must be a tuple of non-negative ints, got 'ab'"),
    ("shape-float", lambda: param_model(shape=(2.5,)).init(KEY),
     fx.ShapeMismatchError, r"param `w`: shape must be a tuple of non-negative ints, got \(2.5,\)"),
    ("shape-names-the-path", lambda: fx.transform(scoped_str_shape).init(KEY),
     fx.ShapeMismatchError, r"param `encoder/w`: shape must be"),
    ("shape-negative", lambda: param_model(shape=(-1,)).init(KEY), fx.ShapeMismatchError, r"got \(-1,\)"),
    ("shape-bool", lambda: param_model(shape=(True,)).init(KEY), fx.ShapeMismatchError, r"got \(True,\)"),
    ("Dense-str", lambda: fx.nn.Dense("4"),
     fx.EffaxError, r"Dense\(features='4'\): `features` must be a positive int, got str.*int\(...\)"),
    ("Dense-float", lambda: fx.nn.Dense(2.0), fx.EffaxError, r"Dense\(features=2.0\)"),
    ("Embed-float", lambda: fx.nn.Embed(10, 2.5), fx.EffaxError, r"Embed\(features=2.5\)"),
    ("Conv-kernel-str", lambda: fx.nn.Conv(4, ("3",)), fx.EffaxError, r"Conv\(kernel_size=\('3',\)\)"),
    # initializers that are not functions
    ("param-init-not-callable", lambda: param_model(init=0.0).init(KEY),
     fx.EffaxError,
     r"param `w`: `init` must be a function `init\(key, shape, dtype\) -> array`, got float 0.0.*constant"),
    ("state-init-not-callable", lambda: fx.transform(lambda: fx.local_state("s", 0.0)).init(KEY),
     fx.EffaxError, r"state `s`: `init` must be a function `init\(\) -> initial value`.*lambda: jnp.zeros"),
    # another transform's init/apply inside a model
    ("nested-init", lambda: fx.transform(nested_init).init(KEY, X),
     fx.EffaxError, r"`t.init` of a transformed model was called inside a model that `t.init` is running.*directly"),
    ("nested-apply-in-apply", lambda: fx.transform(nested_apply).apply({}, X),
     fx.EffaxError, r"`t.apply` of a transformed model was called inside a model that `t.apply` is running"),
]


@pytest.mark.parametrize("call, error, message", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_a_typed_error_naming_the_culprit_and_the_fix(call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    assert isinstance(info.value, fx.EffaxError) and type(info.value).__module__ == "effax"


def test_a_nested_transform_error_leaves_no_state_behind():
    with pytest.raises(fx.EffaxError):
        fx.transform(nested_init).init(KEY, X)
    assert inner.apply(DENSE, X).shape == (4, 2)  # outside a model, the same call works
    v = fx.transform(lambda x: fx.nn.Dense(2)(x)).init(KEY, X)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, DENSE)


def test_valid_spellings_still_work():
    # shapes: ints, NumPy ints, lists, concrete JAX ints
    for shape in (2, (2,), [2], np.int64(2), (np.int32(2),), jnp.array(2)):
        assert param_model(shape=shape).init(KEY)["params"]["w"].shape == (2,)
    assert param_model(shape=()).init(KEY)["params"]["w"].shape == ()
    assert fx.nn.Dense(np.int64(3)).features == 3
    assert fx.nn.DenseGeneral((2, 3)).features == (2, 3)
    # mutable: a name, a tuple, a set, dict keys, NumPy bools
    for mutable in ("batch_stats", ("batch_stats",), {"batch_stats"}, BN.keys() - {"params"}, np.bool_(True)):
        _, updates = bn.apply(BN, X, training=True, mutable=mutable)
        assert set(updates) == {"batch_stats"}
    assert not isinstance(bn.apply(BN, X, training=False, mutable=np.bool_(False)), tuple)
    # keys: raw, typed, per stream, mapped over a batch of keys, under jit
    for rngs in (jax.random.PRNGKey(0), KEY, {"noise": KEY}, {"noise": jax.random.PRNGKey(1)}):
        assert noisy.apply({}, X, rngs=rngs).shape == (4, 3)
    keys = jax.random.split(KEY, 2)
    assert jax.vmap(lambda k: noisy.apply({}, X, rngs=k))(keys).shape == (2, 4, 3)
    assert jax.jit(lambda k: noisy.apply({}, X, rngs=k))(KEY).shape == (4, 3)
    assert dense.init(jax.random.PRNGKey(0), X)["params"]["Dense_0"]["kernel"].shape == (3, 2)
    # a model calling another model's function directly is the fix the nested error points to
    t = fx.transform(lambda x: fx.nn.Dense(2)(fx.nn.Dense(3)(x)))
    assert t.apply(t.init(KEY, X), X).shape == (4, 2)
