"""effax.testing.laws and assert_handler_laws: readable failures under the right law, shrunk
counterexamples, factories, seeds and budgets, and the registry."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from zoo import (
    CallOrderInitParams,
    CallOrderKeys,
    ClipsSetsInPlace,
    PathScaledParams,
    SwallowsSets,
    TransposedParams,
    UndoesSharing,
)

import effax as fx
from effax.testing import LAWS, assert_handler_laws, laws
from effax.testing import strategies as s
from effax.testing.models import Draw, Mode, Model, Param, Scope, SideInput, State

X, KEY = jnp.ones(2), jax.random.key(0)


class FreshKeys(fx.Handler):
    """Draws every key from a counter kept on the handler: no two runs agree."""

    def __init__(self):
        self.n = 0

    def handle(self, request, forward):
        if isinstance(request, fx.RandomRequest):
            self.n += 1
            return jax.random.key(self.n)
        return forward(request)


class TrainOnlyScale(fx.Handler):
    """Answers params, and performs `is_training` itself (answered further out)."""

    def handle(self, request, forward):
        out = forward(request)
        return out * 2 if isinstance(request, fx.ParamRequest) and fx.is_training() else out


def test_a_failure_names_the_law_shows_the_difference_the_requests_and_how_to_rebuild():
    model = Model([Scope("blk0", [State("s0", update="once")])], in_size=2)
    with pytest.raises(AssertionError) as e:
        laws.check_state_laws(model, X, KEY, SwallowsSets)
    message = str(e.value)
    assert message.startswith(
        "effax law `state` does not hold: `get` of `blk0/s0` in 'state' after a `set` returned another value"
    )
    assert "local_state  blk0/s0  in 'state', shape (), get, set, get, get" in message
    assert "handlers under test (innermost last): SwallowsSets()" in message
    assert "x = [1.0, 1.0], key data = [0, 0], training = False" in message
    assert "rebuild the model: Model([Scope(name='blk0'" in message


def test_a_failure_is_reported_under_the_law_that_failed_not_the_one_running():
    # the wrong shape surfaces while determinism runs, and is reported as law 10 with the request
    with pytest.raises(AssertionError) as e:
        laws.check_determinism(Model([Scope("blk0", [Param("w0", (2, 3))])]), X, KEY, TransposedParams)
    assert str(e.value).startswith(
        "effax law `answers match requests` does not hold: param `blk0/w0` (shape (2, 3), float32) was "
        "answered with shape (3, 2), float32\n  the model asked for shape (2, 3), float32"
    )


def test_differences_are_located_in_user_terms():
    masks = [fx.handlers.SideInputs({"mask": 1.0}), fx.handlers.SideInputs({"mask": 2.0})]
    with pytest.raises(AssertionError) as e:
        laws.check_commutes_with(Model([SideInput("mask")]), X, KEY, masks[0], masks[1])
    message = str(e.value)
    assert "swapping the handler under test with SideInputs" in message
    assert "at output of init: [3., 3.] (other innermost) vs [2., 2.] (handler under test innermost)" in message
    assert "[0]" not in message


def test_a_state_law_does_not_trust_a_request_changed_after_forwarding():
    with pytest.raises(AssertionError) as e:
        laws.check_state_laws(Model([State("s0", update="once")], in_size=2), 5 * X, KEY, ClipsSetsInPlace)
    assert str(e.value).startswith(
        "effax law `reuse` does not hold: the handler under test changed write of state `s0` in collection "
        "'state' while handling it (its field `value`)"
    )


def test_an_error_raised_while_a_law_runs_says_so_and_whether_the_handler_causes_it():
    """An exception is no difference the law compares: the message says the model raised while the law
    ran, shows the error, and reruns the model without the handlers under test to say whose fault it is."""

    class Broken(fx.Handler):
        def handle(self, request, forward):
            raise RuntimeError("boom")

    with pytest.raises(AssertionError) as e:
        laws.check_determinism(Model([Param("w0")]), X, KEY, Broken)
    assert str(e.value).startswith(
        "effax law `determinism` does not hold: `t.init_with_output` raised RuntimeError while the law ran, and "
        "only with the handlers under test\n  RuntimeError: boom\n  `t.init_with_output` then `t.apply` of the "
        "model with the built-in handlers alone run: the handler under test causes the error"
    ), e.value
    conflicting = Model([Param("w0", (2,)), Param("w0", (3,))])  # one path, two specs: no handler can run it
    with pytest.raises(AssertionError) as e:
        laws.check_answers_match_requests(conflicting, X, KEY, fx.Handler)
    assert str(e.value).startswith(
        "effax law `answers match requests` could not be checked: running the model raised ParamConflictError "
        "while the law ran, and the model raises without the handlers under test too\n  ParamConflictError: "
        "param `w0` is requested twice"
    ), e.value
    assert "raise ParamConflictError as well: the model or the case is at fault, not the handler" in str(e.value)


def test_hypothesis_shrinks_a_counterexample_to_the_requests_that_matter():
    @settings(max_examples=25, phases=[Phase.generate, Phase.shrink], database=None)
    @given(s.models_and_inputs(), s.keys())
    def law(model_and_x, key):
        laws.check_determinism(*model_and_x, key, FreshKeys)

    with pytest.raises(AssertionError) as e:
        law()
    message = str(e.value)
    listing = message[message.index("model: ") : message.index("\nx = ")]
    assert "next_key" in listing
    assert len(listing.splitlines()) <= 3, listing  # the header and at most two requests


def test_the_kit_shrinks_by_default_and_reports_the_smallest_model():
    with pytest.raises(AssertionError) as e:
        assert_handler_laws(FreshKeys, ["random"], seed=0, only=["determinism"])
    message = str(e.value)
    listing = message[message.index("model: ") : message.index("\nx = ")]
    assert listing.splitlines()[1:] == ["    next_key     <root>  stream 'dropout'"], listing


def test_a_factory_is_called_once_per_check_and_an_instance_is_reused():
    made = []

    def factory():
        made.append(fx.Handler())
        return made[-1]

    laws.check_determinism(Model([Param("w0")]), X, KEY, factory)
    assert len(made) == 1
    # an instance keeps what it holds across runs: FreshKeys passed as an instance still differs run to run
    with pytest.raises(AssertionError, match="`determinism` does not hold"):
        laws.check_determinism(Model([Draw()]), X, KEY, FreshKeys())


def test_max_examples_and_budget_set_each_laws_examples_whatever_the_profile():
    made = []

    def factory():
        made.append(1)
        return fx.Handler()

    settings.register_profile("one example", max_examples=1, derandomize=True)
    previous = settings.get_current_profile_name()
    settings.load_profile("one example")
    try:
        assert_handler_laws(factory, max_examples=3, seed=0, only=["determinism"])
        calls = len(made)
        assert_handler_laws(factory, max_examples=3, budget={"determinism": 6}, seed=0, only=["determinism"])
    finally:
        settings.load_profile(previous)
    # one instance made to read what it declares, one fresh copy up front for the reuse law, then one per example
    assert calls == 2 + 3 and len(made) - calls == 2 + 6


def test_a_seed_reproduces_the_same_run():
    def first_failure(seed):
        with pytest.raises(AssertionError) as e:
            assert_handler_laws(SwallowsSets, ["state"], seed=seed, shrink=False, only=["state"])
        return str(e.value)

    assert first_failure(3) == first_failure(3)


def test_effects_a_handler_performs_are_found_and_kept_out_of_commutation():
    model = Model([Param("w0"), Mode()])
    assert laws.performed_effects(model, X, KEY, TrainOnlyScale, training=True) == {"mode"}
    # swapped with a Mode handler it does not commute (its own `is_training` would be answered by it) ...
    with pytest.raises(AssertionError, match="`commutation` does not hold"):
        laws.check_commutes_with(model, X, KEY, TrainOnlyScale, fx.handlers.Mode(False), training=True)
    # ... so the kit never pairs it with one
    assert_handler_laws(TrainOnlyScale, ["param"], seed=0, only=["commutation"])


def test_handlers_may_be_a_sequence_outermost_first():
    masks = [fx.handlers.SideInputs({"mask": 1.0}), fx.handlers.SideInputs({"mask": 2.0})]
    model = Model([SideInput("mask")])
    laws.check_forwarding_identity(model, X, KEY, masks, effects=["side_input"])
    with pytest.raises(AssertionError, match="swapping the handler under test with SideInputs"):
        laws.check_commutes_with(model, X, KEY, masks[0], masks[1])


def test_the_partners_answer_one_effect_each():
    model = Model([Param("w0"), State("s0"), Draw(), SideInput("mask"), Scope("blk0", [])], in_size=1)
    for effect in ("param", "state", "random", "sow", "side_input", "mode"):
        laws.check_determinism(model, jnp.ones(1), KEY, laws.partner(effect))
    with pytest.raises(ValueError, match="unknown effect 'dropout'"):
        laws.partner("dropout")


def test_the_laws_refuse_what_is_not_a_model():
    with pytest.raises(TypeError, match="the laws run an `effax.testing.models.Model`, got function"):
        laws.check_determinism(lambda x: x, X, KEY)


def test_the_sharing_law_compares_path_dependent_handlers_fairly_and_catches_an_untie():
    model = Model([Param("w0", (2,)), Scope("blk0", [Param("w1", (2,))])])
    laws.check_sharing_laws(model, X, KEY, {"blk0/w1": "w0"}, PathScaledParams)
    with pytest.raises(AssertionError, match="reached the params storage at the alias path `blk0/w1`"):
        laws.check_sharing_laws(model, X, KEY, {"blk0/w1": "w0"}, UndoesSharing)


def test_purity_compares_bfloat16_at_its_own_precision():
    assert laws.tolerance("bfloat16", "float32") > laws.tolerance("float32")
    model = Model([Param("w0", (2, 3), "bfloat16"), Param("w1", (3,), "bfloat16")], in_size=3)
    laws.check_purity_under_jit(model, jnp.linspace(-2, 2, 3), KEY)


def test_assert_handler_laws_runs_the_laws_for_the_effects_and_reports_the_first_failure():
    with pytest.raises(AssertionError, match="effax law `state` does not hold"):
        assert_handler_laws(SwallowsSets, ["state"], max_examples=5, seed=0, only=["determinism", "state"])


def test_assert_handler_laws_refuses_unknown_effects_and_laws():
    with pytest.raises(ValueError, match=r"unknown effects \['params'\]"):
        assert_handler_laws(fx.Handler, ["params"])
    with pytest.raises(ValueError, match=r"unknown laws \['purity'\]; the laws are \['answers match requests'"):
        assert_handler_laws(fx.Handler, only=["purity"])
    with pytest.raises(ValueError, match=r"unknown laws \['sharin'\]"):
        assert_handler_laws(fx.Handler, budget={"sharin": 3})


class StashesAcrossRuns(fx.Handler):
    """Answers a param with the value the previous run made at its path: kept on the class, across runs."""

    stash = {}

    def handle(self, request, forward):
        value = forward(request)
        if isinstance(request, fx.ParamRequest):
            previous, type(self).stash[request.path] = type(self).stash.get(request.path), value
            if previous is not None and previous.shape == value.shape and previous.dtype == value.dtype:
                return previous
        return value


def test_state_kept_across_runs_fails_as_an_assertion_that_says_so():
    """Such a failure may not repeat when hypothesis reruns the example (it raises FlakyFailure): it still
    arrives as the kit's AssertionError, with what to look for."""
    StashesAcrossRuns.stash.clear()
    with pytest.raises(AssertionError, match=r"(?s)does not hold: .*keeps something across runs"):
        assert_handler_laws(StashesAcrossRuns, ("param",), max_examples=10, seed=0, only=["determinism"])


def test_a_lifting_failure_names_the_model_and_the_transform():
    class _RankRun:
        """Adds the rank of the request to each param: outside a lift, the stacked request has one more axis."""

        def handle(self, request, forward):
            out = forward(request)
            return out + float(len(request.shape)) if type(request) is fx.ParamRequest else out

    class AddsRank(fx.Handler):
        def begin(self):
            return _RankRun()

    with pytest.raises(AssertionError) as e:
        laws.check_lifting(Model([Param("w0", init="normal")], in_size=2), X, KEY, AddsRank, context="scan")
    message = str(e.value)
    assert message.startswith("effax law `lifting` does not hold: output of init differs from the unrolled model\n"
                              "  at output of init: [")
    assert "(under fx.scan) vs [" in message and "(unrolled)\n" in message
    for part in ("\nmodel: Model(", "handlers under test (innermost last): AddsRank()", "lifted by: fx.scan",
                 "rebuild the model: Model(["):
        assert part in message, message


def test_a_malformed_answers_and_a_reference_law_without_reference_are_refused():
    class NotATuple(fx.Handler):
        answers = fx.SideInputRequest

    with pytest.raises(fx.EffaxError, match=r"NotATuple.answers is .*must be a tuple of request classes"):
        assert_handler_laws(NotATuple, max_examples=1)
    with pytest.raises(ValueError, match=r"only= names the law 'reference'.*reference="):
        assert_handler_laws(fx.Handler, ("param",), only=["reference"], max_examples=1)
    with pytest.raises(ValueError, match=r"budget=2 is not a dict: .*max_examples=n"):
        assert_handler_laws(fx.Handler, ("param",), budget=2)


def test_the_registry_lists_each_law_of_design_once():
    assert len(set(LAWS)) == len(LAWS)
    assert sorted({law.number for law in LAWS.values()}) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14]
    assert all(name == law.name and law.check.__doc__ for name, law in LAWS.items())


def test_importing_effax_does_not_import_hypothesis():
    code = "import sys, effax; assert 'hypothesis' not in sys.modules and 'effax.testing' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_kit_raises_effax_errors_and_takes_one_name_as_a_string():
    """`effects="param"` and `only="determinism"` are lists of one (never checked letter by letter); wrong
    arguments raise `LawKitError` (an `fx.EffaxError`, and a ValueError or TypeError as before)."""
    from effax.testing import LawKitError, LawKitTypeError

    assert_handler_laws(fx.Handler, effects="param", only="determinism", max_examples=1, seed=0)
    with pytest.raises(LawKitError, match=r"only names unknown laws \['determinsm'\].* Did you mean 'determinism'\?"):
        assert_handler_laws(fx.Handler, only="determinsm")
    with pytest.raises(LawKitError, match=r"effects names unknown effects \['params'\].* Did you mean 'param'\?"):
        assert_handler_laws(fx.Handler, effects="params")
    with pytest.raises(LawKitTypeError, match=r"handler=3 \(type int\) is neither a handler nor a factory"):
        assert_handler_laws(3, only=["determinism"], max_examples=1)
    with pytest.raises(LawKitTypeError, match="the laws run an `effax.testing.models.Model`"):
        laws.check_determinism(lambda x: x, X, KEY)
    with pytest.raises(LawKitError, match="unknown effect 'dropout'"):
        laws.partner("dropout")
    model = Model([Param("w0"), SideInput("mask")])
    laws.check_forwarding_identity(model, X, KEY, fx.handlers.SideInputs({"mask": 0.0}), effects="side_input")
    from effax.testing import lifting

    with pytest.raises(LawKitError, match="context must be one of"):
        lifting.lifted(model, "pmap", 2)
    for error in (LawKitError, LawKitTypeError):
        assert issubclass(error, fx.EffaxError) and error.__module__ == "effax"
    assert issubclass(LawKitError, ValueError) and issubclass(LawKitTypeError, TypeError)


class CachedKeys(fx.Handler):
    """Correct: each key a pure function of (seed, path, stream, draw), computed once eagerly and cached on
    the handler as a concrete key, so runs under `jax.jit` and `jax.eval_shape` are answered concretely."""

    answers = (fx.RandomRequest,)

    def __init__(self):
        self.table = {}

    def begin(self):
        return _CachedKeysRun(self.table)


class _CachedKeysRun:
    answers = (fx.RandomRequest,)

    def __init__(self, table):
        self.table, self.n = table, {}

    def handle(self, request, forward):
        slot = (request.path, request.stream)
        n = self.n[slot] = self.n.get(slot, -1) + 1
        if slot + (n,) not in self.table:
            with jax.ensure_compile_time_eval():
                base = jax.random.fold_in(jax.random.key(3), len(request.path) + 10 * len(request.stream))
                self.table[slot + (n,)] = jax.random.fold_in(base, n)
        return self.table[slot + (n,)]


def test_a_handler_answering_concrete_keys_inside_a_trace_passes():
    """The watch reads a concrete key's data even while `jax.eval_shape` or `jax.jit` traces the run (it
    used to convert it to NumPy under the trace and fail a correct handler with TracerArrayConversionError)."""
    model = Model([Draw("dropout", times=2), Scope("blk0", [Draw("noise")])], in_size=1)
    laws.check_abstract_init(model, jnp.zeros(1), KEY, CachedKeys)
    laws.check_purity_under_jit(model, jnp.zeros(1), KEY, CachedKeys)


class LatchedMode(fx.Handler):
    """Answers `is_training` with what its first run was told, latched on the handler."""

    answers = (fx.ModeRequest,)

    def __init__(self):
        self.training = None

    def handle(self, request, forward):
        if self.training is None:
            self.training = forward(request)
        return self.training


class MemoKeys(fx.Handler):
    """Memoizes each forwarded key by (path, stream, draw) on the handler: a later run with other rngs
    gets the first run's keys."""

    answers = (fx.RandomRequest,)

    def __init__(self):
        self.memo = {}

    def begin(self):
        return _MemoKeysRun(self.memo)


class _MemoKeysRun:
    answers = (fx.RandomRequest,)

    def __init__(self, memo):
        self.memo, self.n = memo, {}

    def handle(self, request, forward):
        slot = (request.path, request.stream)
        n = self.n[slot] = self.n.get(slot, -1) + 1
        if slot + (n,) not in self.memo:
            self.memo[slot + (n,)] = forward(request)
        return self.memo[slot + (n,)]


class CachedParams(fx.Handler):
    """Caches each param by path on the handler, in apply: a later apply on other variables gets the old values."""

    answers = (fx.ParamRequest,)

    def __init__(self):
        self.cache = {}

    def handle(self, request, forward):
        if fx.is_initializing():
            return forward(request)
        if request.path not in self.cache:
            self.cache[request.path] = forward(request)
        return self.cache[request.path]


@pytest.mark.parametrize("handler, model", [
    (LatchedMode, Model([Mode()])),
    (MemoKeys, Model([Draw()])),
    (CachedParams, Model([Param("w0", init="ones")])),  # every init makes the same params
])
def test_reuse_runs_the_instance_again_with_another_mode_key_and_variables(handler, model):
    """A handler that latches what its first run was given (the mode, the keys, the params) is caught by
    the reuse law, which runs the instance again with each of them changed."""
    with pytest.raises(AssertionError, match=r"`reuse` does not hold: .* run \((init|apply) of the model, again "
                                             r"with training=True, key data \[\d+, \d+\], and apply on"):
        laws.check_reuse(model, X, KEY, handler)


def test_determinism_and_locality_failures_say_how_to_fix_the_handler():
    with pytest.raises(AssertionError) as e:
        laws.check_determinism(Model([Draw()]), X, KEY, FreshKeys)
    assert "keep no state on the handler instance across runs" in str(e.value)
    assert "read no NumPy or Python global RNG" in str(e.value)
    model = Model([Param("w0"), Draw(), Scope("blk0", [Param("w0"), Draw()])])
    with pytest.raises(AssertionError, match=r"(?s)a param value .*derive a param's value from its own path"):
        laws.check_locality(model, X, KEY, CallOrderInitParams, drop=[0])
    with pytest.raises(AssertionError, match=r"(?s)a key drawn .*derive a key from the request's path and stream"):
        laws.check_locality(model, X, KEY, lambda: CallOrderKeys(KEY), drop=[1])


class LoggerDroppingSows(fx.Handler):
    """Logs every request and forwards it, except sows, which it drops ("they return None anyway")."""

    def handle(self, request, forward):
        return None if isinstance(request, fx.SideOutputRequest) else forward(request)


@pytest.mark.parametrize("seed", [15, 17, 23])
def test_the_forwarding_law_meets_every_effect_a_handler_forwards(seed):
    """Its models make a request of each effect the handler does not answer (here: all), so a logger that
    drops one kind is caught on every seed (it passed on these, whose models drew no sow)."""
    with pytest.raises(AssertionError, match="`forwarding identity` does not hold"):
        assert_handler_laws(LoggerDroppingSows, (), seed=seed, only=["forwarding identity"], shrink=False)


class KeepsLastSet(fx.Handler):
    """Keeps the last value set of each state on the handler, "for inspection": a tracer under `jax.jit`."""

    def __init__(self):
        self.last = {}

    def handle(self, request, forward):
        if isinstance(request, fx.SetStateRequest):
            self.last[(request.collection, request.path)] = request.value
        return forward(request)


_LEAKED = []


class LeaksToAGlobal(fx.Handler):
    """Appends every param it answers to a module-level list."""

    def handle(self, request, forward):
        out = forward(request)
        if isinstance(request, fx.ParamRequest):
            _LEAKED.append(out)
        return out


def test_a_tracer_kept_on_the_handler_is_found_at_once_and_named():
    """Found by looking through the handler's attributes after `jax.jit` (JAX's own leak check searches
    referrers, about 10 s per example here, so a shrinking hypothesis run took a minute); a leak elsewhere
    is still caught by `jax.checking_leaks()`."""
    with pytest.raises(AssertionError) as e:
        laws.check_purity_under_jit(Model([State("s0")], in_size=1), jnp.zeros(1), KEY, KeepsLastSet)
    assert str(e.value).startswith(
        "effax law `purity under jit` does not hold: `jax.jit(t.apply)` left a tracer in the handler under test: "
        "`KeepsLastSet().last[('state', ('s0',))]` holds one\n  a tracer lives only inside its trace"
    ), e.value
    with pytest.raises(AssertionError, match=r"does not hold: a tracer of `t.apply`'s trace outlived it"):
        laws.check_purity_under_jit(Model([Param("w0")]), X, KEY, LeaksToAGlobal)
    _LEAKED.clear()


def test_the_reuse_laws_other_variables_change_numbers_and_keep_keys():
    """Numbers change; a typed key or a bool (no generated step keeps one today) has no `+ 1` and stays."""
    from effax.testing.laws import _shifted

    shifted = _shifted({"w": jnp.ones(2), "n": jnp.zeros((), jnp.int32), "k": jax.random.key(0), "b": jnp.array(True)})
    assert shifted["w"].tolist() == [2.0, 2.0] and int(shifted["n"]) == 1
    assert (jax.random.key_data(shifted["k"]) == jax.random.key_data(jax.random.key(0))).all() and shifted["b"]


def test_a_factory_s_declaration_and_a_handler_s_answers_on_its_run_are_read_as_the_interpreter_reads_them():
    """A factory's `answers` were ignored ("claims no effect, yet changed the results"), and a stateful handler
    declaring `answers` on its class but not on its run was sent every request by the commutation law."""

    class Defaults(fx.Handler):
        answers = (fx.SideInputRequest,)

        def handle(self, request, forward):
            return 1.0 if request.tag == "mask" else forward(request)

    assert_handler_laws(lambda: Defaults(), max_examples=3, seed=0, only=["forwarding identity"])

    class _CacheRun:  # no `answers` of its own: the interpreter takes its handler's
        def __init__(self):
            self.cache = {}

        def handle(self, request, forward):
            key = (request.path, request.shape, request.dtype)
            if key not in self.cache:
                self.cache[key] = forward(request)
            return self.cache[key]

    class PerRunCache(fx.Handler):
        answers = (fx.ParamRequest,)

        def begin(self):
            return _CacheRun()

    assert_handler_laws(PerRunCache, ("param",), max_examples=3, seed=0, only=["commutation"])


def test_a_handler_that_sees_every_request_is_checked_on_module_calls_too():
    """A handler with no `answers` is sent module calls; one answering them with None passed every law."""

    class QuantizeParams(fx.Handler):
        def handle(self, request, forward):
            if isinstance(request, fx.ParamRequest):
                return forward(request)
            return None if isinstance(request, fx.ModuleCallRequest) else forward(request)

    with pytest.raises(AssertionError, match="forwarding identity"):
        assert_handler_laws(QuantizeParams, ("param",), max_examples=5, seed=0, only=["forwarding identity"])


def test_an_answer_s_dtype_is_shown_as_given():
    """A NumPy float64 answer read "float32" (its canonical dtype) in the law's message."""
    assert laws._show_spec(jnp.zeros((), jnp.float32)) == "shape (), float32"
    assert laws._show_spec(np.zeros((), np.float64)) == "shape (), float64"
    assert laws._show_spec(1.0) == "shape (), float32"


@pytest.mark.parametrize("seed", [1, 3])
def test_locality_removes_a_draw_before_one_kept_at_another_slot(seed):
    """Removals dropping a draw before a kept draw at the same path and stream (renumbered, so never compared)
    let call-order keys pass locality at these seeds."""
    from zoo import CallOrderKeys

    with pytest.raises(AssertionError, match="`locality` does not hold"):
        assert_handler_laws(lambda: CallOrderKeys(jax.random.key(1)), ("random",), seed=seed, shrink=False,
                            only=["locality"])
