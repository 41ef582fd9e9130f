"""The scope interpreter: routing order, forwarding, isolation, names, unwinding."""

import dataclasses
import threading
from typing import ClassVar

import pytest

import effax as fx
from effax.core import Request, current_stack, hermetic, send


@dataclasses.dataclass(frozen=True)
class Ping(Request):
    hint: ClassVar[str] = "install a Pong handler"


class Pong(fx.Handler):
    def __init__(self, tag, log=None):
        self.tag, self.log = tag, log

    def handle(self, request, forward):
        if self.log is not None:
            self.log.append(self.tag)
        if isinstance(request, Ping):
            return self.tag
        return forward(request)


class Forward(fx.Handler):
    def __init__(self, log):
        self.log = log

    def handle(self, request, forward):
        self.log.append("fwd")
        return forward(request)


def test_innermost_handler_answers_first():
    with fx.handle(Pong("outer"), Pong("inner")):
        assert send(Ping(())) == "inner"


def test_forward_reaches_outer_handler():
    log = []
    with fx.handle(Pong("outer", log), Forward(log)):
        assert send(Ping(())) == "outer"
    assert log == ["fwd", "outer"]


def test_unhandled_request_names_request_path_and_fix():
    with fx.scope("enc"):
        with pytest.raises(fx.UnhandledEffectError, match=r"Ping at `enc`.*install a Pong handler"):
            send(Ping(fx.current_path()))


def test_effects_a_handler_performs_go_outward():
    class AsksOuter(fx.Handler):
        def handle(self, request, forward):
            if isinstance(request, Ping):
                return ("inner saw", send(Ping(request.path)))
            return forward(request)

    with fx.handle(Pong("outer"), AsksOuter()):
        assert send(Ping(())) == ("inner saw", "outer")


def test_stack_restored_when_model_raises():
    before = current_stack()
    with pytest.raises(RuntimeError):
        with fx.handle(Pong("a")), fx.scope("s"):
            raise RuntimeError("boom")
    assert current_stack() == before
    assert fx.current_path() == ()


def test_handle_flattens_nested_sequences_and_returns_runs():
    a, b, c = Pong("a"), Pong("b"), Pong("c")
    with fx.handle([a, (b, [c])]) as runs:
        assert runs == (a, b, c)
        assert send(Ping(())) == "c"


def test_stateful_handler_gets_fresh_run_each_entry():
    class Counter(fx.Handler):
        def begin(self):
            return CounterRun()

    class CounterRun:
        def __init__(self):
            self.n = 0

        def handle(self, request, forward):
            self.n += 1
            return self.n

    h = Counter()
    with fx.handle(h) as (r1,):
        send(Ping(()))
        send(Ping(()))
    with fx.handle(h) as (r2,):
        send(Ping(()))
    assert (r1.n, r2.n) == (2, 1)


def test_not_a_handler_is_refused_with_explanation():
    with pytest.raises(fx.EffaxError, match="not a handler"):
        fx.handle(object())


class Passing(fx.Handler):
    pass


@pytest.mark.parametrize(("cls", "args"), [(Passing, ()), (fx.handlers.FrozenState, ({"state": {"n": 2.0}},))])
def test_a_handler_class_is_refused_with_the_instance_to_pass(cls, args):
    """`handlers=[fx.handlers.FrozenState]` was a raw `begin() missing 1 required positional argument: 'self'`."""
    name = cls.__name__
    with pytest.raises(fx.EffaxError, match=rf"{name} is a handler class; pass an instance: {name}\(\)"):
        fx.handle(cls)
    t = fx.transform(lambda: fx.local_state("n", lambda: 1.0).get())
    with pytest.raises(fx.EffaxError, match="pass an instance"):
        t.apply({"state": {"n": 2.0}}, handlers=[cls])
    assert t.apply({"state": {"n": 2.0}}, handlers=[cls(*args)]) == 2.0  # the fix works


def test_a_begin_that_returns_none_is_refused_on_entry():
    """A `begin()` that forgot `return` failed at the first request, with a raw AttributeError from routing."""

    class Counter(fx.Handler):
        def begin(self):
            self.n = 0

    with pytest.raises(fx.EffaxError, match=r"`Counter.begin\(\)` returned None.*return self or a run object"):
        with fx.handle(Counter()):
            pass


def test_hermetic_hides_outer_handlers_and_path():
    with fx.handle(Pong("outer")), fx.scope("s"):
        with hermetic():
            assert fx.current_path() == ()
            with pytest.raises(fx.UnhandledEffectError):
                send(Ping(()))
        assert fx.current_path() == ("s",)


def test_scopes_nest():
    with fx.scope("a"), fx.scope("b"):
        assert fx.current_path() == ("a", "b")
    assert fx.current_path() == ()


@pytest.mark.parametrize("bad", ["", "a/b", 3, None])
def test_scope_names_are_validated(bad):
    with pytest.raises(fx.InvalidNameError, match="name"):
        fx.scope(bad)


def test_invalid_name_error_suggests_fix():
    with pytest.raises(fx.InvalidNameError, match=r"'a/b' contains '/'.*'a_b'"):
        fx.scope("a/b")


def test_errors_report_module_effax_and_subclass_base():
    for cls, base in [
        (fx.UnhandledEffectError, Exception),
        (fx.MissingVariableError, LookupError),
        (fx.ShapeMismatchError, ValueError),
        (fx.ParamConflictError, ValueError),
        (fx.FrozenStateError, Exception),
        (fx.MissingRngError, Exception),
        (fx.ShareError, Exception),
        (fx.InvalidNameError, ValueError),
    ]:
        assert issubclass(cls, fx.EffaxError) and issubclass(cls, base)
        assert cls.__module__ == "effax"


def test_threads_are_isolated():
    barrier = threading.Barrier(4)
    results, errors = {}, []

    def work(i):
        try:
            with fx.handle(Pong(i)), fx.scope(f"t{i}"):
                barrier.wait(timeout=10)
                results[i] = (send(Ping(())), fx.current_path())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == {i: (i, (f"t{i}",)) for i in range(4)}
