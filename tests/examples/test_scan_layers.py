"""examples/scan_layers.py runs small, and the loop and the scan agree."""

import pytest
from example_loader import load

pytestmark = pytest.mark.slow  # an example run, seconds each: CI runs it (`--run-slow`)


def test_scan_layers_matches_the_loop():
    report = load("scan_layers").main(depth=3, width=8, batch=4, verbose=False)
    assert report["max_abs_diff"] < 1e-5
    assert report["max_abs_grad_diff"] < 1e-5
