"""The trajectory's storage: recording a point costs one point, whatever the history (issue 14, item 2).

Nothing here is timed: the tests check that the arrays a user gets (`tracker.logprobs`, `state_dict()`,
`to_run()`, the saved run) are the tracker's one growing array, not copies re-stacked from the history.
"""

import math
import pickle

import numpy as np
import pytest
import torch
from tiny import no_dropout, setup

from hf_entropy_callback import EntropyTracker, load_run
from hf_entropy_callback.runs import RunFormatError
from hf_entropy_callback.trajectory import INITIAL_CAPACITY, Trajectory

POINTS = 40


def _nudge(model, gen):
    # New numbers at every point (as training would give) so that a point mixed up with another shows.
    with torch.no_grad():
        model.classifier.weight.add_(0.05 * torch.randn(model.classifier.weight.shape, generator=gen))


@pytest.fixture(scope="module")
def recorded():
    """A tracker after POINTS points, with the view of its history taken after every point."""
    tok, model, raw, _ = setup("bert", n=30)
    model = no_dropout(model).eval()
    tracker = EntropyTracker(raw, tok, batch_size=16).prepare(model)
    gen = torch.Generator().manual_seed(0)
    views, points = [], []
    for k in range(POINTS):
        _nudge(model, gen)
        tracker.track(model, step=k)
        views.append(tracker.logprobs["train"])
        points.append(tracker.compute_logprobs(model, "train"))  # the same model again: the point's values
    return tok, model, raw, tracker, views, np.stack(points)


def test_recording_points_reuses_one_growing_array(recorded):
    tok, model, raw, tracker, views, points = recorded
    # Each view is the history so far, without a copy: consecutive views share memory, except where the
    # array doubled its capacity (16 -> 32 -> 64 points for 40 points: 2 moves).
    moves = sum(not np.shares_memory(a, b) for a, b in zip(views, views[1:]))
    assert moves == math.ceil(math.log2(POINTS / INITIAL_CAPACITY))
    assert [len(v) for v in views] == list(range(1, POINTS + 1))
    # Views taken earlier still show their points, unchanged by later points or moves.
    for k in (0, 15, 16, 33, POINTS - 1):
        np.testing.assert_array_equal(views[k], points[: k + 1])
    np.testing.assert_array_equal(tracker.logprobs["train"], points)


def test_state_dict_and_run_are_views_of_the_history(recorded, tmp_path):
    tok, model, raw, tracker, views, points = recorded
    lp = tracker.logprobs["train"]
    state, run = tracker.state_dict(), tracker.to_run()
    for arr in (state["logprobs"]["train"], run.logprobs["train"]):
        assert np.shares_memory(arr, lp) and arr.shape == (POINTS, 30, 3) and arr.dtype == np.float32
        with pytest.raises(ValueError, match="read-only"):
            arr[0, 0, 0] = 0.0  # the history cannot be changed through what the tracker hands out
    path = tracker.save(str(tmp_path / "entropy_tracking"))
    np.testing.assert_array_equal(load_run(path).logprobs["train"], points)
    # a pickled state (e.g. torch.save in a checkpoint) holds the values, not the spare capacity
    assert len(pickle.dumps(state["logprobs"]["train"])) < lp.nbytes + 1000


def test_point_metrics_read_one_point(recorded, monkeypatch):
    import hf_entropy_callback.tracker as tracker_module

    tok, model, raw, tracker, views, points = recorded
    seen = []
    for fn in ("gold_loss", "accuracy"):
        real = getattr(tracker_module, fn)
        monkeypatch.setattr(
            tracker_module, fn, lambda lp, labels, _real=real: seen.append(np.shape(lp)) or _real(lp, labels)
        )
    before = tracker.point_metrics(-1)
    tracker.track(model, step=POINTS)
    # losses of the new point and of the first (for the un-learning warning), one point each
    assert seen and all(shape in ((1, 30, 3), (30, 3)) for shape in seen), seen
    assert tracker.point_metrics(-2) == before


def test_resume_from_own_state_does_not_alias_it():
    tok, model, raw, _ = setup("bert", n=20)
    model = no_dropout(model).eval()
    tracker = EntropyTracker(raw, tok).prepare(model)
    gen = torch.Generator().manual_seed(1)
    for k in range(6):
        _nudge(model, gen)
        tracker.track(model, step=k)
    state = pickle.loads(pickle.dumps(tracker.state_dict()))
    views = tracker.state_dict()  # views of the tracker's array, given back to the same tracker
    kept = views["logprobs"]["train"].copy()
    tracker.load_state_dict(views, up_to_step=2)
    assert tracker.steps == [0, 1, 2]
    for k in range(3, 8):
        _nudge(model, gen)
        tracker.track(model, step=k)
    np.testing.assert_array_equal(views["logprobs"]["train"], kept)  # the given state is left as it was
    np.testing.assert_array_equal(tracker.logprobs["train"][:3], state["logprobs"]["train"][:3])
    assert not np.array_equal(tracker.logprobs["train"][3:6], state["logprobs"]["train"][3:6])


def test_load_state_dict_checks_the_arrays_before_changing_anything():
    tok, model, raw, _ = setup("bert", n=12)
    tracker = EntropyTracker(raw, tok).prepare(model)
    for k in range(3):
        tracker.track(model, step=k)
    state = tracker.state_dict()
    bad = dict(state, logprobs={"train": state["logprobs"]["train"][:, :5]})
    with pytest.raises(RunFormatError, match=r"shape \(3, 5, 3\), expected \(3, 12, 3\)"):
        tracker.load_state_dict(bad)
    assert tracker.steps == [0, 1, 2] and tracker.logprobs["train"].shape == (3, 12, 3)


def test_trajectory_grows_and_copies_what_it_is_given():
    t = Trajectory(2, 3, capacity=1)
    rows = [np.full((2, 3), float(k)) for k in range(5)]
    for row in rows:
        t.append(row)
    rows[0][:] = 99.0  # the caller's array is not kept
    np.testing.assert_array_equal(t.view()[:, 0, 0], [0, 1, 2, 3, 4])
    assert t.capacity == 8 and t.point(-1)[0, 0] == 4.0
    with pytest.raises(ValueError, match="shape"):
        t.append(np.zeros((3, 3)))
    again = Trajectory.from_array(t.view())
    np.testing.assert_array_equal(again.view(), t.view())
    assert not np.shares_memory(again.view(), t.view())
