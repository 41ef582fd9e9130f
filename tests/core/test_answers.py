"""`answers=`: which requests a handler's runs are sent; the declaration is the interpreter's, never the run's."""

import dataclasses

import jax
import pytest

import effax as fx
from effax.core import Request, send


class Double(fx.Handler):
    """Stateless: doubles params and side inputs."""

    def handle(self, request, forward):
        out = forward(request)
        return out * 2 if isinstance(request, (fx.SideInputRequest, fx.ParamRequest)) else out


class OnlyParams(fx.Handler):
    """Limits another handler to param requests: its `begin()` returns the other handler."""

    answers = (fx.ParamRequest,)

    def __init__(self, inner):
        self.inner = inner

    def begin(self):
        return self.inner.begin()


def model(x):
    return x * fx.param("w", jax.nn.initializers.ones, ()) * fx.side_input("s", 1.0)


def test_a_handlers_declaration_does_not_stay_on_the_run_it_begins():
    """Law 12: a handler object entered once under another handler's `answers` answers as before afterwards."""
    t = fx.transform(model)
    v, d = t.init(jax.random.key(0), 1.0), Double()
    assert t.apply(v, 1.0, handlers=[d]) == 4.0
    assert t.apply(v, 1.0, handlers=[OnlyParams(d)]) == 2.0  # side inputs pass it by
    assert t.apply(v, 1.0, handlers=[d]) == 4.0
    assert "answers" not in vars(d)
    lifted = fx.transform(lambda x: fx.remat(model)(x))  # a lift reads the declaration too (a proxied run)
    assert lifted.apply(v, 1.0, handlers=[OnlyParams(d)]) == 2.0


@dataclasses.dataclass(frozen=True)
class Temperature(Request):
    hint = "install a Thermometer"


@dataclasses.dataclass(frozen=True)
class ScaledTemperature(Temperature):
    scale: float = 2.0


class Thermometer(fx.Handler):
    answers = (Temperature,)

    def handle(self, request, forward):
        return 20.0 * getattr(request, "scale", 1.0)


def test_a_declared_class_covers_its_subclasses_as_isinstance_does():
    with fx.handle(Thermometer()):
        assert send(ScaledTemperature(())) == 40.0
        assert send(Temperature(())) == 20.0

    class Everything(fx.Handler):
        answers = (fx.Request,)  # every request: what None says

        def handle(self, request, forward):
            return 7.0 if isinstance(request, fx.SideInputRequest) else forward(request)

    assert fx.transform(lambda: fx.side_input("s", 0.0)).apply({}, handlers=[Everything()]) == 7.0


def test_an_answers_entry_that_is_no_request_class_is_refused_on_entry():
    class Bad(fx.Handler):
        answers = ([fx.ParamRequest],)  # unhashable, and not a class

    with pytest.raises(fx.EffaxError, match=r"Bad.answers is .*must be a tuple of request classes"), fx.handle(Bad()):
        pass


def test_answers_are_checked_once_per_class_but_every_other_value_is_checked_again():
    """Entering handlers remembers the last valid `answers` of each run class (a call enters several): an
    instance that declares other, malformed `answers` is still refused, after a valid one and in between."""

    class PerInstance(fx.Handler):
        def __init__(self, answers):
            self.answers = answers

        def handle(self, request, forward):
            return 5.0 if isinstance(request, fx.SideInputRequest) else forward(request)

    good = (fx.SideInputRequest,)
    for _ in range(2):
        with fx.handle(PerInstance(good)):
            assert fx.side_input("s", 0.0) == 5.0
        with pytest.raises(fx.EffaxError, match=r"PerInstance.answers is .*must be a tuple"), fx.handle(
            PerInstance([fx.SideInputRequest])
        ):
            pass
        with pytest.raises(fx.EffaxError, match=r"PerInstance.answers is .*must be a tuple"), fx.handle(
            PerInstance((fx.SideInputRequest, int))
        ):
            pass
    with fx.handle(PerInstance((fx.ParamRequest,))):  # another valid tuple: the side input passes it by
        assert fx.transform(lambda: fx.side_input("s", 0.0)).apply({}, handlers=[PerInstance(good)]) == 5.0
