"""The KV-cached decode step of an `effax.nn` decoder compiles to pure JAX's op count, and samples its tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# `benchmarks` imports as a package: the root conftest.py puts the repository root on sys.path.
from benchmarks.common import count_hlo_ops
from benchmarks.libs import effax_decoder, pure_jax_decoder

pytestmark = pytest.mark.slow  # compiles two decoders: CI runs it (`--run-slow`)

SPEC = effax_decoder.DecoderSpec(vocab=16, d_model=16, heads=2, mlp_dim=32, depth=2, context=24)


def test_cached_decode_step_compiles_to_pure_jax_op_count_and_agrees():
    fx_lib, pure_lib = effax_decoder.build(SPEC), pure_jax_decoder.build(SPEC)
    params, cache = fx_lib["init"](jax.random.key(0))
    _, pure_cache = pure_lib["init"](jax.random.key(0))
    token = jnp.zeros((1, 1), jnp.int32)
    ours = count_hlo_ops(jax.jit(fx_lib["step"]).lower(params, cache, token).compile())
    theirs = count_hlo_ops(jax.jit(pure_lib["step"]).lower(params, pure_cache, token).compile())
    assert ours == theirs
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    a = jax.jit(fx_lib["generate_cached"], static_argnums=3)(params, cache, prompt, 12)
    b = jax.jit(pure_lib["generate_cached"], static_argnums=3)(params, pure_cache, prompt, 12)
    np.testing.assert_array_equal(a, b)
