"""Every name an effect takes is a non-empty string without '/'."""

import jax
import pytest

import effax as fx

ops = {
    "param": lambda n: fx.param(n, jax.nn.initializers.zeros, (1,)),
    "state": lambda n: fx.local_state(n, lambda: 0.0),
    "state collection": lambda n: fx.local_state("s", lambda: 0.0, collection=n),
    "stream": lambda n: fx.next_key(n),
    "random_stream": lambda n: fx.random_stream(n),
    "stream_key": lambda n: fx.stream_key(n),
    "side input tag": lambda n: fx.side_input(n, default=None),
    "sow tag": lambda n: fx.sow(n, 1.0),
    "sow collection": lambda n: fx.sow("t", 1.0, collection=n),
}


@pytest.mark.parametrize("op", sorted(ops))
@pytest.mark.parametrize("bad", ["", "a/b", 7])
def test_bad_names_raise_invalid_name_error(op, bad):
    with pytest.raises(fx.InvalidNameError):
        ops[op](bad)


def test_sow_may_not_use_params_collection():
    with pytest.raises(fx.InvalidNameError, match="reserved for `fx.param`"):
        fx.sow("t", 1.0, collection="params")


def test_request_is_frozen_and_describes_itself():
    r = fx.ParamRequest(("a", "b"), jax.nn.initializers.zeros, (2,), jax.numpy.float32)
    with pytest.raises(AttributeError):
        r.path = ()
    assert r.describe() == "param `a/b` (shape (2,), float32)"
    assert r.name == "a/b"
