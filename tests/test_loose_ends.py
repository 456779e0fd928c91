"""Loose ends of issue 17: fractional epochs in the tracking schedule, `python -m analysis.chaosnli_stats`
from any folder, the divergence note's step, and figures that draw into a caller's axes."""

import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from tiny import args, no_dropout, setup
from transformers import Trainer, TrainerCallback

from hf_entropy_callback import AnnotationEntropyCallback, load_run
from hf_entropy_callback.schedule import tracking_schedule
from hf_entropy_callback.study import figures as F
from hf_entropy_callback.study.loading import load_study
from hf_entropy_callback.synthetic_runs import STUDY_TRAIN_SIZE, Dynamics, tracking_points, write_synthetic_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REASON_ORDER = ("step0", "interval", "epoch_end", "final")

# ------------------------------------------------------------------------------------------------
# Fractional num_train_epochs: the schedule follows the Trainer
# ------------------------------------------------------------------------------------------------


class Recorder(TrainerCallback):
    """Registers the Trainer events that define tracking points, with the reasons they stand for."""

    def __init__(self, track_every):
        self.track_every = track_every
        self.points = {}

    def _add(self, step, reason):
        self.points.setdefault(int(step), set()).add(reason)

    def on_train_begin(self, args, state, control, **kwargs):
        self._add(state.global_step, "step0")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.track_every == 0:
            self._add(state.global_step, "interval")
        if float(state.epoch).is_integer():
            self._add(state.global_step, "epoch_end")
        if state.global_step >= state.max_steps:
            self._add(state.global_step, "final")

    def on_epoch_end(self, args, state, control, **kwargs):
        # A partial last epoch (fractional epochs, max_steps) ends here, at the final step.
        self._add(state.global_step, "epoch_end")

    def schedule(self):
        return [(s, "+".join(r for r in REASON_ORDER if r in rs)) for s, rs in sorted(self.points.items())]


@pytest.mark.parametrize(
    "n, batch, accum, kw",
    [
        (50, 8, 1, {"num_train_epochs": 2.5}),  # 7 steps per epoch, ceil(17.5) = 18 steps
        (50, 4, 2, {"num_train_epochs": 1.3}),  # 13 batches -> 7 updates per epoch, ceil(9.1) = 10 steps
        (50, 8, 1, {"max_steps": 10}),  # stops inside the second epoch
    ],
)
def test_schedule_matches_a_real_trainer_run(tmp_path, n, batch, accum, kw):
    tok, model, raw, train = setup("bert", n=n)
    rec = Recorder(track_every=4)
    cb = AnnotationEntropyCallback(raw, track_every=4, batch_size=64)
    trainer = Trainer(
        model=no_dropout(model),
        args=args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accum, **kw),
        train_dataset=train,
        processing_class=tok,
        callbacks=[rec, cb],
    )
    trainer.train()
    expected = tracking_schedule(
        n,
        batch,
        kw.get("num_train_epochs", 3),
        track_every=4,
        gradient_accumulation_steps=accum,
        max_steps=kw.get("max_steps"),
    )
    assert rec.schedule() == expected
    assert expected[-1][0] == trainer.state.global_step
    # The callback records the same points, reasons in the same order.
    run = load_run(str(tmp_path))
    assert list(zip(run.points["step"], run.points["reason"])) == expected


def test_fractional_epochs_by_hand():
    # 50 examples, batch 8: 7 steps per epoch; 2.5 epochs -> ceil(17.5) = 18 steps, the last epoch partial.
    assert tracking_schedule(50, 8, 2.5, track_every=0) == [
        (0, "step0"),
        (7, "epoch_end"),
        (14, "epoch_end"),
        (18, "epoch_end+final"),
    ]
    # The Trainer's own float arithmetic: 2.2 * 25 = 55.00000000000001, so ceil gives 56 steps.
    assert tracking_schedule(25, 1, 2.2, track_every=0)[-1] == (56, "epoch_end+final")
    # max_steps overrides the epochs, as in the Trainer.
    assert tracking_schedule(50, 8, 2.5, track_every=0, max_steps=3) == [(0, "step0"), (3, "epoch_end+final")]
    assert tracking_schedule(50, 8, 0, track_every=0, max_steps=3)[-1] == (3, "epoch_end+final")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: tracking_schedule(0, 8, 1), "num_examples"),
        (lambda: tracking_schedule(10, 0, 1), "batch_size"),
        (lambda: tracking_schedule(10, 8, 0), "num_epochs"),
        (lambda: tracking_schedule(10, 8, -1.5), "num_epochs"),
        (lambda: tracking_schedule(10, 8, float("nan")), "num_epochs"),
        (lambda: tracking_schedule(10, 8, 1, gradient_accumulation_steps=0), "gradient_accumulation_steps"),
        (lambda: tracking_schedule(10, 8, 1, world_size=0), "world_size"),
        (lambda: tracking_schedule(10, 8, 1, track_every=-1), "track_every"),
    ],
)
def test_schedule_rejects_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_schedule_options_are_keyword_only():
    with pytest.raises(TypeError):
        tracking_schedule(50, 8, 3, 4)


def test_synthetic_runs_keep_fractional_epochs(tmp_path):
    pts = tracking_points(STUDY_TRAIN_SIZE, batch_size=32, num_epochs=2.5, track_every=100)
    per_epoch = math.ceil(STUDY_TRAIN_SIZE / 32)
    last = math.ceil(2.5 * per_epoch)
    assert int(pts["step"].iloc[-1]) == last and pts["reason"].iloc[-1] == "epoch_end+final"
    assert list(zip(pts["step"], pts["reason"])) == tracking_schedule(STUDY_TRAIN_SIZE, 32, 2.5, track_every=100)
    np.testing.assert_allclose(pts["epoch"].iloc[-1], last / per_epoch)
    path = write_synthetic_run(str(tmp_path / "run"), {"num_train_epochs": 2.5}, n_train=30, n_val=10)
    run = load_run(path)
    assert int(run.points["step"].iloc[-1]) == last
    assert run.points["epoch"].iloc[-1] > 2.5


# ------------------------------------------------------------------------------------------------
# python -m analysis.chaosnli_stats from another folder
# ------------------------------------------------------------------------------------------------


def _stats(cwd, *argv, env=None):
    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env.pop("HF_ENTROPY_SHARED_DATA", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "analysis.chaosnli_stats", *argv],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_chaosnli_stats_finds_the_shared_data_from_any_folder(tmp_path):
    folder = os.path.join(
        os.environ.get("HF_ENTROPY_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data")), "chaosnli"
    )
    if not os.path.isfile(os.path.join(folder, "chaosNLI_snli.jsonl")):
        pytest.skip(f"real ChaosNLI data not found at {folder} (../shared/data absent)")
    env = (
        {"HF_ENTROPY_SHARED_DATA": os.environ["HF_ENTROPY_SHARED_DATA"]}
        if "HF_ENTROPY_SHARED_DATA" in os.environ
        else None
    )
    out = _stats(str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    assert "chaosNLI_snli.jsonl: 1514 examples" in out.stdout and "chaosNLI_mnli_m.jsonl" in out.stdout


def test_chaosnli_stats_explicit_folder_and_env(tmp_path, chaosnli_file):
    data = tmp_path / "data" / "chaosnli"
    data.mkdir(parents=True)
    os.replace(chaosnli_file, data / "chaosNLI_snli.jsonl")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A folder as the source: its ChaosNLI files.
    out = _stats(str(elsewhere), str(data))
    assert out.returncode == 0, out.stderr
    assert "chaosNLI_snli.jsonl: 60 examples" in out.stdout
    # The shared-data variable, as the script and the tests read it.
    out = _stats(str(elsewhere), env={"HF_ENTROPY_SHARED_DATA": str(tmp_path / "data")})
    assert out.returncode == 0, out.stderr
    assert "chaosNLI_snli.jsonl: 60 examples" in out.stdout


def test_chaosnli_stats_clear_error_without_data(tmp_path):
    out = _stats(str(tmp_path), env={"HF_ENTROPY_SHARED_DATA": str(tmp_path / "nowhere")})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "no ChaosNLI file" in out.stderr and str(tmp_path / "nowhere") in out.stderr
    assert "HF_ENTROPY_SHARED_DATA" in out.stderr


# ------------------------------------------------------------------------------------------------
# The divergence note names a whole step
# ------------------------------------------------------------------------------------------------


def test_divergence_note_names_an_integer_step(tmp_path):
    steps = [0, 40, 80, 120, 160, 200]
    ok = Dynamics(final_loss=0.1, entropy_slope=2.0, noise_sd=0.3)
    write_synthetic_run(str(tmp_path / "ok_s1"), {"seed": 1}, n_train=40, n_val=10, steps=steps, dynamics=ok)
    write_synthetic_run(
        str(tmp_path / "bad_s2"),
        {"seed": 2},
        n_train=40,
        n_val=10,
        steps=steps,
        dynamics=Dynamics(final_loss=0.1, entropy_slope=2.0, noise_sd=0.3, diverge_at=0.6),
    )
    study = load_study([str(tmp_path)], progress=False)
    notes = [n for n in study.notes if "diverged" in n]
    assert len(notes) == 1 and "bad_s2" in notes[0]
    assert "from step 120 on" in notes[0], notes[0]


# ------------------------------------------------------------------------------------------------
# Figures draw into the caller's axes and return them; only save_figure writes
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    from hf_entropy_callback.study.report import compute_tables

    root = tmp_path_factory.mktemp("fig_runs")
    for method, rank in (("lora", 8), ("full", None)):
        for seed in (1, 2):
            write_synthetic_run(
                str(root / f"{method}_s{seed}"),
                {"method": method, "rank": rank, "seed": seed},
                n_train=60,
                n_val=20,
                steps=[0, 10, 20, 30],
            )
    study = load_study([str(root)], progress=False)
    return study, compute_tables(study, 0.05)


def _files_under(folder):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)


def test_panels_draw_into_the_given_axes_and_write_nothing(small_study, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study, tables = small_study
    monkeypatch.chdir(tmp_path)
    fig, axs = plt.subplots(2, 3)
    try:
        run_ids = list(study.runs.loc[study.runs["method"] == "lora", "run_id"])
        assert F.trajectory_panel(study.curves, run_ids, ax=axs[0, 0]) is axs[0, 0]
        assert F.entropy_histogram_panel(study.entropy, tables["entropy_distribution"], ax=axs[0, 1]) is axs[0, 1]
        assert F.aulc_bins_panel(tables["binning"], scheme="quartile", ax=axs[0, 2]) is axs[0, 2]
        assert F.rank_panel(study.runs, ax=axs[1, 0]) is axs[1, 0]
        assert F.cartography_panel(study.examples, run_id=run_ids[0], ax=axs[1, 1]) is axs[1, 1]
        assert F.calibration_panel(tables["calibration"], measure="ece", ax=axs[1, 2]) is axs[1, 2]
        assert len(axs[0, 0].lines) == 3 and len(axs[0, 0].collections) == 3  # one line and band per category
        assert len(axs[0, 1].patches) > 0 and len(axs[0, 2].lines) > 0 and len(axs[1, 0].lines) > 0
        assert len(axs[1, 1].collections) == 3 and len(axs[1, 2].patches) > 0
        assert len(fig.axes) == 6  # nothing drew a new axes into the caller's figure
    finally:
        plt.close(fig)
    assert _files_under(str(tmp_path)) == []


def test_grids_draw_into_a_given_figure_or_axes(small_study, tmp_path):
    from matplotlib.figure import Figure

    study, tables = small_study
    fig = Figure()
    assert F.aulc_bins_plot(tables["binning"], axes=fig) is fig
    assert len(fig.axes) == 3 and all(len(ax.lines) > 0 for ax in fig.axes)
    other = Figure()
    axs = other.subplots(1, 2)
    assert F.trajectory_plot(study.curves, study.runs, axes=axs) is other
    assert all(len(ax.lines) == 3 for ax in axs)
    with pytest.raises(ValueError, match="2 panels"):
        F.trajectory_plot(study.curves, study.runs, axes=Figure().subplots(1, 3))
    path = F.save_figure(fig, str(tmp_path / "sub" / "aulc.png"))
    assert path == str(tmp_path / "sub" / "aulc.png") and os.path.getsize(path) > 0
    # Nothing to draw: None, not an empty figure.
    assert F.noise_plot(pd.DataFrame()) is None


def test_all_figures_still_writes_pngs(small_study, tmp_path):
    study, tables = small_study
    out = F.all_figures(study, tables, str(tmp_path))
    written = [p for paths in out.values() for p in paths]
    assert written and sorted(written) == _files_under(str(tmp_path))
    assert out["aulc_bins"] == [str(tmp_path / "aulc_bins.png")]
