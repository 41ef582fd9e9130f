"""examples/custom_handler.py runs small: its handlers pass the laws and the sloppy one is caught."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_handler_example_passes_the_laws_and_catches_the_sloppy_variant():
    report = load("custom_handler").main(max_examples=3, verbose=False)
    assert report["log"] == ["param `dense/kernel` (shape (4, 3), float32)"]
    assert 0 < report["max_abs_diff"] < 1e-2
    assert report["caught"].startswith("effax law `forwarding identity` does not hold")
