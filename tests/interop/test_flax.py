"""`fx.from_flax`: Flax linen modules run inside effax models, equal to `module.apply` on the same variables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import effax as fx
from effax.handlers._random import fold, h_path
from effax.interop import _flax
from tests.interop.flax_modules import (
    Attention,
    AutoEncoder,
    Block,
    ConvNet,
    Losses,
    Partitioned,
    RematBlock,
    ScanStack,
    VmapJitShare,
)

K, KD = jax.random.key(0), jax.random.key(1)
X = jax.random.normal(jax.random.key(2), (4, 5))
IMAGES = jax.random.normal(jax.random.key(3), (2, 6, 6, 3))
TOKENS = jax.random.normal(jax.random.key(4), (2, 4, 6))


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


# module, input, static kwargs, collections it updates in train
CASES = {
    "dense-batchnorm-dropout-sow": (Block(), X, "train", ["batch_stats"]),
    "conv-layernorm-batchnorm": (ConvNet(), IMAGES, "train", ["batch_stats"]),
    "self-attention": (Attention(), TOKENS, "train", []),
    "scan-stack": (ScanStack(), X, None, ["batch_stats"]),
    "remat-block": (RematBlock(), X, "train", ["batch_stats"]),
    "vmap-jit-share-scope": (VmapJitShare(), X, None, []),
}


def run_both(module, x, variables, *, mutable, rngs=None, **kwargs):
    t = fx.transform(fx.from_flax(module))
    ours = t.apply(variables, x, rngs=rngs, mutable=mutable, **kwargs)
    theirs = module.apply(variables, x, rngs=rngs, mutable=mutable, **kwargs)
    return ours, theirs


MODES = [(case, train) for case in sorted(CASES) for train in (False, True) if train or CASES[case][2]]


# every other case runs in the README's command (each compiles Flax and effax eagerly), all of them in CI
@pytest.mark.parametrize(("case", "train"), [
    pytest.param(c, t, id=f"{c}-{'train' if t else 'eval'}", marks=pytest.mark.slow if i % 2 else ())
    for i, (c, t) in enumerate(MODES)
])
def test_outputs_and_updates_equal_flax_on_the_same_variables(case, train):
    module, x, flag, updated = CASES[case]
    kwargs = {flag: train} if flag else {}
    variables = module.init(K, x, **kwargs)
    if train:
        ours, theirs = run_both(module, x, variables, mutable=updated or False, rngs={"dropout": KD}, **kwargs)
    else:
        ours, theirs = run_both(module, x, variables, mutable=False, **kwargs)
    assert_same(ours, theirs)
    if train and updated:
        assert set(ours[1]) == set(updated)


def test_init_at_the_root_equals_flax_init():
    t = fx.transform(fx.from_flax(Block()))
    ours = t.init(K, X, train=False)
    assert_same(ours, Block().init(K, X, train=False))
    assert "intermediates" not in ours  # sown values are outputs, never state


def test_init_nested_uses_the_params_key_at_the_module_scope():
    block = fx.from_flax(ConvNet(), name="conv")

    def model(x):
        with fx.scope("body"):
            return block(x, train=False)

    got = fx.transform(model).init(K, IMAGES)
    expected = ConvNet().init(fold(K, h_path(("body", "conv"))), IMAGES, train=False)
    assert_same({c: v["body"]["conv"] for c, v in got.items()}, expected)


def test_nested_in_scopes_next_to_effax_params_with_the_documented_keys():
    block = fx.from_flax(Block(), name="block")

    def model(x):
        w = fx.param("w", jax.nn.initializers.ones, (x.shape[-1],))
        with fx.scope("encoder"):
            return block(x * w, train=fx.is_training())

    t = fx.transform(model)
    variables = t.init(K, X)
    assert set(variables["params"]) == {"w", "encoder"}
    inner = {c: v["encoder"]["block"] for c, v in variables.items() if c != "params"}
    inner["params"] = variables["params"]["encoder"]["block"]
    out, updates = t.apply(variables, X, training=True, rngs={"dropout": KD}, mutable=["batch_stats"])
    nested_key = fold(KD, h_path(("encoder", "block")))
    expected, flax_updates = Block().apply(inner, X, train=True, rngs={"dropout": nested_key}, mutable=["batch_stats"])
    assert_same(out, expected)
    assert_same(updates["batch_stats"]["encoder"]["block"], flax_updates["batch_stats"])


def test_dropout_key_is_the_users_key_at_the_root():
    t = fx.transform(fx.from_flax(nn.Dropout(0.5, deterministic=False)))
    ours = t.apply({}, X, rngs={"dropout": KD})
    assert_same(ours, nn.Dropout(0.5, deterministic=False).apply({}, X, rngs={"dropout": KD}))
    # a raw PRNGKey works as well, giving the same mask
    raw = jax.random.key_data(KD)
    assert_same(t.apply({}, X, rngs={"dropout": raw}), ours)


def test_sown_values_come_back_through_fx_sow():
    module = Block()
    variables = module.init(K, X, train=False)
    ours, theirs = run_both(module, X, variables, mutable=["intermediates"], train=False)
    assert_same(ours, theirs)
    assert set(ours[1]) == {"intermediates"}
    # not collected: only the output, as Flax
    assert_same(fx.transform(fx.from_flax(module)).apply(variables, X, train=False), theirs[0])

    def nested(x):
        with fx.scope("outer"):
            return fx.from_flax(module)(x, train=False)

    _, sown = fx.transform(nested).apply(
        {c: {"outer": v} for c, v in variables.items()}, X, mutable="intermediates"
    )
    assert_same(sown["intermediates"]["outer"], theirs[1]["intermediates"])


def test_custom_sown_collection_and_custom_state_collection():
    module = Losses()
    t = fx.transform(fx.from_flax(module))
    variables = t.init(K, X)
    assert set(variables) == {"params", "counters"}  # 'losses' holds tuples: sown, not state
    flax_variables = {c: v for c, v in module.init(K, X).items() if c != "losses"}
    assert_same(variables, flax_variables)
    ours, theirs = run_both(module, X, variables, mutable=["counters", "losses"])
    assert_same(ours, theirs)
    assert int(ours[1]["counters"]["calls"]) == 1


def test_methods_other_than_call():
    module = AutoEncoder()
    f = fx.from_flax(module)
    t = fx.transform(lambda x: f(f(x, method="encode"), method=AutoEncoder.decode))
    variables = t.init(K, X)
    assert set(variables["params"]) == {"encoder", "decoder"}
    assert_same(t.apply(variables, X), module.apply(variables, X))
    z = fx.transform(lambda x: f(x, method="encode")).apply(variables, X)
    assert_same(z, module.apply(variables, X, method="encode"))


def test_python_bool_arguments_stay_static_under_jit():
    module = Block()
    t = fx.transform(fx.from_flax(module))
    variables = t.init(K, X, train=False)
    expected = module.apply(variables, X, train=True, rngs={"dropout": KD}, mutable=["batch_stats"])
    step = jax.jit(lambda v, x: t.apply(v, x, train=True, rngs={"dropout": KD}, mutable=["batch_stats"]))
    assert_same(step(variables, X), expected)
    static = jax.jit(t.apply, static_argnames=("train", "mutable"))
    assert_same(static(variables, X, train=True, rngs={"dropout": KD}, mutable=("batch_stats",)), expected)
    positional = fx.transform(fx.from_flax(RematBlock()))
    v = positional.init(K, X, True)
    assert_same(jax.jit(lambda v, x: positional.apply(v, x, False))(v, X), RematBlock().apply(v, X, False))


def test_gradients_flow_and_equal_flax_gradients():
    module = Block()
    t = fx.transform(fx.from_flax(module))
    variables = t.init(K, X, train=False)

    def loss(apply):
        def of(params):
            v = {**variables, "params": params}
            out, _ = apply(v, X, train=True, rngs={"dropout": KD}, mutable=["batch_stats"])
            return jnp.sum(out**2)

        return of

    g = jax.grad(loss(t.apply))(variables["params"])
    assert_same(g, jax.grad(loss(module.apply))(variables["params"]))
    assert any(float(jnp.abs(leaf).sum()) > 0 for leaf in jax.tree.leaves(g))


def test_calling_twice_at_one_scope_shares_weights_and_threads_state():
    module = ConvNet()
    f = fx.from_flax(module)

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            inner = ConvNet(name="inner")
            return inner(x[..., :3].repeat(1, -1), train=True), inner(x, train=True)

    t = fx.transform(lambda x: (f(x[..., :3].repeat(1, -1), train=True), f(x, train=True)))
    variables = t.init(K, IMAGES)
    ours = t.apply(variables, IMAGES, mutable=["batch_stats"])
    theirs = Twice().apply({c: {"inner": v} for c, v in variables.items()}, IMAGES, mutable=["batch_stats"])
    assert_same(ours[0], theirs[0])
    assert_same(ours[1]["batch_stats"], theirs[1]["batch_stats"]["inner"])


def test_a_frozen_collection_that_flax_writes_raises_frozen_state_error():
    t = fx.transform(fx.from_flax(Block()))
    variables = t.init(K, X, train=False)
    with pytest.raises(fx.FrozenStateError, match=r"(?s)`<root>`.*'batch_stats'.*mutable=\['batch_stats'\]"):
        t.apply(variables, X, train=True, rngs={"dropout": KD})


def test_a_missing_decode_cache_is_named_not_blamed_on_a_key():
    t = fx.transform(fx.from_flax(nn.MultiHeadDotProductAttention(2, decode=True), name="attn"))
    x = jax.random.normal(jax.random.key(1), (2, 4, 8))
    v = t.init(jax.random.key(0), x)
    missing = r"no attn/cache_index in variables\['cache'\].*Pass the variables"
    with pytest.raises(fx.MissingVariableError, match=missing):
        t.apply({"params": v["params"]}, x[:, :1], handlers=fx.handlers.eval(mutable=["cache"]))
    y, _ = t.apply(v, x[:, :1], handlers=fx.handlers.eval(mutable=["cache"]))  # with the cache: no key needed
    assert y.shape == (2, 1, 8)


def test_a_missing_stream_raises_missing_rng_error_without_falling_back_to_params():
    t = fx.transform(fx.from_flax(Block()))
    variables = t.init(K, X, train=False)
    with pytest.raises(fx.MissingRngError, match=r"(?s)'dropout'.*\['params'\]"):
        t.apply(variables, X, train=True, rngs={"params": KD}, mutable=["batch_stats"])
    # eval draws nothing, so needs no rngs
    assert_same(t.apply(variables, X, train=False), Block().apply(variables, X, train=False))


class _DropoutIfKeyed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dropout(0.5, deterministic=not self.has_rng("dropout"))(x)


class _NoisyThenDropout(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dropout(0.5, deterministic=False)(x + jax.random.normal(self.make_rng("params"), x.shape))


def test_flax_sees_the_streams_rngs_names_as_module_apply_does():
    """`self.has_rng("dropout")` is True when `rngs` names the stream (dropout on, as in Flax), False without
    keys or under the eval preset; a module drawing from "params" at apply and from another stream gets each
    its own key."""
    x = jnp.ones((2, 8))
    for module, rngs in ((_DropoutIfKeyed(), {"dropout": KD}), (_NoisyThenDropout(), {"params": K, "dropout": KD})):
        t = fx.transform(fx.from_flax(module))
        v = t.init(K, x)
        assert_same(t.apply(v, x, rngs=rngs), module.apply(v, x, rngs=rngs))
    t = fx.transform(fx.from_flax(_DropoutIfKeyed()))
    for options in ({}, {"handlers": fx.handlers.eval()}):
        np.testing.assert_array_equal(t.apply({}, x, **options), x)


@pytest.mark.parametrize("lift", ["scan", "remat", "vmap"])
def test_a_stateful_flax_module_inside_a_lifted_transform_equals_the_unrolled_loop(lift):
    """Applying existing variables needs no key (Flax's init runs only for a missing variable), under the
    eval preset too, and a frozen collection is seen as frozen inside the lifted body, as outside it."""
    bn = fx.from_flax(nn.BatchNorm(use_running_average=True))

    def unrolled(x):
        for i in range(1 if lift == "vmap" else 2):  # vmap: each member applies it once
            with fx.scope(f"l{i}"):
                x = bn(x)
        return x

    def lifted(x):
        if lift == "scan":
            return fx.scan(lambda h, _: (bn(h), None), length=2)(x)[0]
        if lift == "vmap":
            return fx.vmap(bn, in_axes=None, axis_size=2)(x)[1]
        return fx.remat(bn)(fx.remat(bn)(x))

    t, plain = fx.transform(lifted), fx.transform(unrolled)
    v, pv = t.init(K, X), plain.init(K, X)
    stats = lambda v: jax.tree.map(lambda a: a + 1.0, v["batch_stats"])  # noqa: E731
    v = {**v, "batch_stats": stats(v)}
    pv = {**pv, "batch_stats": stats(pv)}
    expected = plain.apply(pv, X)
    for options in ({}, {"handlers": fx.handlers.eval()}, {"rngs": K}):
        np.testing.assert_allclose(t.apply(v, X, **options), expected, rtol=1e-6, err_msg=str(options))


def test_flax_variables_load_unchanged_and_pass_check_variables():
    module = ScanStack()
    variables = module.init({"params": K, "dropout": KD}, X)
    t = fx.transform(fx.from_flax(module))
    report = fx.check_variables(t, variables, X)
    assert report.ok, str(report)
    spec = lambda f: jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(f, {"params": K, "dropout": KD}, X))
    assert spec(t.init) == spec(module.init)


def test_init_with_output_is_flax_init_with_output():
    t = fx.transform(fx.from_flax(Block()))
    assert_same(t.init_with_output(K, X, train=False), Block().init_with_output(K, X, train=False))


def test_init_draws_each_stream_as_apply_does_never_from_params():
    """Flax's own init draws a stream its `rngs` lacks from "params"; effax gives it each stream it draws, as
    apply does: the variables are Flax's, init's output is apply's on them (law 3, it was 0.9 off with one
    key), and a `rngs` dict without the stream raises (Strictness), as `fx.nn` does."""
    t = fx.transform(fx.from_flax(Block()))
    out, variables = t.init_with_output(K, X, train=True)
    assert_same(variables, Block().init(K, X, train=True))
    again, _ = t.apply(variables, X, train=True, rngs=K, mutable=True)
    assert_same(out, again)
    both = {"params": K, "dropout": jax.random.key(7)}
    out, variables = t.init_with_output(both, X, train=True)
    assert_same(out, t.apply(variables, X, train=True, rngs=both, mutable=True)[0])
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
    assert shapes(jax.eval_shape(lambda k: t.init(k, X, train=True), K)) == shapes(variables)
    with pytest.raises(fx.MissingRngError, match="dropout"):
        t.init({"params": K}, X, train=True)


def test_init_apply_agreement_when_init_draws_only_params():
    t = fx.transform(fx.from_flax(Block()))
    out, variables = t.init_with_output(K, X, train=False)
    again, _ = t.apply(variables, X, train=False, rngs=K, mutable=True)
    assert_same(out, again)


def test_partitioned_params_are_unboxed_and_keep_their_logical_axes():
    seen = {}

    class Record(fx.Handler):
        def handle(self, request, forward):
            if isinstance(request, fx.ParamRequest):
                seen[request.path] = request.axes
            return forward(request)

    t = fx.transform(fx.from_flax(Partitioned()))
    variables = t.init(K, X, handlers=[Record()])
    assert seen[("Dense_0", "kernel")] == ("embed", "mlp")
    assert seen[("Dense_0", "bias")] is None
    assert_same(variables, nn.unbox(Partitioned().init(K, X)))


def test_partition_names_splitting_a_dimension_over_several_mesh_axes_are_kept():
    """`nn.with_partitioning(init, (("data", "model"), None))`: the tuple entry becomes a tuple axis, never dropped."""

    class MultiAxis(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), (("data", "model"), None))
            return nn.Dense(4, use_bias=False, kernel_init=init)(x)

    module = MultiAxis()
    t = fx.transform(fx.from_flax(module))
    s = fx.summary(t, X)
    axes = fx.sharding.logical_axes(s)["params"]["Dense_0"]["kernel"]
    flax_spec = nn.get_partition_spec(jax.eval_shape(module.init, K, X))["params"]["Dense_0"]["kernel"]
    assert axes == flax_spec == jax.sharding.PartitionSpec(("data", "model"), None)
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    shardings = fx.sharding.logical_to_mesh(s, mesh, [("data", "data"), ("model", "model")])
    assert shardings["params"]["Dense_0"]["kernel"].spec == flax_spec
    variables = jax.jit(t.init, out_shardings=shardings)(K, X)
    assert_same(variables, nn.unbox(module.init(K, X)))


def test_partition_names_that_do_not_fit_the_param_are_refused():
    class Wrong(nn.Module):
        names: tuple

        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, use_bias=False, kernel_init=nn.with_partitioning(nn.initializers.ones, self.names))(x)

    for names in [("embed", "mlp", "heads"), ("embed", 3)]:
        with pytest.raises(fx.EffaxError, match=r"Flax param `Dense_0/kernel` has partition names .* for shape"):
            fx.summary(fx.transform(fx.from_flax(Wrong(names))), X)
    # fewer names than dimensions leave the rest None, as Flax's (a `PartitionSpec`'s) reading of them does
    short = fx.summary(fx.transform(fx.from_flax(Wrong(("embed",)))), X)
    assert fx.sharding.logical_axes(short)["params"]["Dense_0"]["kernel"] == jax.sharding.PartitionSpec("embed", None)


def test_partition_names_of_boxed_state_are_kept():
    """MaxText's and t5x's decode caches are boxed with `nn.with_logical_partitioning`; their names were
    dropped, so the cache was replicated on every mesh, without an error."""
    from jax.sharding import PartitionSpec as P

    class Decoder(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")), (5, 6))
            init = nn.with_logical_partitioning(jnp.zeros, ("batch", "mlp"))
            cache = self.variable("cache", "k", init, (4, 6))
            cache.value = cache.value + x @ w
            return cache.value

    module, rules = Decoder(), [("batch", "data"), ("embed", None), ("mlp", "model")]
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    flax = nn.logical_to_mesh_sharding(nn.get_partition_spec(jax.eval_shape(module.init, K, X)), mesh, rules)
    t = fx.transform(fx.from_flax(module))
    shardings = fx.sharding.logical_to_mesh(fx.summary(t, X), mesh, rules)
    assert shardings["cache"]["k"].spec == flax["cache"]["k"].spec == P("data", "model")
    assert shardings["params"]["w"].spec == flax["params"]["w"].spec
    v = jax.jit(t.init, out_shardings=shardings)(K, X)
    assert_same(v, nn.unbox(module.init(K, X)))

    class Layer(nn.Module):  # stacked by Flax's own `nn.scan`, which names the stacked dimension
        @nn.compact
        def __call__(self, x, _):
            cache = self.variable("cache", "k", nn.with_logical_partitioning(jnp.zeros, ("batch", "mlp")), (4, 5))
            cache.value = cache.value + x
            return x, None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Layer, variable_axes={"cache": 0}, length=3, metadata_params={nn.PARTITION_NAME: "layers"})
            return scan()(x, None)[0]

    stack = Stack()
    flax = nn.get_partition_spec(jax.eval_shape(stack.init, K, X))["cache"]["ScanLayer_0"]["k"]
    axes = fx.sharding.logical_axes(fx.summary(fx.transform(fx.from_flax(stack)), X))
    assert axes["cache"]["ScanLayer_0"]["k"] == flax == P("layers", "batch", "mlp")


def test_the_structure_is_traced_once_per_signature():
    traces = []

    class Counting(nn.Module):
        @nn.compact
        def __call__(self, x, scale: float):
            traces.append(x.shape)
            return nn.Dense(2)(x) * scale

    f = fx.transform(fx.from_flax(Counting()))
    variables = f.init(K, X, 2.0)
    traces.clear()
    f.apply(variables, X, 2.0)
    f.apply(variables, X + 1, 2.0)
    assert len(traces) == 2  # one apply each: the abstract init is memoized
    f.apply(variables, X, 3.0)  # a new static value is a new signature
    assert len(traces) == 4


def test_refuses_what_it_cannot_run():
    with pytest.raises(fx.EffaxError, match="fx.from_nnx"):
        fx.from_flax(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(fx.EffaxError, match="linen module"):
        fx.from_flax(lambda x: x)
    with pytest.raises(fx.InvalidNameError, match="'a/b'"):
        fx.from_flax(nn.Dense(2), name="a/b")
    bound = nn.Dense(2).bind(nn.Dense(2).init(K, X))
    with pytest.raises(fx.EffaxError, match="unbound"):
        fx.from_flax(bound)


def test_non_array_params_are_refused_with_the_path():
    class TupleParam(nn.Module):
        @nn.compact
        def __call__(self, x):
            a, b = self.param("pair", lambda k: (jnp.ones(2), jnp.zeros(2)))
            return x[..., :2] * a + b

    with pytest.raises(fx.EffaxError, match="`pair`.*tuple"):
        fx.transform(fx.from_flax(TupleParam())).init(K, X)


def test_memo_is_bounded():
    assert len(_flax._SPECS) <= _flax._CACHE_SIZE


@given(
    seed=st.integers(0, 2**16),
    batch=st.sampled_from([1, 3]),
    features=st.sampled_from([2, 5]),
    scale=st.floats(0.1, 10.0),
    train=st.booleans(),
)
@pytest.mark.slow  # seconds each: runs in CI (`--run-slow`)
def test_law_9_from_flax_returns_what_module_apply_returns(seed, batch, features, scale, train):
    """Law 9: a Flax module run through `from_flax` returns what `module.apply` returns on the same variables."""
    module = Block()
    key = jax.random.key(seed)
    x = scale * jax.random.normal(key, (batch, features))
    variables = module.init(jax.random.fold_in(key, 1), x, train=False)
    rngs = {"dropout": jax.random.fold_in(key, 2)} if train else None
    mutable = ["batch_stats", "intermediates"] if train else False
    ours, theirs = run_both(module, x, variables, mutable=mutable, rngs=rngs, train=train)
    assert_same(ours, theirs)


class _Perturbed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(self.perturb("h", nn.Dense(3)(x)))


def test_perturb_is_a_no_op_without_perturbations_and_adds_them_when_given():
    m, x = _Perturbed(), jnp.ones((2, 4))
    variables = m.init(jax.random.key(0), x)
    t = fx.transform(fx.from_flax(m))
    assert sorted(t.init(jax.random.key(0), x)) == sorted(variables)  # init makes them, as Flax's
    params_only = {"params": variables["params"]}
    np.testing.assert_allclose(t.apply(params_only, x), m.apply(params_only, x), rtol=1e-6)
    _, updates = t.apply(params_only, x, mutable=True)
    assert "perturbations" not in updates or not jax.tree.leaves(updates["perturbations"])
    loss = lambda f: (lambda v: f(v, x).sum())  # noqa: E731
    ours, theirs = jax.grad(loss(t.apply))(variables), jax.grad(loss(m.apply))(variables)
    np.testing.assert_allclose(ours["perturbations"]["h"], theirs["perturbations"]["h"], rtol=1e-6)
    assert list(jax.grad(loss(t.apply))(params_only)) == ["params"]


class _DropoutAtInit(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(3)(x)
        return nn.Dropout(0.5, deterministic=not self.has_rng("dropout"))(x)


def test_init_gives_flax_every_stream_the_rngs_dict_names():
    m, x = _DropoutAtInit(), jnp.ones((2, 4))
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    out, v = fx.transform(fx.from_flax(m)).init_with_output(rngs, x)
    flax_out, flax_v = m.init_with_output(rngs, x)
    np.testing.assert_allclose(out, flax_out, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b), v, flax_v)


class _ReducedSow(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(3)(x)
        self.sow("intermediates", "total", x.sum(), init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)
        return x


class _SowBesideState(nn.Module):
    @nn.compact
    def __call__(self, x):
        calls = self.variable("stats", "calls", lambda: jnp.zeros((), jnp.int32))
        calls.value += 1
        self.sow("stats", "act_mean", x.mean())
        return x


def test_sows_flax_makes_unlike_effax_are_refused_by_path_not_reshaped():
    x = jnp.ones((1, 4))
    t = fx.transform(fx.from_flax(_ReducedSow()))
    with pytest.raises(fx.EffaxError, match=r"wrote `total` in collection 'intermediates' as an array float32\[\]"):
        t.init(jax.random.key(0), x, mutable=True)
    t = fx.transform(fx.from_flax(_SowBesideState()))
    v = t.init(jax.random.key(0), x)
    with pytest.raises(fx.EffaxError, match="sows `act_mean` into collection 'stats', where it also keeps variables"):
        t.apply(v, x, mutable=["stats"])


def test_a_linen_module_given_to_transform_says_to_wrap_it_with_from_flax():
    """`fx.transform(nn.Dense(3))` was accepted, then failed inside Flax (`CallCompactUnboundModuleError`)."""
    x = jnp.ones((2, 3))
    for model in (nn.Dense(3), nn.Dense):
        with pytest.raises(fx.EffaxError, match=r"Flax linen module .*Dense: .*fx\.from_flax"):
            fx.transform(model)
        with pytest.raises(fx.EffaxError, match=r"fx\.from_flax"):
            fx.summary(model, jax.random.key(0), x)
    t = fx.transform(fx.from_flax(nn.Dense(3)))  # the fix works
    assert t.apply(t.init(jax.random.key(0), x), x).shape == (2, 3)


def test_an_fx_nn_layer_inside_a_linen_module_is_refused_by_name():
    """It was a TraceMismatchError about JAX transforms the user never used (Flax's own shape pass)."""

    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return fx.nn.Dense(2)(nn.Dense(3)(x))

    with pytest.raises(fx.EffaxError, match=r"param `Dense_0/kernel` .* from inside the Flax module Mixed"):
        fx.transform(fx.from_flax(Mixed())).init(jax.random.key(0), jnp.ones((2, 3)))


class _CarriedLSTM(nn.Module):
    """A linen module keeping an LSTM carry (a tuple) as state across calls."""

    @nn.compact
    def __call__(self, x):
        cell = nn.OptimizedLSTMCell(4)
        carry = self.variable("carry", "c", lambda: cell.initialize_carry(jax.random.key(0), x.shape))
        new, y = cell(carry.value, x)
        if not self.is_initializing():
            carry.value = new
        return y


def test_state_whose_value_is_a_tuple_is_state_not_sown_values():
    # a collection of tuples is what `sow` makes, or a tuple-valued variable: only the first is sown
    m, x = _CarriedLSTM(), jnp.ones((2, 3))
    vf, t = m.init(K, x), fx.transform(fx.from_flax(m))
    v = t.init(K, x)
    assert sorted(v) == ["carry", "params"]
    assert_same(v, vf)
    yf, uf = m.apply(vf, x, mutable=["carry"])
    y, u = t.apply(v, x, mutable=["carry"])
    assert_same((y, u), (yf, uf))
    assert_same(t.apply({**v, **u}, x, mutable=["carry"]), m.apply({**vf, **uf}, x, mutable=["carry"]))
    assert fx.check_variables(t, {**vf, **uf}, x).ok


@pytest.mark.parametrize("lift", ["scan", "vmap"])
def test_broadcast_params_of_a_flax_module_are_made_once_as_the_unlifted_module_makes_them(lift):
    # params="broadcast": Flax's init inside the body draws one "params" key for every iteration (member)
    dense = fx.from_flax(nn.Dense(4), name="d")
    if lift == "scan":
        body = fx.scan(lambda h, _: (jnp.tanh(dense(h)), None), length=3, params="broadcast")
        t = fx.transform(lambda x: body(x, None)[0])
    else:
        t = fx.transform(fx.vmap(dense, params="broadcast"))
    x = jnp.ones((3, 4))
    out, v = t.init_with_output(K, x)
    assert_same(v["params"]["d"], fx.transform(dense).init(K, x[0])["params"]["d"])
    assert_same(out, t.apply(v, x))  # law 3


class _KernelDelta(fx.Handler):
    """Answers every kernel with the stored one plus an adapter of its own (a LoRA on params)."""

    def handle(self, request, forward):
        w = forward(request)
        if isinstance(request, fx.ParamRequest) and request.path[-1] == "kernel":
            with fx.scope("lora"):
                a = fx.param("a", jax.nn.initializers.normal(0.5), (w.shape[0], 2))
                b = fx.param("b", jax.nn.initializers.normal(0.5), (2, w.shape[1]))
            return w + a @ b
        return w


def test_init_output_of_a_flax_module_uses_the_params_a_handler_answered():
    # law 3 with an interceptor: init's output comes from the answered params, as apply's does
    class Probe(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Dense(2)(x)
            self.sow("intermediates", "y", y)
            return y

    t = fx.transform(fx.from_flax(Probe(), name="d"))
    out, v = t.init_with_output(K, X, handlers=[_KernelDelta()], mutable=["intermediates"])
    applied, updates = t.apply(v, X, handlers=[_KernelDelta()], mutable=["intermediates"])
    assert_same(out, applied)
    assert_same(v["intermediates"], updates["intermediates"])
    assert not np.allclose(out, nn.Dense(2).apply({"params": v["params"]["d"]["Dense_0"]}, X))


def test_the_mode_reaches_a_method_flax_runs_inside_the_module():
    # docs/guides/flax.md: `method=lambda m, x: m(x, training=fx.is_training())` feeds a linen keyword
    class Critic(nn.Module):
        @nn.compact
        def __call__(self, x, training: bool = False):
            return nn.Dropout(0.5, deterministic=not training)(nn.Dense(3)(x))

    m = Critic()
    t = fx.transform(fx.from_flax(m), method=lambda m, x: m(x, training=fx.is_training()))
    v = t.init(K, X)
    assert_same(t.apply(v, X, training=True, rngs={"dropout": KD}), m.apply(v, X, training=True, rngs={"dropout": KD}))
    assert_same(t.apply(v, X, training=False), m.apply(v, X))
