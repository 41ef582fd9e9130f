"""InterceptMethods and CaptureIntermediates: observe, change, replace and capture module calls."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import effax as fx
from effax.handlers import CaptureIntermediates, InterceptMethods

KEY = jax.random.key(0)
X = jnp.ones((2, 3))
ONES = jax.nn.initializers.ones


class Block(fx.nn.Module):
    def __call__(self, x):
        return fx.nn.Dense(2, kernel_init=ONES)(fx.nn.Dense(4, kernel_init=ONES)(x))


def model(x):
    return fx.nn.Dense(1, kernel_init=ONES)(Block()(x))


T = fx.transform(model)
V = T.init(KEY, X)


def logger(log, tag):
    def interceptor(next_fun, args, kwargs, context):
        log.append((tag, "pre", "/".join(context.path)))
        out = next_fun(*args, **kwargs)
        log.append((tag, "post", "/".join(context.path)))
        return out

    return InterceptMethods(interceptor)


def test_observe_calls_of_nested_modules():
    log = []
    T.apply(V, X, handlers=[logger(log, "a")])
    # layers are named where they are built, as in Flax: in `Dense(2)(Dense(4)(x))` the outer Dense(2)
    # is built first, so it is Dense_0 and the first one called is Dense_1 (named at first call before)
    assert [(w, p) for _, w, p in log] == [
        ("pre", "Block_0"),
        ("pre", "Block_0/Dense_1"),
        ("post", "Block_0/Dense_1"),
        ("pre", "Block_0/Dense_0"),
        ("post", "Block_0/Dense_0"),
        ("post", "Block_0"),
        ("pre", "Dense_0"),
        ("post", "Dense_0"),
    ]


def test_the_innermost_interceptor_wraps_the_others():
    log = []
    T.apply(V, X, handlers=[logger(log, "outer"), logger(log, "inner")])
    first = [(tag, when) for tag, when, path in log if path == "Dense_0"]
    assert first == [("inner", "pre"), ("outer", "pre"), ("outer", "post"), ("inner", "post")]


def test_handlers_installed_inside_the_model_are_innermost():
    log = []

    def f(x):
        with fx.handle(logger(log, "model")):
            return model(x)

    fx.transform(f).apply(V, X, handlers=[logger(log, "apply")])
    first = [tag for tag, when, path in log if path == "Dense_0" and when == "pre"]
    assert first == ["model", "apply"]


def test_an_interceptor_applies_to_calls_nested_inside_an_intercepted_call():
    """The body of an intercepted `Block` runs under the interceptor, so its `Dense` calls are intercepted too."""

    def double_dense(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        return 2 * out if isinstance(context.module, fx.nn.Dense) else out

    plain = T.apply(V, X)
    doubled = T.apply(V, X, handlers=[InterceptMethods(double_dense)])
    assert jnp.allclose(doubled, 8 * plain)


def test_change_the_arguments():
    def halve_block_input(next_fun, args, kwargs, context):
        if isinstance(context.module, Block):
            args = (args[0] / 2,)
        return next_fun(*args, **kwargs)

    out = T.apply(V, X, handlers=[InterceptMethods(halve_block_input)])
    assert jnp.allclose(out, T.apply(V, X / 2))


def test_change_the_result_under_chosen_paths_and_forward_the_rest():
    def zero_second_dense(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        return jnp.zeros_like(out) if context.path == ("Block_0", "Dense_1") else out

    out = T.apply(V, X, handlers=[InterceptMethods(zero_second_dense)])
    assert jnp.array_equal(out, jnp.zeros_like(out) + V["params"]["Dense_0"]["bias"])


def test_replace_a_call_without_running_it():
    def skip_block(next_fun, args, kwargs, context):
        if isinstance(context.module, Block):
            return jnp.ones((args[0].shape[0], 2))
        return next_fun(*args, **kwargs)

    v = T.init(KEY, X, handlers=[InterceptMethods(skip_block)])
    assert list(v["params"]) == ["Dense_0"]  # Block's body never ran: no params for it
    assert jnp.allclose(T.apply(v, X, handlers=[InterceptMethods(skip_block)]), 2.0)


def test_a_handler_can_replace_the_request_it_forwards():
    class Rescale(fx.Handler):
        def handle(self, request, forward):
            if isinstance(request, fx.ModuleCallRequest) and request.path == ("Dense_0",):
                request = dataclasses.replace(request, args=(request.args[0] * 0,))
            return forward(request)

    out = T.apply(V, X, handlers=[Rescale()])
    assert jnp.array_equal(out, jnp.broadcast_to(V["params"]["Dense_0"]["bias"], out.shape))


def test_effects_of_an_interceptor_go_outward_and_land_at_the_module_path():
    def add_offset(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.path == ("Dense_0",):
            with fx.scope("adapter"):
                out = out + fx.param("offset", jax.nn.initializers.ones, out.shape[-1:])
        return out

    v = T.init(KEY, X, handlers=[InterceptMethods(add_offset)])
    assert set(v["params"]["Dense_0"]) == {"kernel", "bias", "adapter"}
    assert jnp.allclose(T.apply(v, X, handlers=[InterceptMethods(add_offset)]), T.apply(v, X) + 1)


def test_intercept_methods_rejects_non_functions():
    with pytest.raises(fx.EffaxError, match=r"InterceptMethods takes a function `interceptor\(next_fun"):
        InterceptMethods("nope")


class Embedder(fx.nn.Module):
    def __call__(self, tokens):
        embed = fx.nn.Embed(5, 3, name="embed")
        return embed.attend(fx.nn.Dense(3)(embed(tokens)))


TOKENS = jnp.array([1, 2])


def captured(handler, fn=lambda t: Embedder()(t), *args):
    t = fx.transform(fn)
    v = t.init(KEY, TOKENS)
    with fx.handle(fx.handlers.LoadParams(v["params"]), fx.handlers.CollectSown(True), handler) as (_, sown, _):
        out = t.fn(TOKENS, *args)
    return out, sown.collections()


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def test_capture_defaults_to_every_call_method():
    out, sown = captured(CaptureIntermediates())
    assert shapes(sown) == {
        "intermediates": {
            "Embedder_0": {
                "embed": {"__call__": ((2, 3),)},
                "Dense_0": {"__call__": ((2, 3),)},
                "__call__": ((2, 5),),
            }
        }
    }
    assert sown["intermediates"]["Embedder_0"]["__call__"][0] is out


def test_capture_filter_picks_modules_and_methods():
    _, sown = captured(CaptureIntermediates(lambda module, method: isinstance(module, fx.nn.Embed)))
    assert shapes(sown) == {"intermediates": {"Embedder_0": {"embed": {"__call__": ((2, 3),), "attend": ((2, 5),)}}}}


def test_a_module_called_twice_captures_a_tuple():
    def f(tokens):
        dense = fx.nn.Dense(3)
        x = fx.nn.Embed(5, 3)(tokens)
        return dense(dense(x))

    _, sown = captured(CaptureIntermediates(), f)
    assert shapes(sown["intermediates"]["Dense_0"]) == {"__call__": ((2, 3), (2, 3))}


def test_capture_sows_nothing_when_intermediates_is_not_collected():
    t = fx.transform(lambda t: Embedder()(t))
    v = t.init(KEY, TOKENS)
    with fx.handle(fx.handlers.LoadParams(v["params"]), fx.handlers.CollectSown("other"), CaptureIntermediates()) as (
        _,
        sown,
        _,
    ):
        t.fn(TOKENS)
    assert sown.collections() == {}


def test_capture_rejects_a_filter_that_is_not_a_function():
    with pytest.raises(fx.EffaxError, match="capture_intermediates takes True or a function"):
        CaptureIntermediates("__call__")
