"""The report writer's folder rules, unreadable runs, and runs the analysis must leave out of its means
(diverged but finite, incomplete history), checked on the files and tables a user gets."""

import os
import stat

import numpy as np
import pandas as pd
import pytest

from hf_entropy_callback.dynamics import format_summary, run_summary
from hf_entropy_callback.runs import load_run, write_run
from hf_entropy_callback.study.cli import main as cli_main
from hf_entropy_callback.study.report import REPORT_MARKER, ReportFolderError, build_report
from hf_entropy_callback.synthetic_runs import Dynamics, write_synthetic_run

FLAT = Dynamics(final_loss=0.05, entropy_slope=0.0, length_slope=0.0, noise_sd=0.3)
STEPS = [0, 50, 100]


def _run(root, name, config=None):
    return write_synthetic_run(
        str(root / name), {"seed": 1, **(config or {})}, n_train=30, n_val=9, steps=STEPS, dynamics=FLAT
    )


def _tree(folder):
    """Every file below `folder` with its bytes (to show that nothing was touched)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


# ------------------------------------------------------------------------------------------------
# --out folders
# ------------------------------------------------------------------------------------------------


def test_out_equal_to_the_runs_folder_deletes_nothing(tmp_path, capsys):
    runs = tmp_path / "R"
    _run(runs, "a")
    (runs / "index.md").write_text("my notes on these runs\n")  # today this made R look like a report
    before = _tree(runs)
    assert cli_main([str(runs), "--out", str(runs), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err and str(runs) in err and "Traceback" not in err
    assert _tree(runs) == before
    assert sorted(os.listdir(tmp_path)) == ["R"]  # no temporary folder left beside it


def test_out_inside_or_holding_an_input_is_refused(tmp_path, capsys):
    runs = tmp_path / "R"
    _run(runs, "a")
    before = _tree(tmp_path)
    # inside a run folder given as input
    assert cli_main([str(runs / "a"), "--out", str(runs / "a" / "report"), "--quiet"]) == 2
    assert "lies inside the run folder" in capsys.readouterr().err
    # holding one: an old report folder someone moved the runs into
    (tmp_path / "index.md").write_text("x")
    with pytest.raises(ReportFolderError, match="holds the run folder"):
        build_report([str(runs)], str(tmp_path), progress=False)
    # through a symbolic link to the runs folder
    os.symlink(runs, tmp_path.parent / f"{tmp_path.name}_link")
    try:
        with pytest.raises(ReportFolderError, match="refusing"):
            build_report([str(runs)], str(tmp_path.parent / f"{tmp_path.name}_link"), progress=False)
    finally:
        os.remove(tmp_path.parent / f"{tmp_path.name}_link")
    assert _tree(tmp_path) == {**before, "index.md": b"x"}


def test_report_folder_has_a_marker_and_only_a_marked_folder_is_replaced(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(runs, "a")
    out = tmp_path / "report"
    rep = build_report([str(runs)], str(out), progress=False, html_index=False)
    assert (out / REPORT_MARKER).read_text().startswith("hf_entropy_callback analysis report")
    (out / "figures" / "stale.png").write_bytes(b"old")
    build_report([str(runs)], str(out), progress=False, html_index=False)  # a report of ours: replaced
    assert not (out / "figures" / "stale.png").exists() and (out / "index.md").exists()
    assert rep.index == str(out / "index.md")
    # a folder that is not a report is left alone, with a message naming it
    other = tmp_path / "paper"
    other.mkdir()
    (other / "draft.tex").write_text("keep")
    assert cli_main([str(runs), "--out", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(other) in err and REPORT_MARKER in err and "Traceback" not in err
    assert (other / "draft.tex").read_text() == "keep"
    # a report folder that has come to hold a run is not replaced either
    _run(out, "moved_here")
    with pytest.raises(ReportFolderError, match="holds a run"):
        build_report([str(runs)], str(out), progress=False)
    assert load_run(str(out / "moved_here"))
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_overlong_and_unwritable_out_give_a_message_and_status_2(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(runs, "a")
    assert cli_main([str(runs), "--out", str(tmp_path / ("r" * 250)), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "too long" in err and "Traceback" not in err
    if os.path.isdir("/proc/self"):  # read-only even for root
        assert cli_main([str(runs), "--out", "/proc/self/hf_entropy_report", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "/proc/self/hf_entropy_report" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["runs"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(runs, "a")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert cli_main([str(runs), "--out", str(ro / "report"), "--quiet"]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_report_modes_follow_the_umask_and_leftovers_are_removed(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "a")
    stale = [tmp_path / ".report.tmp-xyz", tmp_path / ".report.old-ab_12"]
    for d in stale:
        (d / "figures").mkdir(parents=True)
    keep = tmp_path / ".report2.tmp-xyz"
    keep.mkdir()
    old = os.umask(0o022)
    try:
        build_report([str(runs)], str(tmp_path / "report"), progress=False, html_index=False)
    finally:
        os.umask(old)
    out = tmp_path / "report"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "tables").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "index.md").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / REPORT_MARKER).stat().st_mode) == 0o644
    assert not any(d.exists() for d in stale) and keep.exists()


# ------------------------------------------------------------------------------------------------
# unreadable runs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated", "random_bytes"])
def test_corrupt_logprobs_is_named_and_skipped(tmp_path, capsys, kind):
    runs = tmp_path / "runs"
    _run(runs, "good")
    bad = _run(runs, "bad", {"seed": 2})
    path = os.path.join(bad, "logprobs.npz")
    data = open(path, "rb").read()
    data = data[: len(data) // 2] if kind == "truncated" else np.random.default_rng(3).bytes(len(data))
    open(path, "wb").write(data)
    assert cli_main([str(runs), "--out", str(tmp_path / "rep"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert bad in err and "logprobs.npz" in err and "pickle" not in err and "Traceback" not in err
    assert not (tmp_path / "rep").exists()
    assert cli_main([str(runs), "--out", str(tmp_path / "rep"), "--quiet", "--skip-invalid"]) == 0
    index = (tmp_path / "rep" / "index.md").read_text()
    assert f"{bad}: skipped, logprobs.npz is corrupt" in index
    inventory = pd.read_csv(tmp_path / "rep" / "tables" / "runs.csv")
    assert inventory["run_id"].tolist() == ["good"]


# ------------------------------------------------------------------------------------------------
# runs left out of the means
# ------------------------------------------------------------------------------------------------


def _exploded(root, name, loss=3566.0):
    """A synthetic run whose train losses blow up (finitely) over the last tracking points."""
    tdir = _run(root, name, {"seed": 3})
    run = load_run(tdir)
    lp = {k: v.copy() for k, v in run.logprobs.items()}
    gold = run.set_examples("train")["label"].to_numpy()
    lp["train"][1:, np.arange(len(gold)), gold] = -loss
    write_run(tdir, run.config, run.examples, run.points, lp)
    return tdir


def test_diverged_finite_and_incomplete_history_runs_are_left_out(tmp_path):
    runs = tmp_path / "runs"
    for s in (1, 2):
        _run(runs, f"ok_s{s}", {"seed": s})
    _exploded(runs, "exploded_s3")
    _run(runs, "resumed_s4", {"seed": 4, "resumed_without_history": True})
    _run(runs, "resumed_s5", {"seed": 5, "history_complete": False})
    rep = build_report([str(runs)], str(tmp_path / "rep"), progress=False, html_index=False)
    per_seed = pd.read_csv(tmp_path / "rep" / "tables" / "per_seed.csv").set_index("run_id")
    assert per_seed.loc["exploded_s3", "status"] == "diverged"
    assert per_seed.loc["resumed_s4", "status"] == "incomplete history"
    assert per_seed.loc["resumed_s5", "status"] == "incomplete history"
    assert (per_seed.loc[["ok_s1", "ok_s2"], "status"] == "ok").all()
    assert per_seed.loc[["exploded_s3", "resumed_s4", "resumed_s5"], "p_bonf"].isna().all()
    assert "10 ln K" in per_seed.loc["exploded_s3", "exclusion"]
    rho = pd.read_csv(tmp_path / "rep" / "tables" / "rho_by_condition.csv")
    assert len(rho) == 1
    assert rho.loc[0, "n_runs"] == 2 and rho.loc[0, "n_diverged"] == 1 and rho.loc[0, "n_incomplete"] == 2
    assert rho.loc[0, "seeds"] == "1, 2"
    delta = pd.read_csv(tmp_path / "rep" / "tables" / "delta_loss.csv")
    assert (delta["n_runs"] == 2).all()
    index = (tmp_path / "rep" / "index.md").read_text()
    assert "exploded_s3" in index and "above the sanity bound 10 ln K = 10.986" in index
    assert "resumed_s4" in index and "incomplete history" in index
    assert sum("excluded from aggregates" in n for n in rep.notes) == 3


def test_loss_below_the_bound_is_not_divergence(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "ok_s1")
    _exploded(runs, "high_s3", loss=10.0)  # above ln 3 but below 10 ln 3 = 10.99
    rep = build_report([str(runs)], str(tmp_path / "rep"), progress=False, html_index=False)
    assert set(rep.tables["per_seed"]["status"]) == {"ok"}


def test_run_summary_marks_an_incomplete_history(tmp_path):
    full = load_run(_run(tmp_path, "full"))
    resumed = load_run(_run(tmp_path, "resumed", {"resumed_without_history": True}))
    assert run_summary(full)["history_complete"] is True
    summary = run_summary(resumed)
    assert summary["history_complete"] is False
    text = format_summary(summary)
    assert "WARNING: incomplete history" in text
    assert "WARNING" not in format_summary(run_summary(full))


def test_a_run_that_did_not_learn_is_flagged_in_the_report_not_dropped(tmp_path):
    """A run left near chance (the 'NOT LEARNED' warning its script printed) must not sit in the report as
    an ordinary row: its rho describes an untrained model. It stays in the means (the protocol keeps it)."""
    runs = tmp_path / "runs"
    _run(runs, "ok_s1")
    _run(runs, "ok_s2", {"seed": 2})
    stuck = Dynamics(final_loss=1.6, entropy_slope=0.0, length_slope=0.0, noise_sd=0.3)
    write_synthetic_run(str(runs / "stuck_s3"), {"seed": 3}, n_train=30, n_val=9, steps=STEPS, dynamics=stuck)
    summary = run_summary(load_run(str(runs / "stuck_s3")))
    acc = summary["validation_accuracy"]
    assert acc < 1 / 3 + 0.05 and "NOT LEARNED" in format_summary(summary)

    rep = build_report([str(runs)], str(tmp_path / "rep"), progress=False, html_index=False)
    per_seed = pd.read_csv(tmp_path / "rep" / "tables" / "per_seed.csv").set_index("run_id")
    assert per_seed.loc["stuck_s3", "validation_accuracy"] == pytest.approx(acc)
    assert not per_seed.loc["stuck_s3", "learned"] and per_seed.loc[["ok_s1", "ok_s2"], "learned"].all()
    assert (per_seed["status"] == "ok").all()  # flagged, not excluded
    rho = pd.read_csv(tmp_path / "rep" / "tables" / "rho_by_condition.csv")
    assert rho.loc[0, "n_runs"] == 3 and rho.loc[0, "n_not_learned"] == 1
    assert rho.loc[0, "rho_mean"] == pytest.approx(per_seed["rho"].mean())
    inventory = pd.read_csv(tmp_path / "rep" / "tables" / "runs.csv").set_index("run_id")
    assert list(inventory["learned"]) == [True, True, False]
    index = (tmp_path / "rep" / "index.md").read_text()
    assert f"stuck_s3 ({rho.loc[0, 'condition']}, seed 3): NOT LEARNED: validation accuracy {acc:.3f}" in index
    assert "1 usable run(s) did not learn" in index
    assert [n for n in rep.notes if "NOT LEARNED" in n] == [n for n in rep.notes if "stuck_s3" in n]


def test_a_run_without_a_validation_set_is_not_called_unlearned(tmp_path):
    runs = tmp_path / "runs"
    write_synthetic_run(str(runs / "a"), {"seed": 1}, n_train=30, n_val=0, steps=STEPS, dynamics=FLAT)
    rep = build_report([str(runs)], str(tmp_path / "rep"), progress=False, html_index=False)
    assert rep.tables["per_seed"]["learned"].isna().all()
    assert rep.tables["rho_by_condition"].loc[0, "n_not_learned"] == 0
    assert not [n for n in rep.notes if "NOT LEARNED" in n]
