"""State handlers: functional threading, frozen collections, checked writes."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx
from effax.handlers import FrozenState, FunctionalState


def counter():
    n = fx.local_state("n", lambda: jnp.zeros((), jnp.int32), collection="counts")
    n.set(n.get() + 1)
    return n.get()


def test_get_after_set_sees_set_and_updates_hold_whole_collection():
    stored = {"counts": {"n": jnp.array(5, jnp.int32), "other": jnp.ones(2)}}
    with fx.handle(FunctionalState(stored, mutable=True)) as (run,):
        assert counter() == 6
    up = run.updates()
    assert up["counts"]["n"] == 6
    np.testing.assert_array_equal(up["counts"]["other"], jnp.ones(2))
    assert stored["counts"]["n"] == 5  # the caller's tree is never written


def test_init_returns_initial_values_not_sets():
    t = fx.transform(counter)
    out, v = t.init_with_output(None)
    assert out == 1
    assert v == {"params": {}, "counts": {"n": 0}}


def test_frozen_collection_set_raises_with_fix():
    with fx.handle(FrozenState({"counts": {"n": jnp.array(0, jnp.int32)}})):
        with pytest.raises(fx.FrozenStateError, match=r"state `n`.*'counts' is frozen.*mutable=\['counts'\]"):
            counter()


def test_apply_frozen_by_default_and_missing_state_errors():
    t = fx.transform(counter)
    with pytest.raises(fx.FrozenStateError):
        t.apply({"counts": {"n": jnp.array(0, jnp.int32)}})
    with pytest.raises(fx.MissingVariableError, match=r"no state `n` in collection 'counts'.*mutable=\['counts'\]"):
        t.apply({})


def test_missing_state_is_created_when_mutable():
    out, up = fx.transform(counter).apply({}, mutable="counts")
    assert out == 1 and up == {"counts": {"n": 1}}


def test_init_called_only_when_missing():
    calls = []

    def f():
        fx.local_state("s", lambda: calls.append(1) or jnp.zeros(2))

    fx.transform(f).apply({"state": {"s": jnp.ones(2)}}, mutable=True)
    assert calls == []


def test_set_keeps_structure_shape_and_dtype():
    def f(value):
        fx.local_state("s", lambda: jnp.zeros(()), collection="c").set(value)

    t = fx.transform(f)
    with pytest.raises(fx.ShapeMismatchError, match=r"state `s`.*float32\[\].*float32\[3\]"):
        t.apply({}, jnp.zeros(3), mutable=True)
    with pytest.raises(fx.ShapeMismatchError, match=r"int32"):
        t.apply({}, jnp.zeros((), jnp.int32), mutable=True)
    with pytest.raises(fx.ShapeMismatchError):
        t.apply({}, {"a": jnp.zeros(())}, mutable=True)
    _, up = t.apply({}, 3, mutable=True)  # weakly typed Python scalars are cast
    assert up["c"]["s"].dtype == jnp.float32 and up["c"]["s"] == 3.0


def test_params_collection_is_reserved():
    with pytest.raises(fx.InvalidNameError, match="reserved"):
        fx.transform(lambda: fx.local_state("s", lambda: 0.0, collection="params")).init(None)
    with pytest.raises(fx.InvalidNameError, match="never mutable"):
        fx.transform(lambda: 0).apply({}, mutable=["params"])


def test_state_effect_belongs_to_its_creation_path():
    def f():
        with fx.scope("a"):
            s = fx.local_state("s", lambda: jnp.zeros(()))
        with fx.scope("b"):
            s.set(s.get() + 1.0)
        return s.get()

    out, up = fx.transform(f).apply({}, mutable=True)
    assert out == 1.0 and up == {"state": {"a": {"s": 1.0}}}


def test_unhandled_state_says_how():
    with pytest.raises(fx.UnhandledEffectError, match=r"state `s`.*mutable"):
        fx.local_state("s", lambda: 0.0)


def test_frozen_state_read_only_is_equal_to_mutable_when_nothing_set():
    def f():
        return fx.local_state("s", lambda: jnp.ones(2)).get() * 2

    v = {"state": {"s": jnp.full(2, 3.0)}}
    t = fx.transform(f)
    np.testing.assert_array_equal(t.apply(v), t.apply(v, mutable=True)[0])


def test_jitted_set_and_get():
    t = fx.transform(counter)
    v = t.init(None)
    out, up = jax.jit(lambda v: t.apply(v, mutable=True))(v)
    assert out == 1 and up["counts"]["n"] == 1


def test_dict_valued_state_can_be_set_and_read():
    def f():
        s = fx.local_state("opt", lambda: {"m": jnp.zeros(2), "v": jnp.ones(2)})
        s.set({"m": s.get()["m"] + 1, "v": s.get()["v"]})
        return s.get()["m"]

    t = fx.transform(f)
    v = t.init(None)
    out, up = t.apply(v, mutable=True)
    np.testing.assert_array_equal(out, jnp.ones(2))
    assert set(up["state"]["opt"]) == {"m", "v"}
    assert fx.check_variables(t, v).ok


def test_state_name_is_leaf_or_scope_never_both():
    def f():
        fx.local_state("a", lambda: 0.0)
        with fx.scope("a"):
            fx.local_state("b", lambda: 0.0)

    with pytest.raises(fx.ParamConflictError, match=r"`a` in collection 'state' is a leaf.*`a/b`"):
        fx.transform(f).init(None)


def test_a_stored_variable_read_as_a_scope_and_a_leaf_in_one_run_is_refused():
    # `a/b` is a stored leaf (only noted, the fast path); declaring `a` itself afterwards must still clash
    def f():
        with fx.scope("a"):
            fx.local_state("b", lambda: 0.0)
        return fx.local_state("a", lambda: 0.0).get()

    for mutable in (False, True):
        with pytest.raises(fx.ParamConflictError, match=r"`a` in collection 'state' is a scope"):
            fx.transform(f).apply({"state": {"a": {"b": 1.0}}}, mutable=mutable)


@pytest.mark.parametrize("scope_first", [True, False])
def test_a_stored_scope_declared_as_a_variable_clashes_with_its_own_variables(scope_first):
    # either order: `a` (stored as a scope, a dict or another mapping) read as a variable, and `a/b`
    def f():
        def inner():
            with fx.scope("a"):
                fx.local_state("b", lambda: 0.0)

        if not scope_first:
            inner()
        fx.local_state("a", lambda: 0.0)
        if scope_first:
            inner()

    for stored in ({"a": {"b": 1.0}}, types.MappingProxyType({"a": types.MappingProxyType({"b": 1.0})})):
        with pytest.raises(fx.ParamConflictError, match=r"`a` in collection 'state' is a"):
            fx.transform(f).apply({"state": stored})


def test_abstract_state_outside_eval_shape_is_refused_by_path():
    """A state read from `jax.eval_shape(t.init)`'s variables reached the model as a ShapeDtypeStruct."""
    t, x = fx.transform(lambda x: fx.nn.BatchNorm()(x)), jnp.ones((2, 3))
    abstract = jax.eval_shape(t.init, jax.random.key(0), x)
    real = t.init(jax.random.key(0), x)
    with pytest.raises(fx.MissingVariableError, match=r"state `BatchNorm_0/mean` in collection 'batch_stats': "
                                                      r"variables\['batch_stats'\] holds abstract values"):
        t.apply({**real, "batch_stats": abstract["batch_stats"]}, x, training=False)
    pair = fx.transform(lambda: fx.local_state("s", lambda: (jnp.zeros(2), jnp.ones(()))).get())
    with pytest.raises(fx.MissingVariableError, match=r"state `s`.*abstract values"):  # inside a tree too
        pair.apply({"state": {"s": (jax.ShapeDtypeStruct((2,), jnp.float32), jnp.ones(()))}})
    assert jax.eval_shape(lambda v: t.apply(v, x, training=True, mutable=True), abstract)[0].shape == (2, 3)
    assert t.apply(real, x, training=False).shape == (2, 3)


def test_state_variables_that_are_not_dicts_are_refused():
    """`FunctionalState(3)` was an AttributeError `'int' object has no attribute 'items'`."""
    with pytest.raises(fx.EffaxError, match=r"FunctionalState takes the variables by collection.*got int 3"):
        FunctionalState(3)
    with pytest.raises(fx.EffaxError, match=r"FrozenState takes the variables by collection.*got list"):
        FrozenState([1])
    with pytest.raises(fx.EffaxError, match=r"variables\['counts'\] is Array float32\[3\], not a dict"):
        FunctionalState({"counts": jnp.ones(3)})
    with fx.handle(FunctionalState({"counts": {"n": jnp.array(1, jnp.int32)}})):
        assert counter() == 2


def test_an_init_taking_arguments_is_refused_with_the_fix():
    """Flax's `self.variable(c, name, init_fn, shape)` habit: a raw TypeError from the state handler."""

    def model(x, init):
        return x + fx.local_state("mean", init, collection="batch_stats").get()

    x = jnp.ones((2, 3))
    t = fx.transform(lambda x: model(x, lambda shape: jnp.zeros(shape)))
    fix = r"close over the shape: `lambda: jnp.zeros\(shape\)`"
    with pytest.raises(fx.EffaxError, match=r"state `mean` in collection 'batch_stats': its init <lambda> cannot be "
                                            r"called as `init\(\)`.*" + fix):
        t.init(jax.random.key(0), x)
    shape = x.shape[-1:]
    fixed = fx.transform(lambda x: model(x, lambda: jnp.zeros(shape)))  # the fix
    assert fixed.init(jax.random.key(0), x)["batch_stats"]["mean"].shape == (3,)
    step = lambda c, _: (model(c, lambda shape: jnp.zeros(shape)), None)  # noqa: E731
    scanned = fx.transform(lambda x: fx.scan(step, length=2)(x, None))
    with pytest.raises(fx.EffaxError, match=r"state `mean`.*" + fix):  # where a lifted body makes it too
        scanned.init(jax.random.key(0), x)


@pytest.mark.parametrize(("init", "said"), [
    (lambda: "not an array", r"returned str 'not an array', but state is a pytree of arrays"),
    (lambda: None, r"returned None \(a forgotten `return`\?\)"),
    (lambda: (jnp.zeros(2), None), r"returned None .* in its tree"),
])
def test_an_init_value_that_is_not_arrays_is_refused(init, said):
    """`init()` returning a str or None was stored silently."""
    with pytest.raises(fx.EffaxError, match=r"state `s` in collection 'state': its init\(\) " + said):
        fx.transform(lambda: fx.local_state("s", init)).init(None)


def test_numbers_and_numpy_values_are_state():
    def model():
        for name, init in [("n", lambda: 0), ("f", lambda: 1.5), ("np", lambda: np.zeros(2)), ("t", lambda: {})]:
            fx.local_state(name, init)

    assert sorted(fx.transform(model).init(None)["state"]) == ["f", "n", "np", "t"]


def test_one_state_declared_twice_with_other_shapes_is_a_conflict():
    """The second declaration silently got the first's value; `fx.param` raises ParamConflictError for the same."""

    def model(n):
        fx.local_state("count", lambda: jnp.zeros(2))
        return fx.local_state("count", lambda: jnp.zeros(n)).get()

    with pytest.raises(fx.ParamConflictError, match=r"state `count` in collection 'state' is declared twice in one run "
                                                    r"with `init\(\)`s that disagree: first float32\[2\], now "
                                                    r"float32\[3\].*another name"):
        fx.transform(lambda: model(3)).init(None)
    assert fx.transform(lambda: model(2)).init_with_output(None)[0].shape == (2,)  # agreeing inits: one variable

    def renamed():  # the fix
        fx.local_state("count", lambda: jnp.zeros(2))
        return fx.local_state("count_b", lambda: jnp.zeros(3)).get()

    assert fx.transform(renamed).init_with_output(None)[0].shape == (3,)


def _cache(axes=("batch", "kv"), init=lambda: jnp.zeros((2, 3))):
    return fx.local_state("cache", init, collection="cache", axes=axes)


def test_state_axes_reach_the_summary_and_the_mesh_shardings():
    """A decode cache names its dimensions as a param does (Flax boxes a cache with `with_logical_partitioning`);
    they used to have nowhere to go, so every cache was replicated."""
    from jax.sharding import PartitionSpec as P

    def model(x):
        c = _cache()
        c.set(c.get() + x)
        fx.local_state("n", lambda: jnp.zeros((), jnp.int32), collection="cache")
        return x

    t, x = fx.transform(model), jnp.ones((2, 3))
    s = fx.summary(t, x)
    assert s.logical_axes() == {"params": {}, "cache": {"cache": P("batch", "kv"), "n": P()}}
    assert "axes (batch, kv)" in str(s)
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    shardings = fx.sharding.logical_to_mesh(s, mesh, [("batch", "data"), ("kv", "model")])
    assert shardings["cache"]["cache"].spec == P("data", "model")
    v = jax.jit(t.init, out_shardings=shardings)(None, x)
    np.testing.assert_array_equal(v["cache"]["cache"], jnp.zeros((2, 3)))
    np.testing.assert_array_equal(t.apply(v, x, mutable=True)[1]["cache"]["cache"], x)


@pytest.mark.parametrize(("axes", "init", "error", "said"), [
    ("batch", lambda: jnp.zeros(2), fx.InvalidNameError, r"state `cache`: `axes` must be a tuple of names, got str"),
    (("batch", 3), lambda: jnp.zeros(2), fx.InvalidNameError, r"state `cache`: `axes=\('batch', 3\)` holds int 3"),
    (("batch", "kv"), lambda: jnp.zeros(2), fx.ShapeMismatchError,
     r"state `cache` in collection 'cache' has 1 dims \(2,\) but 2 logical axes \('batch', 'kv'\)"),
    (("batch",), lambda: {"k": jnp.zeros(2)}, fx.EffaxError,
     r"has axes=\('batch',\), but its init\(\) made a dict of 1 array\(s\), not one array.*own `fx.local_state`"),
])
def test_state_axes_that_do_not_name_one_array_are_refused(axes, init, error, said):
    with pytest.raises(error, match=said):
        fx.transform(lambda: _cache(axes, init)).init(None)


def test_one_state_declared_twice_with_other_axes_is_a_conflict():
    """As two `axes=` of one param: first-wins would make its sharding depend on call order."""
    def model(second):
        _cache(("batch", "kv"))
        _cache(second)

    with pytest.raises(fx.ParamConflictError, match=r"declared twice in one run with different logical axes: first "
                                                    r"axes=\('batch', 'kv'\), now axes=\('kv', 'batch'\)"):
        fx.transform(model).init(None, ("kv", "batch"))
    for agreeing in [("batch", "kv"), None]:
        fx.transform(model).init(None, agreeing)


def test_a_state_declared_in_a_loop_is_compared_without_tracing_its_init(monkeypatch):
    """A layer called n times declares its state with a new closure per call; comparing the inits by
    tracing them cost two `jax.eval_shape`s a call (32 ms for 50 calls). One function capturing equal
    shapes and dtypes makes the same value; other captured shapes are still a conflict."""
    from effax.handlers import _state

    traced, original = [], _state._made_by
    monkeypatch.setattr(_state, "_made_by", lambda init: traced.append(init) or original(init))

    def model(sizes):
        for n in sizes:
            fx.local_state("count", lambda n=n: jnp.zeros((n,), jnp.float32)).get()

    fx.transform(model).init(None, [3] * 5)
    assert traced == []
    with pytest.raises(fx.ParamConflictError, match=r"first float32\[3\], now float32\[4\]"):
        fx.transform(model).init(None, [3, 4])
    assert len(traced) == 2


def _reads_reaching_storage(monkeypatch):
    """Count the `GetStateRequest`s the storage's run is sent (a read it answered ahead is not)."""
    from effax.handlers._state import _StateRun

    seen, handle, answer_now = [], _StateRun.handle, _StateRun.answer_now

    def note(request):
        if type(request) is fx.GetStateRequest and not any(r is request for r in seen):
            seen.append(request)

    def counting(self, request, forward):
        note(request)
        return handle(self, request, forward)

    def counting_now(self, request):  # the same run, answering in place
        note(request)
        return answer_now(self, request)

    monkeypatch.setattr(_StateRun, "handle", counting)
    monkeypatch.setattr(_StateRun, "answer_now", counting_now)
    return seen


def stats():
    mean = fx.local_state("mean", lambda: jnp.zeros(2), collection="batch_stats")
    return mean.get() + mean.get()


def test_a_frozen_variable_is_read_once_at_its_declaration(monkeypatch):
    # eval: the collection is frozen, so the value the declaration found is every read's answer
    v = {"batch_stats": {"mean": jnp.ones(2)}}
    seen = _reads_reaching_storage(monkeypatch)
    np.testing.assert_array_equal(fx.transform(stats).apply(v), 2 * jnp.ones(2))
    assert seen == []
    # mutable: each read is asked, as a `set` may come between
    out, _ = fx.transform(stats).apply(v, mutable=["batch_stats"])
    np.testing.assert_array_equal(out, 2 * jnp.ones(2))
    assert [r.path for r in seen] == [("mean",), ("mean",)]


class _Doubled(fx.Handler):
    answers = (fx.GetStateRequest,)

    def handle(self, request, forward):
        return 2 * forward(request)


def test_a_read_ahead_never_skips_a_handler_that_answers_reads():
    v = {"batch_stats": {"mean": jnp.ones(2)}}

    def model():
        mean = fx.local_state("mean", lambda: jnp.zeros(2), collection="batch_stats")
        with fx.handle(_Doubled()):  # installed after the declaration: the read goes through it
            inside = mean.get()
        return mean.get(), inside

    t = fx.transform(model)
    outside, inside = t.apply(v)
    np.testing.assert_array_equal(outside, jnp.ones(2))
    np.testing.assert_array_equal(inside, 2 * jnp.ones(2))
    # installed around the whole model (inside the storage): every read goes through it
    np.testing.assert_array_equal(fx.transform(stats).apply(v, handlers=[_Doubled()]), 4 * jnp.ones(2))


def test_a_handle_kept_from_one_apply_reads_where_it_is_used():
    kept = []

    def model():
        kept.append(fx.local_state("mean", lambda: jnp.zeros(2), collection="batch_stats"))
        return kept[0].get()

    t = fx.transform(model)
    t.apply({"batch_stats": {"mean": jnp.ones(2)}})
    with pytest.raises(fx.UnhandledEffectError):  # outside any run, as before
        kept[0].get()
    with fx.handle(FrozenState({"batch_stats": {"mean": 3 * jnp.ones(2)}})):
        np.testing.assert_array_equal(kept[0].get(), 3 * jnp.ones(2))
