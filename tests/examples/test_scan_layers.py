"""examples/scan_layers.py runs small, and the loop and the scan agree."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scan_layers_matches_the_loop():
    report = load("scan_layers").main(depth=3, width=8, batch=4, verbose=False)
    assert report["max_abs_diff"] < 1e-5
    assert report["max_abs_grad_diff"] < 1e-5
