"""The sharded-training example: 8 simulated devices train to the same result as one, each holding half the model."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # an example run, seconds each: CI runs it (`--run-slow`)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_eight_devices_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sharded_training.py"), "--steps", "20", "--json"],
        env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["mesh"] == {"data": 4, "model": 2}
    assert report["max_param_diff"] < 1e-5 and report["max_loss_diff"] < 1e-5
    assert report["loss_last_sharded"] < report["loss_first"]
    assert report["largest_share_on_one_device"] < 0.51  # the model is split in two over "model"
    assert report["kernel_sharding"] == "P(None, 'model')"
