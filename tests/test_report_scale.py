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
from hf_entropy_callback.runs import load_run
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
