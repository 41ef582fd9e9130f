"""The kit is only as good as the bugs it finds: every broken handler of `zoo.py` is caught by the law it
breaks, at `assert_handler_laws`'s defaults, and every correct one passes.

Every other broken handler runs on one seed here (they rotate over 0-4, so the suite sees five), every
fourth correct one with half the default examples; CI (`--run-slow`, or `EFFAX_RUN_SLOW=1`) runs every
handler on all five seeds at the defaults. Broken handlers run with `shrink=False`: with a fixed seed
hypothesis generates the same examples either way, so whether (and by which law) a bug is caught is what
the defaults give; only the shrinking of the counterexample is skipped, which `test_testing_laws.py` checks.
"""

import os

import pytest
from zoo import BROKEN, CORRECT, broken

from effax.testing import assert_handler_laws

SEEDS = range(5)
ALL_SEEDS = os.environ.get("EFFAX_RUN_SLOW") == "1"  # set by tests/conftest.py under --run-slow


def _cases(table, every: int = 1):
    """One seed per handler (rotating over 0-4), or all five under --run-slow; `every` keeps only every n-th
    handler in the README's command (the rest run in CI)."""
    for i, name in enumerate(table):
        for seed in SEEDS:
            if ALL_SEEDS or (seed == i % len(SEEDS) and i % every == 0):
                yield pytest.param(name, seed, id=f"{name}-seed{seed}")


@pytest.mark.parametrize("name, seed", list(_cases(BROKEN, every=2)))
def test_a_broken_handler_is_caught_by_the_law_it_breaks(name, seed):
    _, effects, options, law = BROKEN[name]
    with pytest.raises(AssertionError) as e:
        assert_handler_laws(broken(name), effects, seed=seed, shrink=False, **options)
    message = str(e.value)
    assert message.startswith(f"effax law `{law}` does not hold: "), message
    assert "[0]" not in message.split("\nmodel:")[0], message  # user terms, not internal tuple positions
    assert "\nmodel: Model(" in message and "rebuild the model: Model(" in message


@pytest.mark.parametrize("name, seed", list(_cases(CORRECT, every=4)))
def test_a_correct_handler_passes_every_law(name, seed):
    factory, effects, options = CORRECT[name]
    budget = {} if ALL_SEEDS else {"max_examples": 5}
    assert_handler_laws(factory, effects, seed=seed, **budget, **options)
