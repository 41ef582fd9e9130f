"""examples/from_flax.py runs small: the Flax block trains inside effax and its batch stats move."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Flax modules are dataclasses, which look their module up here
    spec.loader.exec_module(module)
    return module


def test_from_flax_example_trains_and_switches_modes():
    report = load("from_flax").main(steps=25, batch=16, verbose=False)
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert report["eval_accuracy_after"] > report["eval_accuracy_before"]
    assert report["batch_stats_moved"] > 0
