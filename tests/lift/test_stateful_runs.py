"""A lifted body under the user's handlers with state (runs outside the body), tied state, and the inventory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx
from effax.core import send

KEY = jax.random.key(0)
X = jnp.ones((1, 2))


class Doubles(fx.Handler):
    """A stateful handler (a fresh run per call) that changes every param answer."""

    def begin(self):
        return _DoublesRun()


class _DoublesRun:
    def __init__(self):
        self.seen = []

    def handle(self, request, forward):
        out = forward(request)
        if isinstance(request, fx.ParamRequest):
            self.seen.append(request.path)
            return out * 2
        return out


class Counts(fx.Handler):
    """A stateful handler that changes nothing."""

    def begin(self):
        return _CountsRun()


class _CountsRun:
    def __init__(self):
        self.n = 0

    def handle(self, request, forward):
        self.n += 1
        return forward(request)


def layer(x):
    return jnp.tanh(x @ fx.param("w", jax.nn.initializers.normal(), (2, 2)))


def reading_layer(x):  # an initializer that reads the body's value
    return x * fx.param("w", lambda key, shape, dtype: jnp.full(shape, x.mean(), dtype), (2,))


def scanned(f, n=2):
    return lambda h: fx.scan(lambda c, _: (f(c), None), length=n)(h)[0]


LIFTS = {
    "remat": fx.remat,
    "scan": scanned,
    "nested scan": lambda f: scanned(scanned(f)),
    "vmap": lambda f: fx.vmap(f, in_axes=None, axis_size=2),
    "scan of remat": lambda f: scanned(fx.remat(f)),
}


@pytest.mark.parametrize("lift", list(LIFTS))
def test_a_stateful_run_that_changes_param_answers_changes_them_in_init_too(lift):
    """init/apply agreement (law 3) under a lift: the body makes its params outside, through the run."""
    t = fx.transform(LIFTS[lift](layer))
    out, v = t.init_with_output(KEY, X, handlers=[Doubles()])
    np.testing.assert_allclose(out, t.apply(v, X, handlers=[Doubles()]), rtol=1e-6)
    # the stored values: as without the handler (made outside, stacked by `fx.StackedInit`: equal to rounding)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), v, t.init(KEY, X))
    assert not np.allclose(out, t.apply(v, X))  # the handler did change what the body saw


def test_an_initializer_reading_the_body_is_made_inside_and_a_changed_answer_is_refused():
    t = fx.transform(scanned(reading_layer))
    with pytest.raises(fx.EffaxError, match=r"param `w` .* made inside a lifted transform .*\(_DoublesRun\)"):
        t.init(KEY, X, handlers=[Doubles()])
    out, v = t.init_with_output(KEY, X, handlers=[Counts()])  # a run that changes nothing: as without it
    ref_out, ref_v = t.init_with_output(KEY, X)
    np.testing.assert_allclose(out, ref_out)
    jax.tree.map(np.testing.assert_array_equal, v, ref_v)


def two_tied_counters(h):
    for name in ("a", "b"):
        with fx.scope(name):
            c = fx.local_state("c", lambda: jnp.zeros(2), collection="stats")
            c.set(c.get() + h)
    return h


@pytest.mark.parametrize("policy", ["allowed", "unsafe"])
@pytest.mark.parametrize("lift", ["remat", "scan"])
def test_state_tied_by_a_pass_around_a_lift_is_refused_and_works_inside_it(lift, policy):
    """Around the lift the body would keep the two uses apart (lost writes); inside, they are one variable."""
    t = fx.transform(fx.share(LIFTS[lift](two_tied_counters), {"b": "a"}, state=policy))
    with pytest.raises(fx.ShareError, match=r"state `b/c` .*declared inside a lifted transform.* inside the body"):
        t.init(KEY, jnp.ones(2))
    inside = fx.transform(LIFTS[lift](fx.share(two_tied_counters, {"b": "a"}, state=policy)))
    v = inside.init(KEY, jnp.ones(2))
    _, updates = inside.apply(v, jnp.ones(2), mutable=True)
    np.testing.assert_allclose(updates["stats"]["a"]["c"], 2.0 * np.ones_like(v["stats"]["a"]["c"]))  # 0 + 1 + 1


def counter(h):
    c = fx.local_state("c", lambda: jnp.zeros(()), collection="counter")
    c.set(c.get() + h.sum())
    return h


@pytest.mark.parametrize(
    "lift",
    [
        lambda f: lambda x: fx.scan(lambda h, _: (f(h), None), length=3, state="carry")(x)[0],
        lambda f: lambda x: fx.scan(lambda h, _: (f(h), None), length=3)(x)[0],
        fx.remat,
        lambda f: fx.vmap(f, in_axes=None, axis_size=2),
    ],
    ids=["scan carry", "scan stack", "remat", "vmap"],
)
def test_the_inventory_lists_a_lifted_bodys_reads(lift):
    assert [r.kind for r in fx.effects_of(lift(counter), jnp.ones(2))] == ["state", "get", "set"]


@dataclasses.dataclass(frozen=True)
class Table(fx.Request):
    n: int = 4


class CachedTables(fx.Handler):
    """A run that builds a table once per run and answers it again: a cache of concrete values."""

    answers = (Table,)

    def begin(self):
        return _TablesRun()


class _TablesRun:
    def __init__(self):
        self.cache, self.asked = {}, 0

    def handle(self, request, forward):
        self.asked += 1
        if request.n not in self.cache:
            self.cache[request.n] = jnp.sin(jnp.arange(request.n, dtype=jnp.float32))
        return self.cache[request.n]


def table_layer(x):
    return x + send(Table(fx.current_path(), 4))


@pytest.mark.parametrize("lift", list(LIFTS))
def test_a_stateful_run_answering_a_request_of_its_own_is_asked_once_and_leaks_nothing(lift):
    """The learning pass asks the run at compile time and the real pass reuses its answer: the run's cache holds
    no tracer of the learning pass, and it sees the request once per lifted call, as `jax.checkpoint` gives."""
    x = jnp.zeros((1, 4))
    plain = fx.transform(table_layer).apply({}, x, handlers=[CachedTables()])
    t = fx.transform(LIFTS[lift](table_layer))
    out = t.apply({}, x, handlers=[CachedTables()])
    with fx.handle(CachedTables()) as (run,):
        LIFTS[lift](table_layer)(x)
    assert run.asked == 1 and not isinstance(run.cache[4], jax.core.Tracer)
    np.testing.assert_allclose(jax.jit(lambda x: t.apply({}, x, handlers=[CachedTables()]))(x), out, rtol=1e-6)
    if lift in ("remat", "vmap"):  # one application of the layer, as unlifted
        np.testing.assert_allclose(out.reshape(-1, 1, 4)[0], plain, rtol=1e-6)


@dataclasses.dataclass(frozen=True)
class Tick(fx.Request):
    pass


class CountsTicks(fx.Handler):
    """Answers the n-th tick of a run with n: a run that must see each request once."""

    def begin(self):
        return _TicksRun()


class _TicksRun:
    def __init__(self):
        self.ticks = 0

    def handle(self, request, forward):
        if isinstance(request, Tick):
            self.ticks += 1
            return jnp.float32(self.ticks)
        return forward(request)


class Ticking(fx.nn.Module):
    def __call__(self, x):
        return x * send(Tick(fx.current_path()))


def ticks_after_a_module_call(x):  # the run sees the module call, then a tick made inside it, then two more
    return Ticking()(x) + send(Tick(())) + send(Tick(()))


def test_a_request_made_while_the_run_answers_a_module_call_keeps_its_place():
    """The learning pass notes each request before asking the run, so the real pass meets them in the same order
    and every tick after the module call is given again, not asked twice."""
    x = jnp.ones(2)
    with fx.handle(CountsTicks()) as (plain,):
        expected = ticks_after_a_module_call(x)
    with fx.handle(CountsTicks()) as (lifted,):
        out = fx.remat(ticks_after_a_module_call)(x)
    assert plain.ticks == lifted.ticks == 3
    np.testing.assert_allclose(out, expected)
