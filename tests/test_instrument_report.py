"""The report's instrument sections (issue 12: gradient alignment, gradient norms by category, drift), from the
user's side: a report built from synthetic runs that carry instruments, checked against numbers recomputed here
straight from the run files (pandas, numpy and scipy, never through hf_entropy_callback.study)."""

import os
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hf_entropy_callback.runs import INSTRUMENT_COLUMNS, INSTRUMENT_EXAMPLE_COLUMNS, RunFormatError, load_run
from hf_entropy_callback.study.loading import Options, load_study
from hf_entropy_callback.study.report import build_report
from hf_entropy_callback.synthetic_runs import Dynamics, write_synthetic_run

N_TRAIN, N_VAL = 60, 12
STEPS = [0, 25, 50, 75, 100]
SAMPLE = 8
INSTR = {"sample_per_category": SAMPLE, "seed": 3, "loss": "class_weighted_ce", "attention": "eager"}
DIVERGED = Dynamics(final_loss=0.1, entropy_slope=2.0, noise_sd=0.3, diverge_at=0.5)
INSTRUMENT_TABLES = (
    "grad_alignment",
    "grad_norms",
    "grad_norm_tests",
    "grad_norm_test_summary",
    "drift",
    "drift_layers",
    "drift_delta_runs",
    "drift_delta",
)
INSTRUMENT_FIGURES = ("grad_alignment", "grad_norms", "drift", "drift_delta")


def _run(root, name, config, instruments=INSTR, **kw):
    return write_synthetic_run(
        os.path.join(str(root), name), config, n_train=N_TRAIN, n_val=N_VAL, steps=STEPS, instruments=instruments, **kw
    )


def _cfg(method, lr, seed):
    return {"method": method, "rank": 8 if method == "lora" else None, "learning_rate": lr, "seed": seed}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("instr")
    runs = root / "runs"
    for method in ("lora", "full"):
        for s in (1, 2, 3):
            _run(runs, f"{method}_lr1_s{s}", _cfg(method, 1e-4, s))
        for s in (1, 2):
            _run(runs, f"{method}_lr5_s{s}", _cfg(method, 5e-4, s))
    _run(runs, "lora_lr1_s4_diverged", _cfg("lora", 1e-4, 4), dynamics=DIVERGED)
    _run(runs, "lora_lr1_s5_plain", _cfg("lora", 1e-4, 5), instruments=None)
    rep = build_report([str(runs)], str(root / "report"), progress=False, options=Options(n_boot=20))
    return rep, runs


def _csv(rep, name):
    return pd.read_csv(os.path.join(rep.folder, "tables", f"{name}.csv"))


def _usable_runs(rep, runs_dir):
    """run_id -> (condition, seed, tracking dir) of the report's usable runs with instruments, from its inventory."""
    inv = _csv(rep, "runs")
    inv = inv[inv["status"] == "ok"]
    out = {}
    for r in inv.itertuples():
        tdir = os.path.join(str(runs_dir), r.run_id, "entropy_tracking")
        if os.path.isfile(os.path.join(tdir, "instruments.parquet")):
            out[r.run_id] = (r.condition, r.seed, tdir)
    return out


def _raw_instruments(rep, runs_dir):
    frames = []
    for run_id, (cond, seed, tdir) in _usable_runs(rep, runs_dir).items():
        f = pd.read_parquet(os.path.join(tdir, "instruments.parquet"))
        frames.append(f.assign(run_id=run_id, condition=cond, seed=seed))
    return pd.concat(frames, ignore_index=True)


def _t_ci(values):
    v = np.asarray(values, float)
    if len(v) < 2:
        return np.nan, np.nan
    if np.ptp(v) == 0:  # scipy returns NaN for a zero scale; the interval of identical values is that value
        return v[0], v[0]
    return stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))


def _close(a, b, what):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert a.shape == b.shape, what
    assert np.allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True), what


# ------------------------------------------------------------------------------------------------
# Files a user gets
# ------------------------------------------------------------------------------------------------


def test_the_instrument_figures_and_tables_are_written(built):
    rep, _ = built
    for name in INSTRUMENT_FIGURES:
        assert rep.figures[name], name
        for path in rep.figures[name]:
            with open(path, "rb") as fh:
                assert fh.read(8) == b"\x89PNG\r\n\x1a\n", path
            assert os.path.getsize(path) > 10_000, path
    for name in INSTRUMENT_TABLES:
        frame = _csv(rep, name)
        assert len(frame) and len(frame) == len(rep.tables[name]), name
        assert os.path.getsize(os.path.join(rep.folder, "tables", f"{name}.md")) > 0, name
    index = open(rep.index).read()
    for link in re.findall(r"\]\(([^)#]+)\)", index):
        assert os.path.isfile(os.path.join(rep.folder, link)), link
    html = open(os.path.join(rep.folder, "index.html")).read()
    assert html.count("<img") == sum(len(v) for v in rep.figures.values())


def test_the_text_names_the_loss_the_sample_and_the_runs_left_out(built):
    rep, _ = built
    index = open(rep.index).read()
    for title in ("## 12. Gradient alignment", "## 13. Per-example gradient norms", "## 13b. Drift"):
        section = index[index.index(title) :].split("\n## ")[0]
        assert "not computed" not in section, title
    sec12 = index[index.index("## 12.") : index.index("## 13.")]
    assert "class_weighted_ce (the training loss, class-weighted cross-entropy" in sec12
    assert f"{SAMPLE} examples per entropy category" in sec12
    assert "10 usable run(s) with this instrument" in sec12  # the diverged and the plain run are not among them
    assert "1 usable run(s) without gradient instruments (lora_lr1_s5_plain)" in sec12
    assert "Mann–Whitney U" in index


# ------------------------------------------------------------------------------------------------
# Numbers, recomputed from the run files
# ------------------------------------------------------------------------------------------------


def test_alignment_table_equals_a_recomputation_from_the_parquet_files(built):
    rep, runs_dir = built
    raw = _raw_instruments(rep, runs_dir)
    raw = raw[(raw["instrument"] == "grad_alignment") & (raw["quantity"] == "cosine")]
    table = _csv(rep, "grad_alignment")
    assert set(table["pair"]) == {"clean~contested", "clean~ambiguous", "ambiguous~contested"}
    assert len(table) == raw.groupby(["condition", "group", "step"]).ngroups
    for r in table.itertuples():
        v = raw[(raw["condition"] == r.condition) & (raw["group"] == r.pair) & (raw["step"] == r.step)]
        lo, hi = _t_ci(v["value"])
        _close(
            [r.n_runs, r.cosine_mean, r.cosine_sd, r.cosine_ci_low, r.cosine_ci_high, r.progress],
            [len(v), v["value"].mean(), v["value"].std(ddof=1), lo, hi, r.step / STEPS[-1]],
            (r.condition, r.pair, r.step),
        )
    lora = table[table["condition"].str.contains("LoRA") & table["condition"].str.contains("0.0001")]
    assert set(lora["n_runs"]) == {3}  # seeds 1-3; the diverged seed 4 and the plain seed 5 are left out
    assert lora["seeds"].iloc[0] == "1, 2, 3"


def test_grad_norm_table_equals_a_recomputation_from_the_parquet_files(built):
    rep, runs_dir = built
    raw = _raw_instruments(rep, runs_dir)
    raw = raw[raw["instrument"] == "grad_norms"]
    table = _csv(rep, "grad_norms")
    assert list(table["category"].unique()) == ["clean", "ambiguous", "contested"]
    for r in table.itertuples():
        sel = raw[(raw["condition"] == r.condition) & (raw["group"] == r.category) & (raw["step"] == r.step)]
        mean = sel[sel["quantity"] == "grad_norm_mean"]["value"]
        median = sel[sel["quantity"] == "grad_norm_median"]["value"]
        lo, hi = _t_ci(mean)
        _close(
            [r.n_runs, r.grad_norm_mean, r.grad_norm_sd, r.grad_norm_ci_low, r.grad_norm_ci_high],
            [len(mean), mean.mean(), mean.std(ddof=1), lo, hi],
            (r.condition, r.category, r.step),
        )
        _close([r.grad_norm_median_mean, r.grad_norm_median_sd], [median.mean(), median.std(ddof=1)], r)


def test_grad_norm_tests_equal_a_hand_mann_whitney_on_the_per_example_files(built):
    rep, runs_dir = built
    per_run = _csv(rep, "grad_norm_tests").set_index("run_id")
    usable = _usable_runs(rep, runs_dir)
    assert set(per_run.index) == set(usable)
    for run_id, (_, _, tdir) in usable.items():
        ex = pd.read_parquet(os.path.join(tdir, "examples.parquet"))
        norms = pd.read_parquet(os.path.join(tdir, "instrument_examples.parquet"))
        norms = norms[(norms["quantity"] == "grad_norm") & (norms["set"] == "train")]
        last = norms[norms["point"] == norms["point"].max()]
        cat = dict(zip(ex.loc[ex["set"] == "train", "example_id"], ex.loc[ex["set"] == "train", "category"]))
        cats = last["example_id"].map(cat)
        clean = last.loc[cats == "clean", "value"].to_numpy()
        contested = last.loc[cats == "contested", "value"].to_numpy()
        assert len(clean) == SAMPLE and len(contested) == SAMPLE  # the sample size asked for
        diff = contested[:, None] - clean[None, :]
        u = float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        r = per_run.loc[run_id]
        _close(
            [r["U"], r["cles"], r["median_ratio"], r["step"]],
            [u, u / (len(clean) * len(contested)), np.median(contested) / np.median(clean), STEPS[-1]],
            run_id,
        )
        _close(r["p_val"], stats.mannwhitneyu(contested, clean, alternative="two-sided").pvalue, run_id)
    summary = _csv(rep, "grad_norm_test_summary")
    for s in summary.itertuples():
        g = per_run[per_run["condition"] == s.condition]
        _close(
            [s.n_runs, s.cles_mean, s.cles_sd, s.p_max, s.n_higher, s.n_sig],
            [
                len(g),
                g["cles"].mean(),
                g["cles"].std(ddof=1),
                g["p_val"].max(),
                (g["cles"] > 0.5).sum(),
                (g["p_val"] < 0.05).sum(),
            ],
            s.condition,
        )


def test_drift_tables_equal_a_recomputation_from_the_parquet_files(built):
    rep, runs_dir = built
    raw = _raw_instruments(rep, runs_dir)
    raw = raw[raw["instrument"] == "drift"]
    table = _csv(rep, "drift")
    assert list(table["quantity"].unique()) == ["attention_entropy", "cka", "update_norm_total"]
    # Per run and step: the mean over layers (attention entropy, CKA) or the total, then over seeds.
    per_run = raw[raw["quantity"].isin(["attention_entropy", "cka", "update_norm_total"])]
    per_run = per_run.groupby(["condition", "run_id", "quantity", "step"])["value"].mean().reset_index()
    for r in table.itertuples():
        v = per_run[
            (per_run["condition"] == r.condition) & (per_run["quantity"] == r.quantity) & (per_run["step"] == r.step)
        ]
        lo, hi = _t_ci(v["value"])
        _close(
            [r.n_runs, r.value_mean, r.value_sd, r.value_ci_low, r.value_ci_high],
            [len(v), v["value"].mean(), v["value"].std(ddof=1), lo, hi],
            (r.condition, r.quantity, r.step),
        )
    # Rates and methods: drift per method at each learning rate, full FT drifting more than LoRA.
    last = table[table["step"] == STEPS[-1]].set_index(["condition", "quantity"])["value_mean"]
    for lr in ("0.0001", "0.0005"):
        lora = last[f"roberta-base · LoRA r=8 · snli · lr={lr}", "update_norm_total"]
        full = last[f"roberta-base · full FT · snli · lr={lr}", "update_norm_total"]
        assert full > lora
    layers = _csv(rep, "drift_layers")
    assert set(layers["quantity"]) == {"attention_entropy", "cka", "update_norm"}
    for r in layers.sample(40, random_state=0).itertuples():
        sel = raw[(raw["condition"] == r.condition) & (raw["quantity"] == r.quantity)]
        sel = sel[sel["component"] == str(r.component)].sort_values("step")
        final = sel.groupby("run_id")["value"].last()
        change = final - sel.groupby("run_id")["value"].first()
        _close(
            [r.n_runs, r.final_mean, r.final_sd, r.change_mean, r.change_sd],
            [len(final), final.mean(), final.std(ddof=1), change.mean(), change.std(ddof=1)],
            (r.condition, r.quantity, r.component),
        )
    cka = layers[layers["quantity"] == "cka"]
    assert cka["component"].astype(str).tolist()[:12] == [str(i) for i in range(12)]  # layers in numeric order


def test_drift_vs_contested_delta_loss_equals_scipy_on_the_run_files(built):
    rep, runs_dir = built
    raw = _raw_instruments(rep, runs_dir)
    usable = _usable_runs(rep, runs_dir)
    rows = []
    for run_id, (cond, _, tdir) in usable.items():
        ex = pd.read_parquet(os.path.join(tdir, "examples.parquet"))
        ex = ex[ex["set"] == "train"].sort_values("index")
        lp = np.load(os.path.join(tdir, "logprobs.npz"))["train"].astype(np.float64)
        gold = ex["label"].to_numpy()
        loss = -lp[:, np.arange(len(gold)), gold]
        delta = loss[-1] - loss[0]
        contested = (ex["category"] == "contested").to_numpy()
        d = raw[(raw["run_id"] == run_id) & (raw["instrument"] == "drift")]
        at = d.groupby(["quantity", "step"])["value"].mean()
        rows.append(
            {
                "run_id": run_id,
                "method": "full" if "full FT" in cond else "lora",
                "update_norm_total": at["update_norm_total", STEPS[-1]],
                "cka_drift": 1 - at["cka", STEPS[-1]],
                "attention_entropy_change": at["attention_entropy", STEPS[-1]] - at["attention_entropy", 0],
                "delta_loss_contested": delta[contested].mean(),
                "n_contested": contested.sum(),
            }
        )
    mine = pd.DataFrame(rows).set_index("run_id")
    per_run = _csv(rep, "drift_delta_runs").set_index("run_id")
    assert set(per_run.index) == set(mine.index)
    cols = ["update_norm_total", "cka_drift", "attention_entropy_change", "n_contested"]
    _close(per_run.loc[mine.index, cols].to_numpy(float), mine[cols].to_numpy(float), "per-run drift")
    # Delta L from float32 log-probabilities: the loader works in float64 too, so they agree to rounding.
    assert np.allclose(per_run.loc[mine.index, "delta_loss_contested"], mine["delta_loss_contested"], atol=1e-6)
    rho = _csv(rep, "drift_delta")
    assert set(rho["scope"]) == {"all runs", "LoRA", "full FT"}
    for r in rho.itertuples():
        d = mine if r.scope == "all runs" else mine[mine["method"] == ("lora" if r.scope == "LoRA" else "full")]
        x, y = d[r.measure].to_numpy(), d["delta_loss_contested"].to_numpy()
        by_hand = np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1]
        _close([r.n_runs, r.rho], [len(d), by_hand], (r.scope, r.measure))
        _close(r.p_val, stats.spearmanr(x, y).pvalue, (r.scope, r.measure))


# ------------------------------------------------------------------------------------------------
# Without instruments, and with several instrument settings
# ------------------------------------------------------------------------------------------------


def test_without_instruments_the_sections_say_not_computed_and_no_table_is_written(tmp_path):
    for s in (1, 2):
        _run(tmp_path / "runs", f"plain_s{s}", {"seed": s}, instruments=None)
    rep = build_report([str(tmp_path / "runs")], str(tmp_path / "rep"), progress=False, options=Options(n_boot=0))
    index = open(rep.index).read()
    for title in ("## 12. Gradient alignment", "## 13. Per-example gradient norms", "## 13b. Drift"):
        section = index[index.index(title) :].split("\n## ")[0]
        assert "Note: not computed (no run has instruments: rerun the training with --instruments" in section
    written = set(os.listdir(tmp_path / "rep" / "tables"))
    for name in INSTRUMENT_TABLES:
        assert name not in rep.tables and f"{name}.csv" not in written and f"{name}.md" not in written, name
    figures = set(os.listdir(tmp_path / "rep" / "figures"))
    for name in INSTRUMENT_FIGURES:
        assert rep.figures[name] == [] and not any(f.startswith(name) for f in figures), name


def test_a_run_with_only_drift_gets_the_drift_section_and_a_note_for_the_gradients(tmp_path):
    for s in (1, 2, 3):
        _run(tmp_path / "runs", f"drift_s{s}", {"seed": s}, instruments={**INSTR, "names": ["drift"]})
    rep = build_report([str(tmp_path / "runs")], str(tmp_path / "rep"), progress=False, options=Options(n_boot=0))
    index = open(rep.index).read()
    assert "not computed (no run recorded the grad_alignment instrument" in index
    assert "not computed (no run recorded the grad_norms instrument" in index
    assert "drift" in rep.tables and "grad_alignment" not in rep.tables and "grad_norms" not in rep.tables


def test_runs_of_different_instrument_settings_are_kept_apart(tmp_path):
    runs = tmp_path / "runs"
    for s in (1, 2):
        _run(runs, f"s{s}_sample8", {"seed": s})
    _run(runs, "s3_sample16", {"seed": 3}, instruments={**INSTR, "sample_per_category": 16})
    rep = build_report([str(runs)], str(tmp_path / "rep"), progress=False, options=Options(n_boot=0))
    # One condition for rho (instruments do not change training) ...
    assert len(_csv(rep, "rho_by_condition")) == 1
    # ... but two groups in every instrument table, never pooled.
    for name in ("grad_alignment", "grad_norms", "drift", "grad_norm_test_summary"):
        t = _csv(rep, name)
        sizes = t.groupby("instrument_setting")["n_runs"].max().to_dict()
        if name == "drift":
            assert sizes == {"8 per category · attention eager": 2, "16 per category · attention eager": 1}
        else:
            assert sizes == {
                "loss class_weighted_ce · 8 per category": 2,
                "loss class_weighted_ce · 16 per category": 1,
            }
    tests = _csv(rep, "grad_norm_tests").set_index("run_id")
    ex = pd.read_parquet(os.path.join(str(runs), "s3_sample16", "entropy_tracking", "examples.parquet"))
    n_clean = int(((ex["set"] == "train") & (ex["category"] == "clean")).sum())
    assert 8 < n_clean < 16  # so the larger setting takes every clean example
    assert tests.loc["s3_sample16", "n_clean"] == n_clean and tests.loc["s1_sample8", "n_clean"] == 8
    index = open(rep.index).read()
    assert "runs with 2 gradient instrument settings" in index and "runs with 2 drift instrument settings" in index
    assert "their values are not pooled" in index
    assert "8 examples per entropy category, 16 examples per entropy category" in index
    # The displayed tables name the setting of each row when there are several.
    assert "| loss class_weighted_ce · 16 per category |" in index


def test_runs_that_differ_only_in_which_instruments_they_recorded_are_pooled(tmp_path):
    runs = tmp_path / "runs"
    for s in (1, 2):
        _run(runs, f"all_s{s}", {"seed": s})
    _run(runs, "grads_s3", {"seed": 3}, instruments={**INSTR, "names": ["grad_alignment", "grad_norms"]})
    _run(runs, "drift_s4", {"seed": 4}, instruments={**INSTR, "names": ["drift"], "seed": 9})
    rep = build_report([str(runs)], str(tmp_path / "rep"), progress=False, options=Options(n_boot=0))
    for name, seeds in (("grad_alignment", "1, 2, 3"), ("grad_norms", "1, 2, 3"), ("drift", "1, 2, 4")):
        t = _csv(rep, name)
        assert t["instrument_setting"].nunique() == 1 and set(t["seeds"]) == {seeds}, name
    index = open(rep.index).read()
    assert "not pooled" not in index
    assert "1 usable run(s) without gradient instruments (drift_s4)" in index
    assert "1 usable run(s) without drift instruments (grads_s3)" in index


# ------------------------------------------------------------------------------------------------
# The run format and the synthetic runs
# ------------------------------------------------------------------------------------------------


def test_load_run_reads_instruments_and_gives_empty_frames_without(tmp_path):
    with_ = load_run(_run(tmp_path, "with", {"seed": 1}))
    without = load_run(_run(tmp_path, "without", {"seed": 1}, instruments=None))
    assert list(with_.instruments.columns) == list(INSTRUMENT_COLUMNS) and len(with_.instruments)
    assert list(with_.instrument_examples.columns) == list(INSTRUMENT_EXAMPLE_COLUMNS)
    assert without.instruments.empty and list(without.instruments.columns) == list(INSTRUMENT_COLUMNS)
    assert without.instrument_examples.empty
    assert list(without.instrument_examples.columns) == list(INSTRUMENT_EXAMPLE_COLUMNS)
    # Instruments draw from their own stream: the trajectories are the same with or without them.
    assert np.array_equal(with_.logprobs["train"], without.logprobs["train"])
    assert with_.config["instruments"]["sample_per_category"] == SAMPLE and "instruments" not in without.config


def test_damaged_instrument_files_are_named(tmp_path):
    tdir = _run(tmp_path, "bad", {"seed": 1})
    path = os.path.join(tdir, "instruments.parquet")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(RunFormatError, match="instruments.parquet is corrupt"):
        load_run(tdir)
    tdir = _run(tmp_path, "cols", {"seed": 1})
    pd.read_parquet(os.path.join(tdir, "instruments.parquet")).drop(columns=["component"]).to_parquet(
        os.path.join(tdir, "instruments.parquet")
    )
    with pytest.raises(RunFormatError, match=r"instruments.parquet lacks columns \['component'\]"):
        load_run(tdir)
    tdir = _run(tmp_path, "steps", {"seed": 1})
    f = pd.read_parquet(os.path.join(tdir, "instruments.parquet"))
    f.loc[0, "step"] = 7
    f.to_parquet(os.path.join(tdir, "instruments.parquet"))
    with pytest.raises(RunFormatError, match=r"instruments.parquet.*step 7"):
        load_study([tdir], progress=False, options=Options(n_boot=0))


def test_synthetic_instruments_have_the_structure_the_study_describes(tmp_path):
    lora = load_run(_run(tmp_path, "lora", _cfg("lora", 2e-4, 1), instruments={**INSTR, "sample_per_category": None}))
    full = load_run(_run(tmp_path, "full", _cfg("full", 2e-4, 1), instruments={**INSTR, "sample_per_category": None}))
    for run in (lora, full):
        i, per = run.instruments, run.instrument_examples
        # the category summaries are the summaries of the per-example values
        cat = dict(zip(run.examples["example_id"], run.examples["category"]))
        per = per.assign(category=per["example_id"].map(cat))
        assert len(per[per["point"] == 0]) == N_TRAIN  # sample_per_category None: every train example
        got = i[i["quantity"] == "grad_norm_mean"].set_index(["point", "group"])["value"].sort_index()
        want = per.groupby(["point", "category"])["value"].mean().sort_index()
        _close(got.to_numpy(), want.to_numpy(), "grad_norm_mean")
        # the total update norm is the root of the modules' summed squares
        upd = i[i["quantity"] == "update_norm"].groupby("point")["value"].apply(lambda v: np.sqrt((v**2).sum()))
        _close(i[i["quantity"] == "update_norm_total"]["value"].to_numpy(), upd.to_numpy(), "update_norm_total")
        cka0 = i[(i["quantity"] == "cka") & (i["point"] == 0)]["value"]
        assert (cka0 == 1.0).all() and len(cka0) == 12

    def cos(run, point):
        i = run.instruments
        return i[(i["group"] == "clean~contested") & (i["point"] == point)]["value"].item()

    # LoRA's clean and contested gradients come apart over training; full fine-tuning's much less.
    assert cos(lora, 0) - cos(lora, len(STEPS) - 1) > 2 * (cos(full, 0) - cos(full, len(STEPS) - 1)) > 0
    last = lora.instruments[(lora.instruments["quantity"] == "grad_norm_mean") & (lora.instruments["point"] == 4)]
    norms = last.set_index("group")["value"]
    assert norms["contested"] > norms["clean"]
