"""Tests of the analysis package on synthetic run directories with known structure.

Every statistic of the report is recomputed here independently (by hand with numpy, or with
scipy directly) from the stored log-probabilities, never through hf_entropy_callback.dynamics.
"""

import doctest
import itertools
import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hf_entropy_callback import synthetic_runs as synthetic
from hf_entropy_callback.entropy import annotation_entropy, entropy_category
from hf_entropy_callback.runs import RunFormatError, load_run
from hf_entropy_callback.study import conditions, loading, report, tables
from hf_entropy_callback.study.cli import main as cli_main
from hf_entropy_callback.study.conditions import NoRunsFoundError, describe_run, discover_runs
from hf_entropy_callback.study.loading import load_study
from hf_entropy_callback.study.report import build_report, format_table
from hf_entropy_callback.synthetic_runs import Dynamics, tracking_points, write_synthetic_run

N_TRAIN, N_VAL = 150, 45
STEPS = [0, 20, 40, 60, 80, 100]
# Known structure: under UNLEARN contested examples' loss rises and clean examples' falls (rho > 0);
# under FLAT every loss falls to about the same level and entropy plays no part.
UNLEARN = Dynamics(final_loss=0.1, entropy_slope=2.0, length_slope=0.1, noise_sd=0.3)
FLAT = Dynamics(final_loss=0.05, entropy_slope=0.0, length_slope=0.0, noise_sd=0.3)
DIVERGED = Dynamics(final_loss=0.1, entropy_slope=2.0, noise_sd=0.3, diverge_at=0.5)

RUNS = [
    # name, config, dynamics
    *[(f"rob_lora8_s{s}", {"method": "lora", "rank": 8, "seed": s}, UNLEARN) for s in (1, 2, 3)],
    # seed 3 missing on purpose
    *[(f"rob_full_s{s}", {"method": "full", "rank": None, "seed": s}, FLAT) for s in (1, 2)],
    ("rob_lora32_s1", {"method": "lora", "rank": 32, "seed": 1}, UNLEARN),  # a single-run condition
    (
        "rob_lora4_s1",
        {"method": "lora", "rank": 4, "seed": 1},
        Dynamics(final_loss=0.1, entropy_slope=0.6, noise_sd=0.3),
    ),
    (
        "bert_lora8_s1",
        {"model_name_or_path": "bert-base-uncased", "model_type": "bert", "method": "lora", "rank": 8, "seed": 1},
        DIVERGED,
    ),
    (
        "bert_lora8_s2",
        {"model_name_or_path": "bert-base-uncased", "model_type": "bert", "method": "lora", "rank": 8, "seed": 2},
        UNLEARN,
    ),
    *[
        (f"rob_lora8_noise03_s{s}", {"method": "lora", "rank": 8, "seed": s, "label_noise": 0.3}, UNLEARN)
        for s in (1, 2)
    ],
    ("rob_lora8_soft_s1", {"method": "lora", "rank": 8, "seed": 1, "loss": "soft_kl"}, FLAT),
    ("rob_lora8_low_s1", {"method": "lora", "rank": 8, "seed": 1, "composition": "low"}, UNLEARN),
    (
        "qwen_lora8_s1",
        {
            "model_name_or_path": "Qwen/Qwen2.5-1.5B",
            "model_type": "qwen2",
            "architecture": "decoder",
            "method": "lora",
            "rank": 8,
            "seed": 1,
        },
        UNLEARN,
    ),
    ("rob_lora8_mnli_s1", {"method": "lora", "rank": 8, "seed": 1, "dataset": "mnli"}, UNLEARN),
]


def _write(root, name, config, dyn, **kw):
    return write_synthetic_run(
        os.path.join(root, name), config, n_train=N_TRAIN, n_val=N_VAL, steps=STEPS, dynamics=dyn, **kw
    )


@pytest.fixture(scope="module")
def study_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, cfg, dyn in RUNS:
        _write(root, name, {**cfg, "run_name": name}, dyn)
    return str(root)


@pytest.fixture(scope="module")
def built(study_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report"
    rep = build_report([study_root], str(out), progress=False)
    return rep


@pytest.fixture(scope="module")
def study(study_root):
    return load_study([study_root], progress=False)


# ------------------------------------------------------------------------------------------------
# Independent per-example numbers, straight from the stored log-probabilities
# ------------------------------------------------------------------------------------------------


def by_hand(run_dir, name="train"):
    """Per-example loss trajectory numbers computed without hf_entropy_callback.dynamics."""
    run = load_run(run_dir)
    ex = run.examples[run.examples["set"] == name].sort_values("index").reset_index(drop=True)
    lp = run.logprobs[name].astype(np.float64)
    y = ex["label"].to_numpy()
    loss = np.stack([-lp[t, np.arange(len(y)), y] for t in range(lp.shape[0])])
    x = run.points["step"].to_numpy(float) / run.points["step"].iloc[-1]
    aulc = ((x[1:] - x[:-1])[:, None] * (loss[1:] + loss[:-1]) / 2).sum(axis=0)
    # Cartography's default: the epoch-end points only (reason contains "epoch_end").
    ends = [i for i, r in enumerate(run.points["reason"]) if "epoch_end" in r.split("+")]
    if not ends:
        ends = [i for i, r in enumerate(run.points["reason"]) if "step0" not in r.split("+")]
    p_gold = np.exp(-loss[ends])
    out = ex.copy()
    out["aulc"] = aulc
    out["delta_loss"] = loss[-1] - loss[0]
    out["confidence"] = p_gold.mean(axis=0)
    out["variability"] = np.sqrt(((p_gold - p_gold.mean(axis=0)) ** 2).mean(axis=0))
    return out, run


def run_dir(root, name):
    return os.path.join(root, name, "entropy_tracking")


def runs_of(study, prefix):
    return study.runs[study.runs["run_id"].str.startswith(prefix)]


# ------------------------------------------------------------------------------------------------
# Synthetic generator
# ------------------------------------------------------------------------------------------------


def test_tracking_points_match_the_study_schedule():
    pts = tracking_points(21211, batch_size=32, num_epochs=5, track_every=100)
    per_epoch = -(-21211 // 32)
    assert per_epoch == 663
    expected = sorted(set(range(0, 5 * per_epoch + 1, 100)) | {k * per_epoch for k in range(1, 6)})
    assert pts["step"].tolist() == expected
    reasons = dict(zip(pts["step"], pts["reason"]))
    assert reasons[0] == "step0" and reasons[100] == "interval" and reasons[663] == "epoch_end"
    assert reasons[3315] == "epoch_end+final"
    assert np.allclose(pts["epoch"], pts["step"] / 663)


def test_synthetic_run_is_valid_and_has_the_structure_asked_for(study_root):
    dyn, run = by_hand(run_dir(study_root, "rob_lora8_s1"))
    assert run.logprobs["train"].shape == (len(STEPS), N_TRAIN, 3)
    assert run.logprobs["validation"].shape == (len(STEPS), N_VAL, 3)
    assert np.allclose(np.exp(run.logprobs["train"].astype(np.float64)).sum(axis=2), 1.0, atol=1e-5)
    counts = np.stack(run.examples["label_counts"].to_numpy())
    assert np.allclose(run.examples["entropy"], annotation_entropy(counts))
    assert (run.examples["category"].to_numpy() == entropy_category(run.examples["entropy"].to_numpy())).all()
    assert (run.examples["label"].to_numpy() == counts.argmax(axis=1)).all()
    # The loss model: contested examples un-learn, clean ones are learned; under FLAT all are learned.
    means = dyn.groupby("category")["delta_loss"].mean()
    assert means["contested"] > 0.2 and means["clean"] < -0.2
    flat, _ = by_hand(run_dir(study_root, "rob_full_s1"))
    assert (flat.groupby("category")["delta_loss"].mean() < 0).all()
    assert stats.spearmanr(dyn["entropy"], dyn["aulc"]).statistic > 0.5
    # Runs of one dataset share their examples; the mnli run has other ones.
    other, _ = by_hand(run_dir(study_root, "rob_full_s2"))
    assert other["example_id"].tolist() == dyn["example_id"].tolist()
    mnli, _ = by_hand(run_dir(study_root, "rob_lora8_mnli_s1"))
    assert not set(mnli["example_id"]) & set(dyn["example_id"])


def test_synthetic_variants_use_the_data_pipeline(study_root):
    low, _ = by_hand(run_dir(study_root, "rob_lora8_low_s1"))
    assert set(low["category"]) == {"clean"}
    noisy, _ = by_hand(run_dir(study_root, "rob_lora8_noise03_s1"))
    n_clean = int((noisy["category"] == "clean").sum())
    assert noisy["noised"].sum() == round(0.3 * n_clean)
    assert set(noisy.loc[noisy["noised"], "category"]) == {"clean"}


def test_study_configs_has_54_runs_with_unique_names():
    cfgs = synthetic.study_configs()
    assert len(cfgs) == 54
    assert len({c["run_name"] for c in cfgs}) == 54


# ------------------------------------------------------------------------------------------------
# Discovery, grouping, loading
# ------------------------------------------------------------------------------------------------


def test_describe_run_defaults_for_missing_keys():
    d = describe_run({})
    assert (d["model"], d["method"], d["dataset"], d["variant"], d["composition"], d["loss"]) == (
        "unknown",
        "unknown",
        "unknown",
        "base",
        "all",
        "ce",
    )
    assert np.isnan(d["rank"]) and np.isnan(d["seed"]) and d["label_noise"] == 0.0
    assert d["architecture"] == "encoder"
    d = describe_run({"model_type": "qwen2", "rank": 16})
    assert d["method"] == "lora" and d["rank"] == 16 and d["architecture"] == "decoder"
    # A rank stored for a non-LoRA method is not a rank.
    assert np.isnan(describe_run({"method": "ia3", "rank": 8})["rank"])
    d = describe_run({"method": "lora", "rank": 8, "composition": "low", "label_noise": 0.6, "loss": "soft_kl"})
    assert d["variant"] == "composition=low, noise=0.6, loss=soft_kl"


def test_discovery_skips_checkpoints_and_temp_folders(tmp_path):
    out = tmp_path / "runA"
    _write(tmp_path, "runA", {"seed": 1}, FLAT)
    shutil.copytree(out / "entropy_tracking", out / "checkpoint-20" / "entropy_tracking")
    shutil.copytree(out / "entropy_tracking", out / ".entropy_tracking.tmp-x")
    only_ckpt = tmp_path / "runB" / "checkpoint-40"
    shutil.copytree(out / "entropy_tracking", only_ckpt / "entropy_tracking")
    found, notes = discover_runs([str(tmp_path)])
    assert found == [str(out / "entropy_tracking")]
    assert len(notes) == 1 and "runB" in notes[0] and "unfinished" in notes[0]
    # A tracking directory given directly is a run too.
    assert discover_runs([str(out / "entropy_tracking")])[0] == [str(out / "entropy_tracking")]
    with pytest.raises(NoRunsFoundError, match="no run directories"):
        discover_runs([str(tmp_path / "runB")])


def test_conditions_group_seeds_as_replicates(study):
    runs = study.runs
    assert len(runs) == len(RUNS)
    lora8 = runs[runs["condition"] == "roberta-base · LoRA r=8 · snli"]
    assert sorted(lora8["seed"]) == [1, 2, 3]
    assert set(runs.loc[runs["run_id"].str.startswith("rob_full"), "condition"]) == {"roberta-base · full FT · snli"}
    assert runs.loc[runs["run_id"] == "rob_lora8_noise03_s1", "variant"].item() == "noise=0.3"
    assert runs.loc[runs["run_id"] == "qwen_lora8_s1", "architecture"].item() == "decoder"


def test_assign_conditions_splits_by_setting_and_marks_duplicates():
    runs = pd.DataFrame(
        {"run_id": ["a", "b", "c"], "condition": "X", "seed": [1.0, 1.0, 2.0], "learning_rate": [1e-4, 1e-4, 2e-4]}
    )
    out, notes = conditions.assign_conditions(runs)
    # c has another learning rate: its own condition, and a and b (same lr and seed) are duplicates.
    assert out["condition"].tolist() == ["X · lr=0.0001", "X · lr=0.0001", "X · lr=0.0002"]
    assert out["duplicate_of"].tolist() == [None, "a", None]
    assert any("differ in lr" in n for n in notes) and any(n.startswith("b: duplicate of a") for n in notes)


# ------------------------------------------------------------------------------------------------
# Per-run statistics and the rho tables
# ------------------------------------------------------------------------------------------------


def test_per_run_rho_tau_and_accuracy_match_scipy(study, study_root):
    for r in study.runs.itertuples():
        dyn, run = by_hand(run_dir(study_root, r.run_id))
        ok = np.isfinite(dyn["aulc"])
        assert r.n == ok.sum()
        if r.run_id == "bert_lora8_s1":
            # Diverged halfway: every example has a NaN loss, so nothing to correlate.
            assert r.diverged and r.status == "diverged" and r.n_nonfinite == N_TRAIN
            assert r.first_nonfinite_step == 60 and np.isnan(r.rho) and np.isnan(r.validation_accuracy)
            continue
        assert not r.diverged
        sp = stats.spearmanr(dyn.loc[ok, "entropy"], dyn.loc[ok, "aulc"])
        kt = stats.kendalltau(dyn.loc[ok, "entropy"], dyn.loc[ok, "aulc"])
        assert r.rho == pytest.approx(sp.statistic, abs=1e-12)
        assert r.p_val == pytest.approx(sp.pvalue, rel=1e-9)
        assert r.tau == pytest.approx(kt.statistic, abs=1e-12)
        vex = run.examples[run.examples["set"] == "validation"].sort_values("index")
        acc = (run.logprobs["validation"][-1].argmax(axis=1) == vex["label"].to_numpy()).mean()
        assert r.validation_accuracy == pytest.approx(acc)


def test_rho_by_condition_hand_worked():
    runs = pd.DataFrame(
        {
            "condition": ["A", "A", "A", "A", "B", "C"],
            "seed": [1, 2, 3, 4, 1, 1],
            "rho": [0.1, 0.2, 0.3, np.nan, 0.25, 0.05],
            "p_val": [0.001, 0.01, 0.002, np.nan, 0.04, 0.03],
            "n": 100,
            "diverged": [False, False, False, True, False, False],
        }
    )
    t = tables.rho_by_condition(runs).set_index("condition")
    # mean of 0.1, 0.2, 0.3 is 0.2; sample sd sqrt(((-0.1)^2 + 0 + 0.1^2) / 2) = 0.1.
    assert t.loc["A", "rho_mean"] == pytest.approx(0.2) and t.loc["A", "rho_sd"] == pytest.approx(0.1)
    assert (t.loc["A", "n_runs"], t.loc["A", "n_diverged"], t.loc["A", "seeds"]) == (3, 1, "1, 2, 3")
    assert np.isnan(t.loc["B", "rho_sd"])
    # Condition p = largest seed p: A 0.01, B 0.04, C 0.03.
    assert t["p_max"].tolist() == [0.01, 0.04, 0.03]
    # Bonferroni over 3 conditions; BH: sorted 0.01, 0.03, 0.04 -> 0.03, 0.045, 0.04 -> step-up min 0.03, 0.04, 0.04.
    assert t["p_bonf"].tolist() == pytest.approx([0.03, 0.12, 0.09])
    assert t["p_bh"].tolist() == pytest.approx([0.03, 0.04, 0.04])
    assert t["sig_bonf"].tolist() == [True, False, False]
    assert t["n_sig_seeds"].tolist() == [3, 1, 1]


def test_rho_by_condition_on_runs(study, study_root):
    t = tables.rho_by_condition(study.runs).set_index("condition")
    rhos, ps = [], []
    for s in (1, 2, 3):
        dyn, _ = by_hand(run_dir(study_root, f"rob_lora8_s{s}"))
        res = stats.spearmanr(dyn["entropy"], dyn["aulc"])
        rhos.append(res.statistic)
        ps.append(res.pvalue)
    row = t.loc["roberta-base · LoRA r=8 · snli"]
    assert row["rho_mean"] == pytest.approx(np.mean(rhos)) and row["rho_sd"] == pytest.approx(np.std(rhos, ddof=1))
    assert row["p_max"] == pytest.approx(max(ps), rel=1e-9)
    n_cond = t["p_max"].notna().sum()
    assert row["p_bonf"] == pytest.approx(min(1.0, max(ps) * n_cond), rel=1e-9)
    # The bert condition: one usable seed, one diverged; the diverged one is counted, not averaged.
    bert = t.loc["bert-base-uncased · LoRA r=8 · snli"]
    assert (bert["n_runs"], bert["n_diverged"]) == (1, 1) and np.isnan(bert["rho_sd"])
    # The entropy-free full-FT condition is far weaker than LoRA under UNLEARN.
    assert t.loc["roberta-base · full FT · snli", "rho_mean"] < row["rho_mean"] - 0.3


def test_per_seed_table_corrects_over_usable_runs(study):
    t = tables.per_seed_table(study.runs)
    usable = t[t["status"] == "ok"]
    assert len(t) == len(RUNS) and (t["status"] == "diverged").sum() == 1
    expected = np.minimum(usable["p_val"] * len(usable), 1.0)
    assert usable["p_bonf"].to_numpy() == pytest.approx(expected.to_numpy(), rel=1e-9)
    assert t.loc[t["status"] == "diverged", "p_bonf"].isna().all()


# ------------------------------------------------------------------------------------------------
# Delta L, rank sweep, architecture
# ------------------------------------------------------------------------------------------------


def test_delta_loss_table_matches_numpy(study, study_root):
    t = tables.delta_loss_table(study.runs, study.examples)
    per_run = {s: by_hand(run_dir(study_root, f"rob_lora8_s{s}"))[0] for s in (1, 2, 3)}
    sel = t[t["condition"] == "roberta-base · LoRA r=8 · snli"].set_index("category")
    for cat in ("clean", "ambiguous", "contested"):
        means = [d.loc[d["category"] == cat, "delta_loss"].mean() for d in per_run.values()]
        assert sel.loc[cat, "delta_loss_mean"] == pytest.approx(np.mean(means))
        assert sel.loc[cat, "delta_loss_sd"] == pytest.approx(np.std(means, ddof=1))
        share = np.mean([(d.loc[d["category"] == cat, "delta_loss"] > 0).mean() for d in per_run.values()])
        assert sel.loc[cat, "unlearning_share_mean"] == pytest.approx(share)
    assert sel.loc["contested", "delta_loss_mean"] > 0 > sel.loc["clean", "delta_loss_mean"]
    full = t[t["condition"] == "roberta-base · full FT · snli"]
    assert (full["delta_loss_mean"] < 0).all()
    # The diverged bert run is not in any mean.
    assert t.loc[t["condition"] == "bert-base-uncased · LoRA r=8 · snli", "n_runs"].eq(1).all()


def test_rank_sweep_and_trend_match_scipy(study):
    sweep = tables.rank_sweep(study.runs)
    rob = sweep[(sweep["model"] == "roberta-base") & (sweep["dataset"] == "snli")]
    lora = rob[rob["method"] == "lora"]
    assert lora["rank"].tolist() == [4, 8, 32]
    runs = study.runs[
        (study.runs["variant"] == "base") & (study.runs["model"] == "roberta-base") & (study.runs["dataset"] == "snli")
    ]
    for r in lora.itertuples():
        assert r.rho_mean == pytest.approx(runs.loc[runs["rank"] == r.rank, "rho"].mean())
    assert rob.loc[rob["method"] == "full", "rho_mean"].item() == pytest.approx(
        runs.loc[runs["method"] == "full", "rho"].mean()
    )
    trend = tables.rank_trend(sweep).set_index("model").loc["roberta-base"]
    expected = stats.spearmanr(lora["rank"], lora["rho_mean"])
    assert trend["spearman_r"] == pytest.approx(expected.statistic)
    # One-sided exact permutation p, by hand: the share of the 3! orderings with rho >= the observed one.
    sims = [
        stats.spearmanr(lora["rank"], lora["rho_mean"].to_numpy()[list(p)]).statistic
        for p in itertools.permutations(range(3))
    ]
    assert trend["p_val"] == pytest.approx(np.mean(np.array(sims) >= expected.statistic - 1e-12))
    assert trend["p_method"] == "exact"
    assert trend["n_ranks"] == 3 and trend["monotonic"] == bool(np.all(np.diff(lora["rho_mean"]) > 0))
    # bert has one rank only: not a sweep.
    assert "bert-base-uncased" not in set(sweep["model"])


def test_architecture_table(study):
    t = tables.architecture_table(study.runs)
    row = t[(t["dataset"] == "snli") & (t["rank"] == 8)].set_index("architecture")
    u = study.usable
    enc = u[(u["dataset"] == "snli") & (u["rank"] == 8) & (u["variant"] == "base") & (u["architecture"] == "encoder")]
    assert row.loc["encoder", "n_runs"] == len(enc)
    assert row.loc["encoder", "rho_mean"] == pytest.approx(enc["rho"].mean())
    assert row.loc["decoder", "models"] == "Qwen2.5-1.5B"


# ------------------------------------------------------------------------------------------------
# Partial correlation, regression, Kendall
# ------------------------------------------------------------------------------------------------


def _residual(v, z):
    X = np.column_stack([np.ones_like(z), z])
    return v - X @ np.linalg.lstsq(X, v, rcond=None)[0]


def test_partial_correlation_matches_rank_residuals(study, study_root):
    t = tables.partial_correlation(study.runs, study.examples).set_index("run_id")
    for name in ("rob_lora8_s1", "rob_full_s2"):
        dyn, _ = by_hand(run_dir(study_root, name))
        rx, ry, rz = (stats.rankdata(dyn[c]) for c in ("entropy", "aulc", "token_length"))
        r = np.corrcoef(_residual(rx, rz), _residual(ry, rz))[0, 1]
        n = len(dyn)
        tstat = r * np.sqrt((n - 3) / (1 - r**2))
        p = 2 * stats.t.sf(abs(tstat), n - 3)
        assert t.loc[name, "partial_r"] == pytest.approx(r, abs=1e-9)
        assert t.loc[name, "p_val"] == pytest.approx(p, rel=1e-6)
        assert t.loc[name, "ci_low"] < r < t.loc[name, "ci_high"]
    assert "bert_lora8_s1" not in t.index  # diverged


def test_regression_matches_lstsq(study, study_root):
    t = tables.regression(study.runs, study.examples, ["entailment", "neutral", "contradiction"])
    dyn, _ = by_hand(run_dir(study_root, "rob_lora8_s2"))
    X = np.column_stack([np.ones(len(dyn)), dyn["entropy"], dyn["token_length"], dyn["label"] == 1, dyn["label"] == 2])
    y = dyn["aulc"].to_numpy()
    coef = np.linalg.lstsq(X.astype(float), y, rcond=None)[0]
    r2 = 1 - ((y - X.astype(float) @ coef) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    sel = t[t["run_id"] == "rob_lora8_s2"].set_index("term")
    assert list(sel.index) == ["Intercept", "entropy", "token_length", "label=neutral", "label=contradiction"]
    assert sel["coef"].to_numpy() == pytest.approx(coef, abs=1e-8)
    assert sel["r2"].iloc[0] == pytest.approx(r2)
    assert sel.loc["entropy", "beta"] == pytest.approx(coef[1] * dyn["entropy"].std() / dyn["aulc"].std())
    summary = tables.summarize_terms(t)
    ent = summary[(summary["condition"] == "roberta-base · LoRA r=8 · snli") & (summary["term"] == "entropy")]
    coefs = t[(t["condition"] == "roberta-base · LoRA r=8 · snli") & (t["term"] == "entropy")]["coef"]
    assert ent["coef_mean"].item() == pytest.approx(coefs.mean()) and ent["n_runs"].item() == 3


def test_kendall_vs_spearman(study):
    per_run, summary = tables.kendall_vs_spearman(study.runs)
    u = study.usable
    ratio = (u["tau"] / u["rho"]).to_numpy()
    assert np.sort(per_run["ratio"].to_numpy()) == pytest.approx(np.sort(ratio))
    same = np.sign(u["tau"]) == np.sign(u["rho"])
    assert summary["sign_concordance"].item() == pytest.approx(same.mean())
    assert summary["ratio_median"].item() == pytest.approx(np.median(ratio))
    assert summary["n_runs"].item() == len(u)


# ------------------------------------------------------------------------------------------------
# Noise, soft labels, composition
# ------------------------------------------------------------------------------------------------


def test_noise_tests_match_scipy_and_hand_cohen_d(study, study_root):
    t = tables.noise_tests(study.runs, study.examples)
    assert set(t["run_id"]) == {"rob_lora8_noise03_s1", "rob_lora8_noise03_s2"}
    for s in (1, 2):
        base, _ = by_hand(run_dir(study_root, f"rob_lora8_s{s}"))
        noisy, _ = by_hand(run_dir(study_root, f"rob_lora8_noise03_s{s}"))
        pair = base.merge(noisy, on="example_id", suffixes=("_b", "_n"))
        row = t[(t["run_id"] == f"rob_lora8_noise03_s{s}") & (t["target"] == "training")].set_index("subset")
        assert row.loc["all", "baseline_run_id"] == f"rob_lora8_s{s}"
        for subset, d in (("all", pair), ("noised", pair[pair["noised_n"]])):
            x, y = d["aulc_n"].to_numpy(), d["aulc_b"].to_numpy()
            w = stats.wilcoxon(x, y, correction=True)  # pingouin's default: continuity correction
            d_av = (x.mean() - y.mean()) / np.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2)
            assert row.loc[subset, "n"] == len(d)
            assert row.loc[subset, "W"] == pytest.approx(w.statistic)
            assert row.loc[subset, "p_val"] == pytest.approx(w.pvalue, rel=1e-9)
            assert row.loc[subset, "d_av"] == pytest.approx(d_av)
            assert row.loc[subset, "d_z"] == pytest.approx((x - y).mean() / (x - y).std(ddof=1))
        # Noised examples are harder to learn: their AULC rises.
        assert row.loc["noised", "d_av"] > 0.5 and row.loc["noised", "p_val"] < 0.05


def test_noise_levels_rho_per_level(study):
    t = tables.noise_levels(study.runs, study.examples)
    allc = t[t["category"] == "all"].set_index("label_noise")
    u = study.usable
    for level in (0.0, 0.3):
        sel = u[
            (u["label_noise"] == level)
            & (u["model"] == "roberta-base")
            & (u["rank"] == 8)
            & (u["dataset"] == "snli")
            & (u["composition"] == "all")
            & (u["loss"] == "ce")
        ]
        assert allc.loc[level, "rho_mean"] == pytest.approx(sel["rho"].mean())
        assert allc.loc[level, "n_runs"] == len(sel)
    assert allc.loc[0.0, "is_baseline"] and not allc.loc[0.3, "is_baseline"]


def test_soft_label_comparison(study, study_root):
    t = tables.soft_label_comparison(study.runs, study.examples)
    soft, _ = by_hand(run_dir(study_root, "rob_lora8_soft_s1"))
    hard = [by_hand(run_dir(study_root, f"rob_lora8_s{s}"))[0] for s in (1, 2, 3)]
    for cat in ("clean", "contested"):
        row = t[(t["category"] == cat)].set_index("loss")
        assert row.loc["soft_kl", "delta_loss_mean"] == pytest.approx(
            soft.loc[soft["category"] == cat, "delta_loss"].mean()
        )
        assert row.loc["ce", "delta_loss_mean"] == pytest.approx(
            np.mean([h.loc[h["category"] == cat, "delta_loss"].mean() for h in hard])
        )
        assert row.loc["ce", "n_runs"] == 3 and np.isnan(row.loc["soft_kl", "delta_loss_sd"])


def test_composition_comparison(study):
    t = tables.composition_comparison(study.runs, study.examples)
    low = t[t["composition"] == "low"]
    assert set(low["category"]) == {"clean", "all"}
    base = t[t["is_baseline"]]
    assert set(base["composition"]) == {"all"} and base["n_runs"].eq(3).all()


# ------------------------------------------------------------------------------------------------
# Calibration, cartography, binning, entropy distribution
# ------------------------------------------------------------------------------------------------


def _ece(probs, y, bins=10):
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        m = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return total


def test_calibration_table_matches_hand_computation(study, study_root):
    t = tables.calibration_table(study.runs, study.calibration)
    sel = t[(t["condition"] == "roberta-base · full FT · snli") & (t["set"] == "validation")].set_index("category")
    per_run = {"pred_entropy": [], "max_confidence": [], "ece": []}
    for s in (1, 2):
        run = load_run(run_dir(study_root, f"rob_full_s{s}"))
        ex = run.examples[run.examples["set"] == "validation"].sort_values("index")
        p = np.exp(run.logprobs["validation"][-1].astype(np.float64))
        m = ex["category"].to_numpy() == "contested"
        pm = p[m]
        per_run["pred_entropy"].append((-(pm * np.log(pm)).sum(axis=1)).mean())
        per_run["max_confidence"].append(pm.max(axis=1).mean())
        per_run["ece"].append(_ece(pm, ex["label"].to_numpy()[m]))
    for key, vals in per_run.items():
        assert sel.loc["contested", f"{key}_mean"] == pytest.approx(np.mean(vals), rel=1e-6)
        assert sel.loc["contested", f"{key}_sd"] == pytest.approx(np.std(vals, ddof=1), rel=1e-5)


def test_cartography_table_matches_lstsq(study, study_root):
    t = tables.cartography_table(study.runs, study.examples).set_index("run_id")
    dyn, _ = by_hand(run_dir(study_root, "rob_lora8_s3"))
    y = dyn["aulc"].to_numpy()

    def r2(*cols):
        X = np.column_stack([np.ones(len(y)), *cols])
        res = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
        return 1 - (res**2).sum() / ((y - y.mean()) ** 2).sum()

    r2c, r2f = r2(dyn["confidence"]), r2(dyn["confidence"], dyn["entropy"])
    row = t.loc["rob_lora8_s3"]
    assert row["rho_conf_aulc"] == pytest.approx(stats.spearmanr(dyn["confidence"], y).statistic)
    assert row["r2_confidence"] == pytest.approx(r2c) and row["r2_full"] == pytest.approx(r2f)
    assert row["delta_r2"] == pytest.approx(r2f - r2c)
    f = (r2f - r2c) / ((1 - r2f) / (len(y) - 3))
    assert row["p_delta"] == pytest.approx(stats.f.sf(f, 1, len(y) - 3), rel=1e-6)
    ex = study.examples[study.examples["run_id"] == "rob_lora8_s3"]
    assert ex["variability"].to_numpy() == pytest.approx(dyn["variability"].to_numpy())


def test_binning_table_matches_quantile_edges(study, study_root):
    t = tables.binning_table(study.runs, study.examples)
    dyn, _ = by_hand(run_dir(study_root, "rob_lora32_s1"))  # a single-run condition
    h = dyn["entropy"].to_numpy()
    cond = t[t["condition"] == "roberta-base · LoRA r=32 · snli"]
    for scheme, k in (("quartile", 4), ("tercile", 3)):
        edges = np.quantile(h, np.arange(1, k) / k)
        bins = (h[:, None] > edges[None, :]).sum(axis=1)  # a tie at an edge stays in the lower bin
        got = cond[cond["scheme"] == scheme].sort_values("bin_order")
        expected = [dyn["aulc"][bins == b].mean() for b in range(k) if (bins == b).any()]
        assert got["aulc_mean"].to_numpy() == pytest.approx(expected)
        assert got["monotonic"].iloc[0] == bool(np.all(np.diff(expected) > 0))
    fixed = cond[cond["scheme"] == "fixed"].set_index("bin")
    for cat in ("clean", "ambiguous", "contested"):
        assert fixed.loc[cat, "aulc_mean"] == pytest.approx(dyn.loc[dyn["category"] == cat, "aulc"].mean())
    assert fixed["monotonic"].all()  # under UNLEARN, AULC rises with entropy


def test_entropy_distribution_counts(study, study_root):
    t = tables.entropy_distribution(study.entropy).set_index(["dataset", "category"])
    run = load_run(run_dir(study_root, "rob_lora8_mnli_s1"))
    counts = run.examples["category"].value_counts()
    for cat, n in counts.items():
        assert t.loc[("mnli", cat), "n"] == n
        assert t.loc[("mnli", cat), "share"] == pytest.approx(n / len(run.examples))
    # snli comes from a run with every example (not the composition=low run).
    assert t.loc[("snli", "all"), "n"] == N_TRAIN + N_VAL


# ------------------------------------------------------------------------------------------------
# The report folder
# ------------------------------------------------------------------------------------------------

FIGURES = (
    "trajectories",
    "trajectories_variants",
    "entropy_histogram",
    "aulc_bins",
    "rho_vs_rank",
    "noise",
    "cartography",
    "calibration",
)


def test_report_writes_every_figure(built):
    for name in FIGURES:
        assert built.figures[name], name
        for path in built.figures[name]:
            with open(path, "rb") as fh:
                head = fh.read(8)
            assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 10_000, path


def test_report_links_resolve_and_tables_exist(built):
    index = open(built.index).read()
    links = re.findall(r"\]\(([^)#]+)\)", index)
    assert links
    for link in links:
        assert os.path.isfile(os.path.join(built.folder, link)), link
    for name, frame in built.tables.items():
        csv = os.path.join(built.folder, "tables", f"{name}.csv")
        assert os.path.isfile(csv) and os.path.isfile(csv[:-4] + ".md"), name
        if not frame.empty:
            assert len(pd.read_csv(csv)) == len(frame), name
    html = open(os.path.join(built.folder, "index.html")).read()
    assert html.count("<img") == sum(len(v) for v in built.figures.values())


def test_report_shows_single_runs_and_flags_divergence(built):
    index = open(built.index).read()
    line = next(x for x in index.splitlines() if x.startswith("| roberta-base · LoRA r=32 · snli |") and " ± " in x)
    assert " ± — |" in line
    assert "bert_lora8_s1" in index and "diverged" in index
    per_seed = pd.read_csv(os.path.join(built.folder, "tables", "per_seed.csv"))
    assert per_seed.loc[per_seed["run_id"] == "bert_lora8_s1", "status"].item() == "diverged"
    assert any("bert_lora8_s1" in n and "diverged" in n for n in built.notes)
    assert "not computed" in index  # gradient analyses: no gradients in the run format


def test_format_table_hand_case():
    df = pd.DataFrame(
        {
            "condition": ["A", "B"],
            "model": ["m", "m"],
            "rho_mean": [0.2, 0.25],
            "rho_sd": [0.1, np.nan],
            "p_max": [0.0123456, 1e-40],
            "share": [0.25, np.nan],
            "sig_bonf": [True, False],
        }
    )
    out = format_table(df)
    assert list(out.columns) == ["condition", "rho (mean ± sd)", "p_max", "share", "sig_bonf"]
    assert out["rho (mean ± sd)"].tolist() == ["0.200 ± 0.100", "0.250 ± —"]
    assert out["p_max"].tolist() == ["0.0123", "1e-40"]
    assert out["share"].tolist() == ["25.0%", "—"] and out["sig_bonf"].tolist() == ["yes", "no"]


def test_doctests_of_the_analysis_modules():
    for module in (tables, conditions, synthetic, report, loading):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# ------------------------------------------------------------------------------------------------
# CLI and errors
# ------------------------------------------------------------------------------------------------


def test_cli_skips_missing_analyses_with_a_note(tmp_path, capsys):
    for s in (1, 2):
        _write(tmp_path / "runs", f"only_lora_s{s}", {"seed": s}, UNLEARN)
    out = tmp_path / "report"
    assert cli_main([str(tmp_path / "runs"), "--out", str(out), "--quiet", "--no-html"]) == 0
    assert "wrote" in capsys.readouterr().out
    index = (out / "index.md").read_text()
    for phrase in (
        "no runs with label_noise > 0",
        "no runs with a composition other than 'all'",
        "no runs with a loss other than 'ce'",
        "rank sweep skipped",
    ):
        assert phrase in index, phrase
    assert not (out / "index.html").exists()
    assert (out / "figures" / "trajectories.png").stat().st_size > 0


def test_a_new_report_replaces_an_old_one(tmp_path):
    old, new = tmp_path / "report", tmp_path / ".new"
    for folder, text in ((old, "old"), (new, "new")):
        (folder / "figures").mkdir(parents=True)
        (folder / "index.md").write_text(text)
    (old / "figures" / "stale.png").write_bytes(b"x")
    report._replace_folder(str(new), str(old))
    assert (old / "index.md").read_text() == "new" and not (old / "figures" / "stale.png").exists()
    assert sorted(os.listdir(tmp_path)) == ["report"]


def test_unsupported_format_version_names_the_directory(tmp_path, capsys):
    good = _write(tmp_path / "runs", "good", {"seed": 1}, FLAT)
    bad = _write(tmp_path / "runs", "old", {"seed": 2}, FLAT)
    cfg_path = os.path.join(bad, "run_config.json")
    meta = json.load(open(cfg_path))
    meta["format_version"] = 0
    json.dump(meta, open(cfg_path, "w"))
    with pytest.raises(RunFormatError, match=re.escape(bad) + ".*format version 0"):
        build_report([str(tmp_path / "runs")], str(tmp_path / "rep"), progress=False)
    assert not (tmp_path / "rep").exists()  # nothing half-written
    assert cli_main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--quiet"]) == 2
    assert bad in capsys.readouterr().err
    # --skip-invalid builds the report from the rest and lists the skipped run.
    rep = build_report([str(tmp_path / "runs")], str(tmp_path / "rep"), progress=False, skip_invalid=True)
    assert list(rep.tables["runs"]["run_id"]) == ["good"]
    assert any(bad in n for n in rep.notes)
    assert rep.tables["runs"]["path"].tolist() == [good]


def test_no_runs_and_missing_paths_are_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoRunsFoundError, match="no run directories found"):
        build_report([str(tmp_path / "empty")], str(tmp_path / "rep"), progress=False)
    assert cli_main([str(tmp_path / "empty"), "--out", str(tmp_path / "rep")]) == 2
    assert "no run directories found" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover_runs([str(tmp_path / "nowhere")])


def test_refuses_to_replace_a_folder_that_is_not_a_report(tmp_path):
    _write(tmp_path / "runs", "r", {"seed": 1}, FLAT)
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        build_report([str(tmp_path / "runs")], str(target), progress=False)
    assert (target / "notes.txt").read_text() == "keep me"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".precious")]  # no temp folder left


def test_regression_leaves_out_a_collinear_term():
    rng = np.random.default_rng(0)
    label = np.arange(60) % 3
    ex = pd.DataFrame(
        {"run_id": "r", "entropy": rng.uniform(0, 1, 60), "label": label, "token_length": np.where(label == 0, 13, 16)}
    )  # length fixed by "label is not 0"
    ex["aulc"] = ex["entropy"] + 0.2 * (ex["label"] == 2) + rng.normal(0, 0.01, 60)
    runs = pd.DataFrame({"run_id": ["r"], "condition": ["A"], "diverged": [False]})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pingouin warns on a rank-deficient design
        t = tables.regression(runs, ex)
    # token_length = 13 + 3 (label=1) + 3 (label=2): once label=1 is in, label=2 adds nothing and is left out.
    assert t["term"].tolist() == ["Intercept", "entropy", "token_length", "label=1"]
    X = np.column_stack([np.ones(60), ex["entropy"], ex["token_length"], ex["label"] == 1]).astype(float)
    coef = np.linalg.lstsq(X, ex["aulc"].to_numpy(), rcond=None)[0]
    assert t["coef"].to_numpy() == pytest.approx(coef, abs=1e-8)


def test_non_finite_validation_only_is_noted_not_diverged(tmp_path):
    from hf_entropy_callback.runs import write_run

    path = _write(tmp_path / "runs", "valnan", {"seed": 1}, FLAT)
    run = load_run(path)
    lp = dict(run.logprobs)
    lp["validation"] = lp["validation"].copy()
    lp["validation"][-1, :3] = np.nan
    write_run(path, run.config, run.examples, run.points, lp)
    study = load_study([str(tmp_path / "runs")], progress=False)
    row = study.runs.iloc[0]
    assert not row["diverged"] and np.isnan(row["validation_accuracy"]) and np.isfinite(row["rho"])
    assert any("valnan" in n and "validation" in n for n in study.notes)
    # Calibration keeps the train set and leaves out the validation set it cannot compute.
    assert set(study.calibration["set"]) == {"train"}
