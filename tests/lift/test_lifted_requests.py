"""Requests made inside lifted bodies by anyone, values made from the body's inputs, and the cost of nesting."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx

KEY = jax.random.key(0)
X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)


def dense_block(h, _):
    return jax.nn.relu(fx.nn.Dense(3)(h)), None


def lifted(kind, body):
    """`body(h, _) -> (h, None)` run in the lifted context `kind`."""
    if kind == "scan":
        return lambda h: fx.scan(body, length=3)(h)[0]
    if kind == "vmap":
        return lambda h: fx.vmap(lambda h: body(h, None)[0], in_axes=None, axis_size=3)(h)
    return lambda h: fx.remat(lambda h: body(h, None)[0])(h)


@pytest.mark.parametrize("kind", ["scan", "vmap", "remat"])
def test_capture_intermediates_reaches_layers_inside_lifted_transforms(kind):
    t = fx.transform(lifted(kind, dense_block))
    out, v = t.init_with_output(KEY, X, capture_intermediates=True, mutable=True)
    lead = () if kind == "remat" else (3,)
    assert jax.tree.map(jnp.shape, v["intermediates"]) == {"Dense_0": {"__call__": (lead + (2, 3),)}}
    y, updates = t.apply(v, X, capture_intermediates=True)
    assert jax.tree.map(jnp.shape, updates) == {"intermediates": {"Dense_0": {"__call__": (lead + (2, 3),)}}}
    (captured,) = updates["intermediates"]["Dense_0"]["__call__"]
    last = captured[-1] if kind == "scan" else captured  # the last layer's Dense output, before its relu
    if kind != "vmap":
        np.testing.assert_allclose(jax.nn.relu(last), y, rtol=1e-6)
        np.testing.assert_allclose(y, out, rtol=1e-6)


class LoRA(fx.Handler):
    def handle(self, request, forward):
        out = forward(request)
        if isinstance(request, fx.ModuleCallRequest) and isinstance(request.module, fx.nn.Dense):
            (x,) = request.args
            with fx.scope("lora"):
                a = fx.param("a", jax.nn.initializers.normal(), (x.shape[-1], 2))
                b = fx.param("b", jax.nn.initializers.ones, (2, request.module.features))
            out = out + x @ a @ b
        return out


def test_lora_on_a_scanned_model_creates_stacked_adapters_and_summary_counts_them():
    t = fx.transform(lifted("scan", dense_block))
    v = t.init(KEY, X, handlers=[LoRA()])
    assert jax.tree.map(jnp.shape, v["params"]) == {
        "Dense_0": {"bias": (3, 3), "kernel": (3, 3, 3), "lora": {"a": (3, 3, 2), "b": (3, 2, 3)}}
    }
    base = t.apply(v, X)
    adapted = t.apply(v, X, handlers=[LoRA()])
    assert not np.allclose(base, adapted)
    s = fx.summary(t, X, handlers=[LoRA()])
    assert s.param_count == sum(a.size for a in jax.tree.leaves(v["params"]))
    assert jax.tree.map(lambda a: a.shape, s.variables) == jax.tree.map(jnp.shape, v)
    assert [e.name for e in fx.effects_of(t, X, handlers=[LoRA()]).of_kind("param")] == [
        "Dense_0/kernel", "Dense_0/bias", "Dense_0/lora/a", "Dense_0/lora/b"
    ]


@pytest.mark.parametrize("kind", ["scan", pytest.param("vmap", marks=pytest.mark.slow),
                                  pytest.param("remat", marks=pytest.mark.slow)])  # CI runs all three
@pytest.mark.parametrize("init", [lambda h: jnp.zeros_like(h), lambda h: h * 0 + 1], ids=["zeros_like", "h*0+1"])
def test_a_state_init_that_reads_the_body_input_is_made_inside_the_body(kind, init):
    def body(h, _):
        cache = fx.local_state("cache", lambda: init(h), collection="cache")
        cache.set(cache.get() + h)
        return h + 1, None

    t = fx.transform(lifted(kind, body))
    with jax.checking_leaks():
        v = t.init(KEY, X)
        out, updates = t.apply(v, X, mutable=True)
    lead = () if kind == "remat" else (3,)
    assert jax.tree.map(jnp.shape, v) == {"params": {}, "cache": {"cache": lead + (2, 3)}}
    first = init(X)
    np.testing.assert_allclose(v["cache"]["cache"], jnp.broadcast_to(first, lead + first.shape) if kind != "scan"
                               else jnp.stack([init(X + i) for i in range(3)]))


def _lifted_or_nested(kind, body):
    if kind == "nested scan":
        return lambda h: fx.scan(lambda h, _: (lifted("scan", body)(h), None), length=2)(h)[0]
    if kind == "cond":
        return lambda h: fx.cond(True, lambda h: body(h, None)[0], lambda h: h, h)
    return lifted(kind, body)


@pytest.mark.parametrize("kind", ["scan", "nested scan", "vmap", "remat", "cond"])
def test_a_state_init_that_draws_keys_draws_them_only_when_it_runs(kind):
    """As in the unrolled loop, `init()` runs only for a variable that does not exist yet, so the keys it
    draws (or the stream key a Flax module's init asks for) are needed only then: applying existing
    variables needs no key, under the eval preset too."""

    def body(h, _):
        noise = fx.local_state("noise", lambda: jax.random.normal(fx.next_key("params"), (3,)), collection="buf")
        scale = fx.local_state("scale", lambda: jnp.ones(3) + 0 * jax.random.key_data(fx.stream_key("params"))[0])
        return h * scale.get() + noise.get(), None

    t = fx.transform(_lifted_or_nested(kind, body))
    v = t.init(KEY, X)
    expected = t.apply(v, X, rngs=jax.random.key(1))  # existing variables: the key is never used
    np.testing.assert_array_equal(t.apply(v, X), expected)
    np.testing.assert_array_equal(t.apply(v, X, handlers=fx.handlers.eval()), expected)
    out, made = t.init_with_output(KEY, X)  # creating: the keys are drawn, as many as the init draws
    np.testing.assert_array_equal(out, t.apply(made, X))
    assert jax.tree.map(jnp.shape, made) == jax.tree.map(jnp.shape, v)
    np.testing.assert_array_equal(made["buf"]["noise"], v["buf"]["noise"])


def test_keys_drawn_by_a_state_init_take_their_place_among_the_bodys_draws():
    """A draw in the body and one in a variable's `init()` at the same path get the keys of the unrolled
    order, in init (both drawn) and in apply (only the body's)."""

    def step(h):
        before = jax.random.uniform(fx.next_key("noise"), ())
        made = fx.local_state("made", lambda: jax.random.uniform(fx.next_key("noise"), ()), collection="buf")
        after = jax.random.uniform(fx.next_key("noise"), ())
        return h + before + 10 * made.get() + 100 * after

    rngs = {"params": KEY, "noise": jax.random.key(5)}
    plain, remat = fx.transform(step), fx.transform(fx.remat(step))
    want, v = plain.init_with_output(rngs, X)
    got, w = remat.init_with_output(rngs, X)
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(w["buf"]["made"], v["buf"]["made"])
    np.testing.assert_allclose(remat.apply(v, X, rngs=rngs), plain.apply(v, X, rngs=rngs))


def test_a_set_in_a_frozen_collection_is_refused_where_the_unrolled_loop_refuses_it():
    """A handler that asks whether a collection may change by writing a variable back (as `fx.from_flax`
    does) gets the same answer inside a lifted body as outside: `FrozenStateError` at the `set`."""

    def body(h, _):
        count = fx.local_state("count", lambda: jnp.zeros(()), collection="stats")
        try:
            count.set(count.get())
            writable = True
        except fx.FrozenStateError:
            writable = False
        if writable:
            count.set(count.get() + 1)
        return h + writable, None

    for kind in ("scan", "vmap", "remat", "nested scan"):
        t = fx.transform(_lifted_or_nested(kind, body))
        v = t.init(KEY, X)
        frozen = t.apply(v, X)
        np.testing.assert_array_equal(frozen, jnp.broadcast_to(X, frozen.shape), err_msg=kind)  # not written
        out, updates = t.apply(v, X, mutable=["stats"])
        assert float(jnp.min(updates["stats"]["count"])) == 1.0 and float(jnp.min(out - X)) >= 1.0, kind


def _tied(h, _):
    with fx.scope("enc"):
        w1 = fx.param("w", jax.nn.initializers.normal(1.0), (3, 3))
    with fx.scope("dec"):
        w2 = fx.param("w", jax.nn.initializers.normal(1.0), (3, 3))
    return jnp.tanh(h @ w1) @ w2.T, None


def _reused(h, _):
    dense = fx.nn.Dense(3)
    return dense(jnp.tanh(dense(h))), None


@pytest.mark.parametrize("kind", ["scan", "nested scan", "vmap", "remat", "cond"])
def test_summary_and_effects_of_see_every_use_of_a_param_as_unrolled(kind):
    """A param used twice in a lifted body (a reused layer, a tie made by `fx.share` inside it) is requested
    outside once per use, so `summary` counts the uses and notes the tie, and `effects_of` lists each use
    with the binding that moved it, as for the model run plainly."""
    tied = lambda h, _: (fx.share(lambda h: _tied(h, None)[0], {"dec": "enc"})(h), None)  # noqa: E731
    for body, note in ((tied, "shared with dec/w; 2 uses"), (_reused, "2 uses")):
        plain = fx.transform(lambda h, body=body: body(h, None)[0])
        lifted_ = fx.transform(_lifted_or_nested(kind, body))
        rows = [line for line in str(fx.summary(lifted_, X)).splitlines() if note in line]
        assert len(rows) == len([line for line in str(fx.summary(plain, X)).splitlines() if note in line]) > 0
        uses = lambda t: [(e.name, e.binding) for e in fx.effects_of(t, X).of_kind("param")]  # noqa: E731
        assert uses(lifted_) == uses(plain), kind


def test_carried_state_is_made_on_the_first_step_from_its_input():
    def body(h, _):
        total = fx.local_state("total", lambda: h * 10, collection="cache")
        total.set(total.get() + h)
        return h + 1, None

    t = fx.transform(lambda h: fx.scan(body, length=3, state="carry")(h)[0])
    v = t.init(KEY, X)
    np.testing.assert_allclose(v["cache"]["total"], X * 10)  # init() of the first step, before any set
    _, updates = t.apply(v, X, mutable=True)
    np.testing.assert_allclose(updates["cache"]["total"], X * 10 + X + (X + 1) + (X + 2))


def test_an_initializer_that_closes_over_the_body_input_equals_the_unrolled_loop():
    def body(h, _):
        scale = fx.param("scale", lambda k, s, d: jnp.full(s, h.std() + 1.0, d), ())
        return h * scale, None

    def unrolled(h):
        for i in range(3):
            with fx.scope(f"l{i}"):
                h = body(h, None)[0]
        return h

    v = fx.transform(lambda h: fx.scan(body, length=3)(h)[0]).init(KEY, X)
    v_ref = fx.transform(unrolled).init(KEY, X)
    np.testing.assert_allclose(v["params"]["scale"], [v_ref["params"][f"l{i}"]["scale"] for i in range(3)], rtol=1e-6)


@dataclasses.dataclass
class Scaled:  # a plain dataclass with __eq__: not hashable
    scale: float

    def __call__(self, key, shape, dtype):
        return jax.random.normal(key, shape, dtype) * self.scale


@pytest.mark.parametrize("kind", ["scan", "vmap", "remat"])
def test_unhashable_initializers_under_jit_and_eval_shape(kind):
    t = fx.transform(lifted(kind, lambda h, _: (h @ fx.param("w", Scaled(0.1), (3, 3)), None)))
    v = t.init(KEY, X)
    np.testing.assert_allclose(jax.jit(t.init)(KEY, X)["params"]["w"], v["params"]["w"], rtol=1e-6)
    assert jax.eval_shape(t.init, KEY, X)["params"]["w"].shape == v["params"]["w"].shape
    init = fx.StackedInit(Scaled(0.1))
    with pytest.raises(TypeError):
        hash(init)
    assert init(KEY, (2, 3), jnp.float32).shape == (2, 3)


def test_sharded_jit_init_of_a_scanned_model():
    t = fx.transform(lifted("scan", lambda h, _: (h @ fx.param("w", Scaled(0.1), (3, 3), axes=("a", "b")), None)))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    shardings = fx.sharding.logical_to_mesh(fx.summary(t, X), mesh, {"a": "data", "b": None})
    v = jax.jit(t.init, out_shardings=shardings)(KEY, X)
    assert v["params"]["w"].shape == (3, 3, 3)


def test_a_raw_jax_transform_inside_a_lifted_body_still_points_to_the_lifted_ones():
    def body(h, _):
        def inner(c, _):
            return c + jax.random.normal(fx.next_key("noise"), c.shape), None

        return jax.lax.scan(inner, h, None, length=2)[0], None

    t = fx.transform(lambda h: fx.scan(body, length=2)(h)[0])
    with pytest.raises(fx.TraceMismatchError, match="fx.scan"):
        t.apply({}, X, rngs=KEY)


def test_a_stateful_handlers_own_effects_inside_a_scan_are_lifted_too():
    class Counter(fx.Handler):  # stateful: begin() returns a run; it counts module calls in state
        def begin(self):
            return self.Run()

        class Run:
            def handle(self, request, forward):
                if isinstance(request, fx.ModuleCallRequest):
                    calls = fx.local_state("calls", lambda: jnp.zeros((), jnp.int32), collection="calls")
                    calls.set(calls.get() + 1)
                return forward(request)

    t = fx.transform(lifted("scan", dense_block))
    v = t.init(KEY, X, handlers=[Counter()])
    np.testing.assert_array_equal(v["calls"]["Dense_0"]["calls"], [0, 0, 0])  # one per layer, stacked
    _, updates = t.apply(v, X, handlers=[Counter()], mutable=["calls"])
    np.testing.assert_array_equal(updates["calls"]["Dense_0"]["calls"], [1, 1, 1])


def nest(body, k):
    for _ in range(k - 1):
        body = (lambda b: (lambda h, _: (fx.scan(b, length=2)(h)[0], None)))(body)
    return lambda h: fx.scan(body, length=2)(h)[0]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_k_nested_lifts_trace_the_innermost_body_k_plus_one_times(k):
    calls = []

    def inner(h, _):
        calls.append(None)
        return jnp.tanh(h @ fx.param("w", jax.nn.initializers.normal(), (3, 3))), None

    t = fx.transform(nest(inner, k))
    v = t.init(KEY, X)
    counts = {}
    for name, run in {
        "init": lambda: t.init(KEY, X),
        "apply": lambda: t.apply(v, X),
        "eval_shape(init)": lambda: jax.eval_shape(t.init, KEY, X),
        "summary": lambda: fx.summary(t, X),
    }.items():
        calls.clear()
        run()
        counts[name] = len(calls)
    assert counts == {"init": k + 1, "apply": k + 1, "eval_shape(init)": k + 1, "summary": 1}


def test_a_param_used_outside_and_inside_a_stacked_lift_says_why_its_shapes_differ():
    """The two shapes differ by the lift's stacked axis: the message names the lift and params='broadcast'."""
    def tied_readout(ids):
        emb = fx.nn.Embed(5, 4)
        h = emb(ids)
        return fx.scan(lambda c, _: (c + jnp.tanh(emb.attend(c)) @ jnp.ones((5, 4)), None), length=2)(h)[0]

    with pytest.raises(fx.ParamConflictError, match=r"\(2, 5, 4\).* leading axis of 2 more: .*params='broadcast'"):
        fx.transform(tied_readout).init(jax.random.key(0), jnp.array([[0, 1, 2]]))

    def tied_by_share(x):
        with fx.scope("embed"):
            w0 = fx.param("w", jax.nn.initializers.normal(), (4, 4))

        def body(h, _):
            with fx.scope("proj"):
                return jnp.tanh(h @ fx.param("w", jax.nn.initializers.normal(), (4, 4))), None

        with fx.scope("layers"):
            return fx.scan(body, length=2)(x @ w0)[0]

    with pytest.raises(fx.ShareError, match=r"one shape and dtype.* leading axis of 2 more: .*params='broadcast'"):
        fx.transform(fx.share(tied_by_share, {"layers/proj": "embed"})).init(jax.random.key(0), jnp.ones((1, 4)))


@pytest.mark.parametrize("lift", ["plain", "scan", "vmap", "remat", "cond"])
def test_one_path_asked_with_two_shapes_is_a_conflict_in_every_lift(lift):
    """Inside a lift it read "a handler answered shape (4, 4)" (no handler was the user's), and the plain
    model's message blamed a lift's stacking ("a leading axis of 4 more") where there is no lift."""

    def body(x):
        a = fx.param("w", jax.nn.initializers.ones, (4, 4))
        return x @ a + fx.param("w", jax.nn.initializers.ones, (4,))

    fn = {
        "plain": body,
        "scan": lambda x: fx.scan(lambda c, _: (body(c), None), length=2)(x)[0],
        "vmap": lambda x: fx.vmap(body, in_axes=0)(x),
        "remat": lambda x: fx.remat(body)(x),
        "cond": lambda x: fx.cond(True, body, lambda x: x, x),
    }[lift]
    with pytest.raises(fx.ParamConflictError, match=r"requested twice with different specs") as info:
        fx.transform(fn).init(jax.random.key(0), jnp.ones((2, 4)))
    assert "leading axis" not in str(info.value)
