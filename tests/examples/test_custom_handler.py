"""examples/custom_handler.py runs small: its handlers pass the laws, and the sloppy one is caught on every seed."""

import pytest
from example_loader import load

pytestmark = pytest.mark.slow  # an example run, seconds each: CI runs it (`--run-slow`)

example = load("custom_handler")


def test_custom_handler_example_passes_the_laws_and_catches_the_sloppy_variant():
    report = example.main(max_examples=3, seed=0, verbose=False)
    assert report["log"] == ["param `dense/kernel` (shape (4, 3), float32)"]
    assert 0 < report["max_abs_diff"] < 1e-2
    assert report["caught"].startswith("effax law `state` does not hold: `get` of ")


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_the_sloppy_variant_is_caught_at_the_defaults_on_every_seed(seed):
    caught = example.catch_sloppy(seed)
    assert caught is not None and caught.startswith("effax law `"), caught
