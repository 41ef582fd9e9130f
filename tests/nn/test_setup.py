"""`setup()`: submodules, params and state assigned lazily, named after their attributes, as in Flax linen."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx

X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)


class AE(fx.nn.Module):
    def setup(self):
        self.enc = fx.nn.Dense(2)
        self.dec = fx.nn.Dense(3)
        self.layers = [fx.nn.Dense(3), fx.nn.Dense(3)]
        self.heads = {"a": fx.nn.Dense(1)}

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.dec(self.enc(x)) + self.heads["a"](x)

    def encode(self, x):
        return self.enc(x)


class LinenAE(nn.Module):
    def setup(self):
        self.enc = nn.Dense(2)
        self.dec = nn.Dense(3)
        self.layers = [nn.Dense(3), nn.Dense(3)]
        self.heads = {"a": nn.Dense(1)}

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.dec(self.enc(x)) + self.heads["a"](x)


def test_submodules_are_named_after_their_attributes_as_in_linen():
    t = fx.transform(AE())
    ours = t.init(jax.random.key(0), X)
    theirs = LinenAE().init(jax.random.key(0), X)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
    np.testing.assert_allclose(t.apply(theirs, X), LinenAE().apply(theirs, X), rtol=1e-6)
    assert t.apply(ours, X, method="encode").shape == (2, 2)
    np.testing.assert_allclose(jax.jit(t.apply)(ours, X), t.apply(ours, X), rtol=1e-6)


class Counter(fx.nn.Module):
    def setup(self):
        self.scale = fx.param("scale", jax.nn.initializers.ones, ())
        self.count = fx.local_state("count", lambda: jnp.zeros((), jnp.int32), collection="counts")

    def __call__(self, x):
        self.count.set(self.count.get() + 1)
        return x * self.scale


def test_params_and_state_made_in_setup_live_at_the_modules_path():
    def model(x):
        c = Counter()
        return c(c(x))  # one setup per run: both calls share the param and the cell

    t = fx.transform(model)
    v = t.init(jax.random.key(0), X)
    assert jax.tree.map(jnp.shape, v) == {
        "params": {"Counter_0": {"scale": ()}}, "counts": {"Counter_0": {"count": ()}}
    }
    _, updates = t.apply(v, X, mutable=["counts"])
    assert int(updates["counts"]["Counter_0"]["count"]) == 2


def test_setup_runs_afresh_in_each_run_and_trace():
    module = Counter()
    t = fx.transform(module)
    v = t.init(jax.random.key(0), X)
    eager, _ = t.apply(v, X, mutable=["counts"])
    jitted, _ = jax.jit(lambda v, x: t.apply(v, x, mutable=["counts"]))(v, X)
    scanned = fx.transform(lambda x: fx.scan(lambda h, _: (module(h), None), length=2)(x, None)[0])
    vs = scanned.init(jax.random.key(0), X)
    assert vs["params"]["Counter_0"]["scale"].shape == (2,)
    np.testing.assert_allclose(jitted, eager)
    with jax.checking_leaks():
        scanned.apply(vs, X, mutable=["counts"])


def test_setup_attributes_exist_only_while_the_module_runs():
    with pytest.raises(AttributeError, match="assigned in setup\\(\\), which runs only while the module runs"):
        _ = AE().enc
    with pytest.raises(AttributeError, match="does not assign it .assigned: \\['dec', 'enc', 'heads', 'layers'\\]"):
        fx.transform(lambda x: AE().missing).init(jax.random.key(0), X)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign AE.enc here: .*only in setup"):
        AE().enc = fx.nn.Dense(2)


def test_a_module_without_setup_has_no_extra_attributes():
    with pytest.raises(AttributeError, match="'Dense' object has no attribute 'enc'"):
        _ = fx.nn.Dense(2).enc


def same_tree(ours, linen_module, *args):
    theirs = linen_module.init(jax.random.key(0), *args)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
    return theirs


def test_modules_built_in_setup_are_named_by_who_holds_them_as_in_linen():
    class Block(fx.nn.Module):
        proj: fx.nn.Module

        def __call__(self, x):
            return self.proj(x)

    class LinenBlock(nn.Module):
        proj: nn.Module

        def __call__(self, x):
            return self.proj(x)

    class Net(fx.nn.Module):
        def setup(self):
            self.seq = fx.nn.Sequential([fx.nn.Dense(4), jax.nn.relu, fx.nn.Dense(2)])
            self.block = Block(fx.nn.Dense(5))
            self.a = fx.nn.Dense(3)
            self.b = self.a  # one module on two attributes: the first names it
            self.enc = fx.nn.Dense(2, name="foo")  # its own name first

        def __call__(self, x):
            return self.block(self.seq(x)), self.b(self.a(x)), self.enc(x), fx.nn.Dense(6)(x)

    class LinenNet(nn.Module):
        def setup(self):
            self.seq = nn.Sequential([nn.Dense(4), jax.nn.relu, nn.Dense(2)])
            self.block = LinenBlock(nn.Dense(5))
            self.a = nn.Dense(3)
            self.b = self.a
            self.enc = nn.Dense(2, name="foo")

        @nn.compact
        def __call__(self, x):
            return self.block(self.seq(x)), self.b(self.a(x)), self.enc(x), nn.Dense(6)(x)

    t = fx.transform(Net())
    theirs = same_tree(t.init(jax.random.key(0), X), LinenNet(), X)
    assert sorted(theirs["params"]) == ["Dense_0", "a", "block", "foo", "seq"]  # the inline layer keeps Dense_0
    same = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6)  # noqa: E731
    jax.tree.map(same, t.apply(theirs, X), LinenNet().apply(theirs, X))


class Block(fx.nn.Module):
    def __call__(self, x, *rest):
        y = jnp.tanh(fx.nn.Dense(3)(x))
        return (y, None) if rest else y


def test_a_lifted_module_class_is_named_as_linen_names_it():
    class Net(fx.nn.Module):
        def setup(self):
            self.block = fx.remat(Block)()
            self.stack = fx.scan(Block, length=2)()

        def __call__(self, x):
            return self.stack(self.block(x), None)[0]

    v = fx.transform(Net()).init(jax.random.key(0), X)
    assert sorted(v["params"]) == ["block", "stack"]
    compact = fx.transform(lambda x: fx.vmap(Block, axis_size=2, in_axes=None)()(fx.remat(Block)()(x)))
    assert sorted(compact.init(jax.random.key(0), X)["params"]) == ["CheckpointBlock_0", "VmapBlock_0"]


def test_attributes_are_assigned_in_setup_only_and_fields_never():
    class Sets(fx.nn.Module):
        features: int = 2

        def setup(self):
            self.features = 3

        def __call__(self, x):
            return x

    class Late(fx.nn.Module):
        def setup(self):
            self.enc = fx.nn.Dense(2)

        def __call__(self, x):
            self.dec = fx.nn.Dense(3)
            return x

    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'features' of Sets: fields"):
        fx.transform(Sets()).init(jax.random.key(0), X)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign Late.dec here: .*only in setup"):
        fx.transform(Late()).init(jax.random.key(0), X)
