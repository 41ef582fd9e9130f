"""examples/train_digits.py runs end to end for a few steps and reports what it promises."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look up the module of a class's annotations
    spec.loader.exec_module(module)
    return module


def test_train_digits_trains_evaluates_and_plots(tmp_path, capsys):
    plot = tmp_path / "curve.png"
    report = load("train_digits").main(steps=30, eval_every=10, plot=plot, progress=False)
    assert report["steps"] == 30 and report["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["loss_last"] < report["loss_first"]
    assert report["test_accuracy"] > 0.5  # chance is 0.1; the default 500 steps reach about 0.98
    out = capsys.readouterr().out
    assert "test accuracy" in out and str(plot) in out

