"""examples/from_flax.py runs small: the Flax block trains inside effax and its batch stats move."""

import pytest
from example_loader import load

pytestmark = pytest.mark.slow  # an example run, seconds each: CI runs it (`--run-slow`)


def test_from_flax_example_trains_and_switches_modes():
    report = load("from_flax").main(steps=25, batch=16, verbose=False)
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert report["eval_accuracy_after"] > report["eval_accuracy_before"]
    assert report["batch_stats_moved"] > 0


def test_from_flax_example_decodes_from_a_flax_transformer_with_a_cache_under_the_eval_preset():
    report = load("from_flax").decode(length=10, verbose=False)
    assert report["decode_matches_flax"]
    assert len(report["tokens"][0]) == 10
    assert "cache_index" in report["cache_entries"]
