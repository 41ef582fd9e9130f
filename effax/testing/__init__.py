"""Property-test your own handlers against the laws the rest of effax relies on.

Import it explicitly (it needs hypothesis, a test dependency):
`from effax.testing import strategies, laws, assert_handler_laws`.

- `effax.testing.models`: effectful models as data (`Model`, `Scope`, `Param`,
  `State`, `Draw`, `StreamKey`, `Sow`, `SideInput`, `Mode`) with a readable listing;
- `effax.testing.strategies`: hypothesis strategies for models, inputs, keys,
  variables, removals and sharing cases, and small Flax linen models
  (`flax_models`, for the laws through `fx.from_flax`);
- `effax.testing.laws`: one `check_*` function per law, usable inside `@given`,
  and `LAWS`, the registry `assert_handler_laws` runs;
- `assert_handler_laws`: every law relevant to a handler, in one call.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import FlakyFailure
from hypothesis.internal.conjecture import engine

from effax.testing import laws, models, strategies
from effax.testing.laws import LAWS, HandlerLike, Law, Subject
from effax.testing.models import KNOWN_EFFECTS, LawKitError, LawKitTypeError, _names

__all__ = ["assert_handler_laws", "laws", "models", "strategies", "LAWS", "Law", "LawKitError", "LawKitTypeError"]


def _settings(n: int, shrink: bool) -> settings:
    """Hypothesis settings of the kit's own, whatever profile the caller loaded."""
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        settings.get_profile("default"),
        max_examples=n,
        deadline=None,
        derandomize=False,
        database=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=False,
        verbosity=Verbosity.quiet,
    )


def assert_handler_laws(
    handler: HandlerLike,
    effects: Iterable[str] = (),
    *,
    max_examples: int = 10,
    budget: Mapping[str, int] | None = None,
    seed: int | None = None,
    only: Iterable[str] | None = None,
    models: Any = None,
    reference: HandlerLike = None,
    shrink: bool | float = True,
) -> None:
    """Check `handler` against every law relevant to the `effects` it answers, over generated models.

    `effects` names what the handler *answers* (of `"param"`, `"state"`,
    `"random"`, `"sow"`, `"side_input"`, `"mode"`, `"module_call"` for an
    interceptor of `fx.nn` module calls; by default what its class
    declares in `answers = (fx.ParamRequest, ...)`); what it performs itself
    (`fx.is_training()` inside `handle`) is found by the kit and kept out of
    the commutation partners. Generated models always perform the answered
    effects. The laws are `laws.LAWS`, run in that order where they apply;
    every run of every law also checks that answers match their requests,
    keys are fresh, requests are left unchanged and a `get` sees the last
    `set`, and a failure is reported under the law that failed.

    `handler` is a handler, or a class or factory called once per check;
    law 12 (reuse) compares one instance over several runs, models and
    threads with fresh copies made before any run. `reference` declares the
    handler a drop-in for a built-in (law 13): a handler or factory whose
    answers it must give. `max_examples` is the examples per law (the purity
    law, which compiles, runs half as many); `budget={"law name": n}` sets a
    law's own; `seed` fixes the examples drawn, independent of any
    hypothesis profile (None: a fresh random run), so which law fails is
    reproducible; the counterexample shown is shrunk for a wall-clock budget,
    so it may differ with the machine's load (`shrink=False` reports the
    first failing example, the same every run). `only` picks laws by name;
    `models` replaces the strategy of `(model, x)` pairs (default
    `strategies.models_and_inputs(require=effects)`); a failing model is
    shrunk for at most `SHRINK_SECONDS` (`shrink=` seconds, or `False` to
    report the first failing model as found). The first law that fails raises an
    `AssertionError` naming it, the request and what differed. One name may
    be given as a string (`effects="param"`, `only="determinism"`); arguments
    the kit cannot use raise `LawKitError` (`LawKitTypeError` for the wrong kind of object).

    >>> from effax.testing import assert_handler_laws
    >>> class LogRequests(fx.Handler):
    ...     def handle(self, request, forward):
    ...         return forward(request)   # a real one would log `request.describe()`
    >>> assert_handler_laws(LogRequests, max_examples=2, seed=0, only=["determinism", "reuse"])
    """
    effects = _names(effects, "effects", KNOWN_EFFECTS, "effects")
    declared = None if handler is None else laws.declared_effects(handler)  # `answers = (...)` on its class
    if not effects:
        effects = declared or ()
    if budget is not None and not isinstance(budget, Mapping):
        raise LawKitError(
            f"budget={budget!r} is not a dict: `budget={{'law name': n}}` sets one law's examples; "
            "`max_examples=n` sets every law's."
        )
    budget = dict(budget or {})
    chosen = tuple(LAWS) if only is None else _names(only, "only", LAWS, "laws", "the laws are")
    _names(tuple(budget), "budget", LAWS, "laws", "the laws are")
    if "reference" in chosen and only is not None and reference is None:
        raise LawKitError(
            "only= names the law 'reference', which compares the handler with the built-in it stands in for: "
            "pass that built-in, `reference=fx.handlers.KeysFromRngs(...)` (or a factory of it)."
        )
    subject = Subject(
        handler=handler,
        effects=effects,
        models=strategies.models_and_inputs(require=effects) if models is None else models,
        fresh=laws.fresh_copies(handler),
        reference=reference,
        custom_models=models is not None,
        sees_every_request=declared is None,
    )
    for name in chosen:
        law = LAWS[name]
        if only is None and not law.applies(subject):
            continue
        n = budget.get(name, max(1, round(max_examples * law.budget)))
        _run(law, subject, n, seed, shrink)


SHRINK_SECONDS = 5.0
"""How long `assert_handler_laws` shrinks a counterexample by default before reporting the smallest so far."""


def _run(law: Law, subject: Subject, n: int, seed: int | None, shrink: bool | float) -> None:
    def one_law(data: Any, key: Any, training: bool) -> None:
        law.run(subject, data, key, training)

    one_law.__name__ = one_law.__qualname__ = "law_" + law.name.replace("/", "_").replace(" ", "_")
    test = given(st.data(), strategies.keys(), strategies.trainings())(one_law)
    test = _settings(n, bool(shrink))(test)
    if seed is not None:
        test = hypothesis_seed(seed * 1_000_003 + zlib.crc32(law.name.encode()))(test)
    # hypothesis documents this limit as the one to monkeypatch; we bound it for the run and restore it
    limit = engine.MAX_SHRINKING_SECONDS
    engine.MAX_SHRINKING_SECONDS = SHRINK_SECONDS if shrink is True else float(shrink or 0)
    try:
        test()
    except FlakyFailure as e:  # failed, then passed on the rerun: what breaks lives outside the run
        first = next((x for x in e.exceptions if isinstance(x, AssertionError)), None)
        if first is None:
            raise
        raise AssertionError(
            f"{first}\n(The failure did not repeat when hypothesis ran the same example again: the "
            "handler keeps something across runs, such as a class attribute, a module-level dict or a "
            "counter, that changed the answer. Keep per-run data in the run `begin()` returns.)"
        ) from e
    finally:
        engine.MAX_SHRINKING_SECONDS = limit
