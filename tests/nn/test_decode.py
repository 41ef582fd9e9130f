"""KV-cached decoding: Flax's cache layout and numbers, prefill + steps, and greedy sampling equal to no cache."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_parity import KEY, rand, shapes

import effax as fx

EVAL_CACHE = fx.handlers.eval(mutable=["cache"])


@pytest.mark.slow  # seconds each: runs in CI (`--run-slow`)
def test_cache_layout_and_steps_match_flax_decode():
    x = rand(2, 6, 8)
    theirs = nn.MultiHeadDotProductAttention(num_heads=2, decode=True)
    fv = theirs.init(jax.random.key(3), x)
    t = fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=2, decode=True)(x))
    ours = t.init(KEY, x)
    assert shapes(ours["cache"]["MultiHeadAttention_0"]) == shapes(fv["cache"])
    assert int(ours["cache"]["MultiHeadAttention_0"]["cache_index"]) == 0
    v = {"params": {"MultiHeadAttention_0": fv["params"]}, "cache": ours["cache"]}
    fcache = fv["cache"]
    for i in range(6):
        y, upd = t.apply(v, x[:, i : i + 1], handlers=EVAL_CACHE)
        fy, fupd = theirs.apply({"params": fv["params"], "cache": fcache}, x[:, i : i + 1], mutable=["cache"])
        np.testing.assert_allclose(y, fy, atol=1e-5, rtol=1e-5)
        v, fcache = {**v, **upd}, fupd["cache"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), v["cache"]["MultiHeadAttention_0"], fcache)


def test_prefill_then_steps_equal_the_full_causal_pass():
    x = rand(2, 8, 8)
    full = fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=4, causal=True)(x))
    dec = fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=4, causal=True, decode=True)(x))
    v = full.init(KEY, x)
    expected = full.apply(v, x)
    cache = dec.init(KEY, x)["cache"]
    step = jax.jit(lambda v, x: dec.apply(v, x, handlers=EVAL_CACHE))
    y, upd = step({**v, "cache": cache}, x[:, :5])  # a 5-token prompt in one call
    np.testing.assert_allclose(y, expected[:, :5], atol=1e-5)
    for i in range(5, 8):
        y, upd = step({**v, **upd}, x[:, i : i + 1])
        np.testing.assert_allclose(y[:, 0], expected[:, i], atol=1e-5)
    assert int(upd["cache"]["MultiHeadAttention_0"]["cache_index"]) == 8


@pytest.mark.slow  # a decode loop against the float32 one: CI runs it
def test_a_cache_kept_in_bfloat16_is_read_back_in_the_computation_dtype():
    x = rand(2, 6, 8)
    full = fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=2, causal=True)(x))
    dec = fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=2, causal=True, decode=True)(x))
    v = full.init(KEY, x)
    expected = full.apply(v, x)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, dec.init(KEY, x)["cache"])
    v = {**v, "cache": half}
    for i in range(6):
        y, upd = dec.apply(v, x[:, i : i + 1], handlers=EVAL_CACHE)
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(y[:, 0], expected[:, i], atol=3e-2)
        v = {**v, **upd}
    assert v["cache"]["MultiHeadAttention_0"]["cached_key"].dtype == jnp.bfloat16  # kept as it was made
    bf16 = fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=2, decode=True, dtype=jnp.bfloat16)(x))
    y, _ = bf16.apply({**v, "cache": dec.init(KEY, x)["cache"]}, x[:, :1], handlers=EVAL_CACHE)  # an f32 cache
    assert y.dtype == jnp.bfloat16


def test_cache_is_inference_state_and_checks_shapes():
    x = rand(1, 4, 8)
    dec = fx.transform(lambda x: fx.nn.MultiHeadAttention(num_heads=2, decode=True)(x))
    v = dec.init(KEY, x)
    with pytest.raises(fx.FrozenStateError, match=r"fx\.handlers\.eval\(mutable=\['cache'\]\)"):
        dec.apply(v, x[:, :1], handlers=fx.handlers.eval())
    with pytest.raises(fx.EffaxError, match="the cache holds keys of shape"):
        dec.apply(v, rand(3, 1, 8), handlers=EVAL_CACHE)  # another batch size
    with pytest.raises(fx.EffaxError, match="the cache holds keys of shape"):
        dec.apply(v, rand(1, 5, 8), handlers=EVAL_CACHE)  # longer than the cache


class Decoder(fx.nn.Module):
    """A small decoder-only LM with learned positions; `decode=True` keeps a KV cache and its position."""

    vocab: int = 17
    context: int = 40
    width: int = 16
    decode: bool = False

    def __call__(self, tokens):
        embed = fx.nn.Embed(self.vocab, self.width, name="embed")
        if self.decode:
            pos = fx.local_state("index", lambda: jnp.array(0, jnp.int32), collection="cache")
            start = pos.get()
            pos.set(start + tokens.shape[-1])
        else:
            start = 0
        positions = start + jnp.arange(tokens.shape[-1])
        x = embed(tokens) + fx.nn.Embed(self.context, self.width, name="positions")(positions)
        for _ in range(2):
            h = fx.nn.MultiHeadAttention(4, causal=True, decode=self.decode)(fx.nn.LayerNorm()(x))
            x = x + h
            x = x + fx.nn.MLP([32, self.width])(fx.nn.LayerNorm()(x))
        return embed.attend(fx.nn.LayerNorm()(x))


@pytest.mark.slow  # 32 jitted steps twice: runs in CI (`--run-slow`)
def test_cached_greedy_sampling_equals_uncached_for_32_steps():
    model = Decoder()
    full, dec = fx.transform(model), fx.transform(dataclasses.replace(model, decode=True))
    template = jnp.zeros((1, model.context), jnp.int32)
    params = full.init(KEY, template)["params"]
    cache = dec.init(KEY, template)["cache"]
    assert dec.init(KEY, template)["params"].keys() == params.keys()  # one set of weights serves both
    prompt = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]], jnp.int32)
    n_prompt, steps = prompt.shape[1], 32

    @jax.jit
    def uncached(params):
        window = jnp.zeros((1, model.context), jnp.int32).at[:, :n_prompt].set(prompt)

        def step(i, window):
            n = n_prompt + i
            logits = full.apply({"params": params}, window, handlers=fx.handlers.eval())
            token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits[0], n - 1, keepdims=False))
            return window.at[0, n].set(token)

        return jax.lax.fori_loop(0, steps, step, window)[0, n_prompt : n_prompt + steps]

    @jax.jit
    def cached(params, cache):
        logits, upd = dec.apply({"params": params, "cache": cache}, prompt, handlers=EVAL_CACHE)
        token = jnp.argmax(logits[0, -1])

        def step(i, carry):
            cache, token, out = carry
            out = out.at[i].set(token)
            logits, upd = dec.apply({"params": params, "cache": cache}, token.reshape(1, 1), handlers=EVAL_CACHE)
            return upd["cache"], jnp.argmax(logits[0, -1]), out

        return jax.lax.fori_loop(0, steps, step, (upd["cache"], token, jnp.zeros(steps, jnp.int32)))[2]

    a, b = uncached(params), cached(params, cache)
    assert a.shape == (32,) and len(set(np.asarray(a).tolist())) > 1  # a real sequence, not one token repeated
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # seconds each: runs in CI (`--run-slow`)
def test_decode_caches_stack_inside_fx_scan_over_layers():
    """A scanned stack of attention layers keeps one cache per layer, stacked, and decodes as the full pass."""

    def layers(decode):
        def body(x, _):
            h = fx.nn.MultiHeadAttention(2, causal=True, decode=decode, name="attn")(fx.nn.LayerNorm(name="ln")(x))
            return x + h, None

        return lambda x: fx.scan(body, length=3)(x)[0]

    full, dec = fx.transform(layers(False)), fx.transform(layers(True))
    x = rand(1, 6, 8)
    v = full.init(KEY, x)
    cache = dec.init(KEY, x)["cache"]
    assert shapes(cache) == {
        "attn": {"cache_index": (3,), "cached_key": (3, 1, 6, 2, 4), "cached_value": (3, 1, 6, 2, 4)}
    }
    expected = full.apply(v, x)
    step = jax.jit(lambda v, x: dec.apply(v, x, handlers=EVAL_CACHE))
    y, upd = step({**v, "cache": cache}, x[:, :4])
    np.testing.assert_allclose(y, expected[:, :4], atol=1e-5)
    for i in range(4, 6):
        y, upd = step({**v, **upd}, x[:, i : i + 1])
        np.testing.assert_allclose(y[:, 0], expected[:, i], atol=1e-5)
    assert upd["cache"]["attn"]["cache_index"].tolist() == [6, 6, 6]
    assert "cached_key" in str(fx.summary(dec, x))  # the abstract run sees the cache too


@pytest.mark.slow  # seconds of Flax and eager compiles: runs in CI (`--run-slow`)
def test_an_eager_step_past_max_length_is_refused_not_clipped_into_the_cache():
    """JAX clips an out-of-range `dynamic_update_slice`: prompt keys would be overwritten, outputs wrong."""
    dec = fx.transform(lambda x: fx.nn.MultiHeadAttention(2, causal=True, decode=True)(x))
    xs = jax.random.normal(jax.random.key(1), (1, 7, 8))
    v = dec.init(jax.random.key(0), xs[:, :6])  # max_length 6
    step = fx.handlers.eval(mutable=["cache"])
    _, u = dec.apply(v, xs[:, :4], handlers=step)
    _, u = dec.apply({**v, **u}, xs[:, 4:6], handlers=step)  # fills it exactly
    with pytest.raises(fx.EffaxError, match=r"holds 6 positions .*6 are filled, and this call brings 1 more"):
        dec.apply({**v, **u}, xs[:, 6:7], handlers=step)
    _, u = dec.apply(v, xs[:, :4], handlers=step)
    with pytest.raises(fx.EffaxError, match=r"4 are filled, and this call brings 3 more"):
        dec.apply({**v, **u}, xs[:, 4:7], handlers=step)


@pytest.mark.parametrize("index", [jnp.float32(0), jnp.zeros((1,), jnp.int32)], ids=["float", "shape (1,)"])
def test_a_cache_index_that_is_not_an_int_scalar_is_refused_by_path(index):
    """A mis-stored index (a float, a one-element array) reached `dynamic_update_slice` as a raw TypeError."""
    dec = fx.transform(lambda x: fx.nn.MultiHeadAttention(2, decode=True, name="attn")(x))
    x = jnp.ones((1, 4, 8))
    v = dec.init(KEY, x)
    bad = {**v, "cache": {"attn": {**v["cache"]["attn"], "cache_index": index}}}
    for call in (dec.apply, jax.jit(dec.apply, static_argnames="handlers")):
        with pytest.raises(fx.EffaxError, match=r"`attn` \(decode=True\): the cache's `cache_index` .* an int scalar"):
            call(bad, x[:, :1], handlers=EVAL_CACHE)
