import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hf_entropy_callback.dynamics import (
    accuracy,
    aulc,
    calibration,
    cartography,
    delta_loss,
    expected_calibration_error,
    gold_loss,
    progress,
    run_summary,
)
from hf_entropy_callback.runs import Run, RunFormatError, load_run, write_run


def _lp(p_gold_traj, label=0):
    """(points, 1, 3) log-probs with p(gold) given per point, the rest split evenly."""
    out = []
    for p in p_gold_traj:
        row = np.full(3, (1 - p) / 2)
        row[label] = p
        out.append([np.log(row)])
    return np.asarray(out)


def test_aulc_and_delta_hand_worked():
    assert aulc(np.array([[2.0], [1.0], [0.0]]), [0, 50, 100]) == pytest.approx([1.0])
    # uneven spacing: 0.1 * (1 + 1) / 2 + 0.9 * (1 + 0) / 2 = 0.55
    assert aulc(np.array([[1.0], [1.0], [0.0]]), [0, 10, 100]) == pytest.approx([0.55])
    # normalised progress: the same curve over twice the steps has the same AULC
    assert aulc(np.array([[1.0], [1.0], [0.0]]), [0, 20, 200]) == pytest.approx([0.55])
    assert delta_loss(np.array([[0.5, 2.0], [0.7, 1.0]])).tolist() == pytest.approx([0.2, -1.0])
    assert np.isnan(aulc(np.array([[1.0], [np.nan]]), [0, 5]))[0]
    np.testing.assert_allclose(progress([0, 25, 100]), [0, 0.25, 1])
    with pytest.raises(ValueError):
        progress([0])
    with pytest.raises(ValueError):
        progress([0, 5, 5])


def test_gold_loss_and_cartography_hand_worked():
    lp = _lp([0.5, 0.7, 0.9])
    np.testing.assert_allclose(gold_loss(lp, [0])[:, 0], -np.log([0.5, 0.7, 0.9]))
    carto = cartography(lp, [0])
    assert carto.confidence[0] == pytest.approx(0.7)
    assert carto.variability[0] == pytest.approx(np.sqrt(0.08 / 3))  # population std of 0.5, 0.7, 0.9
    assert carto.correctness[0] == pytest.approx(1.0)
    lp2 = _lp([0.2, 0.6], label=1)  # at p=0.2 the others have 0.4 each: wrong; then right
    assert cartography(lp2, [1]).correctness[0] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        gold_loss(lp, [3])


def test_ece_and_calibration_hand_worked():
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1]])
    # bins (0.8, 0.9] and (0.5, 0.6]: 0.5 * |1 - 0.9| + 0.5 * |0 - 0.6|
    assert expected_calibration_error(probs, [0, 1]) == pytest.approx(0.35)
    cal = calibration(np.log(probs), [0, 1], ["clean", "contested"]).set_index("category")
    assert cal.loc["clean", "max_confidence"] == pytest.approx(0.9)
    assert cal.loc["contested", "accuracy"] == 0.0
    assert cal.loc["clean", "pred_entropy"] == pytest.approx(stats.entropy([0.9, 0.05, 0.05]))
    assert cal.loc["all", "n"] == 2 and cal.loc["all", "ece"] == pytest.approx(0.35)
    assert accuracy(np.log(probs), [0, 0]) == 1.0


def _synthetic_run(tmp_path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    steps = [0, 10, 20, 25]
    labels = rng.integers(0, 3, n)
    ent = rng.random(n) * 1.1
    lp = np.log(rng.dirichlet([1, 1, 1], size=(len(steps), n)))
    ex = pd.DataFrame(
        {
            "example_id": [f"x{i}" for i in range(n)] + ["v0", "v1"],
            "set": ["train"] * n + ["validation"] * 2,
            "index": list(range(n)) + [0, 1],
            "entropy": list(ent) + [0.1, 0.9],
            "category": ["clean" if h < 0.4 else "ambiguous" if h <= 0.7 else "contested" for h in ent]
            + ["clean", "contested"],
            "label": list(labels) + [0, 1],
            "label_counts": [[100, 0, 0]] * (n + 2),
            "token_length": rng.integers(5, 20, n + 2),
            "noised": [False] * (n + 2),
        }
    )
    vlp = np.log(np.tile([[[0.8, 0.1, 0.1], [0.7, 0.2, 0.1]]], (len(steps), 1, 1)))
    pts = pd.DataFrame(
        {
            "point": range(4),
            "step": steps,
            "epoch": [0, 0.4, 0.8, 1.0],
            "reason": ["step0", "interval", "interval", "epoch_end+final"],
        }
    )
    write_run(str(tmp_path / "entropy_tracking"), {"method": "lora"}, ex, pts, {"train": lp, "validation": vlp})
    return load_run(str(tmp_path)), lp, labels, ent, steps


def test_run_roundtrip_and_summary_against_scipy(tmp_path):
    run, lp, labels, ent, steps = _synthetic_run(tmp_path)
    assert isinstance(run, Run) and run.config["method"] == "lora" and "torch" in run.versions
    np.testing.assert_array_equal(run.logprobs["train"], lp.astype(np.float32))
    loss = -np.log(np.exp(lp.astype(np.float32).astype(np.float64)))[:, np.arange(len(labels)), labels]
    a = np.trapezoid(loss, np.asarray(steps) / steps[-1], axis=0)
    d = loss[-1] - loss[0]
    s = run_summary(run)
    corr = {(r["y"], r["method"]): r for r in s["correlations"]}
    for y_name, y in (("aulc", a), ("delta_loss", d)):
        rho = stats.spearmanr(ent, y)
        tau = stats.kendalltau(ent, y)
        assert corr[(y_name, "spearman")]["r"] == pytest.approx(rho.statistic)
        assert corr[(y_name, "spearman")]["p_val"] == pytest.approx(rho.pvalue)
        assert corr[(y_name, "kendall")]["r"] == pytest.approx(tau.statistic)
        assert corr[(y_name, "kendall")]["p_val"] == pytest.approx(tau.pvalue)
        assert corr[(y_name, "spearman")]["n"] == len(ent)
    assert s["validation_accuracy"] == pytest.approx(0.5)  # v0 (label 0) right, v1 (label 1) wrong
    cats = {c["category"]: c for c in s["categories"]}
    for cat in cats:
        m = run.set_examples()["category"].to_numpy() == cat
        assert cats[cat]["mean_delta_loss"] == pytest.approx(d[m].mean())


def test_write_is_atomic_and_load_checks(tmp_path):
    run, *_ = _synthetic_run(tmp_path)
    bad_lp = {"train": run.logprobs["train"][:2], "validation": run.logprobs["validation"]}
    with pytest.raises(RunFormatError, match="shape"):
        write_run(str(tmp_path / "entropy_tracking"), {}, run.examples, run.points, bad_lp)
    with pytest.raises(RunFormatError, match=r"sets \['validation'\] have no logprobs"):
        write_run(str(tmp_path / "entropy_tracking"), {}, run.examples, run.points, {"train": run.logprobs["train"]})
    # the failed write left the previous run intact and no temporary folder behind
    assert load_run(str(tmp_path)).logprobs["train"].shape[0] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entropy_tracking"]
    with pytest.raises(RunFormatError, match="not a run directory"):
        load_run(str(tmp_path / "nowhere"))
    import json

    cfg = tmp_path / "entropy_tracking" / "run_config.json"
    meta = json.loads(cfg.read_text())
    meta["format_version"] = 0
    cfg.write_text(json.dumps(meta))
    with pytest.raises(RunFormatError, match="version 0 is not supported"):
        load_run(str(tmp_path))


def test_nan_rows_are_not_read_as_predictions():
    lp = np.log(np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]]))
    bad = np.vstack([lp, [[np.nan] * 3]])
    assert accuracy(lp, [0, 1]) == 1.0
    assert np.isnan(accuracy(bad, [0, 1, 0]))  # argmax would call the NaN row "class 0", i.e. right
    cal = calibration(bad, [0, 1, 0], ["clean", "clean", "contested"]).set_index("category")
    assert cal.loc["clean", "n"] == 2 and cal.loc["clean", "accuracy"] == 1.0 and cal.loc["clean", "n_nan"] == 0
    assert (
        cal.loc["contested", "n"] == 0 and cal.loc["contested", "n_nan"] == 1 and np.isnan(cal.loc["contested", "ece"])
    )
    assert cal.loc["all", "n_nan"] == 1
