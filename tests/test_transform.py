"""Discharge: fx.transform's init/apply as pinned, pure under JAX transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx

init = jax.nn.initializers.normal(1.0)


def model(x):
    with fx.scope("dense"):
        w = fx.param("kernel", init, (x.shape[-1], 3))
        b = fx.param("bias", jax.nn.initializers.zeros, (3,))
    y = jnp.tanh(x @ w + b)
    stats = fx.local_state("mean", lambda: jnp.zeros(3), collection="stats")
    if fx.is_training():
        stats.set(0.5 * stats.get() + 0.5 * y.mean(0))
        y = y * jax.random.bernoulli(fx.next_key("dropout"), 0.5, y.shape)
    fx.sow("y", y)
    return y.sum()


t = fx.transform(model)
x = jnp.ones((4, 2))
key = jax.random.key(0)


def test_init_layout():
    v = t.init(key, x)
    assert set(v) == {"params", "stats"}
    assert jax.tree.map(jnp.shape, v) == {
        "params": {"dense": {"kernel": (2, 3), "bias": (3,)}},
        "stats": {"mean": (3,)},
    }


def test_init_always_returns_params_even_empty():
    assert fx.transform(lambda: 1).init(key) == {"params": {}}


def test_apply_return_shape_follows_mutable():
    v = t.init(key, x)
    rngs = {"dropout": jax.random.key(1)}
    assert isinstance(t.apply(v, x, training=False), jax.Array)
    out, up = t.apply(v, x, training=True, rngs=rngs, mutable=["stats"])
    assert set(up) == {"stats"}
    out, up = t.apply(v, x, training=True, rngs=rngs, mutable=True)
    assert set(up) == {"stats", "intermediates"}
    out, up = t.apply(v, x, training=False, mutable="intermediates")
    assert set(up) == {"intermediates"}


def test_apply_needs_training_when_model_asks():
    with pytest.raises(fx.UnhandledEffectError, match="training=True"):
        t.apply(t.init(key, x), x)


def test_init_training_flag_reaches_model():
    seen = []
    fx.transform(lambda: seen.append(fx.is_training())).init(key)
    fx.transform(lambda: seen.append(fx.is_training())).init(key, training=True)
    assert seen == [False, True]


def test_next_state_is_variables_merged_with_updates():
    v = t.init(key, x)
    rngs = {"dropout": jax.random.key(1)}
    _, up = t.apply(v, x, training=True, rngs=rngs, mutable=["stats"])
    v2 = {**v, **up}
    _, up2 = t.apply(v2, x, training=True, rngs=rngs, mutable=["stats"])
    assert not np.allclose(up["stats"]["mean"], up2["stats"]["mean"])


def test_jit_grad_vmap_eval_shape(maybe_jit):
    v = t.init(key, x)
    f = maybe_jit(lambda v, x: t.apply(v, x, training=False))
    np.testing.assert_allclose(f(v, x), t.apply(v, x, training=False), rtol=1e-6)
    g = jax.grad(lambda p: t.apply({**v, "params": p}, x, training=False))(v["params"])
    assert jax.tree.structure(g) == jax.tree.structure(v["params"])
    ys = jax.vmap(lambda xi: t.apply(v, xi[None], training=False))(x)
    assert ys.shape == (4,)
    abstract = jax.eval_shape(t.init, key, x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
        lambda a: (a.shape, a.dtype), t.init(key, x)
    )


def test_jit_init_and_static_options():
    v = jax.jit(t.init)(key, x)
    apply = jax.jit(t.apply, static_argnames=("training", "mutable"))
    out, up = apply(v, x, rngs={"dropout": key}, training=True, mutable=("stats",))
    assert set(up) == {"stats"}


def test_tracer_options_are_refused_with_fix():
    v = t.init(key, x)
    with pytest.raises(fx.EffaxError, match=r"`training` is a JAX tracer.*static_argnames"):
        jax.jit(lambda tr: t.apply(v, x, training=tr))(True)
    with pytest.raises(fx.EffaxError, match=r"`mutable` is a JAX tracer"):
        jax.jit(lambda m: t.apply(v, x, training=False, mutable=m))(True)


def test_no_tracer_leaks():
    v = t.init(key, x)
    with jax.checking_leaks():
        jax.jit(lambda v: t.apply(v, x, training=True, rngs={"dropout": key}, mutable=True))(v)
        jax.jit(t.init)(key, x)


def test_discharge_is_hermetic():
    class Loud(fx.Handler):
        def handle(self, request, forward):
            raise AssertionError("an outer handler saw a request from inside apply")

    v = t.init(key, x)
    with fx.handle(Loud()), fx.scope("outer"):
        t.apply(v, x, training=False)
        assert set(t.init(key, x)["params"]) == {"dense"}


def test_handlers_argument_is_innermost():
    class ZeroParams(fx.Handler):
        def handle(self, request, forward):
            if isinstance(request, fx.ParamRequest):
                return jnp.zeros(request.shape, request.dtype)
            return forward(request)

    v = t.init(key, x)
    out = t.apply(v, x, training=False, handlers=[[ZeroParams()]])
    assert out == 0.0


def test_variables_must_be_a_dict():
    with pytest.raises(fx.EffaxError, match="must be a dict"):
        t.apply([1, 2], x, training=False)


class _MLP(fx.nn.Module):
    hidden: int = 4

    def __call__(self, x):
        return fx.nn.Dense(self.hidden)(x)


@pytest.mark.parametrize("cls", [_MLP, fx.nn.Dense])
def test_a_module_class_is_refused_with_the_instance_to_pass(cls):
    """`fx.transform(MLP)` ran `MLP(x)`: init made `{'params': {}}` and apply returned a module built from x."""
    name = cls.__name__
    with pytest.raises(fx.EffaxError, match=rf"fx.transform got the class {name}; pass an instance: "
                                            rf"fx.transform\({name}\(\.\.\.\)\)"):
        fx.transform(cls)
    instance = fx.transform(cls(4) if cls is fx.nn.Dense else cls())  # the fix works
    v = instance.init(key, x)
    assert instance.apply(v, x).shape == (4, 4)


def test_calling_a_transform_says_to_call_init_or_apply():
    """`t(v, x)` was "'Transformed' object is not callable" and `jax.jit(t)` JAX's "Expected a callable value"."""
    v = t.init(key, x)
    for call in (lambda: t(v, x), lambda: jax.jit(t)(v, x)):
        with pytest.raises(fx.EffaxError, match=r"`t.init\(key, x\)` creates the variables and `t.apply\(variables, "
                                                r"x\)` runs the model; jit those, `jax.jit\(t.apply\)"):
            call()
    jitted = jax.jit(t.apply, static_argnames=("training",))  # the fix
    np.testing.assert_allclose(jitted(v, x, training=False), t.apply(v, x, training=False), rtol=1e-6)
    with pytest.raises(fx.EffaxError, match="takes a function, got Transformed"):
        fx.transform(t)


def test_raw_jax_transform_inside_model_is_refused():
    def scanned(x):
        def body(c, _):
            return c + jax.random.normal(fx.next_key("noise")), None

        return jax.lax.scan(body, x, None, length=3)[0]

    with pytest.raises(fx.EffaxError, match=r"fx.scan.*fx.vmap.*fx.remat"):
        fx.transform(scanned).apply({}, 0.0, rngs={"noise": key})

    def vmapped(x):
        return jax.vmap(lambda xi: xi * fx.param("w", init, ()))(x)

    with pytest.raises(fx.EffaxError, match="initializes a param inside a JAX transform"):
        fx.transform(vmapped).init(key, x)


def test_reading_loaded_params_inside_inner_transforms_is_allowed():
    def f(x):
        w = fx.param("w", init, ())
        return jax.vmap(lambda xi: xi * fx.param("w", init, ()))(x) + w

    tf = fx.transform(f)
    v = {"params": {"w": jnp.array(2.0)}}
    np.testing.assert_allclose(tf.apply(v, jnp.ones(3)), jnp.full(3, 4.0))


def test_check_variables_lists_every_problem_at_once():
    v = t.init(key, x)
    bad = {
        "params": {"dense": {"kernel": jnp.ones((5, 3)), "bais": jnp.ones(3)}},
        "stats": {"mean": jnp.ones(3, jnp.int32)},
    }
    report = fx.check_variables(t, bad, x)
    assert not report.ok
    assert report.missing == ["params:dense/bias (float32[3]); nearest in the variables: 'params:dense/bais'"]
    assert report.unused == ["params:dense/bais (float32[3])"]
    assert report.mis_shaped == ["params:dense/kernel: model float32[2, 3], variables float32[5, 3]"]
    assert report.mis_typed == ["stats:mean: model float32[3], variables int32[3]"]
    assert fx.check_variables(t, v, x).ok
    assert "missing: params:dense/bias" in str(report)


def test_threads_applying_models_at_once_get_their_own_results():
    import threading

    v = t.init(key, x)
    run = lambda i: t.apply(v, x * i, training=True, rngs={"dropout": jax.random.key(i)}, mutable=True)
    expected = {i: run(i) for i in range(4)}
    barrier = threading.Barrier(4)
    results = {}

    def work(i):
        barrier.wait(timeout=30)
        for _ in range(3):
            results[i] = run(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(4):
        jax.tree.map(np.testing.assert_array_equal, results[i], expected[i])
