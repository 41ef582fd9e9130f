"""Law 11, fresh keys: no two `next_key` draws of one run are equal, across paths, streams and draws."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import effax as fx
from effax.testing import laws
from effax.testing import strategies as s


@given(s.models_and_inputs(require=("random", "random", "random")), s.keys(), s.trainings())
def test_no_two_draws_of_a_run_repeat(model_and_x, key, training):
    model, x = model_and_x
    laws.check_fresh_keys(model, x, key, training=training)


@given(
    st.sampled_from(["scan", "vmap"]), st.integers(1, 4), st.integers(1, 4), st.sampled_from(s.STREAMS),
    st.lists(st.sampled_from(["blk", "mod"]), max_size=2), s.keys(),
)
def test_stream_keys_in_a_lifted_body_never_repeat_a_draw_outside(lift, n, draws, stream, scopes, key):
    """A body's per-iteration `stream_key` is no `next_key` drawn at the same path outside the transform."""

    def body(c, _=None):
        data = jax.random.key_data(fx.stream_key(stream))
        return (c, data) if lift == "scan" else data

    def model():
        with contextlib.ExitStack() as at:
            for name in scopes:
                at.enter_context(fx.scope(name))
            inside = fx.scan(body, length=n)(0)[1] if lift == "scan" else fx.vmap(body, in_axes=None, axis_size=n)(0)
            outside = [jax.random.key_data(fx.next_key(stream)) for _ in range(draws)]
        return inside, jnp.stack(outside)

    inside, outside = fx.transform(model).apply({}, rngs={stream: key})
    seen = {np.asarray(k).tobytes() for k in outside}
    assert len(seen) == draws and not any(np.asarray(k).tobytes() in seen for k in inside)
