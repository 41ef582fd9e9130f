"""How lifted transforms take their arguments: fx.vmap as jax.vmap (keyword arguments mapped along axis 0,
unmapped leaves passed through unchanged), fx.remat keeping Python values static, fx.scan's carry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx

key = jax.random.key(0)
normal = jax.nn.initializers.normal(1.0)
x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)  # 3 members (or examples) of 4 features


def same(a, b):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), a, b)


def per_member(t, v, *args):
    """`t.apply` on member i's slice of every argument, stacked: what the vmapped model must equal."""
    return jnp.stack([t.apply(v, *jax.tree.map(lambda a, i=i: a[i], args)) for i in range(len(x))])


# --- keyword arguments: mapped along axis 0, as in jax.vmap


def scaled(h, scale=1.0, *, shift=None):
    y = h @ fx.param("w", normal, (4, 2)) * scale
    return y if shift is None else y + shift["b"]


def test_keyword_arguments_are_mapped_along_axis_0_like_jax_vmap():
    scale, shift = jnp.arange(1.0, 4.0), {"b": jnp.arange(6.0).reshape(3, 2)}
    lifted = fx.transform(lambda x, s, b: fx.vmap(scaled, params="broadcast")(x, scale=s, shift=b))
    one = fx.transform(lambda h, s, b: scaled(h, scale=s, shift=b))
    v = lifted.init(key, x, scale, shift)
    same(v, one.init(key, x[0], scale[0], jax.tree.map(lambda a: a[0], shift)))
    expect = per_member(one, v, x, scale, shift)
    same(lifted.apply(v, x, scale, shift), expect)
    same(jax.jit(lifted.apply)(v, x, scale, shift), expect)
    # jax.vmap itself agrees, on the same params
    w = v["params"]["w"]
    same(jax.vmap(lambda h, scale, shift: h @ w * scale + shift["b"])(x, scale=scale, shift=shift), expect)


def test_keyword_arguments_of_an_ensemble_follow_each_member():
    scale = jnp.arange(1.0, 4.0)
    lifted = fx.transform(lambda x, s: fx.vmap(scaled, in_axes=None, axis_size=3)(x[0], scale=s))
    one = fx.transform(scaled)
    v = lifted.init(key, x, scale)
    assert v["params"]["w"].shape == (3, 4, 2)
    expect = jnp.stack([one.apply({"params": {"w": v["params"]["w"][i]}}, x[0], scale=scale[i]) for i in range(3)])
    same(lifted.apply(v, x, scale), expect)
    same(jax.jit(lifted.apply)(v, x, scale), expect)


def test_a_keyword_argument_without_axis_0_is_refused_with_the_fix():
    t = fx.transform(lambda x: fx.vmap(scaled, params="broadcast")(x, scale=2.0))
    with pytest.raises(fx.EffaxError, match=(
        r"fx\.vmap at `<root>`: the keyword argument `scale` is mapped along axis 0, as jax\.vmap maps every "
        r"keyword argument .*float 2\.0, of rank 0; pass it positionally with an in_axes entry None .*"
        r"`fx\.vmap\(functools\.partial\(fn, scale=2\.0\)\)\(x\)`"
    )):
        t.init(key, x)
    with pytest.raises(fx.EffaxError, match=r"`scale`: 2, `args\[0\]`: 3|`args\[0\]`: 3, `scale`: 2"):
        fx.transform(lambda x: fx.vmap(scaled, params="broadcast")(x, scale=jnp.ones(2))).init(key, x)
    with pytest.raises(fx.EffaxError, match=r"1 positional argument.*Keyword arguments take no entry"):
        fx.transform(lambda x: fx.vmap(scaled, in_axes=(0, None))(x, scale=jnp.ones(3))).init(key, x)
    # both fixes the message gives work, and give the same values
    positional = fx.transform(lambda x: fx.vmap(scaled, in_axes=(0, None), params="broadcast")(x, 2.0))
    bound = fx.transform(lambda x: fx.vmap(functools.partial(scaled, scale=2.0), params="broadcast")(x))
    v = positional.init(key, x)
    same(bound.init(key, x), v)
    same(bound.apply(v, x), positional.apply(v, x))


# --- unmapped arguments reach the body unchanged, as with jax.vmap


def branching(h, flag, act, n, nothing):
    """A member that needs its unmapped arguments as Python values: a branch, a name, a shape, a layer flag."""
    assert nothing is None
    w = fx.param("w", normal, (4, n))
    y = getattr(jnp, act)(h @ w)
    y = fx.nn.Dropout(0.5, deterministic=flag)(y)
    return y if flag else -y


@pytest.mark.parametrize("flag", [True, False])
def test_unmapped_python_values_reach_the_body_unchanged(flag):
    seen = []

    def member(h, flag, act, n, nothing):
        seen.append((type(flag), type(act), type(n)))
        return branching(h, flag, act, n, nothing)

    lifted = fx.transform(
        lambda x: fx.vmap(member, in_axes=(0, None, None, None, None), params="broadcast")(x, flag, "tanh", 2, None)
    )
    one = fx.transform(lambda h: branching(h, flag, "tanh", 2, None))
    v = lifted.init(key, x)
    same(v, one.init(key, x[0]))
    if flag:  # deterministic: per member, the model on its own slice
        expect = per_member(one, v, x)
        same(lifted.apply(v, x), expect)
        same(jax.jit(lifted.apply)(v, x), expect)
    else:  # dropout per member: kept units are -tanh(x @ w) / 0.5, the others 0
        out = jax.jit(lifted.apply)(v, x, rngs={"dropout": key})
        ref = -jnp.tanh(x @ v["params"]["w"]) / 0.5
        assert out.shape == ref.shape and bool(jnp.all((out == 0) | jnp.isclose(out, ref)))
    assert set(seen) == {(bool, str, int)}  # the learning pass too
    # jax.vmap passes them unchanged as well
    jax.vmap(lambda h, flag, act: seen.append((type(flag), type(act))) or h, in_axes=(0, None, None))(x, flag, "tanh")
    assert seen[-1] == (bool, str)


def test_unmapped_parts_of_a_mapped_argument_and_arrays_pass_through():
    def member(d, scale):
        return branching(d["h"], d["flag"], "sin", 2, None) * scale

    t = fx.transform(
        lambda x, s: fx.vmap(member, in_axes=({"h": 0, "flag": None}, None), params="broadcast")(
            {"h": x, "flag": True}, s
        )
    )
    one = fx.transform(lambda h, s: branching(h, True, "sin", 2, None) * s)
    scale = np.float32(3.0)
    v = t.init(key, x, scale)
    same(v, one.init(key, x[0], scale))
    expect = jnp.stack([one.apply(v, x[i], scale) for i in range(3)])
    same(t.apply(v, x, scale), expect)
    same(jax.jit(t.apply)(v, x, scale), expect)


def test_a_module_with_a_python_flag_is_vmapped_like_jax_vmap():
    class Block(fx.nn.Module):
        def __call__(self, h, deterministic):
            h = fx.nn.Dense(2)(h)
            return fx.nn.Dropout(0.5, deterministic=deterministic)(h)

    t = fx.transform(lambda x: fx.vmap(Block, in_axes=(0, None), params="broadcast")()(x, True))
    one = fx.transform(lambda h: Block(name="VmapBlock_0")(h, True))
    v = t.init(key, x)
    same(v, one.init(key, x[0]))
    same(jax.jit(t.apply)(v, x), per_member(one, v, x))


# --- fx.remat keeps Python values static (jax.checkpoint would trace them unless in static_argnums)


def test_remat_keeps_python_values_static_as_the_plain_function_sees_them():
    plain = fx.transform(lambda h: branching(h, True, "tanh", 2, None).sum())
    rem = fx.transform(lambda h: fx.remat(branching)(h, True, "tanh", 2, None).sum())
    v = plain.init(key, x)
    same(rem.init(key, x), v)
    same(rem.apply(v, x), plain.apply(v, x))
    same(jax.jit(rem.apply)(v, x), plain.apply(v, x))
    grad = lambda t: jax.jit(jax.grad(t.apply, argnums=(0, 1)))(v, x)  # noqa: E731  arrays are still traced
    same(grad(rem), grad(plain))
    eqns = jax.make_jaxpr(rem.apply)(v, x).eqns
    assert [e.primitive.name for e in eqns].count("remat2") == 1  # still one jax.checkpoint
    with pytest.raises(jax.errors.TracerBoolConversionError):  # what jax.checkpoint alone does with the flag
        jax.checkpoint(lambda h, flag: h if flag else -h)(x, True)


# --- fx.scan: a carry is loop state, arrays only


def test_a_scan_carry_that_jax_cannot_trace_is_refused_with_the_fix():
    t = fx.transform(lambda x: fx.scan(lambda c, _: (c, None), length=2)((x, "tanh"))[0][0])
    with pytest.raises(fx.EffaxError, match=(
        r"fx\.scan at `<root>`: `carry\[1\]` is str 'tanh', which the carry cannot hold.*"
        r"`fx\.scan\(lambda c, x: body\(c, x, 'tanh'\), \.\.\.\)`"
    )):
        t.init(key, x)
    # closing over it, as the message says, works
    def body(c, _, act):
        return getattr(jnp, act)(c), None

    closed = fx.transform(lambda x: fx.scan(lambda c, x: body(c, x, "tanh"), length=2)(x)[0])
    same(closed.apply({}, x), jnp.tanh(jnp.tanh(x)))


def test_an_out_axis_the_output_lacks_is_named_with_the_range():
    """`out_axes=5` on a rank-1 output was JAX's raw ValueError from effax's learning pass."""
    member = lambda x: x @ fx.param("w", jax.nn.initializers.normal(), (4, 1))
    with pytest.raises(fx.EffaxError, match=r"out_axes=5 does not fit .* from -\(rank \+ 1\) to rank"):
        fx.transform(lambda x: fx.vmap(member, in_axes=0, out_axes=5)(x)).init(key, jnp.ones((2, 4)))
    t = fx.transform(lambda x: fx.vmap(member, in_axes=0, out_axes=1)(x))  # an axis in range works
    assert t.apply(t.init(key, jnp.ones((2, 4))), jnp.ones((2, 4))).shape == (1, 2)
