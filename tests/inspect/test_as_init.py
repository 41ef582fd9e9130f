"""`fx.summary`/`fx.effects_of` run the model as `t.init` runs it: the same options, presets and refusals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import effax as fx

X = jnp.ones((1, 4, 8))


def counter(x):
    n = fx.local_state("n", lambda: jnp.zeros((), jnp.int32), collection="cache")
    n.set(n.get() + 1)
    return x * fx.param("w", jax.nn.initializers.ones, ())


def shapes(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)


def test_the_eval_preset_runs_as_in_init():
    t = fx.transform(counter)
    preset = fx.handlers.eval()  # init writes the counter and makes the param: init ignores the no-write rule
    v = t.init(jax.random.key(0), X, handlers=preset)
    s = fx.summary(t, X, handlers=preset)
    assert shapes(s.variables) == shapes(v)
    attn = fx.from_flax(nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, decode=True))
    t = fx.transform(lambda x: attn(x, x))
    preset = fx.handlers.eval(mutable=["cache"])
    assert shapes(fx.summary(t, X, handlers=preset).variables) == shapes(t.init(jax.random.key(0), X, handlers=preset))


def test_an_option_conflicting_with_the_preset_is_refused_as_in_init():
    t = fx.transform(counter)
    with pytest.raises(fx.EffaxError, match="training=True conflicts with the preset"):
        t.init(jax.random.key(0), X, training=True, handlers=fx.handlers.eval())
    with pytest.raises(fx.EffaxError, match="training=True conflicts with the preset"):
        fx.summary(t, X, training=True, handlers=fx.handlers.eval())


class AE(fx.nn.Module):
    def encode(self, x):
        return fx.nn.Dense(2, name="enc")(x)

    def __call__(self, x):
        return fx.nn.Dense(3, name="dec")(self.encode(x))


def test_method_capture_intermediates_and_mutable_are_inits():
    t, x = fx.transform(AE()), jnp.ones((1, 3))
    encoded = fx.summary(t, x, method="encode")
    assert shapes(encoded.variables) == shapes(t.init(jax.random.key(0), x, method="encode"))
    sows = fx.effects_of(t, x, capture_intermediates=True).of_kind("sow")
    assert {e.name for e in sows} == {"enc", "dec", "<root>"}
    assert fx.effects_of(t, x, mutable=False).of_kind("sow") == []
    with pytest.raises(fx.MissingVariableError, match="collection 'cache' out"):
        fx.summary(counter, X, mutable=["other"])


def test_a_multi_transform_and_a_non_model():
    def f():
        encoder, decoder = fx.nn.Dense(2, name="encoder"), fx.nn.Dense(3, name="decoder")
        return (lambda x: decoder(encoder(x))), {"encode": encoder}

    ae, x = fx.multi_transform(f), jnp.ones((1, 3))
    assert shapes(fx.summary(ae, x).variables) == shapes(ae.init(jax.random.key(0), x))
    for bad in (42, None):
        with pytest.raises(fx.EffaxError, match="take a model: .* got"):
            fx.summary(bad, x)


class FrozenOnes(fx.Handler):
    """Serves the params under `frozen/` itself: `init` makes none of them."""

    answers = (fx.ParamRequest,)

    def handle(self, request, forward):
        if request.path[:1] == ("frozen",):
            return jnp.ones(request.shape, request.dtype)
        return forward(request)


def test_params_a_handler_serves_are_rows_but_no_variables():
    def model(x):
        with fx.scope("frozen"):
            x = fx.nn.Dense(4)(x)
        return fx.nn.Dense(2)(x)

    t, x, h = fx.transform(model), jnp.ones((1, 3)), [FrozenOnes()]
    v = t.init(jax.random.key(0), x, handlers=h)
    s = fx.summary(t, x, handlers=h)
    assert shapes(s.variables) == shapes(v)
    assert s.param_count == sum(a.size for a in jax.tree.leaves(v)) == 10
    assert jax.tree.structure(s.logical_axes()) == jax.tree.structure(v)
    frozen = [e for e in s.entries if e.path[0] == "frozen"]
    assert len(frozen) == 2 and not any(e.stored for e in frozen)
    assert "answered by a handler, not stored" in str(s)
    assert all(e.by_handler for e in fx.effects_of(t, x, handlers=h) if e.path[0] == "frozen")


@pytest.mark.parametrize("lift", ["scan", "nested scan", "vmap", "remat"])
def test_inside_a_lift_a_served_param_is_a_row_and_the_interceptors_params_are_counted(lift):
    """The summary's own recorder lets lifted requests pass to storage, so a stateless handler outside it
    still runs inside the body (as under `t.init`): a param it serves there is listed, unstored, and what it
    creates is counted, where a param interceptor used to be refused as a handler with per-run state."""

    class LoRA(fx.Handler):  # on the kernel param itself: it changes the answer and creates params
        answers = (fx.ParamRequest,)

        def handle(self, request, forward):
            w = forward(request)
            if request.path[-1] != "kernel" or request.path[0] == "frozen":
                return w
            with fx.scope("lora"):
                return w + fx.param("a", jax.nn.initializers.ones, (w.shape[0], 2)) @ fx.param(
                    "b", jax.nn.initializers.zeros, (2, w.shape[1]))

    def block(h):
        with fx.scope("frozen"):
            h = fx.nn.Dense(3)(h)
        return fx.nn.Dense(3)(h)

    scan = lambda f: lambda h: fx.scan(lambda c, _: (f(c), None), length=2)(h)[0]  # noqa: E731
    model = {"scan": scan(block), "nested scan": scan(scan(block)), "remat": fx.remat(block),
             "vmap": fx.vmap(block, in_axes=None, axis_size=2)}[lift]
    t, x, h = fx.transform(model), jnp.ones((1, 3)), [FrozenOnes(), LoRA()]
    v = t.init(jax.random.key(0), x, handlers=h)
    s = fx.summary(t, x, handlers=h)
    assert shapes(s.variables) == shapes(v)
    assert s.param_count == sum(a.size for a in jax.tree.leaves(v))
    assert "lora" in v["params"]["Dense_0"] and "frozen" not in v["params"]
    frozen = [e for e in fx.effects_of(t, x, handlers=h) if e.path[0] == "frozen"]
    assert sorted(e.path[-1] for e in frozen) == ["bias", "kernel"] and all(e.by_handler for e in frozen)


def test_initializers_run_so_a_wrong_one_is_refused_as_in_init():
    bf16 = lambda key, shape, dtype: jnp.zeros(shape, jnp.bfloat16)  # noqa: E731
    model = lambda x: x @ fx.param("w", bf16, (3, 2))  # noqa: E731
    with pytest.raises(fx.ShapeMismatchError, match="initializer returned shape"):
        fx.transform(model).init(jax.random.key(0), jnp.ones((1, 3)))
    with pytest.raises(fx.ShapeMismatchError, match="initializer returned shape"):
        fx.summary(model, jnp.ones((1, 3)))


def test_state_and_sows_in_one_collection_are_refused_as_in_init():
    def model(x):
        fx.local_state("n", lambda: jnp.zeros(()), collection="stats")
        fx.sow("h", x, collection="stats")
        return x

    with pytest.raises(fx.ParamConflictError, match="holds local state and sown values"):
        fx.transform(model).init(jax.random.key(0), jnp.ones(2), mutable=True)
    with pytest.raises(fx.ParamConflictError, match="holds local state and sown values"):
        fx.summary(model, jnp.ones(2))
