"""The README's demo runs, and its numbers move the right way."""

from example_loader import load


def test_quickstart_trains():
    report = load("quickstart").main(steps=60, verbose=False)
    assert report["eval_mse_after"] < report["eval_mse_before"]
