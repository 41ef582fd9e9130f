"""Shared test set-up: a bounded hypothesis profile for CI, and an eager/jit helper."""

import os

# XLA's CPU backend at optimization level 0: it compiles the suite's thousands of small programs about 40% faster
# (the README's command stays under its 5 minutes on 2 cores). Set before JAX starts its backend; the HLO, and so
# every op count the tests check, is the same. Results may differ from level 3 in the last bits (other machine
# code for the same HLO), which the tolerances allow.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest
from hypothesis import HealthCheck, Phase, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    # The explain phase traces every line JAX runs: a failing example would take minutes to report.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# The README's command runs fewer examples per property (its bar is 5 minutes on 2 cores); CI's `--run-slow`
# runs the "ci" profile's 25 (see `pytest_configure`).
settings.register_profile("quick", settings.get_profile("ci"), max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", default=False,
        help="also run tests marked slow (CI does; the README's command skips them to stay under 5 minutes)",
    )


def pytest_configure(config):
    if config.getoption("--run-slow"):
        os.environ["EFFAX_RUN_SLOW"] = "1"  # tests that widen their parameters when slow runs are on read it
        settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("EFFAX_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: runs in CI (`.ci/run`), or here with `--run-slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Run a function eagerly and under `jax.jit` (NumPyro/Haiku-style `use_jit` parametrization)."""
    if request.param:
        return lambda f, **kw: jax.jit(f, **kw)
    return lambda f, **kw: f
