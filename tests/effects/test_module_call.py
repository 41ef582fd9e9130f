"""The module-call effect: every `fx.nn.Module` call is a request; unhandled, it runs the call."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import effax as fx
from effax.effects import ModuleCallRequest, sees_module_calls

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import count_hlo_ops  # noqa: E402

KEY = jax.random.key(0)
X = jnp.ones((2, 3))


class Block(fx.nn.Module):
    def __call__(self, x):
        return fx.nn.Dense(2)(jax.nn.relu(fx.nn.Dense(4)(x)))


class Twice(fx.nn.Module):
    """`__call__` calls another method of the same module."""

    def __call__(self, x):
        return self.project(x) + 1.0

    def project(self, x):
        return fx.nn.Dense(2)(x)


class Record(fx.Handler):
    """Log each module call's path, method and the path handlers see it at, before and after."""

    def __init__(self, log):
        self.log = log

    def handle(self, request, forward):
        if type(request) is not ModuleCallRequest:
            return forward(request)
        where = "/".join(request.path)
        self.log.append(("call", where, request.method, fx.current_path() == request.path))
        out = forward(request)
        self.log.append(("done", where, request.method))
        return out


def model(x):
    return fx.nn.Dense(3)(Block()(x))


def test_unhandled_module_calls_just_run():
    t = fx.transform(model)
    v = t.init(KEY, X)
    with fx.handle(fx.handlers.LoadParams(v["params"])):
        direct = model(X)
    assert jnp.array_equal(t.apply(v, X), direct)


def test_a_handler_sees_every_call_at_the_module_path_in_call_order():
    t = fx.transform(model)
    v = t.init(KEY, X)
    log = []
    t.apply(v, X, handlers=[Record(log)])
    assert log == [
        ("call", "Block_0", "__call__", True),
        # named where built, as in Flax: the outer Dense of `Dense(.)(Dense(.)(x))` is Dense_0, called second
        ("call", "Block_0/Dense_1", "__call__", True),
        ("done", "Block_0/Dense_1", "__call__"),
        ("call", "Block_0/Dense_0", "__call__", True),
        ("done", "Block_0/Dense_0", "__call__"),
        ("done", "Block_0", "__call__"),
        ("call", "Dense_0", "__call__", True),
        ("done", "Dense_0", "__call__"),
    ]


def test_the_request_carries_module_method_and_arguments():
    seen = []

    class Look(fx.Handler):
        def handle(self, request, forward):
            if isinstance(request, fx.ModuleCallRequest):
                seen.append(request)
            return forward(request)

    def f(tokens):
        embed = fx.nn.Embed(5, 3)
        return embed.attend(embed(tokens))

    tokens = jnp.array([1, 2])
    fx.transform(f).init(KEY, tokens, handlers=[Look()])
    assert [(r.path, r.method, r.method_name) for r in seen] == [
        (("Embed_0",), "__call__", "__call__"),
        (("Embed_0",), "attend", "attend"),
    ]
    assert isinstance(seen[0].module, fx.nn.Embed) and seen[0].module is seen[1].module
    assert seen[0].args[0] is tokens and seen[0].kwargs == {}
    assert "call of `Embed.attend` at `Embed_0`" in seen[1].describe()
    assert "body" not in repr(seen[0])


def test_a_method_calling_another_method_is_a_request_at_the_same_path():
    log = []
    v = fx.transform(lambda x: Twice()(x)).init(KEY, X, handlers=[Record(log)])
    assert [e for e in log if e[0] == "call"] == [
        ("call", "Twice_0", "__call__", True),
        ("call", "Twice_0", "project", True),
        ("call", "Twice_0/Dense_0", "__call__", True),
    ]
    assert list(v["params"]["Twice_0"]) == ["Dense_0"]  # one naming frame, as without the handler


def test_names_and_params_are_the_same_with_and_without_a_handler():
    t = fx.transform(model)
    plain = t.init(KEY, X)
    handled = t.init(KEY, X, handlers=[Record([])])
    assert jax.tree.all(jax.tree.map(jnp.array_equal, plain, handled))


def test_the_body_runs_under_the_call_site_stack_so_nested_effects_are_answered():
    """The request reaches `unhandled()` with an empty stack; the body still sees every handler."""
    t = fx.transform(lambda x: fx.nn.BatchNorm()(x))
    v = t.init(KEY, X)
    y, updates = t.apply(v, X, training=True, mutable=["batch_stats"], handlers=[Record([])])
    y0, updates0 = t.apply(v, X, training=True, mutable=["batch_stats"])
    assert jnp.array_equal(y, y0)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, updates, updates0))


def test_a_module_called_outside_any_transform_is_intercepted_too():
    log = []
    dense = fx.nn.Dense(2)
    with fx.handle(fx.handlers.KeysFromRngs(KEY), fx.handlers.InitParams(), Record(log)):
        dense(X)
    assert log == [("call", "Dense_0", "__call__", True), ("done", "Dense_0", "__call__")]


def test_a_raising_handler_restores_the_stack_and_path():
    class Boom(fx.Handler):
        def handle(self, request, forward):
            if isinstance(request, fx.ModuleCallRequest):
                raise RuntimeError("boom")
            return forward(request)

    def f(x):
        with pytest.raises(RuntimeError, match="boom"), fx.handle(Boom()):
            Block()(x)
        assert fx.current_path() == ()
        return fx.nn.Dense(2)(x)

    assert list(fx.transform(f).init(KEY, X)["params"]) == ["Dense_0"]  # Block_0 never ran its body


def test_which_handlers_see_module_calls():
    class Mine(fx.Handler):
        pass

    class OptOut(fx.Handler):
        answers = (fx.ParamRequest,)

    assert sees_module_calls(Mine())
    assert not sees_module_calls(OptOut())
    assert sees_module_calls(fx.handlers.InterceptMethods(lambda *a: None))
    assert sees_module_calls(fx.handlers.CaptureIntermediates())
    for builtin in [
        fx.handlers.InitParams(),
        fx.handlers.LoadParams({}),
        fx.handlers.FunctionalState({}),
        fx.handlers.CollectSown(),
        fx.handlers.KeysFromRngs(KEY),
        fx.handlers.Mode(True),
    ]:
        assert not sees_module_calls(builtin.begin()), builtin


def test_no_request_is_built_when_no_handler_looks(monkeypatch):
    built = []
    original = ModuleCallRequest.__init__

    def spy(self, *args, **kwargs):
        built.append(args[0])
        original(self, *args, **kwargs)

    monkeypatch.setattr(ModuleCallRequest, "__init__", spy)

    class OptOut(fx.Handler):
        answers = (fx.ParamRequest,)

    t = fx.transform(model)
    v = t.init(KEY, X, handlers=[OptOut()])
    t.apply(v, X)
    assert built == []
    t.apply(v, X, handlers=[Record([])])
    assert len(built) == 4


@pytest.mark.parametrize("order", ["opt-out inside", "opt-out outside"])
def test_a_handler_that_declares_its_answers_never_gets_anything_else(order):
    seen = []

    class ParamsOnly(fx.Handler):
        answers = (fx.ParamRequest,)

        def handle(self, request, forward):
            seen.append(type(request).__name__)  # would crash on a request it never expected
            return forward(request)

    looker = Record([])  # looks at module calls, so they are built and sent
    handlers = [looker, ParamsOnly()] if order == "opt-out inside" else [ParamsOnly(), looker]
    t = fx.transform(model)
    v = t.init(KEY, X)
    t.apply(v, X, handlers=handlers)
    assert seen and set(seen) == {"ParamRequest"}


@pytest.mark.parametrize("order", ["opt-out inside", "opt-out outside"])
def test_a_stateful_handler_declaring_its_answers_on_its_class_sends_its_run_only_those(order):
    class ParamsOnly(fx.Handler):
        answers = (fx.ParamRequest,)  # on the handler's class, as the docs say; the run declares nothing

        def begin(self):
            return Run()

    class Run:
        def __init__(self):
            self.seen = []

        def handle(self, request, forward):
            self.seen.append(type(request).__name__)
            return forward(request)

    looker = Record([])
    handlers = [looker, ParamsOnly()] if order == "opt-out inside" else [ParamsOnly(), looker]
    v = fx.transform(model).init(KEY, X)
    with fx.handle(fx.handlers.LoadParams(v["params"]), *handlers) as runs:
        model(X)
    run = next(r for r in runs if isinstance(r, Run))
    assert run.seen and set(run.seen) == {"ParamRequest"}

    class Slotted:  # a run with __slots__ takes its handler's declaration too: nothing is written on it
        __slots__ = ("seen",)

        def __init__(self):
            self.seen = []

        def handle(self, request, forward):
            self.seen.append(type(request).__name__)
            return forward(request)

    ParamsOnly.begin = lambda self: Slotted()
    with fx.handle(fx.handlers.LoadParams(v["params"]), looker, ParamsOnly()) as (_, _, slotted):
        model(X)
    assert slotted.seen and set(slotted.seen) == {"ParamRequest"}


def test_a_malformed_answers_declaration_is_refused_on_entry():
    class Bad(fx.Handler):
        answers = fx.ParamRequest  # not a tuple

    with pytest.raises(fx.EffaxError, match="must be a tuple of request classes"), fx.handle(Bad()):
        pass


def test_jit_and_grad_through_an_intercepted_model(maybe_jit):
    t = fx.transform(model)
    v = t.init(KEY, X)
    passthrough = fx.handlers.InterceptMethods(lambda next_fun, args, kwargs, ctx: next_fun(*args, **kwargs))

    def loss(params, handlers):
        return jnp.sum(t.apply({"params": params}, X, handlers=handlers) ** 2)

    g0 = maybe_jit(jax.grad(loss), static_argnums=1)(v["params"], ())
    g1 = maybe_jit(jax.grad(loss), static_argnums=1)(v["params"], (passthrough,))
    assert jax.tree.all(jax.tree.map(jnp.allclose, g0, g1))


def test_module_call_requests_cost_nothing_in_the_compiled_program():
    t = fx.transform(model)
    v = t.init(KEY, X)
    passthrough = fx.handlers.InterceptMethods(lambda next_fun, args, kwargs, ctx: next_fun(*args, **kwargs))

    def step(handlers):
        def loss(params):
            return jnp.sum(t.apply({"params": params}, X, handlers=handlers) ** 2)

        return jax.jit(jax.value_and_grad(loss)).lower(v["params"]).compile()

    plain, intercepted = count_hlo_ops(step(())), count_hlo_ops(step((passthrough, Record([]))))
    assert plain == intercepted
    doubled = fx.handlers.InterceptMethods(lambda next_fun, args, kwargs, ctx: 2 * next_fun(*args, **kwargs))
    assert count_hlo_ops(step((doubled,))) > plain  # the counter sees a real change


def test_no_tracer_leaks_with_or_without_an_interceptor():
    t = fx.transform(model)
    v = t.init(KEY, X)
    passthrough = fx.handlers.InterceptMethods(lambda next_fun, args, kwargs, ctx: next_fun(*args, **kwargs))
    with jax.checking_leaks():
        jax.jit(lambda v: t.apply(v, X))(v)
        jax.jit(lambda v: t.apply(v, X, handlers=[passthrough], capture_intermediates=True))(v)
