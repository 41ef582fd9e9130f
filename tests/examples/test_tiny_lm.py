"""examples/tiny_lm.py runs end to end for a few steps: tied embeddings, loss report, a sample."""


import numpy as np
from example_loader import load


def test_tiny_lm_smoke(capsys):
    report = load("tiny_lm").main(
        steps=30, context=32, width=32, depth=1, sample_length=8, prompt="Shall", progress=False
    )
    assert report["tied"]  # one embedding table serves input and output
    assert report["loss_end"] < report["loss_start"] < np.log(57) + 0.3  # starts near uniform, goes down
    assert report["sample"].startswith("Shall") and len(report["sample"]) == 5 + 8
    out = capsys.readouterr().out
    assert "training loss" in out and "held-out loss" in out and "Shall" in out
