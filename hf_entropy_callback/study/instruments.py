"""The report's tables of the tracker's opt-in instruments (issue 12; the study's analyses 12 and 13, and drift).

A run trained with instruments holds ``instruments.parquet`` (one row per value per tracking point:
``instrument``, ``quantity``, ``group``, ``component``, ``value``) and ``instrument_examples.parquet``
(per-example values), and its config's ``"instruments"`` says how they were measured (``loss`` the
gradients used, ``sample_per_category``, ``seed``, ``attention``); see `hf_entropy_callback.runs`.

- grad_alignment: cosine similarity of the aggregated gradients of two entropy categories
  (``group`` "clean~contested", "clean~ambiguous", "ambiguous~contested"), and each category's
  aggregated gradient norm (``group_grad_norm``);
- grad_norms: per-example gradient norms, summarised per category (``grad_norm_mean``,
  ``grad_norm_median``) and stored per example (``grad_norm``);
- drift: per layer attention entropy (nats) and linear CKA against the initial model
  (``component`` = layer), per module the weight-update norm, and their total.

Conventions (as `hf_entropy_callback.study.tables`)
---------------------------------------------------
- Functions named ``*_table`` take the ``runs`` table of `hf_entropy_callback.study.loading.load_study`
  and the study's instrument rows, and return one DataFrame with the fixed columns of the
  matching ``*_COLUMNS`` constant, in that order (empty, with those columns, when nothing applies).
- Excluded runs (diverged, incomplete history, duplicates) never enter a table.
- Runs are pooled over seeds within a condition *and* an instrument setting (``instrument_setting``,
  `instrument_setting`: for the gradient instruments the loss the gradients use and the sample size
  per category, for drift the sample size and the attention implementation): runs whose settings
  differ are never pooled (`instrument_notes` says where a condition has several).
- Across seeds: ``*_mean``, ``*_sd`` (ddof 1) and the 95% t interval of the mean,
  ``mean ± t(0.975, n - 1) * sd / sqrt(n)`` (``*_ci_low``, ``*_ci_high``; NaN with one run).
- The x axis of a curve is the tracking step with the training progress (step / the run's last
  step, `hf_entropy_callback.runs.Run.progress`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import stats

from hf_entropy_callback.entropy import CATEGORIES
from hf_entropy_callback.runs import RunFormatError

from .conditions import CONDITION_KEYS, method_label, order_conditions
from .tables import _seeds, _usable, category_means

__all__ = [
    "INSTRUMENT_KEYS",
    "ALIGNMENT_COLUMNS",
    "GRAD_NORM_COLUMNS",
    "GRAD_NORM_TEST_COLUMNS",
    "GRAD_NORM_TEST_SUMMARY_COLUMNS",
    "DRIFT_COLUMNS",
    "DRIFT_LAYER_COLUMNS",
    "DRIFT_DELTA_RUN_COLUMNS",
    "DRIFT_DELTA_COLUMNS",
    "DRIFT_MEASURES",
    "FAMILIES",
    "instrument_setting",
    "run_instruments",
    "instrument_notes",
    "alignment_table",
    "grad_norm_table",
    "grad_norm_test_table",
    "grad_norm_test_summary_table",
    "drift_table",
    "drift_layer_table",
    "drift_delta_runs_table",
    "drift_delta_table",
    "instrument_tables",
]

#: Columns that identify a group of pooled runs in every instrument table.
INSTRUMENT_KEYS = ["condition", *CONDITION_KEYS, "learning_rate", "instrument_setting"]
ALIGNMENT_COLUMNS = [
    *INSTRUMENT_KEYS,
    "pair",
    "step",
    "progress",
    "n_runs",
    "seeds",
    "cosine_mean",
    "cosine_sd",
    "cosine_ci_low",
    "cosine_ci_high",
]
GRAD_NORM_COLUMNS = [
    *INSTRUMENT_KEYS,
    "category",
    "step",
    "progress",
    "n_runs",
    "seeds",
    "grad_norm_mean",
    "grad_norm_sd",
    "grad_norm_ci_low",
    "grad_norm_ci_high",
    "grad_norm_median_mean",
    "grad_norm_median_sd",
]
GRAD_NORM_TEST_COLUMNS = [
    "run_id",
    *INSTRUMENT_KEYS,
    "seed",
    "step",
    "n_clean",
    "n_contested",
    "median_clean",
    "median_contested",
    "median_ratio",
    "U",
    "p_val",
    "cles",
]
GRAD_NORM_TEST_SUMMARY_COLUMNS = [
    *INSTRUMENT_KEYS,
    "n_runs",
    "seeds",
    "n_clean",
    "n_contested",
    "median_ratio_mean",
    "median_ratio_sd",
    "cles_mean",
    "cles_sd",
    "n_higher",
    "n_sig",
    "p_max",
]
#: The drift curves: the layer mean of attention entropy and CKA, and the total update norm.
DRIFT_QUANTITIES = ("attention_entropy", "cka", "update_norm_total")
DRIFT_COLUMNS = [
    *INSTRUMENT_KEYS,
    "quantity",
    "step",
    "progress",
    "n_runs",
    "seeds",
    "value_mean",
    "value_sd",
    "value_ci_low",
    "value_ci_high",
]
DRIFT_LAYER_COLUMNS = [
    *INSTRUMENT_KEYS,
    "quantity",
    "component",
    "step",
    "n_runs",
    "seeds",
    "final_mean",
    "final_sd",
    "change_mean",
    "change_sd",
]
#: A run's final drift, each related to its contested examples' Delta L.
DRIFT_MEASURES = {
    "update_norm_total": "total weight-update norm at the last point",
    "cka_drift": "1 − mean linear CKA over layers at the last point",
    "attention_entropy_change": "change of the layer-mean attention entropy, last − first point (nats)",
}
DRIFT_DELTA_RUN_COLUMNS = [
    "run_id",
    *INSTRUMENT_KEYS,
    "seed",
    "step",
    *DRIFT_MEASURES,
    "n_contested",
    "delta_loss_contested",
]
DRIFT_DELTA_COLUMNS = ["instrument_setting", "scope", "measure", "n_runs", "rho", "p_val"]
#: `instrument_setting` of a run with instrument data but no ``"instruments"`` entry in its config.
NOT_RECORDED = "not recorded"
#: The instruments that share a setting, and the column of ``Study.runs`` that holds it.
FAMILIES = {"gradients": ("grad_alignment", "grad_norms"), "drift": ("drift",)}
SETTING_COLUMNS = {"gradients": "gradient_setting", "drift": "drift_setting"}


def instrument_setting(config: Mapping[str, Any], family: str = "gradients") -> Optional[str]:
    """The settings of a run's instruments of one `family` that decide whether its values pool with another run's.

    "gradients" (grad_alignment, grad_norms): the loss the gradients use and the sample size per
    category; "drift": the sample size and the attention implementation (attention entropy needs the
    attention weights); from the config's ``"instruments"`` (None when the config has none). The
    sampling seed and the list of instruments are not part of it: like the training seed, the seed
    draws another sample of the same design, and an instrument a run lacks simply leaves it out of
    that instrument's tables.

    Examples
    --------
    >>> cfg = {"instruments": {"loss": "ce", "sample_per_category": 16, "attention": "eager"}}
    >>> instrument_setting(cfg), instrument_setting(cfg, "drift")
    ('loss ce · 16 per category', '16 per category · attention eager')
    >>> instrument_setting({"instruments": {"loss": "soft_kl", "sample_per_category": None}}, "drift")
    'all examples · attention not recorded'
    >>> instrument_setting({}) is None
    True
    """
    if family not in FAMILIES:
        raise ValueError(f"instrument_setting: family must be one of {list(FAMILIES)}, got {family!r}")
    s = config.get("instruments")
    if not isinstance(s, Mapping):
        return None
    if "sample_per_category" not in s:
        sample = "sample not recorded"
    elif s["sample_per_category"] is None:
        sample = "all examples"
    else:
        sample = f"{int(s['sample_per_category'])} per category"
    if family == "drift":
        return f"{sample} · attention {s.get('attention') or NOT_RECORDED}"
    return f"loss {s.get('loss') or NOT_RECORDED} · {sample}"


def run_instruments(run, run_id: str, train_set: str = "train") -> Tuple[Dict[str, Any], Dict[str, pd.DataFrame]]:
    """One run's instrument data, as `hf_entropy_callback.study.loading.summarize_run` keeps them.

    Returns
    -------
    row : dict
        Columns of the run's row in ``Study.runs``: ``instrument_names`` (the instruments with
        data, comma-separated; "" for none), ``gradient_setting`` and ``drift_setting``
        (`instrument_setting` of each family; "not recorded" when the run has data of the family but
        no config entry; None without its data),
        ``instrument_loss``, ``instrument_sample`` (``sample_per_category``; -1 for all examples, NaN
        when not recorded).
    tables : dict
        ``instruments``: the run's rows with ``run_id``, ``progress`` and ``epoch`` of their point;
        ``instrument_examples``: the per-example gradient norms of `train_set` at the last point that
        has them, with each example's ``category`` and ``entropy``. None where the run has none.
    """
    inst = getattr(run, "instruments", None)
    per_ex = getattr(run, "instrument_examples", None)
    inst = inst if inst is not None and len(inst) else None
    per_ex = per_ex if per_ex is not None and len(per_ex) else None
    names = sorted(
        (set(inst["instrument"].astype(str)) if inst is not None else set())
        | (set(per_ex["instrument"].astype(str)) if per_ex is not None else set())
    )
    cfg = (run.config or {}).get("instruments")
    cfg = cfg if isinstance(cfg, Mapping) else {}
    sample = cfg.get("sample_per_category", math.nan) if cfg else math.nan
    row = {
        "instrument_names": ",".join(names),
        **{
            SETTING_COLUMNS[family]: (instrument_setting(run.config, family) or NOT_RECORDED)
            if set(names) & set(members)
            else None
            for family, members in FAMILIES.items()
        },
        "instrument_loss": cfg.get("loss") if names else None,
        "instrument_sample": (-1.0 if sample is None else float(sample)) if names else math.nan,
    }
    progress = run.progress
    epochs = run.points["epoch"].to_numpy(np.float64)
    steps = run.steps
    tables: Dict[str, Optional[pd.DataFrame]] = {"instruments": None, "instrument_examples": None}
    for key, frame, name in ((0, inst, "instruments.parquet"), (1, per_ex, "instrument_examples.parquet")):
        if frame is None:
            continue
        pts = frame["point"].to_numpy()
        bad = (pts < 0) | (pts >= len(steps))
        if not bad.any():
            bad = steps[pts] != frame["step"].to_numpy()
        if bad.any():
            r = frame[bad].iloc[0]
            raise RunFormatError(
                f"{run.path}: {name}: point {r['point']} at step {r['step']} is not a tracking point of points.parquet"
            )
    if inst is not None:
        pts = inst["point"].to_numpy()
        tables["instruments"] = inst.assign(
            run_id=run_id,
            value=inst["value"].astype(np.float64),
            group=inst["group"].fillna("").astype(str),
            component=inst["component"].fillna("").astype(str),
            progress=progress[pts],
            epoch=epochs[pts],
        )
    if per_ex is not None:
        g = per_ex[(per_ex["quantity"] == "grad_norm") & (per_ex["set"] == train_set)]
        if len(g):
            g = g[g["point"] == g["point"].max()]
            ex = run.examples[run.examples["set"] == train_set][["example_id", "category", "entropy"]]
            g = g.merge(ex, on="example_id", how="left")
            if g["category"].isna().any():
                missing = g.loc[g["category"].isna(), "example_id"].iloc[0]
                raise RunFormatError(
                    f"{run.path}: instrument_examples.parquet: example {missing!r} is not a tracked "
                    f"{train_set!r} example of examples.parquet"
                )
            tables["instrument_examples"] = pd.DataFrame(
                {
                    "run_id": run_id,
                    "point": g["point"].to_numpy(),
                    "step": g["step"].to_numpy(),
                    "progress": progress[g["point"].to_numpy()],
                    "example_id": g["example_id"].to_numpy(),
                    "category": g["category"].to_numpy(),
                    "entropy": g["entropy"].to_numpy(np.float64),
                    "grad_norm": g["value"].to_numpy(np.float64),
                }
            )
    return row, tables


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _instrument_runs(runs: pd.DataFrame, family: str) -> pd.DataFrame:
    """The usable runs with data of the instrument `family`, with the key columns (a missing one as NaN) and
    the family's setting as ``instrument_setting``."""
    u = _usable(runs)
    col = SETTING_COLUMNS[family]
    if col not in u:
        return pd.DataFrame(columns=["run_id", "seed", *INSTRUMENT_KEYS])
    u = u[u[col].notna()]
    return u.assign(instrument_setting=u[col]).reindex(columns=["run_id", "seed", *INSTRUMENT_KEYS])


def _join(runs: pd.DataFrame, frame: pd.DataFrame, family: str) -> pd.DataFrame:
    """`frame`'s rows of usable runs with data of the instrument `family`, with their run's keys and seed."""
    if frame is None or frame.empty:
        return pd.DataFrame()
    return frame.merge(_instrument_runs(runs, family), on="run_id", how="inner")


def _t_interval(mean: pd.Series, sd: pd.Series, n: pd.Series) -> Tuple[np.ndarray, np.ndarray]:
    """The 95% t interval of a mean over `n` runs (NaN where n < 2)."""
    n = n.to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf(0.975, np.where(n >= 2, n - 1, np.nan)) * sd.to_numpy(np.float64) / np.sqrt(n)
    return mean.to_numpy(np.float64) - half, mean.to_numpy(np.float64) + half


def _over_seeds(frame: pd.DataFrame, by: Sequence[str], values: Mapping[str, bool]) -> pd.DataFrame:
    """Per group of `by`: ``n_runs``, ``seeds``, and for each value ``_mean``, ``_sd`` (and the t interval
    where `values` maps it to True). NaN keys (the rank of full fine-tuning) form groups of their own."""
    g = frame.groupby(list(by), dropna=False, sort=False)
    out = g.agg(n_runs=("run_id", "nunique"), seeds=("seed", _seeds))
    for v, ci in values.items():
        out[f"{v}_mean"] = g[v].mean()
        out[f"{v}_sd"] = g[v].std(ddof=1)
        if ci:
            # n: the runs with a value (a missing one, NaN, is left out as in the mean and sd)
            out[f"{v}_ci_low"], out[f"{v}_ci_high"] = _t_interval(out[f"{v}_mean"], out[f"{v}_sd"], g[v].count())
    return out.reset_index()


def _ordered(frame: pd.DataFrame, columns: Sequence[str], within: Sequence[str]) -> pd.DataFrame:
    """The report's condition order (`order_conditions`), then `within`, with the fixed `columns`."""
    if frame.empty:
        return pd.DataFrame(columns=list(columns))
    out = order_conditions(frame)
    out["_o"] = out.groupby(["condition", "instrument_setting"], sort=False, dropna=False).ngroup()
    out = out.sort_values(["_o", *within], kind="stable").drop(columns=["_o"])
    return out.reindex(columns=list(columns)).reset_index(drop=True)


def _rows(instruments: pd.DataFrame, instrument: str, quantities: Sequence[str]) -> pd.DataFrame:
    if instruments is None or instruments.empty:
        return pd.DataFrame()
    return instruments[(instruments["instrument"] == instrument) & instruments["quantity"].isin(quantities)]


def instrument_notes(runs: pd.DataFrame, family: str = "gradients") -> List[str]:
    """Where values of the instrument `family` are kept apart or missing: conditions whose usable runs have
    several settings of the family (each is its own group in its tables), and usable runs without the
    family's instruments when others have them.

    Examples
    --------
    >>> import pandas as pd
    >>> runs = pd.DataFrame({"run_id": list("abc"), "condition": "A", "excluded": False,
    ...                      "gradient_setting": ["loss ce · 8 per category", "loss ce · 16 per category", None]})
    >>> for note in instrument_notes(runs, "gradients"):
    ...     print(note)
    A: runs with 2 gradient instrument settings (loss ce · 16 per category; loss ce · 8 per category); their values are not pooled
    1 usable run(s) without gradient instruments (c) are not in their tables
    """
    u = _usable(runs)
    col = SETTING_COLUMNS[family]
    if col not in u:
        return []
    what = "gradient instrument" if family == "gradients" else "drift instrument"
    notes = []
    with_data = u[u[col].notna()]
    for cond, grp in with_data.groupby("condition", sort=False):
        settings = sorted(grp[col].unique())
        if len(settings) > 1:
            notes.append(
                f"{cond}: runs with {len(settings)} {what} settings ({'; '.join(settings)}); their values are not pooled"
            )
    without = u[u[col].isna()]
    if len(with_data) and len(without):
        shown = ", ".join(without["run_id"].astype(str).head(10)) + (", ..." if len(without) > 10 else "")
        notes.append(f"{len(without)} usable run(s) without {what}s ({shown}) are not in their tables")
    return notes


# --------------------------------------------------------------------------------------------
# Analysis 12: gradient alignment over training
# --------------------------------------------------------------------------------------------


def alignment_table(runs: pd.DataFrame, instruments: pd.DataFrame) -> pd.DataFrame:
    """Cosine similarity of the aggregated gradients of two entropy categories over training.

    Per condition, instrument setting, category pair and tracking step: mean, sd and 95% t interval
    over the seeds of the runs' cosines.

    Returns
    -------
    table : DataFrame
        `ALIGNMENT_COLUMNS`.

    Examples
    --------
    >>> import pandas as pd
    >>> runs = pd.DataFrame({"run_id": ["a", "b"], "condition": "A", "method": "lora", "seed": [1, 2],
    ...                      "excluded": False, "gradient_setting": "s"})
    >>> inst = pd.DataFrame({"run_id": ["a", "a", "b", "b"], "instrument": "grad_alignment",
    ...                      "quantity": "cosine", "group": "clean~contested", "step": [0, 10, 0, 10],
    ...                      "progress": [0.0, 1.0, 0.0, 1.0], "value": [0.5, 0.1, 0.7, 0.3]})
    >>> alignment_table(runs, inst)[["pair", "step", "n_runs", "cosine_mean", "cosine_sd"]].round(3)
                  pair  step  n_runs  cosine_mean  cosine_sd
    0  clean~contested     0       2          0.6      0.141
    1  clean~contested    10       2          0.2      0.141
    """
    rows = _join(runs, _rows(instruments, "grad_alignment", ["cosine"]), "gradients")
    if rows.empty:
        return pd.DataFrame(columns=ALIGNMENT_COLUMNS)
    rows = rows.rename(columns={"group": "pair", "value": "cosine"})
    out = _over_seeds(rows, [*INSTRUMENT_KEYS, "pair", "step"], {"cosine": True})
    prog = rows.groupby([*INSTRUMENT_KEYS, "pair", "step"], dropna=False, sort=False)["progress"].mean()
    out = out.merge(prog.reset_index(), on=[*INSTRUMENT_KEYS, "pair", "step"], how="left")
    return _ordered(out, ALIGNMENT_COLUMNS, ["pair", "step"])


# --------------------------------------------------------------------------------------------
# Analysis 13: gradient norms by entropy category (the study's figure 4)
# --------------------------------------------------------------------------------------------


def grad_norm_table(runs: pd.DataFrame, instruments: pd.DataFrame) -> pd.DataFrame:
    """Per-example gradient norms by entropy category over training.

    Per run, category and step the tracker's mean (``grad_norm_mean``) and median
    (``grad_norm_median``) over the category's sampled examples; here their mean, sd (and, for the
    mean, the 95% t interval) over the seeds.

    Returns
    -------
    table : DataFrame
        `GRAD_NORM_COLUMNS`; ``grad_norm_*`` summarise the runs' category means,
        ``grad_norm_median_*`` their category medians.
    """
    rows = _rows(instruments, "grad_norms", ["grad_norm_mean", "grad_norm_median"])
    if rows.empty:
        return pd.DataFrame(columns=GRAD_NORM_COLUMNS)
    # Wide per run first (no missing keys there), then the run's condition keys.
    wide = rows.pivot_table(
        index=["run_id", "group", "step"], columns="quantity", values=["value", "progress"], aggfunc="first"
    )
    wide = pd.DataFrame(
        {
            "grad_norm": wide["value"].reindex(columns=["grad_norm_mean"]).iloc[:, 0],
            "grad_norm_median": wide["value"].reindex(columns=["grad_norm_median"]).iloc[:, 0],
            "progress": wide["progress"].max(axis=1),
        }
    ).reset_index()
    wide = _join(runs, wide.rename(columns={"group": "category"}), "gradients")
    if wide.empty:
        return pd.DataFrame(columns=GRAD_NORM_COLUMNS)
    by = [*INSTRUMENT_KEYS, "category", "step"]
    out = _over_seeds(wide, by, {"grad_norm": True, "grad_norm_median": False})
    prog = wide.groupby(by, dropna=False, sort=False)["progress"].mean().reset_index()
    out = out.merge(prog, on=by, how="left")
    out["_c"] = out["category"].map({c: i for i, c in enumerate(CATEGORIES)}).fillna(len(CATEGORIES))
    return _ordered(out, GRAD_NORM_COLUMNS, ["_c", "step"])


def grad_norm_test_table(runs: pd.DataFrame, instrument_examples: pd.DataFrame) -> pd.DataFrame:
    """Per run: are the contested examples' gradient norms larger than the clean ones'? (figure 4's comparison)

    At the last tracking point with per-example gradient norms, the two-sided Mann–Whitney U test
    (`scipy.stats.mannwhitneyu`) of the contested against the clean examples' norms; ``U`` is the
    contested sample's statistic and ``cles = U / (n_contested * n_clean)`` the common-language
    effect size, the probability that a contested example's norm exceeds a clean one's (ties count
    half; 0.5: no difference). ``median_ratio``: median contested / median clean.

    Returns
    -------
    table : DataFrame
        `GRAD_NORM_TEST_COLUMNS`, one row per run with norms of both categories.
    """
    ex = _join(runs, instrument_examples, "gradients")
    if ex.empty:
        return pd.DataFrame(columns=GRAD_NORM_TEST_COLUMNS)
    rows = []
    for run_id, g in ex.groupby("run_id", sort=False):
        clean = g.loc[g["category"] == "clean", "grad_norm"].to_numpy(np.float64)
        contested = g.loc[g["category"] == "contested", "grad_norm"].to_numpy(np.float64)
        clean, contested = clean[np.isfinite(clean)], contested[np.isfinite(contested)]
        if not len(clean) or not len(contested):
            continue
        res = stats.mannwhitneyu(contested, clean, alternative="two-sided")
        med_clean, med_cont = float(np.median(clean)), float(np.median(contested))
        rows.append(
            {
                **g.iloc[0][["run_id", *INSTRUMENT_KEYS, "seed", "step"]].to_dict(),
                "n_clean": len(clean),
                "n_contested": len(contested),
                "median_clean": med_clean,
                "median_contested": med_cont,
                "median_ratio": med_cont / med_clean if med_clean > 0 else math.nan,
                "U": float(res.statistic),
                "p_val": float(res.pvalue),
                "cles": float(res.statistic) / (len(clean) * len(contested)),
            }
        )
    if not rows:
        return pd.DataFrame(columns=GRAD_NORM_TEST_COLUMNS)
    out = pd.DataFrame(rows)
    return _ordered(out, GRAD_NORM_TEST_COLUMNS, ["seed", "run_id"])


def grad_norm_test_summary_table(per_run: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per condition and instrument setting, the runs of `grad_norm_test_table` together.

    ``cles`` and ``median_ratio``: mean ± sd over seeds; ``n_higher``: runs whose contested norms
    tend higher (cles > 0.5); ``n_sig``: runs with p < `alpha`; ``p_max``: the largest p over the
    seeds (as for rho: the difference is claimed for a condition only when every seed shows it).
    ``n_clean`` / ``n_contested``: examples per run (mean).

    Returns
    -------
    table : DataFrame
        `GRAD_NORM_TEST_SUMMARY_COLUMNS`.
    """
    if per_run.empty:
        return pd.DataFrame(columns=GRAD_NORM_TEST_SUMMARY_COLUMNS)
    d = per_run.assign(_higher=(per_run["cles"] > 0.5).astype(int), _sig=(per_run["p_val"] < alpha).astype(int))
    out = _over_seeds(d, INSTRUMENT_KEYS, {"median_ratio": False, "cles": False})
    g = d.groupby(INSTRUMENT_KEYS, dropna=False, sort=False)
    extra = g.agg(
        n_clean=("n_clean", "mean"),
        n_contested=("n_contested", "mean"),
        n_higher=("_higher", "sum"),
        n_sig=("_sig", "sum"),
        p_max=("p_val", "max"),
    ).reset_index()
    out = out.merge(extra, on=INSTRUMENT_KEYS, how="left")
    return _ordered(out, GRAD_NORM_TEST_SUMMARY_COLUMNS, [])


# --------------------------------------------------------------------------------------------
# Drift over training, and drift vs the contested examples' Delta L
# --------------------------------------------------------------------------------------------


def _drift_per_run(runs: pd.DataFrame, instruments: pd.DataFrame) -> pd.DataFrame:
    """Per run, quantity (`DRIFT_QUANTITIES`) and step: the layer mean (attention entropy, CKA) or the total."""
    rows = _rows(instruments, "drift", DRIFT_QUANTITIES)
    if rows.empty:
        return pd.DataFrame()
    # Reduced per run first (its rows have no missing keys), then the run's condition keys attached.
    per = rows.groupby(["run_id", "quantity", "step"], sort=False)
    return _join(runs, per.agg(value=("value", "mean"), progress=("progress", "mean")).reset_index(), "drift")


def drift_table(runs: pd.DataFrame, instruments: pd.DataFrame) -> pd.DataFrame:
    """Drift over training per condition (so per method and learning rate) and instrument setting.

    Quantities: ``attention_entropy`` and ``cka`` (per run the mean over layers), and
    ``update_norm_total``; mean, sd and 95% t interval over seeds at each step.

    Returns
    -------
    table : DataFrame
        `DRIFT_COLUMNS`.
    """
    per_run = _drift_per_run(runs, instruments)
    if per_run.empty:
        return pd.DataFrame(columns=DRIFT_COLUMNS)
    by = [*INSTRUMENT_KEYS, "quantity", "step"]
    out = _over_seeds(per_run, by, {"value": True})
    prog = per_run.groupby(by, dropna=False, sort=False)["progress"].mean().reset_index()
    out = out.merge(prog, on=by, how="left")
    out["_q"] = out["quantity"].map({q: i for i, q in enumerate(DRIFT_QUANTITIES)})
    return _ordered(out, DRIFT_COLUMNS, ["_q", "step"])


def drift_layer_table(runs: pd.DataFrame, instruments: pd.DataFrame) -> pd.DataFrame:
    """Drift per layer (attention entropy, CKA) and per module (update norm) at each run's last point.

    ``final``: the value at the run's last instrument point; ``change``: that minus the value at its
    first; mean ± sd over seeds. Layers in numeric order, modules by name.

    Returns
    -------
    table : DataFrame
        `DRIFT_LAYER_COLUMNS`.
    """
    rows = _rows(instruments, "drift", ["attention_entropy", "cka", "update_norm"])
    if rows.empty:
        return pd.DataFrame(columns=DRIFT_LAYER_COLUMNS)
    g = rows.sort_values("step", kind="stable").groupby(["run_id", "quantity", "component"], sort=False)
    per = g.agg(step=("step", "last"), final=("value", "last"), first=("value", "first")).reset_index()
    per = _join(runs, per, "drift")
    if per.empty:
        return pd.DataFrame(columns=DRIFT_LAYER_COLUMNS)
    per["change"] = per["final"] - per["first"]
    out = _over_seeds(per, [*INSTRUMENT_KEYS, "quantity", "component"], {"final": False, "change": False})
    step = per.groupby([*INSTRUMENT_KEYS, "quantity", "component"], dropna=False, sort=False)["step"].max()
    out = out.merge(step.reset_index(), on=[*INSTRUMENT_KEYS, "quantity", "component"], how="left")
    comp = out["component"].astype(str)
    out["_q"] = out["quantity"].map({"attention_entropy": 0, "cka": 1, "update_norm": 2})
    out["_n"] = pd.to_numeric(comp, errors="coerce").fillna(np.inf)
    out["_s"] = comp
    return _ordered(out, DRIFT_LAYER_COLUMNS, ["_q", "_n", "_s"])


def drift_delta_runs_table(runs: pd.DataFrame, instruments: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """Per run: its final drift (`DRIFT_MEASURES`) beside its contested examples' mean Delta L.

    Delta L per example as in the study (loss at the last tracking point minus at the first;
    `hf_entropy_callback.study.tables.category_means`), averaged over the run's contested train
    examples. Drift at the run's last instrument point: ``update_norm_total``; ``cka_drift`` = 1 −
    the layer-mean CKA; ``attention_entropy_change`` = the layer-mean attention entropy at the last
    minus at the first point. A measure the run did not record is NaN.

    Returns
    -------
    table : DataFrame
        `DRIFT_DELTA_RUN_COLUMNS`, runs with drift data and contested examples.
    """
    per_run = _drift_per_run(runs, instruments)
    if per_run.empty or examples is None or examples.empty:
        return pd.DataFrame(columns=DRIFT_DELTA_RUN_COLUMNS)
    per_run = per_run.sort_values("step", kind="stable")
    g = per_run.groupby(["run_id", "quantity"], sort=False)
    ends = g.agg(first=("value", "first"), last=("value", "last"), step=("step", "last")).reset_index()
    last = ends.pivot(index="run_id", columns="quantity", values="last").reindex(columns=list(DRIFT_QUANTITIES))
    first = ends.pivot(index="run_id", columns="quantity", values="first").reindex(columns=list(DRIFT_QUANTITIES))
    measures = pd.DataFrame(
        {
            "update_norm_total": last["update_norm_total"],
            "cka_drift": 1.0 - last["cka"],
            "attention_entropy_change": last["attention_entropy"] - first["attention_entropy"],
            "step": ends.groupby("run_id", sort=False)["step"].max(),
        }
    )
    cm = category_means(examples[examples["run_id"].isin(measures.index)])
    cm = cm[cm["category"] == "contested"].set_index("run_id")
    measures["n_contested"] = cm["n"]
    measures["delta_loss_contested"] = cm["delta_loss"]
    measures = measures.dropna(subset=["delta_loss_contested"]).reset_index().rename(columns={"index": "run_id"})
    if measures.empty:
        return pd.DataFrame(columns=DRIFT_DELTA_RUN_COLUMNS)
    out = measures.merge(_instrument_runs(runs, "drift"), on="run_id", how="inner")
    return _ordered(out, DRIFT_DELTA_RUN_COLUMNS, ["seed", "run_id"])


def drift_delta_table(per_run: pd.DataFrame) -> pd.DataFrame:
    """Spearman rho (`scipy.stats.spearmanr`, two-sided p) over runs of each final drift measure against
    the contested examples' mean Delta L, within each instrument setting: over all runs, and within
    each method (LoRA of every rank, IA3, full FT), since methods differ in both drift and Delta L.

    Runs whose measure is NaN are left out; rho needs three runs (NaN below, or when a side is
    constant).

    Returns
    -------
    table : DataFrame
        `DRIFT_DELTA_COLUMNS`.
    """
    if per_run.empty:
        return pd.DataFrame(columns=DRIFT_DELTA_COLUMNS)
    rows = []
    for setting, grp in per_run.groupby("instrument_setting", sort=True, dropna=False):
        scopes = [("all runs", grp)]
        order = {"lora": 0, "ia3": 1, "full": 2}
        for method in sorted(grp["method"].dropna().unique(), key=lambda m: (order.get(m, 3), m)):
            scopes.append((method_label(method, math.nan), grp[grp["method"] == method]))
        for scope, d in scopes:
            for measure in DRIFT_MEASURES:
                ok = d[[measure, "delta_loss_contested"]].dropna()
                rho = p = math.nan
                if len(ok) >= 3:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # constant input: scipy's NaN is the answer
                        res = stats.spearmanr(ok[measure], ok["delta_loss_contested"])
                    rho, p = float(res.statistic), float(res.pvalue)
                rows.append(
                    {
                        "instrument_setting": setting,
                        "scope": scope,
                        "measure": measure,
                        "n_runs": len(ok),
                        "rho": rho,
                        "p_val": p,
                    }
                )
    return pd.DataFrame(rows, columns=DRIFT_DELTA_COLUMNS)


# --------------------------------------------------------------------------------------------
# All of them
# --------------------------------------------------------------------------------------------


def instrument_tables(study) -> Dict[str, pd.DataFrame]:
    """The instrument tables of a study (`hf_entropy_callback.study.loading.Study`), by report name.

    Only the tables an instrument of some usable run feeds are present (none without instruments):
    ``grad_alignment``; ``grad_norms``, ``grad_norm_tests``, ``grad_norm_test_summary`` (the last two
    need per-example norms); ``drift``, ``drift_layers``, ``drift_delta_runs``, ``drift_delta``.
    """
    runs = study.runs
    inst = getattr(study, "instruments", None)
    per_ex = getattr(study, "instrument_examples", None)
    out: Dict[str, pd.DataFrame] = {}
    if inst is None or inst.empty:
        return out
    t = alignment_table(runs, inst)
    if not t.empty:
        out["grad_alignment"] = t
    t = grad_norm_table(runs, inst)
    if not t.empty:
        out["grad_norms"] = t
    tests = grad_norm_test_table(runs, per_ex) if per_ex is not None and not per_ex.empty else pd.DataFrame()
    if not tests.empty:
        out["grad_norm_tests"] = tests
        out["grad_norm_test_summary"] = grad_norm_test_summary_table(tests)
    t = drift_table(runs, inst)
    if not t.empty:
        out["drift"] = t
        out["drift_layers"] = drift_layer_table(runs, inst)
        per_run = drift_delta_runs_table(runs, inst, study.examples)
        if not per_run.empty:
            out["drift_delta_runs"] = per_run
            out["drift_delta"] = drift_delta_table(per_run)
    return out
