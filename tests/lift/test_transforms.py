"""Lifted transforms: fx.scan, fx.vmap and fx.remat over params, state, keys and sows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx
from effax.handlers._random import fold, h_path

L, D = 4, 3
key = jax.random.key(0)
x = jnp.linspace(-1.0, 1.0, 2 * D).reshape(2, D)
normal = jax.nn.initializers.normal(1.0)


def data(k):
    return np.asarray(jax.random.key_data(k))


def block(h):
    """One residual layer: params, a per-layer running mean, a sow."""
    with fx.scope("dense"):
        w = fx.param("kernel", normal, (D, D))
        b = fx.param("bias", normal, (D,))
    y = h + jnp.tanh(h @ w + b)
    mean = fx.local_state("mean", lambda: jnp.zeros(D), collection="stats")
    mean.set(0.5 * mean.get() + 0.5 * y.mean(0))
    fx.sow("y", y.sum())
    return y


def scanned(h):
    with fx.scope("layers"):
        return fx.scan(lambda h, _: (block(h), None), length=L)(h)[0].sum()


def unrolled(h):
    for i in range(L):
        with fx.scope(f"layer_{i}"):
            h = block(h)
    return h.sum()


def unstack(tree):
    """Scanned variables at `layers/...` -> unrolled variables at `layer_i/...`."""
    return {f"layer_{i}": jax.tree.map(lambda a, i=i: a[i], tree["layers"]) for i in range(L)}


def restack(trees):
    return {"layers": jax.tree.map(lambda *a: jnp.stack(a), *[trees[f"layer_{i}"] for i in range(L)])}


ts, tu = fx.transform(scanned), fx.transform(unrolled)


# --- scan over layers


def test_scan_stacks_params_and_state_at_the_body_path():
    v = ts.init(key, x)
    assert jax.tree.map(jnp.shape, v) == {
        "params": {"layers": {"dense": {"kernel": (L, D, D), "bias": (L, D)}}},
        "stats": {"layers": {"mean": (L, D)}},
    }
    np.testing.assert_array_equal(v["stats"]["layers"]["mean"], 0.0)  # init creates, it does not step


def test_scan_equals_the_unrolled_loop_forward_and_gradients(maybe_jit):
    v = ts.init(key, x)
    vu = {"params": unstack(v["params"]), "stats": unstack(v["stats"])}
    apply_s = maybe_jit(lambda v: ts.apply(v, x, mutable=True))
    apply_u = maybe_jit(lambda v: tu.apply(v, x, mutable=True))
    (ys, up_s), (yu, up_u) = apply_s(v), apply_u(vu)
    np.testing.assert_allclose(ys, yu, rtol=1e-6)
    np.testing.assert_allclose(up_s["stats"]["layers"]["mean"], restack(up_u["stats"])["layers"]["mean"], rtol=1e-6)
    sown_u = jnp.stack([up_u["intermediates"][f"layer_{i}"]["y"][0] for i in range(L)])
    (sown_s,) = up_s["intermediates"]["layers"]["y"]
    np.testing.assert_allclose(sown_s, sown_u, rtol=1e-6)

    def loss(t, v, params):
        return t.apply({**v, "params": params}, x, mutable=["stats"])[0]

    gs = maybe_jit(jax.grad(lambda p: loss(ts, v, p)))(v["params"])
    gu = maybe_jit(jax.grad(lambda p: loss(tu, vu, p)))(vu["params"])
    # float32 gradients summed in another order (scan vs unrolled): equal to about 1e-6 of the largest
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), gs, restack(gu))


def test_init_of_layer_i_uses_fold_in_of_its_path_key_and_i():
    kernel = ts.init(key, x)["params"]["layers"]["dense"]["kernel"]
    path_key = fold(key, h_path(("layers", "dense", "kernel")))
    for i in range(L):
        np.testing.assert_array_equal(kernel[i], normal(jax.random.fold_in(path_key, i), (D, D), jnp.float32))
    assert len({np.asarray(k).tobytes() for k in kernel}) == L  # layers are independent


def test_init_is_local_per_layer_and_path():
    def deeper(h):
        fx.param("elsewhere", normal, (5,))  # a new path elsewhere changes nothing here
        with fx.scope("layers"):
            return fx.scan(lambda h, _: (block(h), None), length=L + 2)(h)[0].sum()

    small = ts.init(key, x)["params"]["layers"]
    big = fx.transform(deeper).init(key, x)["params"]["layers"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b[:L]), small, big)


def test_scan_with_xs_and_reverse_matches_a_python_loop(maybe_jit):
    def cell(h, x):
        w = fx.param("w", normal, (D, D))
        return jnp.tanh(h @ w + x), h.sum()

    xs = jnp.arange(5 * D, dtype=jnp.float32).reshape(5, D) / 10
    t = fx.transform(lambda h, xs: fx.scan(cell, reverse=True)(h, xs))
    v = t.init(key, jnp.zeros(D), xs)
    w = v["params"]["w"]
    assert w.shape == (5, D, D)
    h, ys = maybe_jit(t.apply)(v, jnp.zeros(D), xs)
    expect_h, expect_ys = jnp.zeros(D), [None] * 5
    for i in reversed(range(5)):
        expect_ys[i] = expect_h.sum()
        expect_h = jnp.tanh(expect_h @ w[i] + xs[i])
    np.testing.assert_allclose(h, expect_h, rtol=1e-6)
    np.testing.assert_allclose(ys, jnp.stack(expect_ys), rtol=1e-6)


def test_broadcast_params_are_shared_like_an_rnn_cell():
    def cell(h, x):
        w = fx.param("w", normal, (D, D))
        return jnp.tanh(h @ w + x), h

    xs = jnp.ones((6, D))
    t = fx.transform(lambda xs: fx.scan(cell, params="broadcast")(jnp.zeros(D), xs)[0])
    v = t.init(key, xs)
    np.testing.assert_array_equal(v["params"]["w"], normal(fold(key, h_path(("w",))), (D, D), jnp.float32))
    h = jnp.zeros(D)
    for i in range(6):
        h = jnp.tanh(h @ v["params"]["w"] + xs[i])
    np.testing.assert_allclose(t.apply(v, xs), h, rtol=1e-6)


# --- keys


def draw_twice(c, _):
    with fx.scope("noise"):
        a, b = fx.next_key("noise"), fx.next_key("noise")
    return c, (jax.random.key_data(a), jax.random.key_data(b))


def test_keys_differ_per_iteration_and_follow_the_derivation():
    k = jax.random.key(5)
    a, b = fx.transform(lambda: fx.scan(draw_twice, length=L)(0)[1]).apply({}, rngs={"noise": k})
    rows = {np.asarray(r).tobytes() for r in jnp.concatenate([a, b])}
    assert len(rows) == 2 * L
    base = fold(k, h_path(("noise",)))  # draw n outside, then fold in the iteration
    for i in range(L):
        np.testing.assert_array_equal(a[i], data(jax.random.fold_in(jax.random.fold_in(base, 0), i)))
        np.testing.assert_array_equal(b[i], data(jax.random.fold_in(jax.random.fold_in(base, 1), i)))


def test_split_rngs_false_repeats_the_keys_of_one_unlifted_run():
    k = {"noise": jax.random.key(5)}
    a, b = fx.transform(lambda: fx.scan(draw_twice, length=L, split_rngs=False)(0)[1]).apply({}, rngs=k)
    once = fx.transform(lambda: draw_twice(0, None)[1]).apply({}, rngs=k)
    for i in range(L):
        np.testing.assert_array_equal(a[i], once[0])
        np.testing.assert_array_equal(b[i], once[1])


def test_split_rngs_names_the_streams_that_split():
    def body(c, _):
        return c, (jax.random.key_data(fx.next_key("a")), jax.random.key_data(fx.next_key("b")))

    rngs = {"a": jax.random.key(1), "b": jax.random.key(2)}
    a, b = fx.transform(lambda: fx.scan(body, length=L, split_rngs=["a"])(0)[1]).apply({}, rngs=rngs)
    assert len({np.asarray(r).tobytes() for r in a}) == L
    assert len({np.asarray(r).tobytes() for r in b}) == 1


def test_two_scans_at_one_path_draw_different_keys_and_stream_keys_split():
    def body(c, _):
        return c, (jax.random.key_data(fx.next_key("s")), jax.random.key_data(fx.stream_key("s")))

    def twice():
        f = fx.scan(body, length=2)
        return f(0)[1], f(0)[1]

    (d1, s1), (d2, s2) = fx.transform(twice).apply({}, rngs={"s": jax.random.key(0)})
    assert not np.array_equal(d1, d2)  # a second call is a second draw, like calling the body twice
    np.testing.assert_array_equal(s1, s2)  # the base key is a base key
    assert not np.array_equal(s1[0], s1[1])
    base = jax.random.fold_in(jax.random.key(0), 0xFFFF_FFFF)  # the iterations' bases: never a draw outside
    np.testing.assert_array_equal(s1[1], data(jax.random.fold_in(base, 1)))


def test_stream_keys_in_a_body_never_repeat_the_draws_at_the_same_path_outside():
    def model():
        inside = fx.scan(lambda c, _: (c, jax.random.key_data(fx.stream_key("s"))), length=3)(0)[1]
        outside = jnp.stack([jax.random.key_data(fx.next_key("s")) for _ in range(3)])
        return inside, outside

    inside, outside = fx.transform(model).apply({}, rngs={"s": jax.random.key(0)})
    assert not any(np.array_equal(a, b) for a in inside for b in outside)


def test_missing_stream_is_reported_by_the_outer_handler():
    with pytest.raises(fx.MissingRngError, match="noise"):
        fx.transform(lambda: fx.scan(draw_twice, length=L)(0)).apply({}, rngs={"dropout": key})


# --- state


def counter(c, _):
    n = fx.local_state("n", lambda: jnp.zeros((), jnp.int32))
    n.set(n.get() + 1)
    return c, n.get()


def test_carried_state_threads_through_iterations_and_is_returned(maybe_jit):
    t = fx.transform(lambda: fx.scan(counter, length=L, state="carry")(0)[1])
    v = t.init(None)
    assert v == {"params": {}, "state": {"n": 0}}
    ys, up = maybe_jit(lambda v: t.apply(v, mutable=True))(v)
    np.testing.assert_array_equal(ys, np.arange(1, L + 1))
    assert int(up["state"]["n"]) == L
    ys, up = t.apply({**v, **up}, mutable=True)
    np.testing.assert_array_equal(ys, np.arange(L + 1, 2 * L + 1))


def test_stacked_state_is_one_variable_per_iteration():
    t = fx.transform(lambda: fx.scan(counter, length=L)(0)[1])
    v = t.init(None)
    assert v["state"]["n"].shape == (L,)
    ys, up = t.apply(v, mutable=True)
    np.testing.assert_array_equal(ys, np.ones(L))
    np.testing.assert_array_equal(up["state"]["n"], np.ones(L))


def test_state_modes_per_collection():
    def body(c, _):
        a = fx.local_state("a", lambda: 0.0, collection="cache")
        b = fx.local_state("b", lambda: 0.0, collection="stats")
        a.set(a.get() + 1)
        b.set(b.get() + 1)
        return c, None

    t = fx.transform(lambda: fx.scan(body, length=L, state={"cache": "carry"})(0))
    _, up = t.apply(t.init(None), mutable=True)
    assert float(up["cache"]["a"]) == L
    np.testing.assert_array_equal(up["stats"]["b"], np.ones(L))


def test_a_state_effect_made_outside_the_body_is_carried():
    def model():
        n = fx.local_state("n", lambda: 0.0)

        def body(c, _):
            n.set(n.get() + 2.0)
            return c, None

        fx.scan(body, length=L)(0)
        return n.get()

    out, up = fx.transform(model).apply({"state": {"n": 1.0}}, mutable=True)
    assert float(out) == float(up["state"]["n"]) == 1.0 + 2 * L


def test_set_in_a_frozen_collection_is_refused():
    t = fx.transform(lambda: fx.scan(counter, length=L)(0))
    with pytest.raises(fx.FrozenStateError, match="`n`"):
        t.apply(t.init(None))


def test_sows_come_back_stacked():
    def body(c, _):
        fx.sow("c", c)
        fx.sow("c", 10 * c)
        return c + 1, None

    _, up = fx.transform(lambda: fx.scan(body, length=L)(0)).apply({}, mutable="intermediates")
    a, b = up["intermediates"]["c"]
    np.testing.assert_array_equal(a, np.arange(L))
    np.testing.assert_array_equal(b, 10 * np.arange(L))


# --- the handlers outside see plain requests


def test_a_stateful_handler_outside_sees_the_stacked_requests_once():
    class Spy(fx.Handler):
        def begin(self):
            return SpyRun()

    class SpyRun:
        def __init__(self):
            self.seen = []

        def handle(self, request, forward):
            if isinstance(request, fx.ParamRequest):
                self.seen.append((request.path, request.shape))
            return forward(request)

    with fx.handle(fx.handlers.FunctionalState(), fx.handlers.InitParams(key), Spy()) as (_, _, spy):
        fx.scan(lambda h, _: (block(h), None), length=L)(x)
    # once as a probe (does it exist?), once handing back the stacked value made inside the loop
    assert sorted(set(spy.seen)) == [(("dense", "bias"), (L, D)), (("dense", "kernel"), (L, D, D))]


def test_a_stateless_handler_runs_inside_the_body_and_sees_each_iterations_request():
    seen = []

    class Spy(fx.Handler):  # stateless: begin() returns the handler, so it runs inside the loop
        def handle(self, request, forward):
            if isinstance(request, fx.ParamRequest):
                seen.append((request.path, request.shape))
            return forward(request)

    ts.init(key, x, handlers=[Spy()])
    assert sorted(set(seen)) == [(("layers", "dense", "bias"), (D,)), (("layers", "dense", "kernel"), (D, D))]


def test_a_share_pass_outside_ties_two_scanned_stacks():
    def layer(h, _):
        return jnp.tanh(h @ fx.param("w", normal, (D, D))), None

    def model(h):
        with fx.scope("enc"):
            h = fx.scan(layer, length=L)(h)[0]
        with fx.scope("dec"):
            return fx.scan(layer, length=L)(h)[0]

    t = fx.transform(fx.share(model, {"dec": "enc"}))
    v = t.init(key, x)
    assert jax.tree.map(jnp.shape, v["params"]) == {"enc": {"w": (L, D, D)}}
    both = {"enc": v["params"]["enc"], "dec": v["params"]["enc"]}
    np.testing.assert_allclose(t.apply(v, x), fx.transform(model).apply({"params": both}, x), rtol=1e-6)


def test_side_inputs_and_mode_reach_the_body():
    def body(c, _):
        return c + fx.side_input("step") * (2 if fx.is_training() else 1), None

    t = fx.transform(lambda: fx.scan(body, length=L)(0.0)[0])
    out = t.apply({}, training=True, handlers=[fx.handlers.SideInputs({"step": 1.5})])
    assert float(out) == 3.0 * L


def test_check_variables_and_abstract_init_of_a_scanned_model():
    v = ts.init(key, x)
    assert fx.check_variables(ts, v, x).ok
    assert jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(ts.init, key, x)) == jax.tree.map(
        lambda a: (a.shape, a.dtype), v
    )


def test_nested_scans_and_remat_inside_scan_equal_the_unrolled_loop():
    def inner(h, _):
        return block(h), None

    def nested(h):
        with fx.scope("layers"):
            return fx.scan(lambda h, _: fx.scan(fx.remat(inner), length=2)(h), length=2)(h)[0].sum()

    tn = fx.transform(nested)
    v = tn.init(key, x)
    assert v["params"]["layers"]["dense"]["kernel"].shape == (2, 2, D, D)
    flat = jax.tree.map(lambda a: a.reshape((L,) + a.shape[2:]), v)
    vu = {"params": unstack(flat["params"]), "stats": unstack(flat["stats"])}
    np.testing.assert_allclose(tn.apply(v, x, mutable=True)[0], tu.apply(vu, x, mutable=True)[0], rtol=1e-6)


# --- vmap


def member(x):
    w = fx.param("w", normal, (D, D))
    y = jnp.tanh(x @ w)
    return y + 0.01 * jax.random.normal(fx.next_key("noise"), y.shape)


def test_vmap_ensemble_members_are_independent(maybe_jit):
    n = 5
    t = fx.transform(fx.vmap(member, in_axes=None, axis_size=n))
    v = t.init(key, x)
    w = v["params"]["w"]
    assert w.shape == (n, D, D)
    path_key = fold(key, h_path(("w",)))
    for i in range(n):
        np.testing.assert_array_equal(w[i], normal(jax.random.fold_in(path_key, i), (D, D), jnp.float32))
    rngs = {"noise": jax.random.key(3)}
    out = maybe_jit(lambda v: t.apply(v, x, rngs=rngs))(v)
    assert out.shape == (n,) + x.shape
    noise = fx.transform(lambda: jax.random.key_data(fx.next_key("noise"))).apply({}, rngs=rngs)
    for i in range(n):  # member i is the model on its own params, with key fold_in(k, i)
        k_i = jax.random.fold_in(jax.random.wrap_key_data(noise), i)
        expect = jnp.tanh(x @ w[i]) + 0.01 * jax.random.normal(k_i, (2, D))
        np.testing.assert_allclose(out[i], expect, rtol=1e-5, atol=1e-6)


def test_vmap_shared_rngs_give_members_the_same_keys():
    t = fx.transform(fx.vmap(lambda: jax.random.key_data(fx.next_key("noise")), axis_size=3, split_rngs=False))
    keys = t.apply({}, rngs={"noise": key})
    assert len({np.asarray(k).tobytes() for k in keys}) == 1


def test_vmap_broadcast_params_map_over_examples_like_jax_vmap():
    t1 = fx.transform(member)
    tv = fx.transform(fx.vmap(member, params="broadcast", split_rngs=False))
    v = t1.init(key, x[0])
    assert tv.init(key, x)["params"]["w"].shape == (D, D)
    rngs = {"noise": jax.random.key(3)}
    expect = jax.vmap(lambda xi: t1.apply(v, xi, rngs=rngs))(x)
    np.testing.assert_allclose(tv.apply(v, x, rngs=rngs), expect, rtol=1e-6)


def test_vmap_stacked_state_and_refused_shared_writes():
    def body(x):
        s = fx.local_state("s", lambda: 0.0)
        s.set(s.get() + x)
        return s.get()

    t = fx.transform(fx.vmap(body))
    out, up = t.apply(t.init(None, jnp.arange(3.0)), jnp.arange(3.0), mutable=True)
    np.testing.assert_array_equal(up["state"]["s"], np.arange(3.0))
    shared = fx.transform(fx.vmap(body, state="broadcast"))
    with pytest.raises(fx.EffaxError, match="`s`.*state='stack'"):
        shared.apply(shared.init(None, jnp.arange(3.0)), jnp.arange(3.0), mutable=True)


def test_vmap_shared_writes_name_only_the_variables_that_differ():
    def member(x):
        w = fx.param("w", jax.nn.initializers.ones, (4,))
        n = fx.local_state("count", lambda: jnp.array(0, jnp.int32), collection="cache")
        n.set(n.get() + 1)  # the same in every member
        s = fx.local_state("seen", lambda: jnp.zeros(4), collection="cache")
        s.set(x)  # differs per member
        return fx.nn.Dense(4)(x * w)  # auto-named: the error path traces the body again, named alike

    t = fx.transform(fx.vmap(member, params="broadcast"))
    with pytest.raises(fx.EffaxError, match="shared variable.s. `seen` .params="):
        t.init(jax.random.key(0), jnp.arange(12.0).reshape(3, 4))


def test_vmap_shared_state_reduced_over_the_axis_is_kept():
    def body(x):
        s = fx.local_state("s", lambda: 0.0)
        s.set(jax.lax.pmean(x, "batch"))
        return x

    t = fx.transform(fx.vmap(body, state="broadcast", axis_name="batch"))
    _, up = t.apply({"state": {"s": 0.0}}, jnp.arange(4.0), mutable=True)
    assert float(up["state"]["s"]) == 1.5


def test_vmap_sows_are_stacked():
    def body(x):
        fx.sow("x", 2 * x)
        return x

    _, up = fx.transform(fx.vmap(body)).apply({}, jnp.arange(3.0), mutable=True)
    np.testing.assert_array_equal(up["intermediates"]["x"][0], 2 * np.arange(3.0))


# --- remat


def dropout_layer(x):
    w = fx.param("w", normal, (D, D))
    y = jnp.sin(x @ w)
    fx.sow("y", y)
    keep = jax.random.bernoulli(fx.next_key("dropout"), 0.5, y.shape)
    return jnp.where(keep, y, 0.0).sum()


def test_remat_gives_the_same_values_keys_and_gradients(maybe_jit):
    plain, rem = fx.transform(dropout_layer), fx.transform(fx.remat(dropout_layer))
    v = plain.init(key, x)
    jax.tree.map(np.testing.assert_array_equal, rem.init(key, x), v)
    rngs = {"dropout": jax.random.key(9)}
    a = plain.apply(v, x, rngs=rngs, mutable=True)
    b = maybe_jit(lambda v: rem.apply(v, x, rngs=rngs, mutable=True))(v)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    g = lambda t: maybe_jit(jax.grad(lambda v: t.apply(v, x, rngs=rngs)))(v)  # noqa: E731
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g(plain), g(rem))


def test_remat_passes_its_policy_to_jax_checkpoint():
    policy = jax.checkpoint_policies.dots_saveable
    t = fx.transform(fx.remat(dropout_layer, policy=policy))
    v = t.init(key, x)
    jaxpr = jax.make_jaxpr(lambda v: t.apply(v, x, rngs=key))(v)
    policies = [e.params["policy"] for e in jaxpr.jaxpr.eqns if "policy" in e.params]
    assert policies == [policy]


def test_remat_static_argnums_and_state():
    def layer(x, double):
        n = fx.local_state("n", lambda: 0.0)
        n.set(n.get() + 1)
        return x * (2 if double else 1)

    t = fx.transform(lambda x: fx.remat(layer, static_argnums=1)(x, True))
    out, up = t.apply(t.init(None, 1.0), 1.0, mutable=True)
    assert (float(out), float(up["state"]["n"])) == (2.0, 1.0)


# --- purity and misuse


@pytest.mark.slow  # 7 s; CI runs it (`--run-slow`), beside the matrix's leak sweep and the leak-checked core
def test_no_tracer_leaks():
    with jax.checking_leaks():
        v = ts.init(key, x)
        jax.jit(lambda v: ts.apply(v, x, mutable=True))(v)
        tv = fx.transform(fx.vmap(member, in_axes=None, axis_size=2))
        jax.jit(lambda v: tv.apply(v, x, rngs=key))(tv.init(key, x))
        tr = fx.transform(fx.remat(dropout_layer))
        jax.jit(jax.grad(lambda v: tr.apply(v, x, rngs=key)))(tr.init(key, x))


@pytest.mark.parametrize(
    "raw",
    [
        lambda f: jax.lax.scan(lambda c, _: (f(), None), 0, length=2),
        lambda f: jax.vmap(lambda _: f())(jnp.zeros(2)),
        lambda f: jax.checkpoint(f)(),
    ],
    ids=["lax.scan", "vmap", "checkpoint"],
)
def test_raw_jax_transforms_around_effects_point_to_the_lifted_ones(raw):
    def model():
        raw(lambda: fx.param("w", normal, (2,)).sum())

    with pytest.raises(fx.TraceMismatchError, match=r"fx\.scan.*fx\.vmap.*fx\.remat"):
        fx.transform(model).init(key)
    with pytest.raises(fx.TraceMismatchError, match="draws a key"):
        fx.transform(lambda: raw(lambda: jax.random.normal(fx.next_key("s")))).apply({}, rngs=key)
    # a sow no run keeps (init keeps none) is refused too: let pass, JAX would cache the raw transform's
    # trace, and a later apply asking for the sow would silently get nothing
    with pytest.raises(fx.TraceMismatchError, match="sows a value"):
        fx.transform(lambda: raw(lambda: fx.sow("h", jnp.ones(2)) or 0.0)).init(key)


def test_misuse_errors_say_how_to_fix():
    with pytest.raises(fx.EffaxError, match="length="):
        fx.transform(lambda: fx.scan(counter)(0)).init(None)
    with pytest.raises(fx.EffaxError, match=r"pair \(carry, y\)"):
        fx.transform(lambda: fx.scan(lambda c, _: c, length=2)(0)).init(None)
    with pytest.raises(fx.EffaxError, match="'stack', 'carry'"):
        fx.scan(counter, length=2, state="broadcast")
    with pytest.raises(fx.EffaxError, match="params='layer'"):
        fx.vmap(member, params="layer")
    with pytest.raises(fx.EffaxError, match="split_rngs"):
        fx.scan(counter, split_rngs=3)


def test_layers_created_inside_a_body_keep_their_auto_names():
    def model(x):
        h = fx.nn.Dense(D)(x)
        h, _ = fx.scan(lambda h, _: (jnp.tanh(fx.nn.Dense(D)(h)), None), length=L)(h)
        h = fx.vmap(lambda h: fx.nn.Dense(D)(h), in_axes=None, axis_size=2)(h)
        return fx.remat(lambda h: fx.nn.Dense(D)(h))(h)

    t = fx.transform(model)
    v = t.init(key, x)
    shapes = {name: p["kernel"].shape for name, p in v["params"].items()}
    assert shapes == {"Dense_0": (D, D), "Dense_1": (L, D, D), "Dense_2": (2, D, D), "Dense_3": (D, D)}
    assert t.apply(v, x).shape == (2,) + x.shape


class _Doubler(fx.nn.Module):
    features: int = 3

    def __call__(self, h, *x):  # a scan body when given x: (carry, x) -> (carry, y)
        h = jnp.tanh(fx.nn.Dense(self.features)(h))
        return (h, x[0]) if x else h


@pytest.mark.parametrize("lift", ["scan", "vmap", "remat"])
def test_a_module_class_is_lifted_per_instance_as_in_flax(lift):
    x = jnp.ones((2, 3))
    by_class = {
        "scan": lambda h: fx.scan(_Doubler, 2)(features=3)(h, None)[0],
        "vmap": lambda h: fx.vmap(_Doubler, axis_size=2, in_axes=None)(features=3)(h),
        "remat": lambda h: fx.remat(_Doubler)(features=3)(h),
    }[lift]
    by_instance = {
        "scan": lambda h: fx.scan(_Doubler(features=3), 2)(h, None)[0],
        "vmap": lambda h: fx.vmap(_Doubler(features=3), axis_size=2, in_axes=None)(h),
        "remat": lambda h: fx.remat(_Doubler(features=3))(h),
    }[lift]
    a, b = fx.transform(by_class), fx.transform(by_instance)
    va, vb = a.init(jax.random.key(0), x), b.init(jax.random.key(0), x)
    prefix = {"scan": "Scan", "vmap": "Vmap", "remat": "Checkpoint"}[lift]  # Flax's names of the lifted class
    assert list(va["params"]) == [f"{prefix}_Doubler_0"] and list(vb["params"]) == ["_Doubler_0"]
    renamed = {"params": {"_Doubler_0": va["params"][f"{prefix}_Doubler_0"]}}
    assert jax.tree.map(jnp.shape, renamed) == jax.tree.map(jnp.shape, vb)
    np.testing.assert_allclose(a.apply(va, x), b.apply(renamed, x))


def _layer(h, _):
    return h @ fx.param("w", jax.nn.initializers.ones, (D, D)), None


def test_scan_length_is_a_non_negative_int_that_agrees_with_xs():
    """A `length` JAX would refuse (or silently truncate) is an EffaxError naming the scan and the fix."""
    for bad in (-1, 2.7, "3", True):
        with pytest.raises(fx.EffaxError, match=r"fx\.scan: length=.* is not a non-negative int"):
            fx.scan(_layer, length=bad)
    with pytest.raises(fx.EffaxError, match=r"length=4, but xs has 3 slices .* pass length=3"):
        fx.transform(lambda h: fx.scan(_layer, length=4)(h, jnp.ones((3, 1)))[0]).init(key, x)
    with pytest.raises(fx.EffaxError, match=r"fx\.scan at `enc`: the leaves of xs .*`xs\[0\]`: 3, `xs\[1\]`: 4"):
        with fx.handle(fx.handlers.InitParams(key)), fx.scope("enc"):
            fx.scan(_layer)(x, (jnp.ones(3), jnp.ones(4)))
    with pytest.raises(fx.EffaxError, match=r"`xs\['t'\]` is an array float32\[\], without a leading axis"):
        fx.transform(lambda h: fx.scan(_layer)(h, {"t": jnp.float32(1)})[0]).init(key, x)
    v = fx.transform(lambda h: fx.scan(_layer, length=np.int64(2))(h)[0]).init(key, x)
    assert v["params"]["w"].shape == (2, D, D)  # a NumPy int is an int
    assert fx.transform(lambda h: fx.scan(_layer, length=3)(h, jnp.ones((3, 1)))[0]).init(key, x)


def test_a_carry_that_changes_type_in_one_step_is_shown_both_ways():
    with pytest.raises(fx.EffaxError) as e:
        fx.transform(lambda h: fx.scan(lambda h, _: ((h, h), None), length=2)(h)[0]).init(key, x)
    assert "fx.scan at `<root>`" in str(e.value)
    assert "takes float32[2,3] and returns (float32[2,3], float32[2,3])" in str(e.value)
    with pytest.raises(fx.EffaxError, match=r"`carry\[1\]`: float32\[2,3\] -> bfloat16\[2,3\]"):
        body = lambda c, _: ((c[0], c[1].astype(jnp.bfloat16)), None)  # noqa: E731
        fx.transform(lambda h: fx.scan(body, length=2)((h, h))[0]).init(key, x)
    with pytest.raises(fx.EffaxError, match=r"`carry`: float32\[2,3\] -> float32\[2,6\]"):
        fx.transform(lambda h: fx.scan(lambda c, _: (jnp.concatenate([c, c], 1), None), length=2)(h)[0]).init(key, x)
    # a Python scalar carry takes the body's dtype, as in jax.lax.scan
    assert fx.transform(lambda: fx.scan(lambda c, _: (c + 0.5, None), length=2)(0)[0]).apply({}) == 1.0


def test_vmap_in_axes_are_checked_against_the_arguments():
    def one(h):
        return h @ fx.param("w", jax.nn.initializers.ones, (D,))

    def init(f, *args):
        return fx.transform(f).init(key, *args)

    with pytest.raises(fx.EffaxError, match=r"fx\.vmap at `<root>`: in_axes=\(0, 0\) has 2 entries, .* 1 positional"):
        init(fx.vmap(one, in_axes=(0, 0)), x)
    with pytest.raises(fx.EffaxError, match=r"in_axes maps no argument .* `axis_size=n`"):
        init(fx.vmap(one, in_axes=None), x)
    with pytest.raises(fx.EffaxError, match=r"maps `args\[0\]` along axis 5, but it is float32\[2,3\], of rank 2"):
        init(fx.vmap(one, in_axes=5), x)
    with pytest.raises(fx.EffaxError, match=r"`args\[0\]\['a'\]`: 2, `args\[0\]\['b'\]`: 4"):
        init(fx.vmap(lambda d: one(d["a"]) + d["b"].sum()), {"a": x, "b": jnp.ones(4)})
    with pytest.raises(fx.EffaxError, match=r"`args\[0\]`: 2, axis_size=3"):
        init(fx.vmap(one, axis_size=3), x)
    with pytest.raises(fx.EffaxError, match=r"in_axes entry 0 \(\(0, 0\)\) does not fit argument 0"):
        init(fx.vmap(one, in_axes=((0, 0),)), x)
    with pytest.raises(fx.EffaxError, match=r"in_axes='0' is not an axis spec"):
        fx.vmap(one, in_axes="0")
    # what jax.vmap takes still works: negative axes, a list, a container per argument, None with axis_size
    assert init(fx.vmap(one, in_axes=-2), x)["params"]["w"].shape == (2, D)
    assert init(fx.vmap(lambda d, s: one(d["a"]) * s, in_axes=[{"a": 1}, None]), {"a": x.T}, 2.0)
    assert init(fx.vmap(one, in_axes=None, axis_size=3), x[0])["params"]["w"].shape == (3, D)


@pytest.mark.parametrize("lift", [fx.scan, fx.vmap, fx.remat])
def test_lifting_what_is_not_a_function_is_refused_when_made(lift):
    with pytest.raises(fx.EffaxError, match=rf"fx\.{lift.__name__} takes the function to lift .*, got int 3"):
        lift(3)


def test_stack_axis_names_the_stacked_dimension_for_sharding_rules():
    """Flax's `metadata_params={nn.PARTITION_NAME: "layers"}`: the stacked axis gets a logical name, so
    `logical_axes` and `logical_to_mesh` shard it; values are those made without it."""
    from jax.sharding import PartitionSpec as P

    def layer(h, _):
        w = fx.param("w", normal, (D, D), axes=("embed", "mlp"))
        return jnp.tanh(h @ w + fx.param("b", jax.nn.initializers.zeros, (D,))), None

    named = fx.transform(lambda h: fx.scan(layer, length=L, stack_axis="layers")(h)[0])
    plain = fx.transform(lambda h: fx.scan(layer, length=L)(h)[0])
    assert fx.sharding.logical_axes(fx.summary(plain, x))["params"] == {"b": P(), "w": P(None, "embed", "mlp")}
    axes = fx.sharding.logical_axes(fx.summary(named, x))["params"]
    assert axes == {"b": P("layers", None), "w": P("layers", "embed", "mlp")}
    mesh = jax.make_mesh((1,), ("stage",))
    rules = [("layers", "stage"), ("embed", None), ("mlp", None)]
    shardings = fx.sharding.logical_to_mesh(fx.summary(named, x), mesh, rules)
    assert shardings["params"]["w"].spec == P("stage", None, None) and shardings["params"]["b"].spec == P("stage", None)
    v = jax.jit(named.init, out_shardings=shardings)(key, x)
    np.testing.assert_array_equal(v["params"]["w"], plain.init(key, x)["params"]["w"])

    ensemble = fx.transform(fx.vmap(lambda h: layer(h, None)[0], in_axes=None, axis_size=2, stack_axis="ensemble"))
    assert fx.sharding.logical_axes(fx.summary(ensemble, x))["params"]["w"] == P("ensemble", "embed", "mlp")
    nested = fx.transform(lambda h: fx.scan(
        lambda h, _: (fx.scan(layer, length=2, stack_axis="inner")(h)[0], None), length=L, stack_axis="outer"
    )(h)[0])
    assert fx.sharding.logical_axes(fx.summary(nested, x))["params"]["w"] == P("outer", "inner", "embed", "mlp")
    with pytest.raises(fx.EffaxError, match=r"stack_axis=3 is not a logical axis name"):
        fx.scan(layer, length=L, stack_axis=3)
    with pytest.raises(fx.EffaxError, match=r"params='broadcast' stacks none"):
        fx.vmap(layer, params="broadcast", stack_axis="ensemble")


def test_stacked_state_axes_gain_the_stacked_dimension():
    """A per-layer cache stacked by `fx.scan`/`fx.vmap` has one more dimension: its axes gain `stack_axis` (or
    None) in front, as a stacked param's do; a carried variable keeps its own."""
    from jax.sharding import PartitionSpec as P

    def layer(h, _):
        cache = fx.local_state("k", lambda: jnp.zeros((2, D)), collection="cache", axes=("batch", "kv"))
        cache.set(cache.get() + h)
        fx.local_state("n", lambda: jnp.zeros((), jnp.int32), collection="cache")
        return h, None

    def axes(lift):
        return fx.sharding.logical_axes(fx.summary(fx.transform(lift), x))["cache"]

    assert axes(lambda h: fx.scan(layer, length=L)(h)[0]) == {"k": P(None, "batch", "kv"), "n": P()}
    assert axes(lambda h: fx.scan(layer, length=L, stack_axis="layers")(h)[0]) == {
        "k": P("layers", "batch", "kv"), "n": P("layers")}
    assert axes(lambda h: fx.scan(layer, length=L, state="carry", stack_axis="layers")(h)[0]) == {
        "k": P("batch", "kv"), "n": P()}
    assert axes(lambda h: fx.scan(lambda h, _: (fx.scan(layer, length=2, stack_axis="inner")(h)[0], None),
                                  length=L, stack_axis="outer")(h)[0])["k"] == P("outer", "inner", "batch", "kv")
    assert axes(fx.vmap(lambda h: layer(h, None)[0], in_axes=None, axis_size=2))["k"] == P(None, "batch", "kv")
    t = fx.transform(lambda h: fx.scan(layer, length=L, stack_axis="layers")(h)[0])
    assert t.init(key, x)["cache"]["k"].shape == (L, 2, D)


@pytest.mark.parametrize("lift", ["scan", "vmap"])
def test_stacked_state_of_another_size_is_refused_by_path(lift):
    # JAX's own error names only the lift's internal arguments (`ins[8]`, "leading axis sizes [2, 2, 3]")
    def body(h):
        n = fx.local_state("n", lambda: jnp.zeros(h.shape[-1:]), collection="cache")
        n.set(n.get() + h)
        return h + n.get()

    if lift == "scan":
        make = lambda k: fx.transform(lambda x: fx.scan(lambda c, _: (body(c), None), length=k)(x, None)[0])
        x_init, x_apply = jnp.ones((2,)), jnp.ones((2,))
    else:
        make = lambda k: fx.transform(fx.vmap(body, params="broadcast", state="stack"))
        x_init, x_apply = jnp.ones((3, 2)), jnp.ones((2, 2))
    v = make(3).init(jax.random.key(0), x_init)
    with pytest.raises(fx.ShapeMismatchError, match=r"state `n` in collection 'cache' is stacked by fx\."
                       + lift + r".* is 2, but the stored value's leading axis is 3"):
        make(2).apply(v, x_apply, mutable=["cache"])
