"""A user's stateless handler outside a run with state, around a lifted transform (docs/guides/lifted-transforms.md,
"Limits"): it is not rerun inside the body, so it answers the body's lifted requests once, outside. Changing the
answer element by element matches the unrolled loop; making variables of its own there would make one, not one per
layer, so it is refused by name rather than silently made wrong."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx
from tests.lift.test_composition import ParamLoRA  # an adapter per kernel: the per-layer params at stake

KEY = jax.random.key(0)
X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
normal = jax.nn.initializers.normal(0.5)
shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731


class Doubled(fx.Handler):
    """Changes each param element by element and performs nothing: the same on a stacked param."""

    answers = (fx.ParamRequest,)

    def handle(self, request, forward):
        return 2 * forward(request)


class Counting(fx.Handler):
    """A user's handler with per-run state that changes nothing."""

    def begin(self):
        return CountingRun()


class CountingRun:
    def __init__(self):
        self.params = 0

    def handle(self, request, forward):
        self.params += isinstance(request, fx.ParamRequest)
        return forward(request)


def layer(h):
    with fx.scope("a"):
        return jnp.tanh(h @ fx.param("kernel", normal, (3, 3)))


LIFTS = {
    "scan": lambda f: lambda h: fx.scan(lambda c, _: (f(c), None), length=2)(h)[0],
    "vmap": lambda f: lambda h: fx.vmap(f, axis_size=2, params="stack")(jnp.stack([h, h])).sum(0),
    "remat": lambda f: fx.remat(f),
    "cond": lambda f: lambda h: fx.cond(True, f, f, h),
}


@pytest.mark.parametrize("lift", LIFTS)
def test_an_interceptor_making_params_outside_a_stateful_handler_is_refused(lift):
    model = fx.transform(LIFTS[lift](layer))
    refused = r"`ParamLoRA` performed param `.*lora/a`.*outside `CountingRun`, the run of a handler"
    with pytest.raises(fx.EffaxError, match=refused) as e:
        model.init(KEY, X, handlers=[ParamLoRA(), Counting()])
    assert "list `ParamLoRA` after that handler in `handlers=`" in str(e.value)
    # inside the run with state it is rerun in the body: one adapter per layer, as unrolled
    v = model.init(KEY, X, handlers=[Counting(), ParamLoRA()])
    if lift in ("scan", "vmap"):
        assert shapes(v["params"])["a"]["lora"] == {"a": (2, 3, 2), "b": (2, 2, 3)}
    else:
        assert shapes(v["params"])["a"]["lora"] == {"a": (3, 2), "b": (2, 3)}


def test_fx_share_around_a_lift_refuses_the_interceptor_and_names_the_fix():
    def pair(h):
        with fx.scope("b"):
            h = jnp.tanh(h @ fx.param("kernel", normal, (3, 3)))
        return layer(h)

    scanned = LIFTS["scan"](pair)
    tied = fx.transform(fx.share(scanned, {"b": "a"}))
    with pytest.raises(fx.EffaxError, match=r"outside the `fx.share` pass that wraps the lifted transform") as e:
        tied.init(KEY, X, handlers=[ParamLoRA()])
    assert "inside the function `fx.share` wraps" in str(e.value)

    def adapted(h):  # the fix the message names: the interceptor inside the shared function
        with fx.handle(ParamLoRA()):
            return scanned(h)

    v = fx.transform(fx.share(adapted, {"b": "a"})).init(KEY, X)
    assert shapes(v["params"]) == {"a": {"kernel": (2, 3, 3), "lora": {"a": (2, 3, 2), "b": (2, 2, 3)}}}


def test_an_interceptor_that_only_changes_values_outside_a_stateful_handler_equals_the_unrolled_loop():
    scanned = fx.transform(LIFTS["scan"](layer))

    def unrolled(h):
        for i in range(2):
            with fx.scope(f"l{i}"):
                h = layer(h)
        return h

    v = scanned.init(KEY, X, handlers=[Doubled(), Counting()])
    restacked = {f"l{i}": jax.tree.map(lambda a, i=i: a[i], v["params"]) for i in range(2)}
    got = scanned.apply(v, X, handlers=[Doubled(), Counting()])
    want = fx.transform(unrolled).apply({"params": restacked}, X, handlers=[Doubled(), Counting()])
    np.testing.assert_allclose(got, want, rtol=1e-6)


class Noisy(fx.Handler):
    """Draws a key, or sows, while it answers a param: once per layer unrolled."""

    answers = (fx.ParamRequest,)

    def __init__(self, performs):
        self.performs = performs

    def handle(self, request, forward):
        w = forward(request)
        if self.performs == "draws":
            return w + 0.01 * jax.random.normal(fx.next_key("noise"), w.shape)
        fx.sow("norm", jnp.linalg.norm(w))
        return w


@pytest.mark.parametrize("performs", ["draws", "sows"])
def test_drawing_or_sowing_while_answering_outside_a_stateful_handler_is_refused(performs):
    model = fx.transform(LIFTS["scan"](layer))
    v = model.init(KEY, X)
    with pytest.raises(fx.EffaxError, match="`Noisy` performed"):
        model.apply(v, X, rngs={"noise": KEY}, mutable=["intermediates"], handlers=[Noisy(performs), Counting()])
    # inside it, once per layer: the sows come back stacked, as from the unrolled loop
    _, updates = model.apply(v, X, rngs={"noise": KEY}, mutable=["intermediates"],
                             handlers=[Counting(), Noisy(performs)])
    if performs == "sows":
        assert shapes(updates["intermediates"]) == {"a": {"norm": ((2,),)}}


OPERATIONS = {
    "init": lambda t, h: t.init(KEY, X, handlers=h),
    "jit(init)": lambda t, h: jax.jit(lambda k, x: t.init(k, x, handlers=h))(KEY, X),
    "eval_shape(init)": lambda t, h: jax.eval_shape(lambda k, x: t.init(k, x, handlers=h), KEY, X),
    "apply": lambda t, h: t.apply(t.init(KEY, X), X, handlers=h),
    "summary": lambda t, h: fx.summary(t, X, handlers=h),
    "check_variables": lambda t, h: fx.check_variables(t, t.init(KEY, X), X, handlers=h),
}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_the_refusal_holds_under_every_operation(operation):
    model = fx.transform(LIFTS["scan"](layer))
    with pytest.raises(fx.EffaxError, match="`ParamLoRA` performed param"):
        OPERATIONS[operation](model, [ParamLoRA(), Counting()])
