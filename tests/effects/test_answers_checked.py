"""Law 10 at run time: an answer to a key draw, a mode question or a state read has the request's kind, or the
run stops at the request with the handler's likely slip named (a param's answer was checked; these were not)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import effax as fx


def model(x):
    n = fx.local_state("count", lambda: jnp.zeros(()), collection="stats").get()
    return x * n, fx.next_key("dropout"), fx.is_training()


def answering(cls, value):
    class Answer(fx.Handler):
        answers = (cls,)

        def handle(self, request, forward):
            return value

    return Answer()


T = fx.transform(model)
X = jnp.ones((2, 3))
V = T.init(jax.random.key(0), X)


@pytest.mark.parametrize(
    ("cls", "value", "message"),
    [
        (fx.RandomRequest, jnp.zeros((2,)), r"key draw from stream 'dropout' .*float32\[2\], not one typed key"),
        (fx.RandomRequest, jnp.zeros((2,), jnp.uint32), r"jax\.random\.wrap_key_data"),
        (fx.RandomRequest, jax.random.split(jax.random.key(0)), r"\[2\], not one typed key"),
        (fx.RandomRequest, None, r"None; did `handle` forget `return forward\(request\)`\?"),
        (fx.ModeRequest, None, r"`fx\.is_training\(\)` at `<root>`: a handler answered None"),
        (fx.ModeRequest, "yes", r"answered str 'yes', not a Python bool"),
        (fx.ModeRequest, jnp.bool_(True), r"not a Python bool"),
        (fx.GetStateRequest, None, r"read of state `count` .*: a handler answered None; did `handle` forget"),
    ],
)
def test_an_answer_of_the_wrong_kind_is_named_at_the_request(cls, value, message):
    with pytest.raises(fx.EffaxError, match=message):
        T.apply(V, X, training=True, rngs=jax.random.key(1), handlers=[answering(cls, value)])


def test_answers_of_the_right_kind_pass_eagerly_and_under_jit():
    handlers = [answering(fx.RandomRequest, jax.random.key(7)), answering(fx.ModeRequest, False)]
    out, key, training = T.apply(V, X, handlers=handlers)
    assert training is False and jax.random.key_data(key).tolist() == jax.random.key_data(jax.random.key(7)).tolist()
    jax.jit(lambda v: T.apply(v, X, training=True, rngs=jax.random.key(1))[0])(V)
