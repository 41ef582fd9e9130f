"""`answer_now`: a run's in-place answer, asked before `handle` (effax/core/README.md)."""

import effax as fx
from effax.core import LATER


class Flag(fx.Handler):
    """Answers `is_training()` in place for a path under `fast`, through `handle` elsewhere."""

    answers = (fx.ModeRequest,)

    def __init__(self):
        self.handled = []

    def handle(self, request, forward):
        self.handled.append(request.path)
        return False

    def answer_now(self, request):
        return True if request.path[:1] == ("fast",) else LATER


def test_send_takes_the_in_place_answer_and_falls_back_to_handle_on_later():
    flag = Flag()
    with fx.handle(flag):
        with fx.scope("fast"):
            assert fx.is_training() is True
        with fx.scope("slow"):
            assert fx.is_training() is False
    assert flag.handled == [("slow",)]


class Inverted(fx.handlers.Mode):
    """A subclass that overrides `handle` only: `Mode`'s inherited `answer_now` must not answer for it."""

    def handle(self, request, forward):
        return not self.training


def test_a_subclass_overriding_handle_is_never_answered_by_an_inherited_answer_now():
    with fx.handle(Inverted(training=True)):
        assert fx.is_training() is False
    t = fx.transform(lambda: fx.is_training())
    assert t.apply({}, handlers=[Inverted(training=False)]) is True

