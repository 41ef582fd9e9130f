"""examples/tiny_lm.py runs end to end for a few steps: tied embeddings, loss report, a sample."""


import numpy as np
import pytest
from example_loader import load


@pytest.mark.slow  # 27 s on a busy 2-core machine (over the 20 s bar); CI runs it (`--run-slow`)
def test_tiny_lm_smoke(capsys):
    report = load("tiny_lm").main(
        steps=30, context=32, width=32, depth=1, sample_length=8, prompt="Shall", progress=False
    )
    assert report["tied"]  # one embedding table serves input and output
    assert report["loss_end"] < report["loss_start"] < np.log(57) + 0.3  # starts near uniform, goes down
    assert report["sample"].startswith("Shall") and len(report["sample"]) == 5 + 8
    # the KV-cached sampler and the window re-running one draw the same tokens while the window fills
    assert report["cached_matches_uncached"] and report["sample"] == report["sample_uncached"]
    assert report["tokens_per_s_cached"] > 0 and report["tokens_per_s_uncached"] > 0
    out = capsys.readouterr().out
    assert "training loss" in out and "held-out loss" in out and "Shall" in out
    assert "tokens/s with the KV cache" in out


@pytest.mark.slow  # 5 s of sampling: runs in CI (`--run-slow`), keeping the README's command under 5 minutes
def test_tiny_lm_cached_sampler_refills_a_full_cache():
    """Sampling past the context: the cache is refilled from the last half window, and tokens keep coming."""
    import jax
    import jax.numpy as jnp

    import effax as fx

    tiny_lm = load("tiny_lm")
    model = tiny_lm.TinyLM(vocab_size=7, context=8, width=8, depth=1, heads=2)
    t = fx.transform(model)
    params = t.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    samplers = tiny_lm.make_samplers(model, t, jax.random.key(0), 3, 20, 0.0)
    cached, uncached = (np.asarray(samplers[k](params, prompt, jax.random.key(1))) for k in ("cached", "uncached"))
    assert cached.shape == uncached.shape == (1, 23)
    np.testing.assert_array_equal(cached[:, :8], uncached[:, :8])  # greedy: equal while the window fills
