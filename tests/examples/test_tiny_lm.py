"""examples/tiny_lm.py runs end to end for a few steps: tied embeddings, loss report, a sample."""

import importlib.util
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look up the module of a class's annotations
    spec.loader.exec_module(module)
    return module


def test_tiny_lm_smoke(capsys):
    report = load("tiny_lm").main(
        steps=30, context=32, width=32, depth=1, sample_length=8, prompt="Shall", progress=False
    )
    assert report["tied"]  # one embedding table serves input and output
    assert report["loss_end"] < report["loss_start"] < np.log(57) + 0.3  # starts near uniform, goes down
    assert report["sample"].startswith("Shall") and len(report["sample"]) == 5 + 8
    out = capsys.readouterr().out
    assert "training loss" in out and "held-out loss" in out and "Shall" in out
