"""The README's demo runs, and its numbers move the right way."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_trains():
    report = load("quickstart").main(steps=60, verbose=False)
    assert report["eval_mse_after"] < report["eval_mse_before"]
