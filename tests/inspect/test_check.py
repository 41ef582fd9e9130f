"""`fx.check_variables`: a pure diff of `eval_shape(t.init)` with the variables, never a run on them."""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import pytest

import effax as fx

KEY = jax.random.key(0)
X = jnp.ones((2, 3))


def model(x):
    h = fx.nn.Dense(4)(x)
    mean = fx.local_state("mean", lambda: jnp.zeros(4), collection="stats")
    return h * fx.side_input("scale") + mean.get()


SIDE = [fx.handlers.SideInputs({"scale": 2.0})]


def test_a_mis_shaped_state_is_reported_not_raised():
    t = fx.transform(model)
    v = t.init(KEY, X, handlers=SIDE)
    bad = {**v, "stats": {"mean": jnp.zeros((2, 4))}}
    report = fx.check_variables(t, bad, X, handlers=SIDE)
    assert report.mis_shaped == ["stats:mean: model float32[4], variables float32[2, 4]"]
    assert fx.check_variables(t, v, X, handlers=SIDE).ok


def test_boxed_flax_values_and_strings_are_reported():
    t = fx.transform(model)
    v = t.init(KEY, X, handlers=SIDE)
    kernel = v["params"]["Dense_0"]["kernel"]
    boxed = {**v, "params": {"Dense_0": {"kernel": linen.LogicallyPartitioned(kernel, ("a", "b")), "bias": "zeros"}}}
    report = fx.check_variables(t, boxed, X, handlers=SIDE)
    bias, kernel = sorted(report.mis_typed)
    assert kernel.startswith("params:Dense_0/kernel: model float32[3, 4], variables a boxed Flax value")
    assert "unbox" in kernel and len(kernel) < 250
    assert bias == "params:Dense_0/bias: model float32[4], variables a str, not an array"


def test_params_an_interceptor_creates_are_expected_under_its_handlers():
    class Adapter(fx.Handler):
        def handle(self, request, forward):
            out = forward(request)
            if isinstance(request, fx.ModuleCallRequest):
                out = out + fx.param("delta", jax.nn.initializers.zeros, out.shape[-1:])
            return out

    t = fx.transform(lambda x: fx.nn.Dense(4)(x))
    v = t.init(KEY, X, handlers=[Adapter()])
    assert fx.check_variables(t, v, X, handlers=[Adapter()]).ok
    assert fx.check_variables(t, v, X).unused == ["params:Dense_0/delta (float32[4])"]


def test_check_variables_takes_a_transform_or_the_function_like_summary():
    import pytest

    v = fx.transform(model).init(KEY, X, handlers=SIDE)
    assert fx.check_variables(model, v, X, handlers=SIDE).ok
    with pytest.raises(fx.EffaxError, match="fx.transform"):
        fx.check_variables(3, {}, X)


def test_a_param_stored_as_a_nested_list_is_one_entry_as_apply_takes_it():
    t = fx.transform(lambda x: x @ fx.param("w", jax.nn.initializers.ones, (3, 4)))
    x = jnp.ones((2, 3))
    v = {"params": {"w": [[1.0] * 4] * 3}}
    assert t.apply(v, x).shape == (2, 4)
    assert fx.check_variables(t, v, x).ok
    short = fx.check_variables(t, {"params": {"w": [[1.0] * 4] * 2}}, x)
    assert short.mis_shaped == ["params:w: model float32[3, 4], variables float32[2, 4]"]
    as_tuple = {"params": {"w": ((1.0,) * 4,) * 3}}  # a tuple too (it read "a tuple, not an array")
    assert t.apply(as_tuple, x).shape == (2, 4) and fx.check_variables(t, as_tuple, x).ok


def test_training_must_be_a_bool_as_in_init():
    t = fx.transform(lambda x: x)
    for bad in ("False", jnp.array(False)):
        with pytest.raises(fx.EffaxError, match="`training` must be True or False"):
            fx.check_variables(t, {}, jnp.ones(2), training=bad)


def test_key_state_stored_as_its_data_matches_as_apply_takes_it():
    def model(x):
        k = fx.local_state("rng", lambda: jax.random.key(3), collection="rngstate")
        k1, k2 = jax.random.split(k.get())
        k.set(k1)
        return x + jax.random.normal(k2, x.shape)

    t, x = fx.transform(model), jnp.ones(2)
    v = t.init(jax.random.key(0), x)
    raw = {**v, "rngstate": {"rng": jax.random.key_data(v["rngstate"]["rng"])}}
    t.apply(raw, x, mutable=True)
    assert fx.check_variables(t, raw, x).ok
    wrong = {**v, "rngstate": {"rng": jnp.zeros(3, jnp.uint32)}}
    assert not fx.check_variables(t, wrong, x).ok


def test_a_module_class_is_refused_with_the_instance_to_pass():
    with pytest.raises(fx.EffaxError, match=r"fx.check_variables got the class Dense; pass an instance: "
                                            r"fx.check_variables\(Dense\(\.\.\.\), variables, x\)"):
        fx.check_variables(fx.nn.Dense, {}, X)
    t = fx.transform(fx.nn.Dense(4))
    assert fx.check_variables(fx.nn.Dense(4), t.init(KEY, X), X).ok


def test_model_arguments_left_out_are_refused_with_the_call_to_write():
    """`fx.check_variables(t, v)` for a model taking `x` was the model's raw `TypeError`."""
    t = fx.transform(lambda x: fx.nn.Dense(2)(x))
    v = t.init(jax.random.key(0), jnp.ones((1, 3)))
    with pytest.raises(fx.EffaxError, match=r"fx.check_variables: the model `<lambda>` cannot take these arguments "
                                            r"\(missing a required argument: 'x'\).*`fx.check_variables\(t, "
                                            r"variables, x\)`"):
        fx.check_variables(t, v)
    assert fx.check_variables(t, v, jnp.ones((1, 3))).ok
    # `init`'s options pass; those adding sown values (outputs, not variables) expect none of them
    assert fx.check_variables(t, v, jnp.ones((1, 3)), capture_intermediates=True).ok


def _dense():
    t = fx.transform(lambda x: fx.nn.Dense(3)(x))
    x = jnp.ones((2, 4))
    return t, x, t.init(jax.random.key(0), x)


def test_a_namedtuple_where_the_model_keeps_a_dict_is_reported_as_apply_reads_it():
    """A NamedTuple node read as `Dense_0/kernel` and `Dense_0/bias` (its field names): "variables match the
    model", and then `t.apply` raised MissingVariableError on the same variables."""
    import collections

    t, x, v = _dense()
    node = collections.namedtuple("KernelBias", "kernel bias")(**v["params"]["Dense_0"])
    report = fx.check_variables(t, {"params": {"Dense_0": node}}, x)
    assert not report.ok and "params:Dense_0 (a KernelBias, not an array)" in report.unused
    with pytest.raises(fx.MissingVariableError):
        t.apply({"params": {"Dense_0": node}}, x)
    state = fx.transform(lambda: fx.local_state("pair", lambda: (jnp.zeros(2), jnp.ones(3))).get())
    assert fx.check_variables(state, state.init(None)).ok  # a state holding a tuple is still compared per leaf


def test_keys_of_mixed_types_are_reported_not_crashed_on():
    t, x, v = _dense()
    bad = {"params": {**v["params"], 0: {"kernel": jnp.zeros((4, 3))}}}
    assert str(fx.check_variables(t, bad, x)) == "unused: params:0/kernel (float32[4, 3])"


def test_options_that_add_sown_values_expect_no_sown_variables():
    """`capture_intermediates=True` (or `mutable=True`) listed the run's sown outputs as missing variables."""

    def probe(x):
        h = fx.nn.Dense(4)(x)
        fx.sow("h", h)
        return h

    t, x = fx.transform(probe), jnp.ones((3, 5))
    v = t.init(jax.random.key(0), x)
    assert fx.check_variables(t, v, x, capture_intermediates=True).ok
    assert fx.check_variables(t, v, x, mutable=True).ok
    with_sows = t.init(jax.random.key(0), x, capture_intermediates=True)  # init's result with them checks too
    assert "intermediates" in with_sows and fx.check_variables(t, with_sows, x, capture_intermediates=True).ok
    assert list(fx.summary(t, x, capture_intermediates=True).variables) == ["params"]


def test_a_model_keyword_named_like_the_tools_own_first_parameters_reaches_the_model():
    """A diffusion model's `t=` (the time step) was "got multiple values for argument 't'"."""

    def denoiser(x, t, variables=1.0):
        return fx.nn.Dense(3)(x) * t * variables

    m, x, step = fx.transform(denoiser), jnp.ones((2, 3)), jnp.ones((2, 1))
    v = m.init(jax.random.key(0), x, t=step)
    assert fx.check_variables(m, v, x, t=step, variables=2.0).ok
    assert fx.summary(m, x, t=step).param_count == 12
    fx.effects_of(m, x, t=step)  # as its first parameter is `fn`, it took `t` already
