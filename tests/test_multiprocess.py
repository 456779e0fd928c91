"""Two real CPU processes (torchrun, gloo): the tracked set is sharded, gathered and stored once."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from hf_entropy_callback import load_run
from hf_entropy_callback.callback import tracking_schedule

HERE = os.path.dirname(os.path.abspath(__file__))
TORCHRUN = shutil.which("torchrun")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two-process run, one-process run) of tests/mp_worker.py, instruments on in both."""
    tmp_path = tmp_path_factory.mktemp("mp")
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [
        TORCHRUN,
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        os.path.join(HERE, "mp_worker.py"),
        str(two),
        "8",
        "11",
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(two / "world.json") as fh:
        assert json.load(fh)["world_size"] == 2  # really two processes, not the one-process launcher
    # the reference: one process with the same global batch (2 x 8)
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "mp_worker.py"), str(one), "16", "11"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return two, one


@needs_torchrun
def test_two_processes_match_one(runs):
    two, one = runs
    a, b = load_run(str(two)), load_run(str(one))
    # 48 training examples / (2 x 8) -> 3 steps per epoch, 2 epochs, track every 2
    expected = [(0, "step0"), (2, "interval"), (3, "epoch_end"), (4, "interval"), (6, "interval+epoch_end+final")]
    assert tracking_schedule(48, 8, 2, track_every=2, world_size=2) == expected
    assert list(zip(a.points["step"], a.points["reason"])) == expected
    assert list(zip(b.points["step"], b.points["reason"])) == expected
    assert a.config["world_size"] == 2 and b.config["world_size"] == 1
    for name, n in (("train", 50), ("validation", 11)):
        ex = a.set_examples(name)
        assert len(ex) == n and ex["example_id"].is_unique  # each example stored exactly once
        assert a.logprobs[name].shape == b.logprobs[name].shape
        assert np.isfinite(a.logprobs[name]).all()
        np.testing.assert_allclose(a.logprobs[name][0], b.logprobs[name][0], atol=1e-5)  # step 0: same model
        np.testing.assert_allclose(a.logprobs[name], b.logprobs[name], atol=1e-3)  # and they stay close
    # the loss over 2 processes x 8 gives the gradients of one process x 16
    ga, gb = torch.load(two / "first_grads.pt"), torch.load(one / "first_grads.pt")
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6, msg=k)


@needs_torchrun
def test_instruments_two_processes_match_one(runs):
    """Sharded, gathered and all-reduced instrument values equal one process's."""
    two, one = runs
    a, b = load_run(str(two)), load_run(str(one))
    assert a.config["instruments"]["sample_size"] == b.config["instruments"]["sample_size"] == 15
    for x, y in ((a.instruments, b.instruments), (a.instrument_examples, b.instrument_examples)):
        assert len(x) and np.isfinite(x["value"]).all()
        pd.testing.assert_frame_equal(x.drop(columns="value"), y.drop(columns="value"))  # same rows, each once
        first = (x["point"] == 0).to_numpy()
        # step 0: the same model, so the same values up to summation order
        np.testing.assert_allclose(x["value"][first], y["value"][first], rtol=1e-5, atol=1e-6)
        # later points: the two runs' weights differ by float rounding of the distributed training (1e-7 here)
        np.testing.assert_allclose(x["value"], y["value"], rtol=1e-3, atol=1e-5)
