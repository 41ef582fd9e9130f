"""examples/train_digits.py runs end to end for a few steps and reports what it promises."""

import pytest
from example_loader import load

pytestmark = pytest.mark.slow  # an example run, seconds each: CI runs it (`--run-slow`)


def test_train_digits_trains_evaluates_and_plots(tmp_path, capsys):
    plot = tmp_path / "curve.png"
    report = load("train_digits").main(steps=30, eval_every=10, plot=plot, progress=False)
    assert report["steps"] == 30 and report["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["loss_last"] < report["loss_first"]
    assert report["test_accuracy"] > 0.5  # chance is 0.1; the default 500 steps reach about 0.98
    out = capsys.readouterr().out
    assert "test accuracy" in out and str(plot) in out

