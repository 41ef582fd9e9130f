"""Property-test your own handlers against the laws the rest of effax relies on.

Import it explicitly (it needs hypothesis, a test dependency):
`from effax.testing import strategies, laws, assert_handler_laws`.

- `effax.testing.models`: effectful models as data (`Model`, `Scope`, `Param`,
  `State`, `Draw`, `Sow`, `SideInput`, `Mode`) with a readable listing;
- `effax.testing.strategies`: hypothesis strategies for models, inputs, keys,
  variables and share bindings;
- `effax.testing.laws`: one `check_*` function per law, usable inside `@given`;
- `assert_handler_laws`: every law relevant to a handler, in one call.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from effax.testing import laws, models, strategies
from effax.testing.laws import HandlerLike
from effax.testing.models import EFFECTS

__all__ = ["assert_handler_laws", "laws", "models", "strategies", "LAWS"]

LAWS = (
    "determinism", "locality", "init/apply agreement", "abstract init", "state",
    "forwarding identity", "commutation", "associativity", "sharing", "purity under jit",
)
"""The laws `assert_handler_laws` knows, by the names its failures use."""


def _relevant(effects: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for law in LAWS:
        if law == "locality" and not {"param", "random"} & set(effects):
            continue
        if law == "state" and "state" not in effects:
            continue
        if law == "sharing" and "param" not in effects:
            continue
        out.append(law)
    return tuple(out)


def assert_handler_laws(
    handler: HandlerLike,
    effects: Iterable[str] = (),
    *,
    max_examples: int = 10,
    models: Any = None,
    only: Iterable[str] | None = None,
) -> None:
    """Check `handler` against every law relevant to the `effects` it answers, over generated models.

    `effects` names what the handler answers (of `"param"`, `"state"`,
    `"random"`, `"sow"`, `"side_input"`, `"mode"`): generated models always
    perform them, forwarding identity is checked on models without them, and
    commutation and nesting are checked against built-in handlers of the
    other effects. Locality runs for param and random handlers, sharing for
    param handlers, the state laws for state handlers. `handler` is a
    handler, or a class or factory called once per check (an instance is
    reused across every run). `models` replaces the strategy of `(model, x)`
    pairs (default `strategies.models_and_inputs(require=effects)`); `only`
    picks laws by name (see `LAWS`). The first law that fails raises an
    `AssertionError` showing the smallest model hypothesis found.

    >>> from effax.testing import assert_handler_laws
    >>> class LogRequests(fx.Handler):
    ...     def handle(self, request, forward):
    ...         return forward(request)   # a real one would log `request.describe()`
    >>> assert_handler_laws(LogRequests, max_examples=2, only=["determinism"])
    """
    s = strategies
    effects = tuple(effects)
    unknown = [e for e in effects if e not in EFFECTS]
    if unknown:
        raise ValueError(f"effects names unknown effects {unknown}; the kit knows {list(EFFECTS)}.")
    chosen = _relevant(effects) if only is None else tuple(only)
    bad = [law for law in chosen if law not in LAWS]
    if bad:
        raise ValueError(f"unknown laws {bad}; the laws are {list(LAWS)}.")
    model_and_x = s.models_and_inputs(require=effects) if models is None else models

    others = [e for e in EFFECTS if e not in effects]
    partner = st.sampled_from(others).map(laws.partner) if others else st.none()
    maybe_partner = st.one_of(st.none(), partner)
    extra = {
        "locality": lambda m: s.removals(m),
        "commutation": lambda m: partner,
        "associativity": lambda m: st.tuples(maybe_partner, maybe_partner),
        "sharing": lambda m: s.share_bindings(m),
    }

    def check(law: str, model: Any, x: Any, key: Any, training: bool, more: Any) -> None:
        if law == "determinism":
            laws.check_determinism(model, x, key, handler, training=training)
        elif law == "locality":
            laws.check_locality(model, x, key, handler, drop=more, training=training)
        elif law == "init/apply agreement":
            laws.check_init_apply_agreement(model, x, key, handler, training=training)
        elif law == "abstract init":
            laws.check_abstract_init(model, x, key, handler, training=training)
        elif law == "state":
            laws.check_state_laws(model, x, key, handler, training=training)
        elif law == "forwarding identity":
            laws.check_forwarding_identity(model, x, key, handler, effects=effects, training=training)
        elif law == "commutation":
            if more is not None:
                laws.check_commutes_with(model, x, key, handler, more, training=training)
        elif law == "associativity":
            laws.check_associativity(model, x, key, handler, outer=more[0], inner=more[1], training=training)
        elif law == "sharing":
            laws.check_sharing_laws(model, x, key, more, handler, training=training)
        else:
            laws.check_purity_under_jit(model, x, key, handler, training=training)

    def run(law: str) -> None:
        make_extra = extra.get(law, lambda m: st.none())

        def one_law(data: Any, key: Any, training: bool) -> None:
            model, x = data.draw(model_and_x, label="model, x")
            check(law, model, x, key, training, data.draw(make_extra(model), label="also"))

        one_law.__name__ = one_law.__qualname__ = "law_" + law.replace("/", "_").replace(" ", "_")
        n = max(1, max_examples // 4) if law == "purity under jit" else max_examples
        quiet = [*settings.default.suppress_health_check, HealthCheck.too_slow]  # JAX compiles are slow
        # the explain phase traces every line JAX runs (sys.settrace): minutes, for a hint we already give
        phases = [p for p in settings.default.phases if p is not Phase.explain]
        configured = settings(max_examples=n, deadline=None, suppress_health_check=quiet, phases=phases)
        configured(given(st.data(), s.keys(), st.booleans())(one_law))()

    for law in chosen:
        run(law)
