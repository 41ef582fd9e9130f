"""examples/custom_handler.py runs small: its handlers pass the laws and the sloppy one is caught."""

from example_loader import load


def test_custom_handler_example_passes_the_laws_and_catches_the_sloppy_variant():
    report = load("custom_handler").main(max_examples=3, verbose=False)
    assert report["log"] == ["param `dense/kernel` (shape (4, 3), float32)"]
    assert 0 < report["max_abs_diff"] < 1e-2
    assert report["caught"].startswith("effax law `forwarding identity` does not hold")
