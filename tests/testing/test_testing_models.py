"""effax.testing.models: models as data, their interpreter, listing and derived models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx
from effax.testing import models as M
from effax.testing.models import Draw, Mode, Model, Param, Scope, SideInput, Sow, State

MODEL = Model(
    [
        Scope("blk0", [Param("w0", (2, 3), "bfloat16"), State("s0", "stats", (2,), "twice"), Draw("noise")]),
        Sow("h0"),
        SideInput("mask", 2.0),
        Mode(),
    ],
    in_size=3,
)


def test_repr_lists_the_requests_in_order_with_their_paths():
    assert repr(MODEL) == (
        "Model(in_size=3), 6 requests in order:\n"
        "  param        blk0/w0  shape (2, 3) bfloat16, init normal\n"
        "  local_state  blk0/s0  in 'stats', shape (2,), get, set, set, get, get\n"
        "  next_key     blk0     stream 'noise'\n"
        "  sow          h0       into 'intermediates'\n"
        "  side_input   <root>   tag 'mask', default 2.0\n"
        "  is_training  <root>"
    )
    assert repr(Model([], in_size=1)) == "Model(in_size=1), 0 requests (none)"


def test_code_rebuilds_the_model():
    assert eval(MODEL.code(), vars(M)) == MODEL


def test_running_the_model_makes_the_variables_it_describes():
    t = fx.transform(MODEL)
    out, variables = t.init_with_output(jax.random.key(0), jnp.ones(3))
    assert out.shape == (3,) and out.dtype == jnp.float32
    assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == jax.tree.map(
        lambda a: (a.shape, a.dtype), MODEL.variable_specs()
    )
    assert variables["stats"]["blk0"]["s0"].tolist() == [0.5, 0.5]


def test_every_answer_reaches_the_output():
    t = fx.transform(MODEL)
    x, key = jnp.ones(3), jax.random.key(0)
    variables = t.init(key, x)
    base, _ = t.apply(variables, x, rngs=key, mutable=True, training=False)
    changed = [
        t.apply({**variables, "params": jax.tree.map(lambda w: w + 1, variables["params"])}, x, rngs=key, mutable=True,
                training=False),
        t.apply({**variables, "stats": jax.tree.map(lambda s: s + 1, variables["stats"])}, x, rngs=key, mutable=True,
                training=False),
        t.apply(variables, x, rngs=jax.random.key(1), mutable=True, training=False),
        t.apply(variables, x, rngs=key, mutable=True, training=True),
        t.apply(variables, x, rngs=key, mutable=True, training=False, handlers=[fx.handlers.SideInputs({"mask": 0.0})]),
    ]
    for out, _ in changed:
        assert not np.allclose(out, base)


def test_the_last_of_two_sets_is_what_the_state_keeps():
    model = Model([State("s0", update="twice")], in_size=1)
    t = fx.transform(model)
    x = jnp.array([2.0])
    out, updates = t.apply(t.init(None, x), x, mutable=True)
    # h = x + 0.5 = 2.5; first set 0.5 + h; second set 0.5 * 0.5 + 0.25 * h; output reads the last one twice
    assert updates["state"]["s0"].tolist() == pytest.approx(0.875)
    assert out.tolist() == pytest.approx([2.5 + 0.875 + 0.5 * 0.875])


def test_a_draw_of_several_keys_draws_them_at_one_path():
    model = Model([Scope("blk0", [Draw("noise", times=3)])], in_size=1)
    assert model.requests() == ["next_key     blk0  stream 'noise', 3 draws"]
    seen = []

    class Record(fx.Handler):
        def handle(self, request, forward):
            seen.append((type(request).__name__, request.path))
            return forward(request)

    with fx.handle(fx.handlers.KeysFromRngs(jax.random.key(0)), Record()):
        model(jnp.zeros(1))
    assert seen == [("RandomRequest", ("blk0",))] * 3


def test_walk_visits_scopes_before_their_children_with_paths():
    assert [(path, type(step).__name__) for path, step in MODEL.walk()] == [
        ((), "Scope"), (("blk0",), "Param"), (("blk0",), "State"), (("blk0",), "Draw"),
        ((), "Sow"), ((), "SideInput"), ((), "Mode"),
    ]


def test_drop_keeps_the_paths_of_what_stays_and_a_dropped_scope_takes_its_children():
    assert MODEL.drop([1, 4]).requests() == [r for i, r in enumerate(MODEL.requests()) if i not in (0, 3)]
    assert MODEL.drop([0]).effects() == {"sow", "side_input", "mode"}


def test_without_removes_the_named_effects_and_read_only_removes_sets():
    assert MODEL.without("param", "random").effects() == {"state", "sow", "side_input", "mode"}
    assert "set" not in " ".join(MODEL.read_only().requests())
    t = fx.transform(MODEL.read_only())
    variables = t.init(jax.random.key(0), jnp.ones(3))
    t.apply(variables, jnp.ones(3), rngs=jax.random.key(0), training=False)  # frozen state: no set, no error


def test_param_specs_and_effects():
    assert MODEL.param_specs() == {("blk0", "w0"): ((2, 3), "bfloat16")}
    assert MODEL.effects() == set(M.EFFECTS)


def test_a_stream_key_step_adds_noise_from_the_streams_base_key():
    model = Model([Scope("blk0", [M.StreamKey("noise")])], in_size=2)
    assert model.requests() == ["stream_key   blk0  stream 'noise'"]
    t = fx.transform(model)
    out = t.apply({}, jnp.zeros(2), rngs={"noise": jax.random.key(0)})
    with fx.handle(fx.handlers.KeysFromRngs({"noise": jax.random.key(0)})), fx.scope("blk0"):
        base = fx.stream_key("noise")
    assert np.allclose(out, jax.random.uniform(base, (2,)))


def test_a_state_keeps_its_dtype_and_structure_through_its_sets():
    model = Model([State("s0", dtype="int32", update="twice"), State("s1", dtype="bfloat16", tree=True)], in_size=1)
    assert model.requests() == [
        "local_state  s0  in 'state', shape () int32, get, set, set, get, get",
        "local_state  s1  in 'state', dict of mean (shape () bfloat16) and count (shape () int32), get, set, get, get",
    ]
    t = fx.transform(model)
    variables = t.init(None, jnp.zeros(1))
    assert jax.tree.map(lambda a: a.dtype.name, variables) == jax.tree.map(
        lambda s: s.dtype.name, model.variable_specs()
    ) == {"params": {}, "state": {"s0": "int32", "s1": {"count": "int32", "mean": "bfloat16"}}}
    _, updates = t.apply(variables, jnp.zeros(1), mutable=True)
    assert int(updates["state"]["s0"]) == 1 + 2 and int(updates["state"]["s1"]["count"]) == 1  # counters step


def test_draws_keep_the_model_s_float32_under_x64():
    """`jax.random.uniform`'s default is float64 under x64: the kit's own model changed a scan carry's dtype, so
    the lifting law reported every key handler (and the built-ins alone) as "could not be checked"."""
    from effax.testing import laws
    from effax.testing.models import StreamKey

    with jax.enable_x64(True):
        model = Model([Draw(), StreamKey()], in_size=1)
        out = fx.transform(model).apply({}, jnp.zeros(1, jnp.float32), rngs=jax.random.key(0))
        assert out.dtype == jnp.float32
        laws.check_lifting(Model([Draw()], in_size=1), np.zeros(1, np.float64), jax.random.key(0), None,
                           context="scan")
