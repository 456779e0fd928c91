"""The report at scale (issue 14, item 5): the shortcuts that make 540 runs fast give the same numbers.

Shared bootstrap resamples (`BootstrapResampler`) against the per-call computation they replace, the
per-column number formatting against `_fmt_number`, and a study loaded with shared resamples
against each run summarised on its own.
"""

import math
import os

import numpy as np
import pytest
from scipy import stats

from hf_entropy_callback.dynamics import ece_bootstrap, expected_calibration_error
from hf_entropy_callback.inference import BootstrapResampler, spearman_bootstrap
from hf_entropy_callback.runs import RunFormatError, load_run
from hf_entropy_callback.study.loading import Options, load_study, summarize_run
from hf_entropy_callback.study.report import _column_formatter, _fmt_number, format_table
from hf_entropy_callback.synthetic_runs import write_synthetic_run


def _reference_spearman_bootstrap(x, y, n_boot, seed):
    """The per-call algorithm `BootstrapResampler.spearman` replaced (before issue 14), kept as the reference:
    draw counts in chunks, rank x and y of every resample from the counts, Pearson of the weighted ranks."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n_boot <= 0 or n < 3:
        return np.full(max(n_boot, 0), np.nan)

    def groups(v):
        order = np.argsort(v, kind="stable")
        sv = v[order]
        new = np.r_[True, sv[1:] != sv[:-1]]
        group = np.empty(len(v), dtype=np.intp)
        group[order] = np.cumsum(new) - 1
        return order, np.flatnonzero(new), group

    def ranks(counts, order, starts, group):
        per = np.add.reduceat(counts[:, order], starts, axis=1)
        cum = np.cumsum(per, axis=1)
        return (cum - (per - 1) / 2.0)[:, group]

    rng = np.random.default_rng(seed)
    perm = np.argsort(x, kind="stable")
    inv = np.empty(n, dtype=np.intp)
    inv[perm] = np.arange(n)
    x, y = x[perm], y[perm]
    gx, gy = groups(x), groups(y)
    out = np.empty(n_boot)
    chunk = max(1, min(n_boot, 2_000_000 // n))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        counts = np.bincount((inv[idx] + (np.arange(b) * n)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        dx, dy = ranks(counts, *gx) - (n + 1) / 2.0, ranks(counts, *gy) - (n + 1) / 2.0
        num = (counts * dx * dy).sum(axis=1)
        den = np.sqrt((counts * dx * dx).sum(axis=1) * (counts * dy * dy).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + b] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


@pytest.mark.parametrize("case", range(12))
def test_shared_spearman_resamples_equal_the_per_call_algorithm_bit_for_bit(case):
    rng = np.random.default_rng(case)
    n = int(rng.integers(3, 1500))
    n_boot = [1, 50, 400, 2500][case % 4]  # 2500 resamples of > 800 examples come in several chunks
    x = rng.normal(size=n)
    if case % 3 == 0:
        x = np.round(x, 1)  # ties in x
    boot = BootstrapResampler(n_boot=n_boot, seed=case)
    for k in range(3):  # several y against one x: the later calls reuse the resamples of x
        y = x + rng.normal(size=n)
        if (case + k) % 2:
            y = np.round(y, 1)  # ties in y
        if k == 2:
            y[rng.integers(0, n, 3)] = np.nan  # dropped pairs: another x, drawn afresh
        expect = _reference_spearman_bootstrap(x, y, n_boot, case)
        assert np.array_equal(boot.spearman(x, y), expect, equal_nan=True)
        assert np.array_equal(spearman_bootstrap(x, y, n_boot=n_boot, seed=case), expect, equal_nan=True)
    assert np.isnan(boot.spearman(x, np.ones(n))).all()  # constant y: every replicate NaN


def test_shared_spearman_replicates_equal_scipy_on_explicit_resamples():
    rng = np.random.default_rng(3)
    x = np.round(rng.uniform(0, 1, 200), 1)
    boot = BootstrapResampler(n_boot=40, seed=11)
    idx = np.random.default_rng(11).integers(0, 200, size=(40, 200))
    for _ in range(3):
        y = rng.normal(size=200) + x
        ref = [stats.spearmanr(x[i], y[i]).statistic for i in idx]
        assert boot.spearman(x, y) == pytest.approx(ref, abs=1e-12)


def test_resampler_cache_is_bounded_and_gives_the_same_draws():
    boot = BootstrapResampler(n_boot=30, seed=2, max_cells=30 * 100)
    a = boot.indices(60)
    assert np.array_equal(a, np.random.default_rng(2).integers(0, 60, size=(30, 60)))
    assert boot.indices(60) is a  # kept
    b = boot.indices(70)  # 30 x 70 + 30 x 60 cells exceed the budget: the older one goes
    assert boot._cells <= boot.max_cells and list(boot._cache) == [("indices", 70)]
    assert np.array_equal(boot.indices(60), a) and boot.indices(60) is not a
    assert not b.flags.writeable
    nothing = BootstrapResampler(n_boot=30, seed=2, max_cells=0)
    nothing.indices(60)
    assert not nothing._cache


def test_ece_bootstrap_with_a_shared_resampler_equals_the_per_call_draws():
    rng = np.random.default_rng(4)
    boot = BootstrapResampler(n_boot=25, seed=3)
    for n in (80, 80, 55):
        logits = rng.normal(size=(n, 3)) * 2
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        y = rng.integers(0, 3, n)
        shared = ece_bootstrap(p, y, 15, n_boot=25, seed=3, resampler=boot)
        assert np.array_equal(shared, ece_bootstrap(p, y, 15, n_boot=25, seed=3))
        idx = np.random.default_rng(3).integers(0, n, size=(25, n))
        assert shared == pytest.approx([expected_calibration_error(p[i], y[i], 15) for i in idx], abs=1e-12)
    with pytest.raises(ValueError, match="not 26 with seed 3"):
        ece_bootstrap(p, y, 15, n_boot=26, seed=3, resampler=boot)


def test_column_formatter_writes_what_fmt_number_writes():
    values = [
        None,
        math.nan,
        np.nan,
        math.inf,
        -math.inf,
        0.0,
        -0.0,
        3.0,
        1234.5,
        -1000.0,
        0.000123456,
        2e-4,
        12.3456,
        7,
        -3,
        True,
        np.bool_(False),
        np.int64(5),
        np.float64(2.5),
        np.float32(0.25),
        np.float64(np.nan),
        "text",
        "a|b",
    ]
    columns = ["rho", "learning_rate", "p_val", "tau_p_val", "p_max", "share_changed", "sign_concordance", "n"]
    columns += ["n_runs", "seed", "rank", "W", "final_step", "condition"]
    for col in columns:
        fmt = _column_formatter(col)
        for v in values:
            assert fmt(v) == _fmt_number(col, v), (col, v)


def test_format_table_is_unchanged_by_the_column_formatters():
    import pandas as pd

    df = pd.DataFrame(
        {
            "condition": ["A", "B", "C"],
            "rho_mean": [0.2, np.nan, 1500.0],
            "rho_sd": [0.1, np.nan, np.inf],
            "n_runs": [3, 1, 2],
            "p_max": [0.0123456, np.nan, 1e-9],
            "share": [0.5, 0.25, np.nan],
            "ok": [True, False, True],
        }
    )
    shown = format_table(df)
    assert shown["rho (mean ± sd)"].tolist() == ["0.200 ± 0.100", "— ± —", "1500 ± ∞"]
    for col in ("n_runs", "p_max", "share", "ok"):
        assert shown[col].tolist() == [_fmt_number(col, v) for v in df[col]]


def test_a_study_with_shared_resamples_equals_each_run_summarised_on_its_own(tmp_path):
    steps = [0, 40, 80, 120]
    small = dict(n_train=90, n_val=30, steps=steps)
    for seed in (1, 2, 3):
        write_synthetic_run(str(tmp_path / f"lora_s{seed}"), {"seed": seed}, **small)
    write_synthetic_run(str(tmp_path / "noisy_s1"), {"seed": 1, "label_noise": 0.3}, **small)
    write_synthetic_run(str(tmp_path / "low_s1"), {"seed": 1, "composition": "low"}, **small)  # another tracked set
    options = Options(n_boot=200, boot_seed=7)
    study = load_study([str(tmp_path)], progress=False, options=options)
    for run_id in study.runs["run_id"]:
        run = load_run(os.path.join(str(tmp_path), run_id))
        row, alone = summarize_run(run, run_id, options=options)  # its own resamples, nothing shared
        assert np.array_equal(study.boot[run_id], alone["boot"])
        got = study.runs.set_index("run_id").loc[run_id]
        assert (got["rho_ci_low"], got["rho_ci_high"]) == (row["rho_ci_low"], row["rho_ci_high"])
        cal = study.calibration[study.calibration["run_id"] == run_id].reset_index(drop=True)
        assert cal.equals(alone["calibration"].reset_index(drop=True))
        ex = study.examples[study.examples["run_id"] == run_id].reset_index(drop=True)
        assert ex.equals(alone["examples"].reset_index(drop=True))


def test_loading_in_worker_processes_gives_the_same_study(tmp_path):
    steps = [0, 40, 80]
    for seed in (1, 2, 3):
        write_synthetic_run(str(tmp_path / f"lora_s{seed}"), {"seed": seed}, n_train=60, n_val=20, steps=steps)
    write_synthetic_run(str(tmp_path / "full_s1"), {"seed": 1, "method": "full"}, n_train=60, n_val=20, steps=steps)
    broken = write_synthetic_run(str(tmp_path / "broken"), {"seed": 9}, n_train=60, n_val=20, steps=steps)
    os.remove(os.path.join(broken, "logprobs.npz"))  # an incomplete run: skipped with a note, or an error
    options = Options(n_boot=100, boot_seed=3)
    with pytest.raises(RunFormatError, match="logprobs.npz is missing"):
        load_study([str(tmp_path)], progress=False, options=options, workers=2)
    alone = load_study([str(tmp_path)], progress=False, options=options, skip_invalid=True)
    pooled = load_study([str(tmp_path)], progress=False, options=options, skip_invalid=True, workers=2)
    assert any("broken" in note and "skipped" in note for note in pooled.notes)
    for name in ("runs", "examples", "curves", "calibration", "entropy", "agreement"):
        assert getattr(pooled, name).equals(getattr(alone, name)), name
    assert pooled.notes == alone.notes and pooled.configs == alone.configs
    assert set(pooled.boot) == set(alone.boot)
    assert all(np.array_equal(pooled.boot[r], alone.boot[r]) for r in alone.boot)


def test_worker_count():
    from hf_entropy_callback.study.loading import RUNS_PER_WORKER, _worker_count

    assert _worker_count(1, 540) == 1 and _worker_count(3, 2) == 2  # as asked, at most one per run
    assert _worker_count(0, RUNS_PER_WORKER - 1) == 1  # too few runs to pay for a worker's start
    assert _worker_count(None, 540) == min(os.cpu_count() or 1, 540 // RUNS_PER_WORKER)


# ------------------------------------------------------------------------------------------------
# Frames built in one go equal the frames built piece by piece before (the code they replaced)
# ------------------------------------------------------------------------------------------------


def _reference_agreement_table(logprobs, label_counts, categories, majority, steps):
    import pandas as pd

    from hf_entropy_callback.agreement import METRICS, agreement_metrics
    from hf_entropy_callback.entropy import CATEGORIES

    lp = np.asarray(logprobs, dtype=np.float64)
    met = agreement_metrics(lp, label_counts, majority)
    cats = np.asarray(categories).astype(str)
    names = [c for c in CATEGORIES if (cats == c).any()] + sorted(set(cats) - set(CATEGORIES)) + ["all"]
    frames = []
    for cat in names:
        sel = np.ones(len(cats), bool) if cat == "all" else cats == cat
        ok = np.isfinite(met["kl"][:, sel])
        n = ok.sum(axis=1)
        row = {"point": np.arange(lp.shape[0]), "step": steps, "category": cat, "n": n}
        for k in METRICS:
            v = met[k][:, sel]
            with np.errstate(invalid="ignore"):
                row[k] = np.where(n > 0, np.nansum(np.where(ok, v, 0.0), axis=1) / np.maximum(n, 1), np.nan)
        frames.append(pd.DataFrame(row))
    return pd.concat(frames, ignore_index=True)


def _reference_curves(run_id, losses, steps, epochs, cats):
    import warnings

    import pandas as pd

    from hf_entropy_callback.entropy import CATEGORIES

    frames = []
    for cat in [c for c in CATEGORIES if (cats == c).any()] + ["all"]:
        sub = losses[:, cats == cat] if cat != "all" else losses
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, sd = np.nanmean(sub, axis=1), np.nanstd(sub, axis=1, ddof=1)
        frame = {"run_id": run_id, "point": np.arange(len(steps)), "step": steps, "progress": steps / steps[-1]}
        frame.update(epoch=epochs, category=cat, mean=mean, sd=sd, n=np.isfinite(sub).sum(axis=1))
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True)


def test_one_frame_builders_equal_the_piecewise_frames(tmp_path):
    import pandas as pd

    from hf_entropy_callback.agreement import agreement_table
    from hf_entropy_callback.dynamics import example_dynamics
    from hf_entropy_callback.study.loading import _curves
    from hf_entropy_callback.synthetic_runs import Dynamics

    path = write_synthetic_run(
        str(tmp_path / "r"), {"seed": 4, "label_noise": 0.3}, n_train=1200, n_val=300, steps=[0, 30, 60, 90, 120]
    )
    diverging = write_synthetic_run(
        str(tmp_path / "d"), {"seed": 5}, n_train=80, n_val=20, steps=[0, 30, 60, 90], dynamics=Dynamics(diverge_at=0.6)
    )
    for p in (path, diverging):
        run = load_run(p)
        for name in ("train", "validation"):
            ex = run.set_examples(name)
            args = (
                run.logprobs[name],
                np.array(ex["label_counts"].tolist(), dtype=np.float64),
                ex["category"].to_numpy(),
                ex["original_label"].to_numpy(),
                run.steps,
            )
            got = agreement_table(*args[:3], majority=args[3], steps=args[4])
            pd.testing.assert_frame_equal(got, _reference_agreement_table(*args), check_exact=True)
        losses, steps = run.losses("train"), run.steps.astype(np.float64)
        epochs, cats = run.points["epoch"].to_numpy(np.float64), run.set_examples("train")["category"].to_numpy()
        pd.testing.assert_frame_equal(
            _curves("r", losses, steps, epochs, cats),
            _reference_curves("r", losses, steps, epochs, cats),
            check_exact=True,
        )
        # Example dynamics: the examples with each derived column, as assigning them one by one gives.
        dyn = example_dynamics(run, "train")
        ex = run.set_examples("train")
        assert list(dyn.columns[: len(ex.columns)]) == list(ex.columns)
        pd.testing.assert_frame_equal(dyn[list(ex.columns)], ex, check_exact=True)
        assert dyn["aulc"].to_numpy() == pytest.approx(
            ((losses[1:] + losses[:-1]) / 2 * np.diff(steps / steps[-1])[:, None]).sum(axis=0), nan_ok=True
        )
