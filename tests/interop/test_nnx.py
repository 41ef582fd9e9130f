"""`fx.from_nnx`: Flax NNX modules run inside effax models, equal to calling the NNX module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import effax as fx
from effax.handlers._random import fold, h_path

X = jax.random.normal(jax.random.key(2), (4, 3))
KD = jax.random.key(7)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])

    def __call__(self, x):
        h = self.drop(self.bn(self.lin(x)))
        for layer in self.layers:
            h = layer(h)
        return h

    def embed(self, x):
        return self.lin(x)


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


def reference(module, scope=()):
    """A copy of `module` whose streams hold the keys `from_nnx` documents (count 0)."""
    graphdef, state = nnx.split(nnx.clone(module))
    flat = []
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, nnx.RngKey):
            holder = scope + tuple(str(p) for p in path[:-1])
            var = var.replace(fold(KD, h_path(holder)))
        elif isinstance(var, nnx.RngCount):
            var = var.replace(jnp.zeros_like(var.get_value()))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def test_init_holds_the_modules_own_values_in_flax_collections():
    net = Net(nnx.Rngs(params=0, dropout=1))
    variables = fx.transform(fx.from_nnx(net)).init(jax.random.key(1), X)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]["layers"]) == {"0", "1"}
    assert_same(variables["params"]["lin"]["kernel"], net.lin.kernel[...])
    assert_same(variables["batch_stats"]["bn"]["var"], net.bn.var[...])


def test_eval_output_equals_the_module_and_needs_no_rngs():
    net = Net(nnx.Rngs(params=0, dropout=1))
    net.eval()
    t = fx.transform(fx.from_nnx(net))
    variables = t.init(jax.random.key(1), X)
    assert_same(t.apply(variables, X), net(X))
    assert_same(jax.jit(t.apply)(variables, X), net(X))


def test_a_stream_the_run_lacks_is_not_asked_for_inside_a_lifted_transform():
    """An NNX module holds its streams even when it does not draw (Dropout in eval): inside `fx.scan`, as
    outside, the run's missing key for it is no error until the module draws."""
    f = fx.from_nnx(nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0)), name="drop")
    t = fx.transform(lambda x: fx.scan(lambda c, _: (f(c, deterministic=True), None), length=2)(x, None)[0])
    v = t.init(jax.random.key(0), X)
    for options in ({}, {"handlers": fx.handlers.eval()}, {"rngs": {"other": KD}}):
        np.testing.assert_array_equal(t.apply(v, X, **options), X)


def test_train_output_and_batch_stats_equal_the_module_with_effax_keys():
    net = Net(nnx.Rngs(params=0, dropout=1))
    t = fx.transform(fx.from_nnx(net))
    variables = t.init(jax.random.key(1), X)
    out, updates = t.apply(variables, X, rngs={"dropout": KD}, mutable=["batch_stats"])
    ref = reference(net)
    assert_same(out, ref(X))
    assert_same(updates["batch_stats"]["bn"]["mean"], ref.bn.mean[...])
    assert not np.allclose(updates["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])
    # the module given is never mutated
    assert_same(net.bn.mean[...], variables["batch_stats"]["bn"]["mean"])
    assert int(net.drop.rngs.count[...]) == 0


def test_nested_under_a_scope_and_name():
    net = Net(nnx.Rngs(params=0, dropout=1))
    f = fx.from_nnx(net, name="net")

    def model(x):
        with fx.scope("body"):
            return f(x)

    t = fx.transform(model)
    variables = t.init(jax.random.key(1), X)
    assert set(variables["params"]["body"]["net"]) == {"lin", "bn", "layers"}
    out, _ = t.apply(variables, X, rngs={"dropout": KD}, mutable=True)
    assert_same(out, reference(net, ("body", "net"))(X))


def test_drawing_from_a_missing_stream_raises_missing_rng_error():
    t = fx.transform(fx.from_nnx(Net(nnx.Rngs(params=0, dropout=1))))
    variables = t.init(jax.random.key(1), X)
    with pytest.raises(fx.MissingRngError, match=r"(?s)'dropout'.*`drop/rngs`"):
        t.apply(variables, X, mutable=["batch_stats"])


def test_writes_to_a_frozen_collection_are_dropped():
    net = Net(nnx.Rngs(params=0, dropout=1))  # train mode: BatchNorm writes its stats
    t = fx.transform(fx.from_nnx(net))
    variables = t.init(jax.random.key(1), X)
    out = t.apply(variables, X, rngs={"dropout": KD})
    assert_same(out, reference(net)(X))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # NNX prefers nnx.capture to Module.sow
def test_intermediates_come_back_through_fx_sow():
    class Sowing(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

        def __call__(self, x):
            h = self.lin(x)
            self.lin.sow(nnx.Intermediate, "h", h)
            return 2 * h

    module = Sowing()
    t = fx.transform(fx.from_nnx(module))
    variables = t.init(jax.random.key(1), X)
    out, sown = t.apply(variables, X, mutable=["intermediates"])
    assert_same(sown, {"intermediates": {"lin": {"h": (out / 2,)}}})


def test_other_methods_and_gradients():
    net = Net(nnx.Rngs(params=0, dropout=1))
    net.eval()
    f = fx.from_nnx(net)
    t = fx.transform(lambda x: f(x, method="embed"))
    variables = t.init(jax.random.key(1), X)
    assert_same(t.apply(variables, X), net.embed(X))

    def loss(params):
        return jnp.sum(t.apply({**variables, "params": params}, X) ** 2)

    grads = jax.grad(loss)(variables["params"])
    kernel = net.lin.kernel[...]
    expected = jax.grad(lambda k: jnp.sum((X @ k + net.lin.bias[...]) ** 2))(kernel)
    assert_same(grads["lin"]["kernel"], expected)
    assert_same(fx.transform(lambda x: f(x, method=type(net).embed)).apply(variables, X), net.embed(X))
    # `method=` on the transform reaches the NNX method too, by name or as the advised function
    whole = fx.transform(f)
    assert_same(whole.apply(variables, X, method="embed"), net.embed(X))
    assert_same(whole.apply(variables, X, method=lambda m, x: m.embed(x)), net.embed(X))


def test_sharding_names_become_logical_axes():
    class Sharded(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((3, 2)), out_sharding=("embed", "mlp"), eager_sharding=False)

        def __call__(self, x):
            return x @ self.w[...]

    seen = {}

    class Record(fx.Handler):
        def handle(self, request, forward):
            if isinstance(request, fx.ParamRequest):
                seen[request.path] = request.axes
            return forward(request)

    fx.transform(fx.from_nnx(Sharded())).init(jax.random.key(0), X, handlers=[Record()])
    assert seen == {("w",): ("embed", "mlp")}


def test_a_dimension_split_over_several_names_keeps_its_names():
    class Split(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((4, 2)), out_sharding=(("data", "model"), None), eager_sharding=False)

        def __call__(self, x):
            return x @ self.w[...]

    s = fx.summary(fx.transform(fx.from_nnx(Split())), jnp.ones((1, 4)))
    assert s.entries[0].axes == (("data", "model"), None)


def test_sharding_names_of_state_and_short_names_are_kept():
    """A `Cache`'s names and a Param's shorter-than-its-rank names (a valid `PartitionSpec`) used to be
    dropped, leaving both replicated without an error; names longer than the rank are refused."""
    from jax.sharding import PartitionSpec as P

    class Cached(nnx.Module):
        def __init__(self, names):
            self.w = nnx.Param(jnp.ones((3, 3)), out_sharding=names, eager_sharding=False)
            self.cache = nnx.Cache(jnp.zeros((4, 3)), out_sharding=("batch", "mlp"), eager_sharding=False)

        def __call__(self, x):
            self.cache[...] = self.cache[...] + x @ self.w[...]
            return self.cache[...]

    axes = fx.sharding.logical_axes(fx.summary(fx.transform(fx.from_nnx(Cached(("embed",)))), X))
    assert axes == {"params": {"w": P("embed", None)}, "cache": {"cache": P("batch", "mlp")}}
    with pytest.raises(fx.EffaxError, match=r"NNX param `w` has sharding names \('embed', 'mlp', 'heads'\) for "
                                            r"shape \(3, 3\)"):
        fx.summary(fx.transform(fx.from_nnx(Cached(("embed", "mlp", "heads")))), X)


def test_refuses_what_it_cannot_run():
    import flax.linen as nn

    with pytest.raises(fx.EffaxError, match="fx.from_flax"):
        fx.from_nnx(nn.Dense(2))
    with pytest.raises(fx.InvalidNameError):
        fx.from_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), name="")


def test_stock_modules_with_a_per_call_rngs_keyword_run_and_draw_from_effax_keys():
    """`nnx.Sequential`, `nnx.Dropout`: their optional `rngs=` (NNX's per-call key override) is what effax's
    `rngs` feeds through the module's streams, so it is no clash with `t.apply`'s option (every call was
    refused); a keyword the module requires still is."""
    x = jnp.ones((2, 4))
    seq = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1)))
    v = fx.transform(fx.from_nnx(seq)).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, v) == {"params": {"layers": {"0": {"bias": (8,), "kernel": (4, 8)}}}}
    seq.eval()
    np.testing.assert_allclose(fx.transform(fx.from_nnx(seq)).apply(v, x), seq(x))
    seq.train()
    t = fx.transform(fx.from_nnx(seq))
    a, b = (t.apply(v, x, rngs={"dropout": jax.random.key(k)}, mutable=True)[0] for k in (3, 4))
    assert not np.allclose(a, b) and (a == 0).any()
    with pytest.raises(fx.MissingRngError, match="dropout"):
        t.apply(v, x, mutable=True)

    class NeedsRngs(nnx.Module):
        def __call__(self, x, rngs):
            return x

    with pytest.raises(fx.EffaxError, match="'rngs', which is also an option"):
        fx.transform(fx.from_nnx(NeedsRngs())).init(jax.random.key(0), x)
