"""Flax parity on real Flax code: init mode, decode caches, option clashes, captured intermediates,
boxed values, `method=`, the top-level module and interceptor order (issue 15)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx
from tests.interop.flax_modules import AutoEncoder, Block, Classifier, Critic, Decoder

K, KD = jax.random.key(0), jax.random.key(1)
X = jax.random.normal(jax.random.key(2), (4, 5))
TOKENS = jax.random.randint(jax.random.key(3), (2, 8), 0, 11)


def assert_same(a, b, tol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def structs(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


# --- 1. init runs Flax's own init, in Flax's init mode


def test_batchnorm_with_an_axis_name_initializes_outside_a_mapped_axis_as_in_flax():
    module = nn.BatchNorm(use_running_average=False, axis_name="batch")
    t = fx.transform(fx.from_flax(module))
    assert_same(t.init_with_output(K, X), module.init_with_output(K, X))
    assert structs(jax.eval_shape(t.init, K, X)) == structs(module.init(K, X))
    assert fx.summary(t, X).param_count == 10  # scale and bias
    # and applies in a mapped axis, as the imagenet ResNet trains under pmap
    v = t.init(K, X)
    step = lambda apply: jax.vmap(lambda x: apply(v, x, mutable=["batch_stats"]), axis_name="batch")
    assert_same(step(t.apply)(X[:, None]), step(module.apply)(X[:, None]))


def test_a_decode_cache_initializes_as_in_flax_and_summary_and_eval_shape_work():
    module = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, decode=True)
    x = jax.random.normal(K, (2, 6, 8))
    t = fx.transform(fx.from_flax(module))
    ours, theirs = t.init_with_output(K, x), module.init_with_output(K, x)
    assert sorted(ours[1]) == ["cache", "params"]
    assert_same(ours, theirs)
    assert structs(jax.eval_shape(t.init, K, x)) == structs(theirs[1])
    summary = fx.summary(t, x)
    assert summary.param_count == sum(a.size for a in jax.tree.leaves(theirs[1]["params"]))


@pytest.mark.slow  # seconds of Flax and eager decode compiles: CI runs it
def test_a_decoder_with_has_variable_branches_initializes_as_in_flax():
    module = Decoder(decode=True)
    t = fx.transform(fx.from_flax(module))
    assert_same(t.init_with_output(K, TOKENS), module.init_with_output(K, TOKENS))
    assert jax.eval_shape(t.init, K, TOKENS)["cache"]["cache_index"].shape == ()


def test_init_nested_in_a_scope_runs_flax_init_mode_too():
    f = fx.from_flax(nn.BatchNorm(use_running_average=False, axis_name="batch"), name="bn")

    def model(x):
        with fx.scope("body"):
            return f(x)

    v = fx.transform(model).init(K, X)
    assert structs(v["batch_stats"]["body"]["bn"]) == {"mean": ((5,), jnp.float32), "var": ((5,), jnp.float32)}


def test_is_initializing_is_the_effect_from_flax_asks():
    t = fx.transform(lambda: fx.is_initializing())
    assert t.init_with_output(K)[0] is True
    assert t.apply({}) is False
    assert jax.eval_shape(lambda k: t.init_with_output(k)[1], K) == {"params": {}}


# --- 2. inference state: a greedy decode loop under the eval preset, jitted


def greedy(step, variables, prompt, n):
    """Feed the prompt then `n` greedy tokens one at a time through `step(variables, token)`."""

    def body(i, carry):
        variables, token, out = carry
        logits, cache = step(variables, token)
        variables = {**variables, "cache": cache}
        nxt = jnp.where(i + 1 < prompt.shape[1], prompt[:, jnp.minimum(i + 1, prompt.shape[1] - 1)],
                        jnp.argmax(logits[:, -1], -1))
        return variables, nxt, out.at[:, i].set(nxt)

    out = jnp.zeros((prompt.shape[0], n), jnp.int32)
    return jax.lax.fori_loop(0, n, body, (variables, prompt[:, 0], out))[2]


@pytest.mark.slow  # seconds of Flax and eager decode compiles: CI runs it
def test_greedy_decoding_under_the_eval_preset_with_a_mutable_cache_equals_flax():
    decoder = Decoder(decode=True)
    t = fx.transform(fx.from_flax(decoder))
    variables = t.init(K, jnp.zeros((2, 8), jnp.int32))  # allocates the cache, as lm1b's initialize_cache
    assert_same(variables, decoder.init(K, jnp.zeros((2, 8), jnp.int32)))
    preset = fx.handlers.eval(mutable=["cache"])

    def ours(v, token):
        logits, updates = t.apply(v, token[:, None], handlers=preset)
        return logits, updates["cache"]

    def theirs(v, token):
        logits, updates = decoder.apply(v, token[:, None], mutable=["cache"])
        return logits, updates["cache"]

    prompt = TOKENS[:, :3]
    got = jax.jit(lambda v: greedy(ours, v, prompt, 7))(variables)
    expected = jax.jit(lambda v: greedy(theirs, v, prompt, 7))(variables)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    # the cached decode equals re-running the full prefix without a cache
    full = Decoder(decode=False)
    tokens = jnp.concatenate([prompt[:, :1], got], axis=1)
    logits = full.apply({"params": variables["params"]}, tokens[:, :-1])
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1))[:, 2:], np.asarray(got)[:, 2:])


def test_the_eval_preset_without_the_cache_mutable_refuses_the_write_with_advice():
    decoder = Decoder(decode=True)
    t = fx.transform(fx.from_flax(decoder))
    variables = t.init(K, jnp.zeros((2, 8), jnp.int32))
    with pytest.raises(fx.FrozenStateError, match=r"mutable=\['cache'\]"):
        t.apply(variables, TOKENS[:, :1], handlers=fx.handlers.eval())


# --- 3. a model keyword named like an option is never silently taken


def test_a_training_keyword_of_the_model_raises_with_the_fix():
    critic = fx.from_flax(Critic())
    t = fx.transform(critic)
    with pytest.raises(fx.EffaxError, match=r"(?s)takes a keyword argument 'training'.*fx\.is_training\(\)"):
        t.init(K, X)
    v = Critic().init(K, X)
    with pytest.raises(fx.EffaxError, match="'training'"):
        t.apply(v, X, training=True, rngs={"dropout": KD})
    # the documented fix: feed the mode from inside the model
    fixed = fx.transform(lambda x: critic(x, training=fx.is_training()))
    assert_same(fixed.init(K, X), v)
    train = fixed.apply(v, X, training=True, rngs={"dropout": KD})
    assert_same(train, Critic().apply(v, X, training=True, rngs={"dropout": KD}))
    assert_same(fixed.apply(v, X, training=False), Critic().apply(v, X))
    # or positionally, where nothing is taken
    assert_same(t.apply(v, X, True, rngs={"dropout": KD}), train)


@pytest.mark.parametrize("option", ["training", "rngs", "mutable", "handlers", "method", "capture_intermediates"])
def test_every_option_name_clashes_in_plain_functions_too(option):
    namespace = {}
    exec(f"def model(x, *, {option}=None):\n    return x", namespace)
    t = fx.transform(namespace["model"])
    with pytest.raises(fx.EffaxError, match=f"keyword argument {option!r}.*`t.init`/`t.apply`"):
        t.init(K, X)
    with pytest.raises(fx.EffaxError, match=f"{option!r}"):
        t.apply({}, X)
    assert fx.transform(functools.partial(namespace["model"], **{option: 1})).apply({}, X) is X


def test_models_without_clashing_names_are_inspected_once():
    from effax.discharge import _transform

    def model(x, **kwargs):  # **kwargs takes nothing by name: no clash
        return x

    t = fx.transform(model)
    before = _transform._keyword_options.cache_info()
    for _ in range(3):
        t.apply({}, X)
    after = _transform._keyword_options.cache_info()
    assert after.misses - before.misses <= 1 and after.hits - before.hits >= 2


# --- 4. capture_intermediates reaches into from_flax modules


def test_capture_intermediates_returns_flax_intermediates_under_the_module_path():
    module = Block()
    v = module.init(K, X, train=False)
    t = fx.transform(fx.from_flax(module))
    _, ours = t.apply(v, X, train=False, capture_intermediates=True)
    _, theirs = module.apply(v, X, train=False, capture_intermediates=True, mutable=["intermediates"])
    assert_same(ours, theirs)
    assert len(jax.tree.leaves(ours)) == 6  # Dense_0, BatchNorm_0, Dropout_0, Dense_1, the block, the sow
    nested = fx.transform(lambda x: fx.from_flax(module, name="block")(x, train=False))
    _, ours = nested.apply({c: {"block": t} for c, t in v.items()}, X, capture_intermediates=True)
    assert_same(ours["intermediates"]["block"], theirs["intermediates"])


def test_capture_intermediates_with_a_filter_and_under_init():
    module = Classifier()
    t = fx.transform(fx.from_flax(module))
    only_dense = lambda mdl, method: isinstance(mdl, nn.Dense)
    v = module.init(K, X)
    _, ours = t.apply(v, X, capture_intermediates=only_dense)
    _, theirs = module.apply(v, X, capture_intermediates=only_dense, mutable=["intermediates"])
    assert sorted(ours["intermediates"]) == ["Dense_0", "Dense_1"]
    assert_same(ours, theirs)
    _, made = t.init_with_output(K, X, capture_intermediates=True)
    assert sorted(made["intermediates"]) == ["Dense_0", "Dense_1", "__call__"]


# --- 5. boxed Flax values


def test_boxed_variables_are_unboxed_on_the_way_in():
    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            x = nn.Dense(17, kernel_init=init)(x)
            return nn.Embed(17, 8, embedding_init=nn.with_partitioning(nn.initializers.normal(), (None, "m")))(
                jnp.argmax(x, -1)
            )

    boxed = Boxed().init(K, X)
    assert isinstance(boxed["params"]["Dense_0"]["kernel"], nn.LogicallyPartitioned)
    t = fx.transform(fx.from_flax(Boxed()))
    assert_same(t.apply(boxed, X), Boxed().apply(boxed, X))
    assert_same(t.init(K, X), nn.unbox(boxed))  # unboxed; the names became `axes`
    # boxed values loaded into effax's own params too
    dense = fx.transform(lambda x: fx.nn.Dense(17)(x))
    layer = boxed["params"]["Dense_0"]
    plain = nn.unbox(layer)
    assert_same(dense.apply({"params": {"Dense_0": layer}}, X), X @ plain["kernel"] + plain["bias"])


def test_a_value_that_is_no_array_is_refused_in_one_line():
    t = fx.transform(lambda x: fx.nn.Dense(17)(x))

    class Opaque:
        def __repr__(self):
            return "Opaque(" + "0, " * 2000 + ")"

    with pytest.raises(fx.ShapeMismatchError) as info:
        t.apply({"params": {"Dense_0": {"kernel": Opaque(), "bias": jnp.zeros(17)}}}, X)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert "Dense_0/kernel" in message and "Opaque" in message


# --- 6. method= on fx.transform(fx.from_flax(m))


def test_method_names_and_functions_reach_flax_methods():
    module = AutoEncoder()
    v = module.init(K, X)
    t = fx.transform(fx.from_flax(module))
    expected = module.apply(v, X, method="encode")
    assert_same(t.apply(v, X, method="encode"), expected)
    assert_same(t.apply(v, X, method=lambda m, x: m.encode(x)), expected)  # the advice works
    assert_same(t.apply(v, expected, method=AutoEncoder.decode), module.apply(v, expected, method="decode"))
    assert_same(fx.transform(fx.from_flax(module), method="encode").apply(v, X), expected)
    assert_same(fx.transform(fx.from_flax(module).encode).apply(v, X), expected)
    with pytest.raises(fx.EffaxError, match=r"(?s)no method 'encoder'.*\['decode', 'encode'\].*lambda m"):
        t.apply(v, X, method="encoder")


# --- 7. fx.transform(module) is Flax's top-level module


class FxClassifier(fx.nn.Module):
    def __call__(self, x):
        return fx.nn.Dense(3)(jax.nn.relu(fx.nn.Dense(6)(x)))


def test_flax_variables_apply_unchanged_to_the_equivalent_fx_nn_model():
    v = Classifier().init(K, X)
    t = fx.transform(FxClassifier())
    assert structs(t.init(K, X)) == structs(v)  # Dense_0, Dense_1 at the root, no FxClassifier_0
    assert_same(t.apply(v, X), Classifier().apply(v, X), tol=1e-5)
    _, ours = t.apply(v, X, capture_intermediates=True)
    _, theirs = Classifier().apply(v, X, capture_intermediates=True, mutable=["intermediates"])
    assert_same(ours, theirs, tol=1e-5)  # the top-level `__call__` too, as Flax lays it out
    assert fx.check_variables(t, v, X).ok


def test_a_module_inside_a_function_keeps_its_own_scope():
    v = fx.transform(lambda x: FxClassifier()(x)).init(K, X)
    assert list(v["params"]) == ["FxClassifier_0"]


# --- 8. interceptor order, translated from Flax's


def test_nested_flax_interceptors_are_handlers_in_reverse_order():
    def dense_call(context):
        return context.method_name == "__call__" and isinstance(context.module, (nn.Dense, fx.nn.Dense))

    def add_one(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        return out + 1 if dense_call(context) else out

    def times_two(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        return out * 2 if dense_call(context) else out

    ones = nn.initializers.ones
    x = jnp.ones((1, 2))
    flax_dense = nn.Dense(1, kernel_init=ones)
    v = flax_dense.init(K, x)
    with nn.intercept_methods(add_one):
        with nn.intercept_methods(times_two):
            flax_out = flax_dense.apply(v, x)
    assert float(flax_out[0, 0]) == 2 * 2 + 1  # y = 2: the outermost (add_one) runs first, on the outside

    t = fx.transform(fx.nn.Dense(1, kernel_init=ones))
    intercept = fx.handlers.InterceptMethods
    ours = t.apply(v, x, handlers=[intercept(times_two), intercept(add_one)])
    assert_same(ours, flax_out)
    reversed_ = t.apply(v, x, handlers=[intercept(add_one), intercept(times_two)])
    assert float(reversed_[0, 0]) == (2 + 1) * 2
