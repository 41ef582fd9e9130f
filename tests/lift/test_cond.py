"""`fx.cond` and `fx.switch`: both branches' variables after init, keys, state and sows follow the branch taken."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx

KEY = jax.random.key(0)
ones = jax.nn.initializers.ones


def two_branches(x, flip):
    def left(x):
        with fx.scope("left"):
            return jnp.tanh(x @ fx.param("w", jax.nn.initializers.normal(), (3, 3)))

    def right(x):
        with fx.scope("right"):
            return x * fx.param("s", ones, (3,)) + fx.param("b", ones, (3,))

    return fx.cond(flip, left, right, x)


@pytest.mark.parametrize("flip", [True, False])
def test_init_creates_both_branches_whichever_runs(flip):
    t = fx.transform(two_branches)
    out, v = t.init_with_output(KEY, jnp.ones(3), flip)
    assert jax.tree.map(jnp.shape, v["params"]) == {"left": {"w": (3, 3)}, "right": {"b": (3,), "s": (3,)}}
    expected = jnp.tanh(jnp.ones(3) @ v["params"]["left"]["w"]) if flip else jnp.full(3, 2.0)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_apply_takes_one_branch_under_jit_and_grad():
    t = fx.transform(two_branches)
    v = t.init(KEY, jnp.ones(3), True)
    x = jnp.arange(3.0)
    np.testing.assert_allclose(jax.jit(t.apply)(v, x, False), x * 1 + 1)
    np.testing.assert_allclose(jax.jit(t.apply)(v, x, True), jnp.tanh(x @ v["params"]["left"]["w"]), rtol=1e-6)
    grads = jax.grad(lambda p, flip: t.apply({"params": p}, x, flip).sum())(v["params"], False)
    np.testing.assert_allclose(grads["right"]["s"], x)
    np.testing.assert_allclose(grads["left"]["w"], 0.0)


def test_keys_follow_the_branch_taken():
    def drawn(which):
        def model():
            a = lambda: jax.random.key_data(fx.next_key("noise"))
            b = lambda: jax.random.key_data(fx.next_key("noise")) + 0
            return fx.switch(which, [a, b])

        return model

    direct = fx.transform(lambda: jax.random.key_data(fx.next_key("noise"))).apply({}, rngs=KEY)
    for which in (0, 1):
        np.testing.assert_array_equal(fx.transform(drawn(which)).apply({}, rngs=KEY), direct)


def test_a_branch_that_writes_state_writes_through():
    def model(flip):
        count = fx.local_state("count", lambda: jnp.zeros((), jnp.int32))

        def bump():
            count.set(count.get() + 1)
            return count.get()

        return fx.cond(flip, bump, count.get)

    t = fx.transform(model)
    v = t.init(KEY, True)
    assert int(v["state"]["count"]) == 0  # init creates, it does not step
    out, updates = t.apply(v, True, mutable=True)
    assert (int(out), int(updates["state"]["count"])) == (1, 1)
    out, updates = jax.jit(lambda v, f: t.apply(v, f, mutable=True))(v, False)
    assert (int(out), int(updates["state"]["count"])) == (0, 0)


def test_sows_follow_the_branch_and_must_agree():
    def model(flip):
        return fx.cond(flip, lambda: fx.sow("h", jnp.ones(2)), lambda: fx.sow("h", jnp.zeros(2)))

    t = fx.transform(model)
    _, updates = t.apply({}, True, mutable=True)
    np.testing.assert_array_equal(updates["intermediates"]["h"][0], jnp.ones(2))
    bad = fx.transform(lambda flip: fx.cond(flip, lambda: fx.sow("h", 1.0), lambda: None))
    with pytest.raises(fx.EffaxError, match="sow the same tags"):
        bad.apply({}, True, mutable=True)


@pytest.mark.parametrize("lifted", [False, True], ids=["plain", "in fx.scan"])
def test_a_sow_in_one_branch_does_nothing_where_nothing_collects_it(lifted):
    """A sow does nothing when its collection is not collected (init, apply without `mutable=`), so the
    branches need not agree on it there; where it is collected they must, and the refusal says so."""

    def cond(x):
        return fx.cond(x.sum() > 0, lambda h: (fx.sow("h", h), h * 2)[1], lambda h: h, x)

    model = (lambda x: fx.scan(lambda c, _: (cond(c), None), length=2)(x)[0]) if lifted else cond
    t, x = fx.transform(model), jnp.ones(3)
    assert t.init(jax.random.key(0), x) == {"params": {}}
    np.testing.assert_array_equal(t.apply({}, x), x * (4 if lifted else 2))
    out, updates = t.apply({}, x, mutable=["state"])
    np.testing.assert_array_equal(out, x * (4 if lifted else 2))
    assert updates == {}
    for collected in (True, ["intermediates"]):
        with pytest.raises(fx.EffaxError, match="sow the same tags"):
            t.apply({}, x, mutable=collected)
    for mutable in (True, False):  # a summary lists every branch's sows, collected or not (no branch is taken)
        assert [(e.kind, e.tag) for e in fx.effects_of(t, x, mutable=mutable)] == [("sow", "h")]
        assert fx.summary(t, x, mutable=mutable).param_count == 0

    class Watch(fx.Handler):  # stateful, and says nothing of what it answers: it may keep sows
        def begin(self):
            return WatchRun()

    class WatchRun:
        def handle(self, request, forward):
            return forward(request)

    with pytest.raises(fx.EffaxError, match=r"Here WatchRun may keep them: .* declare what it answers"):
        t.apply({}, x, handlers=[Watch()])
    Watch.answers = (fx.ParamRequest,)
    np.testing.assert_array_equal(t.apply({}, x, handlers=[Watch()]), x * (4 if lifted else 2))


def test_mistakes_are_named_with_what_tells_them_apart():
    two_shapes = fx.transform(lambda x: fx.cond(x.sum() > 0, lambda h: (fx.sow("h", h), h)[1],
                                                 lambda h: (fx.sow("h", h.sum(0)), h)[1], x))
    with pytest.raises(fx.EffaxError, match=r"branch 0: 'h' at `<root>` \(float32\[2,3\]\); branch 1: 'h' at "
                                            r"`<root>` \(float32\[3\]\)"):
        two_shapes.apply({}, jnp.ones((2, 3)), mutable=True)
    two_layers = fx.transform(lambda x: fx.cond(x.sum() > 0, fx.nn.Dense(3, name="a"), fx.nn.Dense(3, name="b"), x))
    v = two_layers.init(KEY, jnp.ones((2, 3)))
    with pytest.raises(fx.EffaxError, match=r"With `capture_intermediates`, .* pass a filter"):
        two_layers.apply(v, jnp.ones((2, 3)), capture_intermediates=True)
    with pytest.raises(fx.EffaxError, match="pred must be a scalar .* got NoneType None"):
        fx.transform(lambda x: fx.cond(None, lambda h: h, lambda h: -h, x)).apply({}, jnp.ones(2))

    def noisy_in_training(x):  # a Python bool pred still asks for the keys of both branches
        noisy = lambda h: h + jax.random.normal(fx.next_key("noise"), h.shape)  # noqa: E731
        return fx.cond(fx.is_training(), noisy, lambda h: h, x)

    t = fx.transform(noisy_in_training)
    for options in ({"training": False}, {"handlers": [fx.handlers.eval()]}):
        with pytest.raises(fx.MissingRngError, match=r"'noise'.*asks for the keys of every branch .* Python `if`"):
            t.apply({}, jnp.ones(2), **options)


class Double(fx.Handler):
    """A user's stateful handler that changes every param's answer (the composition matrix's `Scale`)."""

    answers = (fx.ParamRequest,)

    def begin(self):
        return DoubleRun()


class DoubleRun:
    answers = (fx.ParamRequest,)

    def handle(self, request, forward):
        return forward(request) * 2.0


@pytest.mark.parametrize("inside", ["nothing", "fx.scan", "fx.remat", "fx.vmap"])
def test_a_stateful_handler_changing_params_inside_a_branch(inside):
    """A branch's new param is made outside through the handler, as a lift's is, so the branch computes on
    the changed answer: init works, its output is apply's (law 3), and it equals the model without the cond
    (it was refused: the merged needs lost the branch's initializer)."""

    def layer(h):
        return jnp.tanh(h @ fx.param("w", jax.nn.initializers.normal(), (3, 3)))

    body = {
        "nothing": layer,
        "fx.scan": lambda h: fx.scan(lambda c, _: (layer(c), None), length=2)(h)[0],
        "fx.remat": fx.remat(layer),
        "fx.vmap": lambda h: fx.vmap(layer, in_axes=None, axis_size=2)(h).sum(0),
    }[inside]
    x, hs = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), [Double()]
    t = fx.transform(lambda x: fx.cond(x.sum() > -10, body, lambda h: h, x))
    out, v = t.init_with_output(KEY, x, handlers=hs)
    np.testing.assert_allclose(out, t.apply(v, x, handlers=hs), rtol=1e-6)
    np.testing.assert_allclose(out, fx.transform(body).apply(v, x, handlers=hs), rtol=1e-6)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, fx.transform(body).init(KEY, x))


def test_a_raw_lax_cond_around_an_effect_points_to_fx_cond():
    def model(flip):
        return jax.lax.cond(flip, lambda: fx.next_key("noise"), lambda: fx.next_key("noise"))

    with pytest.raises(fx.TraceMismatchError, match="fx.cond"):
        fx.transform(model).apply({}, True, rngs=KEY)


def test_branches_that_return_different_shapes_are_refused():
    with pytest.raises(fx.EffaxError, match="same structure"):
        fx.transform(lambda f: fx.cond(f, lambda: jnp.zeros(2), lambda: jnp.zeros(3))).apply({}, True)


def test_cond_inside_scan_and_summary():
    def body(h, i):
        return fx.cond(i % 2 == 0, lambda h: h @ fx.param("even", ones, (2, 2)), lambda h: h, h), None

    t = fx.transform(lambda h: fx.scan(body)(h, jnp.arange(3))[0])
    v = t.init(KEY, jnp.ones(2))
    assert v["params"]["even"].shape == (3, 2, 2)
    np.testing.assert_allclose(t.apply(v, jnp.ones(2)), jnp.full(2, 4.0))
    assert fx.summary(t, jnp.ones(2)).param_count == 12


def test_layers_made_inline_in_each_branch_get_their_own_names():
    def model(x, flip):
        return fx.cond(flip, lambda x: fx.nn.Dense(2)(x), lambda x: fx.nn.Dense(2)(x) * 2, x)

    t = fx.transform(model)
    v = t.init(KEY, jnp.ones(3), True)
    assert sorted(v["params"]) == ["Dense_0", "Dense_1"]
    np.testing.assert_allclose(t.apply(v, jnp.ones(3), False),
                               2 * (jnp.ones(3) @ v["params"]["Dense_1"]["kernel"] + v["params"]["Dense_1"]["bias"]),
                               rtol=1e-6)
    assert fx.summary(t, jnp.ones(3), True).param_count == 16


def test_a_predicate_that_is_not_one_scalar_is_refused_with_the_rule():
    x = jnp.ones((2, 3))
    with pytest.raises(fx.EffaxError, match=r"fx\.cond at `<root>`: pred must be a scalar .* got bool\[2,3\]"):
        fx.transform(lambda x: fx.cond(x > 0, lambda x: x, lambda x: -x, x)).init(KEY, x)
    with pytest.raises(fx.EffaxError, match=r"fx\.switch at `<root>`: index must be a scalar .* got int32\[2\]"):
        fx.transform(lambda x: fx.switch(jnp.arange(2), [lambda x: x, lambda x: -x], x)).init(KEY, x)
    t = fx.transform(lambda x: fx.cond(jnp.all(x > 0), lambda x: x, lambda x: -x, x))  # the suggested fix
    np.testing.assert_array_equal(t.apply({}, x), x)
    assert fx.transform(lambda x: fx.cond(1, lambda x: x, lambda x: -x, x)).apply({}, x).sum() == 6  # a number


def test_branches_that_are_not_functions_are_named_without_dumping_arrays():
    x = jnp.ones((2, 3))
    with pytest.raises(fx.EffaxError, match=r"fx\.cond: true_fn is an array float32\[2,3\], not a function") as e:
        fx.transform(lambda x: fx.cond(True, x, lambda x: x, x)).init(KEY, x)
    assert "Array(" not in str(e.value) and "fx.switch" not in str(e.value)
    with pytest.raises(fx.EffaxError, match=r"fx\.switch: branch 1 is int 3, not a function"):
        fx.switch(0, [lambda: 1, 3])
    with pytest.raises(fx.EffaxError, match=r"fx\.switch takes a non-empty list of branch functions, got list \[\]"):
        fx.switch(0, [])


@pytest.mark.parametrize("flip", [True, False])
def test_state_made_in_one_branch_is_created_and_starts_at_its_initial_value(flip):
    """A branch that declares and writes state (a `BatchNorm` in training) initializes: the variable exists
    whichever branch runs, init returns its initial value, and a mutable apply writes only where taken."""

    def counted(x):
        n = fx.local_state("n", lambda: jnp.full((), 5, jnp.int32), collection="stats")
        n.set(n.get() + 1)
        return x * 2

    t = fx.transform(lambda x, p: fx.cond(p, counted, lambda x: x, x))
    x = jnp.ones(2)
    assert int(t.init(KEY, x, flip)["stats"]["n"]) == 5
    for apply in (t.apply, jax.jit(t.apply, static_argnames="mutable")):
        out, updates = apply({}, x, flip, mutable=True)
        assert int(updates["stats"]["n"]) == (6 if flip else 5)
        np.testing.assert_allclose(out, 2 * x if flip else x)
    bn = fx.transform(lambda x, p: fx.cond(p, lambda x: fx.nn.BatchNorm()(x), lambda x: x, x))
    v = bn.init(KEY, jnp.ones((2, 4)), flip, training=True)
    assert jax.tree.map(jnp.shape, v["batch_stats"]) == {"BatchNorm_0": {"mean": (4,), "var": (4,)}}


def test_a_float_switch_index_is_refused_not_truncated():
    branches = [lambda x: x * 0, lambda x: x * 1]
    with pytest.raises(fx.EffaxError, match="index must be an int"):
        fx.transform(lambda x: fx.switch(1.7, branches, x)).apply({}, jnp.ones(2))
