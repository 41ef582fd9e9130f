"""fx.effects_of: every request a model performs, found abstractly."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import effax as fx
from effax.core import send

INIT = jax.nn.initializers.normal(1.0)


def model(x):
    with fx.scope("dense"):
        w = fx.param("kernel", INIT, (x.shape[-1], 4), axes=("in", "out"))
    n = fx.local_state("count", lambda: jnp.zeros((), jnp.int32), collection="stats")
    n.set(n.get() + 1)
    with fx.scope("drop"):
        k = fx.next_key("dropout")
        base = fx.stream_key("dropout")
    scale = fx.side_input("scale", default=1.0)
    y = x @ w * scale
    fx.sow("h", y)
    if fx.is_training():
        y = y + jax.random.normal(k, y.shape) + jax.random.key_data(base).sum()
    return y


X = jax.ShapeDtypeStruct((8, 3), jnp.float32)


def test_every_request_with_kind_path_shape_dtype_and_where():
    effects = fx.effects_of(model, X)
    rows = [(e.kind, e.name, e.shape, e.dtype, e.collection, e.stream, e.tag) for e in effects]
    key = jax.eval_shape(lambda: jax.random.key(0)).dtype
    assert rows == [
        ("param", "dense/kernel", (3, 4), "float32", "params", None, None),
        ("state", "count", (), "int32", "stats", None, None),
        ("get", "count", (), "int32", "stats", None, None),
        ("set", "count", (), "int32", "stats", None, None),
        ("key", "drop", (), key, None, "dropout", None),
        ("stream_key", "drop", (), key, None, "dropout", None),
        ("side_input", "<root>", (), "float32", None, None, "scale"),
        ("sow", "<root>", (8, 4), "float32", "intermediates", None, "h"),
        ("mode", "<root>", None, None, None, None, None),
    ]
    assert all(isinstance(e, fx.RequestRecord) for e in effects)
    assert effects[0].request.axes == ("in", "out")
    assert effects[0].dtype == jnp.float32  # a real dtype, not only a name


def test_runs_abstractly_with_no_parameter_memory():
    seen = []

    def spy(x):
        w = fx.param("w", INIT, (1000, 1000))
        seen.append((isinstance(w, jax.core.Tracer), isinstance(x, jax.core.Tracer)))
        return x

    effects = fx.effects_of(spy, jnp.ones(3))
    assert seen == [(True, True)]  # traced under jax.eval_shape: nothing was computed
    assert effects[0].size == 1_000_000


def test_python_values_stay_static():
    def layers(x, n):
        for i in range(n):  # needs a Python int
            with fx.scope(f"l{i}"):
                x = x * fx.param("g", INIT, (3,))
        return x

    effects = fx.effects_of(layers, X, 3)
    assert [e.name for e in effects] == ["l0/g", "l1/g", "l2/g"]
    assert [e.name for e in fx.effects_of(layers, X, n=2)] == ["l0/g", "l1/g"]


def test_accepts_a_transform():
    assert [e.kind for e in fx.effects_of(fx.transform(model), X)][:2] == ["param", "state"]


def test_training_changes_the_run():
    def f():
        if fx.is_training():
            fx.next_key("dropout")

    assert fx.effects_of(f).of_kind("key") == []
    assert len(fx.effects_of(f, training=True).of_kind("key")) == 1


def test_rngs_dict_must_name_the_streams():
    with pytest.raises(fx.MissingRngError, match="dropout"):
        fx.effects_of(model, X, rngs={"params": jax.random.key(0)})


def test_handlers_answer_side_inputs():
    def f():
        return fx.side_input("mask")

    with pytest.raises(fx.UnhandledEffectError):
        fx.effects_of(f)
    (e,) = fx.effects_of(f, handlers=[fx.handlers.SideInputs({"mask": jnp.ones((2, 5), bool)})])
    assert (e.kind, e.shape, e.dtype) == ("side_input", (2, 5), "bool")


def test_tied_params_name_the_binding_that_resolved_them():
    def encdec(x):
        with fx.scope("encoder"), fx.scope("embed"):
            table = fx.param("table", INIT, (5, 3))
        with fx.scope("decoder"), fx.scope("embed"):
            table2 = fx.param("table", INIT, (5, 3))
        return table[x] @ table2.T

    effects = fx.effects_of(fx.share(encdec, {"decoder/embed": "encoder/embed"}), jnp.array([1, 2]))
    first, second = effects
    assert (first.name, first.origin, first.binding) == ("encoder/embed/table", None, None)
    assert second.name == "encoder/embed/table"
    assert second.origin == ("decoder", "embed", "table")
    assert second.binding == "decoder/embed -> encoder/embed"
    assert "decoder/embed -> encoder/embed (asked at decoder/embed/table)" in str(effects)


def test_tags_show_as_bound_or_unbound():
    def f():
        with fx.scope("a"):
            fx.param("t", INIT, (2,), shared="emb")

    (unbound,) = fx.effects_of(f)
    assert unbound.tag == "emb" and unbound.binding is None
    assert "shared='emb' (unbound)" in str(fx.effects_of(f))
    (bound,) = fx.effects_of(fx.share(f, tags=True))
    assert bound.name == "emb" and bound.origin == ("a", "t") and bound.binding == "shared='emb' -> emb"


def test_shared_state_names_its_binding():
    def f():
        for name in ("a", "b"):
            with fx.scope(name):
                fx.local_state("s", lambda: jnp.zeros(2))

    effects = fx.effects_of(fx.share(f, {"b": "a"}, state="allowed"))
    assert [(e.kind, e.name, e.origin, e.binding) for e in effects] == [
        ("state", "a/s", None, None),
        ("state", "a/s", ("b", "s"), "b -> a"),
    ]


def test_tree_valued_state_keeps_its_structure():
    def f():
        fx.local_state("s", lambda: {"m": jnp.zeros(2), "v": jnp.zeros((), jnp.int32)})

    (e,) = fx.effects_of(f)
    assert e.shape is None and e.dtype is None and e.size is None
    assert e.structure == {"m": jax.ShapeDtypeStruct((2,), jnp.float32), "v": jax.ShapeDtypeStruct((), jnp.int32)}


def test_table_lists_one_line_per_request():
    text = repr(fx.effects_of(model, X))
    lines = text.splitlines()
    assert lines[0].split() == ["kind", "path", "shape", "dtype", "collection/stream", "shared", "via"]
    assert len(lines) == 10
    assert "dense/kernel" in lines[1] and "(3, 4)" in lines[1] and "params" in lines[1]
    assert "intermediates:h" in text and "dropout" in text


def test_of_kind_and_size_for_summaries():
    effects = fx.effects_of(model, X)
    params = effects.of_kind("param")
    assert isinstance(params, fx.Inventory) and [e.name for e in params] == ["dense/kernel"]
    assert sum(e.size for e in params) == 12
    assert len(effects.of_kind("get", "set")) == 2


@dataclasses.dataclass(frozen=True)
class Ping(fx.Request):
    pass


class Pong(fx.Handler):
    def handle(self, r, forward):
        return "pong" if isinstance(r, Ping) else forward(r)


def test_unknown_request_kinds_are_listed_by_type_name():
    (e,) = fx.effects_of(lambda: send(Ping(("here",))), handlers=[Pong()])
    assert (e.kind, e.name, e.shape) == ("Ping", "here", None)


@pytest.mark.parametrize("lift", ["scan_param", "scan_dense", "remat"])
def test_records_of_a_lifted_model_hold_no_tracer_of_the_abstract_run(lift):
    # law 8: a lift's learning pass (module calls it noted) and the params it made (their `Constant`
    # initializers) kept the abstract run's tracers in the records
    def body(h, _):
        if lift == "scan_dense":
            return fx.nn.Dense(3)(h), None
        return h @ fx.param("w", jax.nn.initializers.ones, (3, 3)), None

    if lift == "remat":
        t = fx.transform(lambda x: fx.remat(lambda h: body(h, None)[0])(x))
    else:
        t = fx.transform(lambda x: fx.scan(body, 2)(x, None)[0])
    x = jnp.ones((2, 3))
    with jax.checking_leaks():
        records = fx.effects_of(t, x)
        fx.summary(t, x)
    for r in records:
        assert not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(vars(r.request)))
