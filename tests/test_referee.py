"""The audit's cases (issue 11), each checked against an independent computation.

Grouping (duplicates, learning rates, tracked sets, twins), both noise targets, the directional
condition test, exact permutation p-values, bootstrap CIs (exactness and coverage), effect sizes,
agreement metrics against scipy, cartography points, unrounded CSVs, and the report built from a
folder that mixes all of that.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from hf_entropy_callback.agreement import agreement_metrics, agreement_table
from hf_entropy_callback.dynamics import cartography_points, ece_bootstrap, expected_calibration_error
from hf_entropy_callback.inference import (
    cohen_d,
    directional_test,
    percentile_interval,
    spearman_bootstrap,
    spearman_permutation_test,
)
from hf_entropy_callback.runs import load_run
from hf_entropy_callback.study import tables
from hf_entropy_callback.study.loading import Options, load_study
from hf_entropy_callback.study.report import build_report
from hf_entropy_callback.synthetic_runs import write_synthetic_run

STEPS = [0, 40, 80, 120, 160]
SMALL = dict(n_train=120, n_val=30, steps=STEPS)


def _run(root, name, cfg, **kw):
    return write_synthetic_run(os.path.join(str(root), name), cfg, **{**SMALL, **kw})


def _copy(root, src, dst):
    shutil.copytree(os.path.join(str(root), src), os.path.join(str(root), dst))


def _aulc(loss, steps=STEPS):
    x = np.asarray(steps, float) / steps[-1]
    return ((x[1:] - x[:-1])[:, None] * (loss[1:] + loss[:-1]) / 2).sum(axis=0)


# ------------------------------------------------------------------------------------------------
# Conditions: duplicates, learning rates, tracked sets, twins
# ------------------------------------------------------------------------------------------------


def test_a_duplicate_is_counted_once_and_listed(tmp_path):
    _run(tmp_path, "a_s1", {"seed": 1})
    _run(tmp_path, "a_s2", {"seed": 2})
    _copy(tmp_path, "a_s1", "b_copy_s1")  # bit-identical copy, same seed
    study = load_study([str(tmp_path)], progress=False, options=Options(n_boot=0))
    runs = study.runs.set_index("run_id")
    assert runs.loc["b_copy_s1", "duplicate_of"] == "a_s1" and runs.loc["b_copy_s1", "status"] == "duplicate"
    assert any(n.startswith("b_copy_s1: duplicate of a_s1") for n in study.notes)
    t = tables.rho_by_condition(study.runs, family="all")
    assert t["n_runs"].tolist() == [2] and t["seeds"].tolist() == ["1, 2"]
    # The mean is over the two distinct runs, by hand with scipy.
    rhos = []
    for name in ("a_s1", "a_s2"):
        run = load_run(os.path.join(tmp_path, name))
        ex = run.set_examples("train")
        rhos.append(stats.spearmanr(ex["entropy"], _aulc(run.losses("train"))).statistic)
    assert t["rho_mean"].iloc[0] == pytest.approx(np.mean(rhos))
    assert set(study.examples["run_id"]) == {"a_s1", "a_s2"}


def test_learning_rates_and_tracked_sets_are_separate_conditions(tmp_path):
    for lr in (1e-4, 2e-4):
        for s in (1, 2):
            _run(tmp_path, f"lr{lr:g}_s{s}", {"seed": s, "learning_rate": lr})
    _run(tmp_path, "other_set_s3", {"seed": 3, "learning_rate": 1e-4}, n_train=100)  # other examples
    study = load_study([str(tmp_path)], progress=False, options=Options(n_boot=0))
    conds = study.runs.groupby("condition")["run_id"].apply(sorted).to_dict()
    assert len(conds) == 3
    lr1 = [c for c, ids in conds.items() if ids == ["lr0.0001_s1", "lr0.0001_s2"]]
    assert lr1 and "lr=0.0001" in lr1[0] and "tracked set=" in lr1[0]
    assert conds[[c for c in conds if "lr=0.0002" in c][0]] == ["lr0.0002_s1", "lr0.0002_s2"]
    assert any("other_set_s3" in ids for ids in conds.values()) and ["other_set_s3"] in conds.values()
    assert any("differ in" in n and "tracked set" in n and "lr" in n for n in study.notes)


def test_noise_twin_is_the_run_equal_in_every_other_setting(tmp_path):
    for lr in (1e-4, 2e-4):
        _run(tmp_path, f"base_lr{lr:g}", {"seed": 1, "learning_rate": lr})
        _run(tmp_path, f"noisy_lr{lr:g}", {"seed": 1, "learning_rate": lr, "label_noise": 0.3})
    _run(tmp_path, "noisy_lr3e-4", {"seed": 1, "learning_rate": 3e-4, "label_noise": 0.3})  # no baseline at 3e-4
    study = load_study([str(tmp_path)], progress=False, options=Options(n_boot=0))
    t = tables.noise_tests(study.runs, study.examples)
    pairs = dict(t[["run_id", "baseline_run_id"]].drop_duplicates().itertuples(index=False))
    assert pairs == {"noisy_lr0.0001": "base_lr0.0001", "noisy_lr0.0002": "base_lr0.0002"}
    notes = tables.unmatched_variants(study.runs, "label_noise", 0.0)
    assert len(notes) == 1 and notes[0].startswith("noisy_lr3e-4") and "differ in lr" in notes[0]


def test_soft_label_twin_must_match_else_a_note(tmp_path):
    _run(tmp_path, "ce", {"seed": 1, "track_every": 100})
    _run(tmp_path, "soft", {"seed": 1, "loss": "soft_kl", "track_every": 50})
    study = load_study([str(tmp_path)], progress=False, options=Options(n_boot=0))
    t = tables.soft_label_comparison(study.runs, study.examples)
    assert not t["is_baseline"].any()  # the soft run has no hard-label twin
    notes = tables.unmatched_variants(study.runs, "loss", "ce")
    assert len(notes) == 1 and "track_every" in notes[0]


# ------------------------------------------------------------------------------------------------
# Noise against both targets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exclude", [False, True])
def test_noise_tables_against_both_targets(tmp_path, exclude):
    _run(tmp_path, "base", {"seed": 5})
    _run(tmp_path, "noisy", {"seed": 5, "label_noise": 0.6, "label_noise_exclude_original": exclude})
    study = load_study([str(tmp_path)], progress=False, options=Options(n_boot=0))
    t = tables.noise_tests(study.runs, study.examples).set_index(["target", "subset"])
    b, n = load_run(os.path.join(tmp_path, "base")), load_run(os.path.join(tmp_path, "noisy"))
    eb, en = b.set_examples("train"), n.set_examples("train")
    assert (eb["example_id"] == en["example_id"]).all()
    noised = en["noised"].to_numpy(bool)
    changed = (en["label"] != en["original_label"]).to_numpy()
    assert not changed[~noised].any()
    share = changed[noised].mean()
    assert (share == 1.0) if exclude else (share < 1.0)  # uniform over all K keeps about 1/3 of the labels
    assert t.loc[("training", "all"), "share_changed"] == pytest.approx(share)
    assert t.loc[("training", "all"), "noise_rule"] == ("other classes" if exclude else "all classes")
    lp = n.logprobs["train"].astype(float)
    idx = np.arange(len(en))
    aulc_train = _aulc(-lp[:, idx, en["label"].to_numpy()])
    aulc_orig = _aulc(-lp[:, idx, en["original_label"].to_numpy()])
    aulc_base = _aulc(-b.logprobs["train"].astype(float)[:, idx, eb["label"].to_numpy()])
    for target, noisy_aulc in (("training", aulc_train), ("original", aulc_orig)):
        x, y = noisy_aulc[noised], aulc_base[noised]
        row = t.loc[(target, "noised")]
        w = stats.wilcoxon(x, y, correction=True)
        assert row["n"] == noised.sum()
        assert row["mean_diff"] == pytest.approx((x - y).mean())
        assert row["p_val"] == pytest.approx(w.pvalue, rel=1e-9)
        assert row["d_z"] == pytest.approx((x - y).mean() / (x - y).std(ddof=1))
        assert row["d_av"] == pytest.approx(pg.compute_effsize(x, y, paired=True, eftype="cohen"))
    # The two targets differ on the noised examples whose label changed, and only there.
    assert not np.allclose(aulc_train[changed], aulc_orig[changed])
    assert np.allclose(aulc_train[~changed], aulc_orig[~changed])


def test_version_1_runs_are_read_and_flagged(tmp_path):
    _run(tmp_path, "base", {"seed": 5})
    tdir = _run(tmp_path, "noisy", {"seed": 5, "label_noise": 0.3})
    for d in (tdir, os.path.join(tmp_path, "base", "entropy_tracking")):  # rewrite as version 1
        meta = json.load(open(os.path.join(d, "run_config.json")))
        meta["format_version"] = 1
        json.dump(meta, open(os.path.join(d, "run_config.json"), "w"))
        ex = pd.read_parquet(os.path.join(d, "examples.parquet")).drop(columns=["original_label"])
        ex.to_parquet(os.path.join(d, "examples.parquet"), index=False)
    run = load_run(tdir)
    assert run.format_version == 1 and not run.original_label_known
    assert (run.examples["original_label"] == run.examples["label"]).all()
    assert load_run(os.path.join(tmp_path, "base")).original_label_known  # no noise: nothing unknown
    study = load_study([str(tmp_path)], progress=False, options=Options(n_boot=0))
    assert any("noisy" in n and "format version 1" in n for n in study.notes)
    t = tables.noise_tests(study.runs, study.examples).set_index(["target", "subset"])
    assert np.isnan(t.loc[("original", "noised"), "mean_diff"]) and np.isnan(
        t.loc[("training", "all"), "share_changed"]
    )
    assert np.isfinite(t.loc[("training", "noised"), "p_val"])


# ------------------------------------------------------------------------------------------------
# Directional test, family, exact p, effect sizes
# ------------------------------------------------------------------------------------------------


def test_mixed_signs_are_not_significant():
    # rho = +0.2, -0.2, +0.2 on 1,200 examples: each two-sided p about 3e-12 (scipy's t approximation).
    n = 1200
    r = np.array([0.2, -0.2, 0.2])
    t_stat = r * np.sqrt((n - 2) / (1 - r**2))
    p_two = 2 * stats.t.sf(np.abs(t_stat), n - 2)
    p_greater = stats.t.sf(t_stat, n - 2)
    assert (p_two < 1e-11).all() and p_greater[1] > 1 - 1e-11
    runs = pd.DataFrame(
        {
            "run_id": list("abc"),
            "condition": "A",
            "seed": [1, 2, 3],
            "rho": r,
            "n": n,
            "p_val": p_two,
            "p_greater": p_greater,
        }
    )
    t = tables.rho_by_condition(runs, family="all")
    assert t["rho_mean"].item() == pytest.approx(0.2 / 3)
    assert not t["sig_bonf"].item() and not t["sig_bh"].item() and t["p_max"].item() > 0.99
    d = directional_test(p_greater, r)
    assert d["n_positive"].item() == 2 and not d["significant"].item()
    # All positive: significant.
    runs2 = runs.assign(rho=0.2, p_greater=p_greater[0])
    assert tables.rho_by_condition(runs2, family="all")["sig_bonf"].item()


def test_correction_family_main_vs_all():
    runs = pd.DataFrame(
        {
            "run_id": list("abcd"),
            "condition": ["r8", "r16", "full", "r8 noise"],
            "seed": 1,
            "n": 100,
            "rho": 0.3,
            "p_greater": [0.01, 0.01, 0.01, 0.01],
            "method": ["lora", "lora", "full", "lora"],
            "rank": [8, 16, np.nan, 8],
            "variant": ["base", "base", "base", "noise=0.3"],
        }
    )
    main = tables.rho_by_condition(runs).set_index("condition")
    assert main["in_family"].to_dict() == {"r8": True, "r16": False, "full": True, "r8 noise": False}
    assert main.loc["r8", "p_bonf"] == pytest.approx(0.02) and np.isnan(main.loc["r16", "p_bonf"])
    every = tables.rho_by_condition(runs, family="all").set_index("condition")
    assert every.loc["r8", "p_bonf"] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="family"):
        tables.rho_by_condition(runs, family="folder")


def test_exact_permutation_p_by_hand_enumeration():
    x = np.arange(1, 7)
    y = np.array([0.1, 0.15, 0.2, 0.3, 0.31, 0.5])  # perfectly monotone
    g = spearman_permutation_test(x, y, alternative="greater")
    two = spearman_permutation_test(x, y, alternative="two-sided")
    assert g["method"].item() == "exact" and g["n_permutations"].item() == 720
    assert g["p_val"].item() == pytest.approx(1 / 720)  # one-sided: only the identity reaches rho = 1
    assert two["p_val"].item() == pytest.approx(2 / 720)  # two-sided: also the reversal (rho = -1)
    # Hand enumeration with scipy on arbitrary data with ties, n = 7.
    rng = np.random.default_rng(3)
    x7, y7 = rng.integers(0, 4, 7).astype(float), rng.normal(size=7)
    obs = stats.spearmanr(x7, y7).statistic
    sims = np.array([stats.spearmanr(x7, y7[list(p)]).statistic for p in itertools.permutations(range(7))])
    for alt, hits in (
        ("greater", sims >= obs - 1e-12),
        ("less", sims <= obs + 1e-12),
        ("two-sided", np.abs(sims) >= abs(obs) - 1e-12),
    ):
        assert spearman_permutation_test(x7, y7, alternative=alt)["p_val"].item() == pytest.approx(hits.mean())
    # scipy's t approximation is not exact: on the monotone case it says 0.
    assert stats.spearmanr(x, y).pvalue < 1e-6


def test_monte_carlo_permutation_p_close_to_scipy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=12), rng.normal(size=12)
    ours = spearman_permutation_test(x, y, alternative="two-sided", n_resamples=20000, seed=1)
    ref = stats.permutation_test(
        (y,),
        lambda v: stats.spearmanr(x, v).statistic,
        permutation_type="pairings",
        n_resamples=20000,
        alternative="two-sided",
        random_state=2,
        vectorized=False,
    )
    assert ours["method"].item() == "monte carlo"
    assert ours["p_val"].item() == pytest.approx(ref.pvalue, abs=0.02)


def test_cohen_d_z_and_d_av():
    rng = np.random.default_rng(1)
    a = rng.normal(1.0, 1.0, 300)
    b = a - 0.01 + rng.normal(0, 0.05, 300)  # pairs correlate about 0.998
    d = cohen_d(a, b)
    diff = a - b
    assert d["d_z"].item() == pytest.approx(diff.mean() / diff.std(ddof=1))
    assert d["d_av"].item() == pytest.approx(pg.compute_effsize(a, b, paired=True, eftype="cohen"))
    assert d["r_pairs"].item() > 0.99 and abs(d["d_z"].item()) > 10 * abs(d["d_av"].item())


# ------------------------------------------------------------------------------------------------
# Bootstrap
# ------------------------------------------------------------------------------------------------


def test_bootstrap_replicates_equal_scipy_on_the_same_resamples():
    rng = np.random.default_rng(0)
    x = np.round(rng.uniform(0, 1, 150), 1)  # many ties
    y = rng.normal(size=150) + x
    reps = spearman_bootstrap(x, y, n_boot=50, seed=9)
    idx = np.random.default_rng(9).integers(0, 150, size=(50, 150))
    ref = [stats.spearmanr(x[i], y[i]).statistic for i in idx]
    assert reps == pytest.approx(ref, abs=1e-12)


def test_bootstrap_ci_covers_the_true_spearman_rho():
    r = 0.5
    true_rho = 6 / np.pi * np.arcsin(r / 2)  # Spearman's rho of a bivariate normal with Pearson r
    rng = np.random.default_rng(2024)
    cov = [[1, r], [r, 1]]
    covered = 0
    for rep in range(100):
        xy = rng.multivariate_normal([0, 0], cov, size=200)
        lo, hi = percentile_interval(spearman_bootstrap(xy[:, 0], xy[:, 1], n_boot=400, seed=rep))
        covered += lo <= true_rho <= hi
    assert 88 <= covered <= 99


def test_ece_bootstrap_replicate_equals_ece_of_the_resample():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(80, 3)) * 2
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 3, 80)
    reps = ece_bootstrap(p, y, 15, n_boot=20, seed=3)
    idx = np.random.default_rng(3).integers(0, 80, size=(20, 80))
    assert reps == pytest.approx([expected_calibration_error(p[i], y[i], 15) for i in idx], abs=1e-12)


def test_per_run_ci_contains_rho_and_condition_ci_uses_joint_resamples(tmp_path):
    _run(tmp_path, "s1", {"seed": 1})
    _run(tmp_path, "s2", {"seed": 2})
    study = load_study([str(tmp_path)], progress=False, options=Options(n_boot=300, boot_seed=4))
    runs = study.runs.set_index("run_id")
    for rid in ("s1", "s2"):
        assert runs.loc[rid, "rho_ci_low"] < runs.loc[rid, "rho"] < runs.loc[rid, "rho_ci_high"]
        ex = study.examples[study.examples.run_id == rid].sort_values("example_id")
        expect = spearman_bootstrap(ex["entropy"], ex["aulc"], n_boot=300, seed=4)
        assert study.boot[rid] == pytest.approx(expect)
    t = tables.rho_by_condition(study.runs, boot=study.boot, family="all")
    lo, hi = percentile_interval((study.boot["s1"] + study.boot["s2"]) / 2)
    assert (t["rho_ci_low"].item(), t["rho_ci_high"].item()) == pytest.approx((lo, hi))
    none = load_study([str(tmp_path)], progress=False, options=Options(n_boot=0))
    assert none.runs["rho_ci_low"].isna().all()


# ------------------------------------------------------------------------------------------------
# Agreement, cartography, calibration bins
# ------------------------------------------------------------------------------------------------


def test_agreement_metrics_against_scipy():
    rng = np.random.default_rng(5)
    counts = rng.multinomial(100, [0.6, 0.3, 0.1], size=40)
    counts[0] = [100, 0, 0]  # zeros in the human distribution: 0 ln 0 = 0
    logits = rng.normal(size=(40, 3))
    lq = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    m = agreement_metrics(lq, counts)
    h = counts / 100
    q = np.exp(lq)
    assert m["kl"] == pytest.approx(stats.entropy(h, q, axis=1))
    assert m["js_distance"] == pytest.approx(jensenshannon(h, q, axis=1))  # natural log by default
    assert m["js_divergence"] == pytest.approx(jensenshannon(h, q, axis=1) ** 2)
    assert m["cross_entropy"] == pytest.approx(-(h * lq).sum(axis=1))
    assert m["l1"] == pytest.approx(np.abs(h - q).sum(axis=1))
    assert m["accuracy"] == pytest.approx((q.argmax(1) == counts.argmax(1)).astype(float))
    cats = np.where(np.arange(40) < 20, "clean", "contested")
    t = agreement_table(lq[None], counts, cats).set_index("category")
    assert t.loc["contested", "js_distance"] == pytest.approx(jensenshannon(h[20:], q[20:], axis=1).mean())


def test_cartography_uses_epoch_end_points_and_population_sd(tmp_path):
    reasons = ["step0", "interval", "epoch_end", "interval", "epoch_end+final"]
    assert cartography_points(reasons).tolist() == [2, 4]
    assert cartography_points(reasons, "all").tolist() == [0, 1, 2, 3, 4]
    tdir = _run(tmp_path, "r", {"seed": 1, "num_train_epochs": 2})
    run = load_run(tdir)
    pts = run.points.copy()
    pts["reason"] = reasons
    from hf_entropy_callback.runs import write_run

    write_run(tdir, run.config, run.examples, pts, run.logprobs)
    for which, idx in (("epoch_end", [2, 4]), ("all", [0, 1, 2, 3, 4])):
        study = load_study([str(tmp_path)], progress=False, options=Options(n_boot=0, cartography_points=which))
        ex = run.set_examples("train")
        p = np.exp(-run.losses("train"))[idx]
        got = study.examples.sort_values("index")
        assert got["confidence"].to_numpy() == pytest.approx(p.mean(axis=0))
        assert got["variability"].to_numpy() == pytest.approx(np.std(p, axis=0, ddof=0))
        assert len(got) == len(ex)


def test_ece_bins_option_and_interval(tmp_path):
    _run(tmp_path, "r", {"seed": 1})
    a = load_study([str(tmp_path)], progress=False, options=Options(n_boot=200, ece_bins=10)).calibration
    b = load_study([str(tmp_path)], progress=False, options=Options(n_boot=200, ece_bins=15)).calibration
    run = load_run(os.path.join(tmp_path, "r"))
    ex = run.set_examples("validation")
    p = np.exp(run.logprobs["validation"][-1].astype(float))
    for cal, bins in ((a, 10), (b, 15)):
        row = cal[(cal["set"] == "validation") & (cal["category"] == "all")].iloc[0]
        assert row["ece"] == pytest.approx(expected_calibration_error(p, ex["label"].to_numpy(), bins))
        assert row["ece_bins"] == bins and row["ece_ci_low"] <= row["ece"] <= row["ece_ci_high"]


def test_partial_correlation_ci_is_not_rounded(tmp_path):
    _run(tmp_path, "r", {"seed": 1})
    study = load_study([str(tmp_path)], progress=False, options=Options(n_boot=0))
    t = tables.partial_correlation(study.runs, study.examples).iloc[0]
    d = study.examples
    res = pg.partial_corr(data=d, x="entropy", y="aulc", covar="token_length", method="spearman")
    lo, hi = res["CI95"].iloc[0]
    # By hand: Fisher z with n - 1 covariate - 3 degrees of freedom.
    r, n = res["r"].item(), len(d)
    z, se = np.arctanh(r), 1 / np.sqrt(n - 1 - 3)
    by_hand = (np.tanh(z - stats.norm.ppf(0.975) * se), np.tanh(z + stats.norm.ppf(0.975) * se))
    assert (t["ci_low"], t["ci_high"]) == pytest.approx(by_hand, abs=1e-12)
    assert (t["ci_low"], t["ci_high"]) == pytest.approx((lo, hi), abs=0.005)  # pingouin's, rounded to 2 decimals
    assert round(t["ci_low"], 2) != t["ci_low"]


# ------------------------------------------------------------------------------------------------
# Done when: a report from a folder mixing learning rates, duplicates and tracked sets
# ------------------------------------------------------------------------------------------------


def test_report_from_a_mixed_folder(tmp_path):
    root = tmp_path / "runs"
    for lr in (1e-4, 2e-4):
        for s in (1, 2):
            _run(root, f"lr{lr:g}_s{s}", {"seed": s, "learning_rate": lr})
            _run(root, f"lr{lr:g}_noise_s{s}", {"seed": s, "learning_rate": lr, "label_noise": 0.3})
    _copy(root, "lr0.0001_s1", "lr0.0001_s1_again")  # duplicate
    _run(root, "subset_s1", {"seed": 1, "learning_rate": 1e-4}, n_train=100)  # other tracked set
    report = build_report([str(root)], str(tmp_path / "report"), progress=False, options=Options(n_boot=100))
    t = report.tables
    conds = t["conditions"].set_index("condition")
    assert len(conds) == 5  # 2 lrs x (base, noise) + the other tracked set
    assert sorted(conds["n_runs"]) == [1, 2, 2, 2, 2] and conds["n_excluded"].sum() == 1
    base1 = [c for c in conds.index if "lr=0.0001" in c and "noise" not in c and conds.loc[c, "n_runs"] == 2]
    assert len(base1) == 1 and conds.loc[base1[0], "seeds"] == "1, 2"
    pairs = dict(t["noise_tests"][["run_id", "baseline_run_id"]].drop_duplicates().itertuples(index=False))
    assert pairs == {f"lr{lr:g}_noise_s{s}": f"lr{lr:g}_s{s}" for lr in (1e-4, 2e-4) for s in (1, 2)}
    index = open(report.index).read()
    assert "lr0.0001_s1_again: duplicate of lr0.0001_s1" in index
    assert "Conditions and their defining settings" in index and "learning_rate" in index
    assert "--family main" in index
    # No sweep here: the section says so and no figure is drawn.
    assert "rank sweep skipped" in index and not report.figures["rho_vs_rank"]
    assert "kept every example" not in index
    assert report.figures["entropy_aulc"] and report.figures["agreement"]
    # Small tables are shown inline; CSVs hold unrounded numbers.
    assert "| condition |" in index.split("Conditions and their defining settings")[1][:3000]
    csv = pd.read_csv(os.path.join(report.folder, "tables", "per_seed.csv"))
    assert np.allclose(
        csv.set_index("run_id")["rho"], report.tables["per_seed"].set_index("run_id")["rho"], rtol=0, atol=1e-15
    )
