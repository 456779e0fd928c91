"""Cross-condition tables and figures never pool runs whose other settings differ (from the user's side).

A report folder holds all-MiniLM-L6-v2 (and a decoder's) SNLI runs at bulk size 20000 (seed 42) and at
bulk size 2000 (seeds 123 and 456): separate conditions. Every section that compares across methods, ranks,
architectures or learning rates must keep the two bulk sizes apart (rows / lines labelled "bulk=..."), with
the means of each family recomputed here straight from the run files (scipy, pandas), never through
hf_entropy_callback.study. The entropy slopes are chosen so that pooling gives other numbers: rho grows with
the rank at bulk 20000 and falls at bulk 2000.
"""

import os

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_instrument_report import _csv  # the report's CSV as the user reads it
from test_referee import _aulc, _run  # the audit's small synthetic run and AULC by hand

from hf_entropy_callback.runs import load_run
from hf_entropy_callback.study import figures as F
from hf_entropy_callback.study import tables
from hf_entropy_callback.study.loading import Options, load_study
from hf_entropy_callback.study.report import build_report
from hf_entropy_callback.synthetic_runs import Dynamics

MINILM = {
    "model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
    "model_type": "bert",
    "architecture": "encoder",
}
QWEN = {"model_name_or_path": "Qwen/Qwen2.5-0.5B", "model_type": "qwen2", "architecture": "decoder"}
#: Seed -> bulk size: seed 42 was trained with the full bulk, seeds 123 and 456 with a tenth of it.
BULK = {42: 20000, 123: 2000, 456: 2000}
#: Entropy slope per bulk size and method: rho rises with the rank at bulk 20000, falls at bulk 2000.
SLOPES = {
    20000: {8: 0.2, 16: 0.8, 64: 2.0, "full": 0.1},
    2000: {8: 2.0, 16: 0.9, 64: 0.3, "full": 1.5},
}
LABEL = {20000: "bulk=20000", 2000: "bulk=2000"}
MINI, QW = "all-MiniLM-L6-v2", "Qwen2.5-0.5B"


def _cfg(model, method, seed, **extra):
    """A run's config as the script records it: LoRA alpha 2r and dropout 0.05, neither for full FT."""
    lora = method != "full"
    cfg = {
        **model,
        "method": "lora" if lora else "full",
        "rank": method if lora else None,
        "lora_alpha": 2 * method if lora else None,
        "lora_dropout": 0.05 if lora else None,
        "seed": seed,
        "bulk_size": BULK[seed],
        "dataset": "snli",
    }
    return {**cfg, **extra}


def _rho_by_hand(tdir):
    """Spearman rho of entropy vs AULC of a run, from its files."""
    run = load_run(tdir)
    ex = run.set_examples("train")
    return float(stats.spearmanr(ex["entropy"], _aulc(run.losses("train"))).statistic)


def _write(root, name, model, method, seed, slope_scale=1.0, **extra):
    slope = SLOPES[BULK[seed]][method] * slope_scale
    tdir = _run(
        root,
        name,
        _cfg(model, method, seed, **extra),
        dynamics=Dynamics(final_loss=0.1, entropy_slope=slope, noise_sd=0.4),
    )
    return {
        "run_id": name,
        "model": os.path.basename(model["model_name_or_path"]),
        "architecture": model["architecture"],
        "method": "full" if method == "full" else "lora",
        "rank": np.nan if method == "full" else float(method),
        "seed": seed,
        "bulk": BULK[seed],
        "noise": extra.get("label_noise", 0.0),
        "learning_rate": extra.get("learning_rate", 2e-4),
        "rho": _rho_by_hand(tdir),
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The mixed folder's report, the study loaded from it, and each run's rho by hand."""
    root = tmp_path_factory.mktemp("pooling")
    runs = root / "runs"
    rows = []
    for seed in BULK:
        for method in (8, 16, 64, "full"):
            # Drift instruments on r8 and full FT: the drift-vs-ΔL correlation pools runs across conditions.
            inst = {"names": ["drift"]} if method in (8, "full") else None
            rows.append(_write(runs, f"mini_{method}_s{seed}", MINILM, method, seed, instruments=inst))
        for method in (8, 64):
            rows.append(_write(runs, f"qwen_{method}_s{seed}", QWEN, method, seed, slope_scale=1.2))
        rows.append(_write(runs, f"mini_8_noise_s{seed}", MINILM, 8, seed, label_noise=0.3))
    rep = build_report([str(runs)], str(root / "report"), progress=False, options=Options(n_boot=0))
    study = load_study([str(runs)], progress=False, options=Options(n_boot=0))
    return rep, study, pd.DataFrame(rows)


def _family_means(rho: pd.DataFrame, by):
    """Mean rho, run count and seeds per group of `by` (NaN ranks kept), with pandas."""
    g = rho.groupby(by, dropna=False)
    out = g["rho"].agg(["mean", "size"]).rename(columns={"mean": "rho_mean", "size": "n_runs"})
    out["seeds"] = g["seed"].agg(lambda s: ", ".join(str(v) for v in sorted(s)))
    return out.reset_index()


def _section(index: str, title: str) -> str:
    """The text of one section of index.md (up to the next section heading)."""
    part = index.split(f"## {title}", 1)[1]
    return part.split("\n## ", 1)[0]


# ------------------------------------------------------------------------------------------------
# Section 5: the rank sweep, its trend test and its figure
# ------------------------------------------------------------------------------------------------


def test_rank_sweep_has_one_line_per_bulk_size(built):
    rep, _, rho = built
    sweep = _csv(rep, "rank_sweep")
    mini = sweep[sweep["model"] == MINI]
    # Two families of 3 LoRA ranks and full FT each, never one row pooling both bulk sizes.
    assert len(mini) == 8 and sorted(set(mini["settings"])) == sorted(LABEL.values())
    base = rho[(rho["model"] == MINI) & (rho["noise"] == 0)]
    expected = _family_means(base, ["bulk", "method", "rank"])
    assert len(expected) == 8
    for e in expected.itertuples():
        row = mini[
            (mini["settings"] == LABEL[e.bulk])
            & (mini["method"] == e.method)
            & ((mini["rank"] == e.rank) | (mini["rank"].isna() & np.isnan(e.rank)))
        ]
        assert len(row) == 1, (e.bulk, e.method, e.rank)
        row = row.iloc[0]
        assert row["n_runs"] == e.n_runs and str(row["seeds"]) == e.seeds
        assert row["rho_mean"] == pytest.approx(e.rho_mean, abs=1e-12)
    # The data tell pooling apart: the three seeds' mean at r=8 is neither family's.
    pooled = base.loc[base["rank"] == 8, "rho"].mean()
    assert all(abs(pooled - v) > 0.05 for v in mini.loc[mini["rank"] == 8, "rho_mean"])
    # The trend test runs within each family: + with rank at bulk 20000, - at bulk 2000.
    trend = _csv(rep, "rank_trend")
    trend = trend[trend["model"] == MINI].set_index("settings")
    assert set(trend.index) == set(LABEL.values())
    for bulk, label in LABEL.items():
        lora = expected[(expected["bulk"] == bulk) & (expected["method"] == "lora")].sort_values("rank")
        assert trend.loc[label, "n_ranks"] == 3
        assert trend.loc[label, "spearman_r"] == pytest.approx(
            stats.spearmanr(lora["rank"], lora["rho_mean"]).statistic
        )
        full = expected[(expected["bulk"] == bulk) & (expected["method"] == "full")]["rho_mean"].item()
        assert trend.loc[label, "rho_full"] == pytest.approx(full)
    assert trend.loc["bulk=20000", "spearman_r"] == 1 and trend.loc["bulk=2000", "spearman_r"] == -1
    # The figure is still drawn, and the section names the bulk sizes.
    assert rep.figures["rho_vs_rank"] and os.path.getsize(rep.figures["rho_vs_rank"][0]) > 10_000
    text = _section(open(rep.index).read(), "5. Rank sweep")
    assert "bulk=2000" in text and "bulk=20000" in text


def test_rank_figure_draws_one_line_per_bulk_size(built):
    _, study, rho = built
    fig = F.rank_plot(study.runs)
    ax = fig.axes[0]
    lines = {c.get_label(): c for c in ax.containers if not c.get_label().startswith("_")}
    base = rho[(rho["noise"] == 0) & (rho["method"] == "lora")]
    for (model, arch, bulk), g in base.groupby(["model", "architecture", "bulk"]):
        label = f"{model} ({arch}) · {LABEL[bulk]}"
        assert label in lines, (label, sorted(lines))
        means = g.groupby("rank")["rho"].mean().sort_index()
        data = lines[label].lines[0]
        assert list(data.get_xdata()) == list(means.index)
        assert np.allclose(data.get_ydata(), means.to_numpy(), atol=1e-12)
    assert len(lines) == 4  # MiniLM and Qwen, each at two bulk sizes


def test_one_setting_family_gives_the_table_it_always_gave(built):
    _, study, _ = built
    runs = study.runs[study.runs["bulk_size"] == 2000]
    sweep = tables.rank_sweep(runs)
    assert "settings" not in sweep and list(sweep.columns) == [
        "model",
        "architecture",
        "dataset",
        "method",
        "rank",
        "n_runs",
        "seeds",
        "rho_mean",
        "rho_sd",
    ]
    assert "settings" not in tables.rank_trend(sweep) and "settings" not in tables.architecture_table(runs)


# ------------------------------------------------------------------------------------------------
# Section 16: decoders vs encoders
# ------------------------------------------------------------------------------------------------


def test_architecture_table_keeps_bulk_sizes_apart(built):
    rep, _, rho = built
    arch = _csv(rep, "architecture")
    base = rho[(rho["noise"] == 0) & (rho["method"] == "lora")]
    expected = _family_means(base, ["rank", "architecture", "bulk"])
    assert len(arch) == len(expected) == 10  # encoder ranks 8, 16, 64 and decoder ranks 8, 64, per bulk size
    for e in expected.itertuples():
        row = arch[
            (arch["rank"] == e.rank) & (arch["architecture"] == e.architecture) & (arch["settings"] == LABEL[e.bulk])
        ]
        assert len(row) == 1, (e.rank, e.architecture, e.bulk)
        assert row["n_runs"].item() == e.n_runs
        assert row["rho_mean"].item() == pytest.approx(e.rho_mean, abs=1e-12)
    text = _section(open(rep.index).read(), "16. Decoders vs encoders")
    assert "bulk=2000" in text and "not pooled" in text


# ------------------------------------------------------------------------------------------------
# Section 1: the trajectory grid (and the cartography maps' titles)
# ------------------------------------------------------------------------------------------------


def test_trajectory_grid_has_a_row_per_bulk_size(built):
    _, study, _ = built
    fig = F.trajectory_plot(study.curves, study.runs, max_rows=None)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    # A panel is one condition: 1 seed at bulk 20000, 2 at bulk 2000, never the 3 seeds pooled.
    assert titles and not any("(3 seeds)" in t for t in titles)
    for model in (MINI, QW):
        for bulk, n in ((20000, "(1 seed)"), (2000, "(2 seeds)")):
            mine = [t for t in titles if t.startswith(model) and LABEL[bulk] + "\n" in t]
            assert mine and all(t.endswith(n) for t in mine), (model, bulk, titles)
    # MiniLM: LoRA r=8, 16, 64 and full FT per bulk size; Qwen: r=8 and 64.
    assert len(titles) == 2 * 4 + 2 * 2
    maps = F.cartography_plot(study.examples, study.runs, max_rows=None)
    map_titles = [ax.get_title() for ax in maps.axes if ax.get_title()]
    assert any("bulk=2000" in t for t in map_titles) and any("bulk=20000" in t for t in map_titles)


# ------------------------------------------------------------------------------------------------
# Section 10: label noise (table display and figure)
# ------------------------------------------------------------------------------------------------


def test_noise_levels_and_figure_keep_bulk_sizes_apart(built):
    rep, _, _ = built
    levels = _csv(rep, "noise_levels")
    allc = levels[levels["category"] == "all"]
    # The table's groups were already separate: one baseline and one noisy row per bulk size.
    assert sorted(zip(allc["bulk_size"], allc["label_noise"], allc["n_runs"])) == [
        (2000, 0.0, 2),
        (2000, 0.3, 2),
        (20000, 0.0, 1),
        (20000, 0.3, 1),
    ]
    text = _section(open(rep.index).read(), "10. Label-noise injection")
    assert "bulk=2000" in text and "bulk=20000" in text
    fig = F.noise_plot(rep.tables["noise_levels"])
    rho_panels = [ax for ax in fig.axes if ax.get_ylabel().startswith("Spearman")]
    assert len(rho_panels) == 2  # one row per bulk size, not one line through both
    titles = sorted(ax.get_title() for ax in rho_panels)
    assert "bulk=2000" in titles[0] and "bulk=20000" in titles[1]
    for ax in rho_panels:
        bulk = 20000 if "bulk=20000" in ax.get_title() else 2000
        want = allc[allc["bulk_size"] == bulk].sort_values("label_noise")["rho_mean"].to_numpy()
        assert np.allclose(ax.containers[0].lines[0].get_ydata(), want)


# ------------------------------------------------------------------------------------------------
# Section 13b: drift vs contested ΔL pools runs across conditions by design: the text says which settings
# ------------------------------------------------------------------------------------------------


def test_drift_correlation_names_the_settings_its_runs_differ_in(built):
    rep, _, _ = built
    per_run = _csv(rep, "drift_delta_runs")
    assert len(per_run) == 6  # r8 and full FT at three seeds
    text = _section(open(rep.index).read(), "13b. Drift over training and the contested examples' Delta L")
    assert "bulk: 2000, 20000" in text
    # The drift curves are per condition; the two bulk sizes of one method must not look like one line.
    fig = F.drift_plot(rep.tables["drift"])
    lines = [line for line in fig.axes[0].lines if "bulk=" in line.get_label()]
    assert len(lines) == 4
    assert len({(line.get_color(), line.get_linestyle(), line.get_marker()) for line in lines}) == 4


# ------------------------------------------------------------------------------------------------
# Section 18: matched learning rates
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def matched(tmp_path_factory):
    root = tmp_path_factory.mktemp("matched")
    runs = root / "runs"
    rows = []
    for lr, scale in ((1e-5, 0.5), (5e-5, 1.0)):
        for seed in BULK:
            for method in (8, "full"):
                name = f"mini_{method}_lr{lr:g}_s{seed}"
                rows.append(_write(runs, name, MINILM, method, seed, slope_scale=scale, learning_rate=lr))
    rep = build_report([str(runs)], str(root / "report"), progress=False, options=Options(n_boot=0), html_index=False)
    return rep, pd.DataFrame(rows)


def test_matched_lr_table_keeps_bulk_sizes_apart(matched):
    rep, rho = matched
    t = _csv(rep, "matched_lr")
    assert len(t) == 8 and sorted(set(t["settings"])) == sorted(LABEL.values())
    acc = _csv(rep, "per_seed").set_index("run_id")["validation_accuracy"]
    rho = rho.assign(acc=rho["run_id"].map(acc), label=np.where(rho["method"] == "full", "full FT", "LoRA r=8"))
    for (bulk, lr, method), g in rho.groupby(["bulk", "learning_rate", "label"]):
        row = t[(t["settings"] == LABEL[bulk]) & np.isclose(t["learning_rate"], lr) & (t["method"] == method)]
        assert len(row) == 1, (bulk, lr, method)
        assert row["n_runs"].item() == len(g)
        assert row["rho_mean"].item() == pytest.approx(g["rho"].mean(), abs=1e-12)
        assert row["validation_accuracy_mean"].item() == pytest.approx(g["acc"].mean(), abs=1e-12)
