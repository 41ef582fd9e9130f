"""fx.sharding: logical axes follow the rules, trees mirror the variables, sharded init places each param."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import effax as fx
from effax.sharding import ShardingError, logical_to_spec

init = jax.nn.initializers
RULES = [("batch", "data"), ("embed", None), ("mlp", "model"), ("heads", "model")]


def model(x):
    with fx.scope("up"):
        w = fx.param("kernel", init.lecun_normal(), (x.shape[-1], 8), axes=("embed", "mlp"))
        b = fx.param("bias", init.zeros, (8,), axes=("mlp",))
    with fx.scope("down"):
        v = fx.param("kernel", init.lecun_normal(), (8, x.shape[-1]), axes=("mlp", "embed"))
    n = fx.local_state("count", lambda: jnp.zeros((), jnp.int32))
    n.set(n.get() + 1)
    scale = fx.param("scale", init.ones, (x.shape[-1],))  # no axes: replicated
    return jax.nn.relu(x @ w + b) @ v * scale


X = jnp.ones((4, 6))


def mesh_1x1():
    return jax.make_mesh((1, 1), ("data", "model"))


def test_spec_follows_rules_in_order():
    assert logical_to_spec(("batch", "embed"), None, RULES) == P("data", None)
    assert logical_to_spec(("embed", "mlp"), None, dict(RULES)) == P(None, "model")
    assert logical_to_spec(None, None, RULES) == P()
    assert logical_to_spec(("mlp", None), None, RULES) == P("model", None)
    # a mesh axis serves one dim only: the second dim wanting "model" is replicated (Flax's rule)
    assert logical_to_spec(("mlp", "heads"), None, RULES) == P("model", None)
    # a later rule for the same name is the fallback when the first one's mesh axis is taken
    rules = [("heads", "model"), ("mlp", "model"), ("mlp", "data")]
    assert logical_to_spec(("mlp", "heads"), None, rules) == P("data", "model")
    assert logical_to_spec(("mlp",), None, [("mlp", ("data", "model"))]) == P(("data", "model"))


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(ShardingError, match=r"logical axis 'hidden'.*\('hidden', None\)"):
        logical_to_spec(("batch", "hidden"), None, RULES)


def test_rule_naming_a_missing_mesh_axis_is_an_error():
    with pytest.raises(ShardingError, match=r"mesh axis 'tensor'.*\('data', 'model'\)"):
        logical_to_spec(("mlp",), mesh_1x1(), [("mlp", "tensor")])


def test_malformed_rule_is_an_error():
    with pytest.raises(ShardingError, match="not a pair"):
        logical_to_spec(("mlp",), None, ["mlp"])


def test_logical_to_mesh_mirrors_the_variables():
    t = fx.transform(model)
    mesh = mesh_1x1()
    shardings = fx.sharding.logical_to_mesh(fx.summary(t, X), mesh, RULES)
    abstract = jax.eval_shape(t.init, jax.random.key(0), X)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
    params = shardings["params"]
    assert params["up"]["kernel"] == NamedSharding(mesh, P(None, "model"))
    assert params["up"]["bias"].spec == P("model")
    assert params["down"]["kernel"].spec == P("model", None)
    assert params["scale"].spec == P()
    assert shardings["state"]["count"].spec == P()
    variables = jax.jit(t.init, out_shardings=shardings)(jax.random.key(0), X)
    assert variables["params"]["up"]["kernel"].sharding == params["up"]["kernel"]


def test_inventory_and_axes_trees_give_the_same_shardings():
    t = fx.transform(model)
    mesh = mesh_1x1()
    expected = fx.sharding.logical_to_mesh(fx.summary(t, X), mesh, RULES)
    assert fx.sharding.logical_to_mesh(fx.effects_of(t, X), mesh, RULES) == expected
    axes = fx.sharding.logical_axes(fx.summary(t, X))
    assert axes["params"]["up"]["kernel"] == P("embed", "mlp")
    assert fx.sharding.logical_to_mesh(axes, mesh, RULES) == expected
    plain = {"params": {"w": ("embed", "mlp"), "b": None}}
    out = fx.sharding.logical_to_mesh(plain, mesh, RULES)
    assert (out["params"]["w"].spec, out["params"]["b"].spec) == (P(None, "model"), P())


def test_abstract_arrays_without_axes_are_refused():
    abstract = jax.eval_shape(fx.transform(model).init, jax.random.key(0), X)
    with pytest.raises(ShardingError, match=r"do not carry logical axes.*fx.summary"):
        fx.sharding.logical_to_mesh(abstract, mesh_1x1(), RULES)


def test_error_names_the_param_path():
    def f(x):
        return x @ fx.param("w", init.ones, (6, 2), axes=("embed", "vocab"))

    with pytest.raises(ShardingError, match=r"variable `params:w` has logical axis 'vocab'"):
        fx.sharding.logical_to_mesh(fx.summary(fx.transform(f), X), mesh_1x1(), RULES)


def test_a_variables_tree_is_refused_by_path_and_type_without_its_values():
    variables = fx.transform(model).init(jax.random.key(0), X)
    for f in (fx.sharding.logical_axes, lambda v: fx.sharding.logical_to_mesh(v, mesh_1x1(), RULES)):
        with pytest.raises(ShardingError, match=r"entry `params:down/kernel` holds jax.Array float32\[8, 6\]") as info:
            f(variables)
        assert "Array(" not in str(info.value) and "[[" not in str(info.value)


def test_bad_axes_in_an_axes_tree_name_the_entry():
    with pytest.raises(ShardingError, match=r"entry `params:w`: logical axes \('embed', 1\) hold int 1"):
        fx.sharding.logical_axes({"params": {"w": ("embed", 1)}})


def test_the_model_itself_or_a_root_leaf_is_refused_with_the_fix():
    t = fx.transform(model)
    for source in (t, model):
        for f in (fx.sharding.logical_axes, lambda v: fx.sharding.logical_to_mesh(v, mesh_1x1(), RULES)):
            with pytest.raises(ShardingError, match=r"a model says its axes only when it runs. Pass `fx.summary"):
                f(source)
    with pytest.raises(ShardingError, match=r"but the source \(not a tree of variables\) holds int 3"):
        fx.sharding.logical_axes(3)
    with pytest.raises(ShardingError, match=r"the source \(not a tree of variables\): logical axes \('mlp', 3\)"):
        fx.sharding.logical_axes(("mlp", 3))
    # the suggested fix works, and a root that is one entry's axes maps as that entry
    assert fx.sharding.logical_to_mesh(fx.summary(t, X), mesh_1x1(), RULES)["params"]["up"]["bias"].spec == P("model")
    assert fx.sharding.logical_to_mesh(P("mlp"), mesh_1x1(), RULES).spec == P("model")
    assert fx.sharding.logical_axes(None) == P()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: fx.sharding.logical_to_mesh(s, None, RULES), r"`mesh` must be a `jax.sharding.Mesh`, got NoneType"),
        (lambda s: fx.sharding.logical_to_mesh(s, "mesh", RULES), r"`mesh` must be a `jax.sharding.Mesh`, got str"),
        (lambda s: fx.sharding.logical_to_mesh(s, mesh_1x1(), None), r"`rules` must be a list .* got NoneType"),
        (lambda s: fx.sharding.logical_to_mesh(s, mesh_1x1(), ("mlp", "model")),
         r"got tuple .*for one rule write `\[\('mlp', 'model'\)\]`"),
        (lambda s: logical_to_spec(("mlp",), None, [("mlp", 1)]),
         r"rule \('mlp', 1\): the mesh axes must be a mesh axis name, a tuple of them, or None .* got int 1"),
        (lambda s: logical_to_spec(("mlp",), None, [(1, "model")]), r"rule \(1, 'model'\): the logical axis must be"),
        (lambda s: logical_to_spec(("mlp",), None, [("mlp", ("model", "model"))]),
         r"names a mesh axis twice.*`\('mlp', 'model'\)`"),
        (lambda s: logical_to_spec("mlp", None, RULES), r"got str 'mlp' \(write `\('mlp',\)` for one dimension\)"),
        (lambda s: logical_to_spec(("mlp", ""), None, RULES), r"hold str ''"),
    ],
    ids=["mesh-None", "mesh-str", "rules-None", "rules-one-pair", "target-int", "logical-int", "target-twice",
         "axes-str", "axes-empty-name"],
)
def test_argument_errors_say_what_was_given_and_the_fix(call, message):
    s = fx.summary(fx.transform(model), X)
    with pytest.raises(ShardingError, match=message):
        call(s)


def test_a_dimension_split_over_several_names_maps_name_by_name():
    rules = [("batch", "data"), ("seq", "model"), ("embed", None)]
    assert logical_to_spec((("batch", "seq"), "embed"), None, rules) == P(("data", "model"), None)
    assert logical_to_spec((("batch", "embed"), None), None, rules) == P("data", None)  # embed replicates
    assert logical_to_spec((("embed",), None), None, rules) == P(None, None)
    # the rule order decides between dimensions, member by member (Flax's rule)
    assert logical_to_spec((("batch", "seq"), "seq"), None, rules) == P(("data", "model"), None)
    assert logical_to_spec(("seq", ("batch", "seq")), None, rules) == P("model", "data")
    with pytest.raises(ShardingError, match=r"logical axis 'heads', but no rule maps it"):
        logical_to_spec((("batch", "heads"),), None, rules)

    def f(x):
        return x @ fx.param("w", init.ones, (6, 4), axes=(("batch", "seq"), None))

    mesh = mesh_1x1()
    shardings = fx.sharding.logical_to_mesh(fx.summary(fx.transform(f), X), mesh, rules)
    assert shardings["params"]["w"] == NamedSharding(mesh, P(("data", "model"), None))
    assert fx.sharding.logical_axes({"params": {"w": (("batch", "seq"), None)}})["params"]["w"] == P(
        ("batch", "seq"), None
    )


EIGHT_DEVICES = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import effax as fx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from tests.test_sharding import RULES, X, model

    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    t = fx.transform(model)
    x = jnp.ones((8, 6))
    shardings = fx.sharding.logical_to_mesh(fx.summary(t, x), mesh, RULES)
    variables = jax.jit(t.init, out_shardings=shardings)(jax.random.key(0), x)
    reference = jax.jit(t.init)(jax.random.key(0), x)
    for (path, a), s, r in zip(jax.tree.leaves_with_path(variables), jax.tree.leaves(shardings),
                               jax.tree.leaves(reference)):
        assert a.sharding == s, (path, a.sharding, s)
        assert {sh.data.shape for sh in a.addressable_shards} == {s.shard_shape(a.shape)}, path
        assert np.array_equal(np.asarray(a), np.asarray(r)), path
    kernel = variables["params"]["up"]["kernel"]
    assert {sh.data.shape for sh in kernel.addressable_shards} == {(6, 4)}  # half of (6, 8) per device

    def odd(x):
        return x @ fx.param("w", jax.nn.initializers.ones, (6, 7), axes=("embed", "mlp"))
    try:
        fx.sharding.logical_to_mesh(fx.summary(fx.transform(odd), x), mesh, RULES)
    except fx.sharding.ShardingError as e:
        assert "dimension 1 (logical axis 'mlp') has size 7" in str(e), e
    else:
        raise AssertionError("no error for a dimension that does not divide")

    def split(x):
        return x @ fx.param("w", jax.nn.initializers.ones, (6, 8), axes=(("batch", "mlp"), None))
    try:
        fx.sharding.logical_to_mesh(fx.summary(fx.transform(split), x), mesh, RULES)
    except fx.sharding.ShardingError as e:
        assert "dimension 0 (logical axis ('batch', 'mlp')) has size 6, which mesh axes ('data', 'model')" in str(e), e
    else:
        raise AssertionError("no error for a split dimension that does not divide")
    print("OK")
    """
)


def run_on_eight_devices(script):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


def test_sharded_init_on_eight_devices():
    run_on_eight_devices(EIGHT_DEVICES)
