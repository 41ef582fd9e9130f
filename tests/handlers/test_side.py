"""Side inputs, sown side outputs and the mode handler."""

import jax.numpy as jnp
import pytest

import effax as fx
from effax.handlers import CollectSown, Mode, SideInputs


def test_side_input_from_handler_else_default_else_error():
    with fx.handle(SideInputs({"mask": 1})):
        assert fx.side_input("mask") == 1
        assert fx.side_input("other", default=2) == 2
    with pytest.raises(fx.UnhandledEffectError, match=r"side input 'ctx'.*SideInputs\(\{'ctx': value\}\)"):
        fx.side_input("ctx")


def test_side_inputs_through_apply_handlers():
    t = fx.transform(lambda x: x * fx.side_input("scale"))
    assert t.apply({}, 2.0, handlers=[SideInputs({"scale": 3.0})]) == 6.0


def test_sow_is_noop_without_collector_and_appends_with_one():
    def f():
        with fx.scope("block"):
            fx.sow("h", 1.0)
            fx.sow("h", 2.0)
        fx.sow("loss", 3.0, collection="losses")
        return 0

    f()  # nothing collects: no error
    t = fx.transform(f)
    assert t.apply({}) == 0
    _, up = t.apply({}, mutable="intermediates")
    assert up == {"intermediates": {"block": {"h": (1.0, 2.0)}}}
    _, up = t.apply({}, mutable=True)
    assert up == {"intermediates": {"block": {"h": (1.0, 2.0)}}, "losses": {"loss": (3.0,)}}


def test_sow_starts_fresh_each_run_even_if_variables_hold_old_sows():
    t = fx.transform(lambda: fx.sow("h", 1.0))
    _, up = t.apply({}, mutable=True)
    _, up2 = t.apply(up, mutable=True)
    assert up2 == {"intermediates": {"h": (1.0,)}}


def test_init_returns_no_sown_values():
    v = fx.transform(lambda: fx.sow("h", 1.0)).init(None)
    assert v == {"params": {}}


def test_collection_with_state_and_sows_conflicts():
    def f():
        fx.local_state("s", lambda: 0.0, collection="c")
        fx.sow("h", 1.0, collection="c")

    with pytest.raises(fx.ParamConflictError, match="'c' holds local state and sown values"):
        fx.transform(f).apply({}, mutable=True)


def test_collect_sown_handler_filters_collections():
    with fx.handle(CollectSown("a")) as (run,):
        fx.sow("x", 1, collection="a")
        fx.sow("y", 2, collection="b")
    assert run.collections() == {"a": {"x": (1,)}}


def test_mode_and_unhandled_mode_message():
    with fx.handle(Mode(True)):
        assert fx.is_training() is True
    with pytest.raises(fx.UnhandledEffectError, match=r"is_training.*training=True"):
        fx.is_training()
    with pytest.raises(fx.EffaxError, match="True or False"):
        Mode(jnp.array(1))


def test_side_inputs_take_a_dict_and_sows_are_told_which_collection_fits():
    with pytest.raises(fx.EffaxError, match="SideInputs takes a dict .tag: value., got list"):
        fx.handlers.SideInputs(["mask"])
    with pytest.raises(fx.InvalidNameError, match="collection='intermediates' or 'losses'"):
        fx.sow("h", 1.0, collection="params")
