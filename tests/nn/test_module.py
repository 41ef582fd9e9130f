"""fx.nn.Module: auto-names, explicit names, weight sharing, per-run counters, routing."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import pytest

import effax as fx
from effax.nn._naming import current_names

KEY = jax.random.key(0)
X = jnp.ones((2, 3))


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def init_params(fn, *args, **kwargs):
    return fx.transform(fn).init(KEY, *args, **kwargs)["params"]


class Block(fx.nn.Module):
    features: int = 4

    def __call__(self, x):
        x = fx.nn.Dense(self.features)(x)
        return fx.nn.Dense(self.features)(jax.nn.relu(x))


def test_auto_names_count_per_class_within_the_parent_scope():
    def f(x):
        x = fx.nn.Dense(4)(x)
        x = fx.nn.LayerNorm()(x)
        x = fx.nn.Dense(5)(x)
        with fx.scope("head"):
            return fx.nn.Dense(2)(x)

    params = init_params(f, X)
    assert sorted(params) == ["Dense_0", "Dense_1", "LayerNorm_0", "head"]
    assert params["Dense_1"]["kernel"].shape == (4, 5)
    assert list(params["head"]) == ["Dense_0"]


def test_fields_named_like_the_made_inits_helpers_are_plain_fields():
    """A module's `__init__` is made from its fields (with the naming where built inline): fields named like
    the helpers it calls (`path_now`, `run_values`, `cls`) are ordinary fields, and naming still works."""

    class Odd(fx.nn.Module):
        path_now: int = 2
        run_values: int = 3
        cls: str = "c"

        def __call__(self, x):
            return fx.param("w", jax.nn.initializers.ones, (self.path_now, self.run_values)) * x

    def f(x):
        return Odd()(x) + Odd(path_now=2)(x) + Odd(cls="d", name="last")(x)

    params = init_params(f, jnp.ones(()))
    assert shapes(params) == {"Odd_0": {"w": (2, 3)}, "Odd_1": {"w": (2, 3)}, "last": {"w": (2, 3)}}
    assert Odd(path_now=5).path_now == 5 and Odd().cls == "c"


def test_init_and_apply_give_identical_names_and_apply_runs_repeatedly():
    # named at construction, as Flax: the outer `Block()` is built first, so it is Block_0
    # (this test asserted first-call order, Block_1 for the outer one, before names followed Flax)
    t = fx.transform(lambda x: Block()(Block(3)(x)))
    v = t.init(KEY, X)
    assert shapes(v["params"]) == {
        "Block_0": {"Dense_0": {"bias": (4,), "kernel": (3, 4)}, "Dense_1": {"bias": (4,), "kernel": (4, 4)}},
        "Block_1": {"Dense_0": {"bias": (3,), "kernel": (3, 3)}, "Dense_1": {"bias": (3,), "kernel": (3, 3)}},
    }
    first = t.apply(v, X)
    assert jnp.array_equal(t.apply(v, X), first)  # counters start fresh each run
    assert jnp.array_equal(jax.jit(t.apply)(v, X), first)
    assert fx.check_variables(t, v, X).ok


def test_explicit_name_wins():
    params = init_params(lambda x: fx.nn.Dense(2, name="out")(fx.nn.Dense(4)(x)), X)
    assert sorted(params) == ["Dense_0", "out"]


def test_auto_names_skip_an_explicit_name_taken_before_them():
    # the explicit layer is built first here (it was inline in one expression before, where the
    # outer Dense is now built, and so auto-named, first: see the next test)
    def f(x):
        h = fx.nn.Dense(4, name="Dense_0")(x)
        return fx.nn.Dense(3)(h)

    params = init_params(f, X)
    assert shapes(params) == {"Dense_0": {"bias": (4,), "kernel": (3, 4)}, "Dense_1": {"bias": (3,), "kernel": (4, 3)}}


def test_an_explicit_name_equal_to_an_earlier_auto_name_raises_as_flax():
    with pytest.raises(fx.InvalidNameError, match=r"(?s)'Dense_0'.*auto-name of an earlier Dense.*NameInUseError"):
        init_params(lambda x: fx.nn.Dense(3)(fx.nn.Dense(4, name="Dense_0")(x)), X)
    flax = pytest.importorskip("flax.linen")

    class Clash(flax.Module):
        @flax.compact
        def __call__(self, x):
            return flax.Dense(3)(flax.Dense(4, name="Dense_0")(x))

    with pytest.raises(Exception, match="Dense_0"):  # Flax's NameInUseError
        Clash().init(KEY, X)


def test_one_explicit_name_given_to_two_modules_in_one_call_raises_as_flax():
    """Two instances named "a" would silently be one layer; one instance called twice is one layer on purpose."""

    class Inline(fx.nn.Module):
        def __call__(self, x):
            return fx.nn.Dense(3, name="a")(x) + fx.nn.Dense(3, name="a")(x)

    class InSetup(fx.nn.Module):
        def setup(self):
            self.a, self.b = fx.nn.Dense(3), fx.nn.Dense(3, name="a")

        def __call__(self, x):
            return self.a(x) + self.b(x)

    for module in (Inline(), InSetup()):
        with pytest.raises(fx.InvalidNameError, match=r"'a' .*given to two modules in the same call.*NameInUseError"):
            fx.transform(module).init(KEY, X)

    class Twice(fx.nn.Module):
        def __call__(self, x):
            dense = fx.nn.Dense(3, name="a")
            return dense(x) + dense(x)

    class Outer(fx.nn.Module):  # a module called twice re-creates its inline layers: the same names, shared
        def __call__(self, x):
            inner = Twice(name="inner")
            return inner(x) + inner(x)

    assert list(fx.transform(Twice()).init(KEY, X)["params"]) == ["a"]
    assert list(fx.transform(Outer()).init(KEY, X)["params"]["inner"]) == ["a"]
    flax = pytest.importorskip("flax.linen")

    class Linen(flax.Module):
        @flax.compact
        def __call__(self, x):
            return flax.Dense(3, name="a")(x) + flax.Dense(3, name="a")(x)

    with pytest.raises(Exception, match="a"):  # Flax's NameInUseError
        Linen().init(KEY, X)


def test_names_are_given_at_construction_as_flax_gives_them():
    flax = pytest.importorskip("flax.linen")

    class Linen(flax.Module):
        @flax.compact
        def __call__(self, x):
            return flax.Dense(2)(jax.nn.relu(flax.Dense(3)(x)))

    ours = init_params(lambda x: fx.nn.Dense(2)(jax.nn.relu(fx.nn.Dense(3)(x))), X)
    assert shapes(ours) == shapes(Linen().init(KEY, X)["params"])
    assert shapes(ours)["Dense_1"] == {"bias": (3,), "kernel": (3, 3)}  # the 3-unit layer, built second


def test_explicit_name_is_validated():
    with pytest.raises(fx.InvalidNameError, match="contains '/'"):
        init_params(lambda x: fx.nn.Dense(2, name="a/b")(x), X)


def test_same_instance_called_twice_shares_its_weights():
    def f(x):
        layer = fx.nn.Dense(3)
        return layer(layer(x))

    t = fx.transform(f)
    v = t.init(KEY, X)
    assert list(v["params"]) == ["Dense_0"]
    w, b = v["params"]["Dense_0"]["kernel"], v["params"]["Dense_0"]["bias"]
    assert jnp.allclose(t.apply(v, X), (X @ w + b) @ w + b)


def test_same_instance_keeps_the_path_where_it_was_built_when_called_from_another_scope():
    # named where it is built (Flax and Haiku); this test asserted the scope of its first call
    # (`a`) before names were given at construction
    def f(x):
        layer = fx.nn.Dense(3)
        with fx.scope("a"):
            x = layer(x)
        with fx.scope("b"):
            return layer(x)

    assert list(init_params(f, X)) == ["Dense_0"]


def test_a_module_built_outside_any_run_is_named_at_its_first_call():
    layer = fx.nn.Dense(3)

    def f(x):
        with fx.scope("a"):
            return layer(x)

    assert shapes(init_params(f, X)) == {"a": {"Dense_0": {"bias": (3,), "kernel": (3, 3)}}}


def test_a_module_called_twice_recreates_its_inline_layers_under_the_same_names():
    def f(x):
        block = Block(3)
        return block(block(x))

    t = fx.transform(f)
    v = t.init(KEY, X)
    assert list(v["params"]) == ["Block_0"]
    assert sorted(v["params"]["Block_0"]) == ["Dense_0", "Dense_1"]  # not Dense_2, Dense_3
    once = fx.transform(lambda x: Block(3)(x))
    assert jnp.allclose(t.apply(v, X), once.apply(v, once.apply(v, X)))


def test_two_methods_creating_inline_layers_do_not_share_by_accident():
    class AutoEncoder(fx.nn.Module):
        def encode(self, x):
            return fx.nn.Dense(2)(x)

        def decode(self, z):
            return fx.nn.Dense(2)(z)

        def __call__(self, x):
            return self.decode(self.encode(x))

    def f(x):
        ae = AutoEncoder()
        return ae.decode(ae.encode(x)), ae.encode(x)

    params = init_params(f, X)
    assert sorted(params["AutoEncoder_0"]) == ["Dense_0", "Dense_1"]
    assert params["AutoEncoder_0"]["Dense_0"]["kernel"].shape == (3, 2)  # encode's, reused on its 2nd call
    assert params["AutoEncoder_0"]["Dense_1"]["kernel"].shape == (2, 2)


def test_a_method_calling_another_stays_in_the_same_scope():
    class Twice(fx.nn.Module):
        def inner(self, x):
            return fx.param("w", jax.nn.initializers.ones, (x.shape[-1],)) * x

        def __call__(self, x):
            return self.inner(self.inner(x))

    assert shapes(init_params(lambda x: Twice()(x), X)) == {"Twice_0": {"w": (3,)}}


def test_subclass_calling_super_stays_in_the_same_scope():
    class Scaled(fx.nn.Dense):
        def __call__(self, x):
            return 2.0 * super().__call__(x)

    assert shapes(init_params(lambda x: Scaled(2)(x), X)) == {"Scaled_0": {"bias": (2,), "kernel": (3, 2)}}


def test_names_under_a_plain_handle_block_count_across_the_block():
    with fx.handle(fx.handlers.InitParams(KEY)) as (run,):
        fx.nn.Dense(4)(X)
        fx.nn.Dense(2)(jnp.ones((2, 4)))
    assert sorted(run.params) == ["Dense_0", "Dense_1"]
    assert current_names() is None


def test_a_hermetic_block_is_a_run_of_its_own():
    # (this used a nested `t.init`, which is now refused inside a running model; a hermetic block
    # is what `t.init` opens, so it still shows that names start afresh in a run of their own)
    from effax.core import hermetic

    def outer(x):
        fx.nn.Dense(3)(x)
        with hermetic(), fx.handle(fx.handlers.InitParams(KEY)) as (run,):
            fx.nn.Dense(2)(x)
        return run.params

    assert list(fx.transform(outer).init_with_output(KEY, X)[0]) == ["Dense_0"]


def test_module_without_params_runs_outside_any_run():
    y = fx.nn.Sequential([jax.nn.relu, jnp.negative])(jnp.array([-1.0, 2.0]))
    assert jnp.array_equal(y, jnp.array([0.0, -2.0]))
    assert current_names() is None


def test_modules_are_frozen_dataclasses_with_a_keyword_only_name():
    layer = fx.nn.Dense(3, name="d")
    assert dataclasses.is_dataclass(layer) and (layer.features, layer.name) == (3, "d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.features = 4
    with pytest.raises(TypeError):
        fx.nn.Dense(3, True, None, jnp.float32, None, None, None, "d")  # name is keyword-only
    assert fx.nn.Dense(3) != fx.nn.Dense(3)  # identity, so two equal configs are two layers


class _Config(fx.nn.Module):
    """A module with every kind of dataclass field the fused `__init__` must build as the dataclass does."""

    features: int
    tags: list = dataclasses.field(default_factory=list)
    scale: float = 2.0
    count: int = dataclasses.field(default=7, init=False)
    made: dict = dataclasses.field(default_factory=dict, init=False)
    label: str = dataclasses.field(default="x", kw_only=True)
    log: list = dataclasses.field(default_factory=list, init=False)

    def __post_init__(self):
        self.log.append(("post_init", self.features, self.count))

    def __call__(self, x):
        return fx.nn.Dense(self.features)(x) * self.scale


def _as_plain_dataclass(cls):
    """`cls`'s declared fields as a plain frozen dataclass: the `__init__` that `dataclasses` itself makes."""

    def field(f):
        given = {"default": f.default} if f.default is not dataclasses.MISSING else (
            {"default_factory": f.default_factory} if f.default_factory is not dataclasses.MISSING else {})
        return f.name, f.type, dataclasses.field(init=f.init, kw_only=f.kw_only, **given)

    return dataclasses.make_dataclass("Plain" + cls.__name__, [field(f) for f in dataclasses.fields(cls)],
                                      frozen=True, eq=False)


_PlainConfig = _as_plain_dataclass(_Config)


def test_a_module_init_builds_fields_as_the_dataclass_init_does():
    import inspect

    params = inspect.signature(_Config).parameters
    assert [(p.name, p.kind, repr(p.default)) for p in params.values()] == [
        (p.name, p.kind, repr(p.default)) for p in inspect.signature(_PlainConfig).parameters.values()
    ]
    assert list(params) == ["features", "tags", "scale", "name", "label"]  # `name` (the base's) comes first
    assert all(p.kind is p.KEYWORD_ONLY for p in list(params.values())[3:])
    a, b = _Config(3), _Config(3, [1], 0.5, label="y", name="c")
    assert (a.features, a.tags, a.scale, a.count, a.made, a.label, a.name) == (3, [], 2.0, 7, {}, "x", None)
    assert (b.tags, b.scale, b.label, b.name) == ([1], 0.5, "y", "c")
    assert a.tags is not _Config(3).tags and a.made is not _Config(3).made  # a fresh default per instance
    assert a.log == [("post_init", 3, 7)]  # `__post_init__` runs after every field is set, once
    assert dataclasses.asdict(a) == dataclasses.asdict(_PlainConfig(3)) | {"log": a.log}
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.scale = 1.0
    with pytest.raises(TypeError):
        _Config()  # `features` is required
    with pytest.raises(TypeError):
        _Config(3, count=1)  # not an `__init__` field
    assert list(init_params(lambda x: _Config(2)(x), X)) == ["_Config_0"]


def test_a_module_with_its_own_init_or_an_initvar_is_still_named_where_built():
    class Own(fx.nn.Module):
        features: int = 2

        def __init__(self, double: int, *, name=None):
            object.__setattr__(self, "features", 2 * double)
            object.__setattr__(self, "name", name)

        def __call__(self, x):
            return fx.nn.Dense(self.features)(x)

    class WithInitVar(fx.nn.Module):
        features: int
        offset: dataclasses.InitVar[int] = 0

        def __post_init__(self, offset):
            object.__setattr__(self, "features", self.features + offset)

        def __call__(self, x):
            return fx.nn.Dense(self.features)(x)

    def f(x):
        late = WithInitVar(1, offset=2)  # built first: `WithInitVar_0`, though called last
        return late(Own(1)(x))

    params = init_params(f, X)
    assert shapes(params) == {
        "Own_0": {"Dense_0": {"bias": (2,), "kernel": (3, 2)}},
        "WithInitVar_0": {"Dense_0": {"bias": (3,), "kernel": (2, 3)}},
    }


def test_function_valued_fields_are_not_wrapped_as_methods():
    init = jax.nn.initializers.ones
    layer = fx.nn.Dense(2, kernel_init=init)
    assert layer.kernel_init is init
    assert fx.nn.Dense(2).kernel_init(KEY, (1, 1), jnp.float32).shape == (1, 1)


def test_every_module_call_goes_through_one_method(monkeypatch):
    seen = []
    original = fx.nn.Module._call

    def spy(self, method, fn, args, kwargs):
        seen.append((type(self).__name__, method))
        return original(self, method, fn, args, kwargs)

    monkeypatch.setattr(fx.nn.Module, "_call", spy)

    def f(tokens):
        embed = fx.nn.Embed(5, 3)
        return embed.attend(fx.nn.MLP([3])(embed(tokens)))

    init_params(f, jnp.array([1, 2]))
    assert seen == [("Embed", "__call__"), ("MLP", "__call__"), ("Dense", "__call__"), ("Embed", "attend")]


def test_names_do_not_leak_between_threads():
    t = fx.transform(lambda x: Block()(x))
    results = []

    def work():
        results.append(sorted(t.init(KEY, X)["params"]["Block_0"]))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == [["Dense_0", "Dense_1"]] * 4


def test_a_raising_module_restores_the_naming_state():
    class Boom(fx.nn.Module):
        def __call__(self, x):
            raise RuntimeError("boom")

    def f(x):
        with pytest.raises(RuntimeError):
            Boom()(x)
        assert fx.current_path() == ()
        return fx.nn.Dense(2)(x)

    assert list(init_params(f, X)) == ["Dense_0"]


@pytest.mark.parametrize("method", ["init", "init_with_output", "apply"])
def test_flax_init_and_apply_on_a_module_say_to_transform_it(method):
    """`fx.nn.Dense(3).init(key, x)`, the Flax habit, was a bare AttributeError."""
    module = Block()
    with pytest.raises(fx.EffaxError, match=rf"`Block.{method}`: fx.nn modules are not transformed.*"
                                            rf"`t = fx.transform\(module\); t.{method}\(") as info:
        getattr(module, method)
    assert isinstance(info.value, AttributeError) and not hasattr(module, method)
    t = fx.transform(module)  # the fix works
    assert t.apply(t.init(KEY, X), X).shape == (2, 4)


@pytest.mark.parametrize("setup", [False, True], ids=["compact", "setup"])
@pytest.mark.parametrize(("method", "instead"), [("param", "fx.param"), ("variable", "fx.local_state"),
                                                 ("make_rng", "fx.next_key"), ("sow", "fx.sow")])
def test_a_linen_method_on_a_module_names_the_effax_function(method, instead, setup):
    """`self.param(...)` inside an fx.nn module (the linen habit) was a bare AttributeError (or, with `setup()`,
    one saying setup() does not assign it)."""

    class Scale(fx.nn.Module):
        def __call__(self, x):
            return x * getattr(self, method)("w", jax.nn.initializers.ones, (x.shape[-1],))

    class SetUp(Scale):
        def setup(self):
            self.unused = 1.0

    module = SetUp() if setup else Scale()
    with pytest.raises(fx.EffaxError, match=rf"`{type(module).__name__}.{method}`: .* {instead}\(") as info:
        fx.transform(module).init(KEY, X)
    assert isinstance(info.value, AttributeError) and not hasattr(Scale(), method)


class _Args(fx.nn.Module):
    """Records how its method was called: the arguments reach it as given, on the eager path or not."""

    def __call__(self, x=None, *rest, scale=1.0, **extra):
        return ("call", x, rest, scale, extra)

    def no_input(self):
        return ("no_input",)

    def keyword(self, inputs, *, k=0):
        return ("keyword", inputs, k)


class _SeesCalls(fx.Handler):
    """Answers every `ModuleCallRequest` by running the call: module calls leave the eager path."""

    answers = (fx.ModuleCallRequest,)

    def __init__(self):
        self.calls = []

    def handle(self, request, forward):
        self.calls.append((request.method, request.args, dict(request.kwargs)))
        return forward(request)


@pytest.mark.parametrize("watched", [False, True], ids=["eager path", "module calls answered"])
def test_a_module_method_gets_its_arguments_as_given(watched):
    """The eager path takes the first positional argument as a parameter of its own (no repacking): every
    other way of passing arguments reaches the method unchanged, as through `Module._call`."""
    watcher = _SeesCalls()

    def f():
        m = _Args()
        return [
            m(1), m(), m(x=2), m(1, 2, 3), m(1, scale=2.0), m(1, 2, flag=True), m.no_input(),
            m.keyword(4), m.keyword(inputs=5, k=1),
        ]

    out = fx.transform(f).apply({}, handlers=[watcher] if watched else ())
    assert out == [
        ("call", 1, (), 1.0, {}), ("call", None, (), 1.0, {}), ("call", 2, (), 1.0, {}), ("call", 1, (2, 3), 1.0, {}),
        ("call", 1, (), 2.0, {}), ("call", 1, (2,), 1.0, {"flag": True}), ("no_input",), ("keyword", 4, 0),
        ("keyword", 5, 1),
    ]
    if watched:  # the request holds the arguments as the caller passed them
        assert [c[1:] for c in watcher.calls[:3]] == [((1,), {}), ((), {}), ((), {"x": 2})]
        assert watcher.calls[-1] == ("keyword", (), {"inputs": 5, "k": 1})
