"""The study's tables, as tidy DataFrames, built from the ``runs`` and ``examples`` tables of
`analysis.loading.load_study`.

Conventions
-----------
- ``runs``: one row per run with ``run_id``, ``condition`` and its keys (model, architecture,
  method, rank, dataset, variant, composition, label_noise, loss), ``seed``, ``diverged``, and
  the run's Spearman ``rho`` / ``p_val`` / ``n`` and Kendall ``tau`` of entropy vs AULC.
- ``examples``: one row per (run, tracked example) from `hf_entropy_callback.dynamics.example_dynamics`
  plus ``run_id``.
- Excluded runs never enter an aggregate; they stay visible in `per_seed_table`. A run is excluded
  when ``excluded`` is True (diverged, or an incomplete history: see `analysis.loading`); frames
  without that column fall back to ``diverged``.
- Across seeds: ``*_mean`` and ``*_sd`` (sample sd, ddof = 1; NaN with a single run).

Combining seeds into one p-value per condition
----------------------------------------------
A condition's p-value is the **largest p-value among its seeds** (an intersection-union test:
"entropy correlates with AULC" is declared for a condition only if it holds in every seed; this is
a valid level-alpha test whatever the dependence between seeds). Seeds of one condition share
their tracked examples, so their tests are not independent and Fisher's or Stouffer's combination,
which assume independence, would overstate the evidence. Bonferroni and Benjamini–Hochberg are
then applied over the conditions that have a p-value (`pingouin.multicomp`). `per_seed_table`
also corrects every run's own p-value over all runs.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import pingouin as pg
from scipy import stats

from hf_entropy_callback.entropy import CATEGORIES, quartile_bins, tercile_bins

from .conditions import CONDITION_KEYS, order_conditions

ALPHA = 0.05
#: Settings that must agree between a variant run and the run it is compared with.
MATCH_KEYS = ("model", "architecture", "method", "rank", "dataset", "composition", "label_noise", "loss")
CATEGORY_ORDER = {c: i for i, c in enumerate(CATEGORIES + ("all",))}


def _present(frame: pd.DataFrame, keys: Iterable[str]) -> list:
    return [k for k in keys if k in frame.columns]


def _excluded(runs: pd.DataFrame) -> pd.Series:
    """Which runs stay out of aggregates: ``excluded`` where present, else ``diverged``, else none."""
    for col in ("excluded", "diverged"):
        if col in runs:
            return runs[col].astype(bool)
    return pd.Series(False, index=runs.index)


def _usable(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[~_excluded(runs)]


def _seeds(seeds: pd.Series) -> str:
    vals = sorted(int(s) for s in pd.to_numeric(seeds, errors="coerce").dropna())
    return ", ".join(map(str, vals)) if vals else "—"


def _category_sort(frame: pd.DataFrame, keys: Sequence[str] = ("condition",)) -> pd.DataFrame:
    """Order rows by condition (see `order_conditions`), then by category (clean, ambiguous, contested, all)."""
    if frame.empty:
        return frame.reset_index(drop=True)
    ordered = order_conditions(frame)
    # Keep the condition order just fixed (group number), sort categories within each group.
    ordered["_o"] = ordered.groupby(list(keys), sort=False, dropna=False).ngroup()
    ordered["_c"] = ordered["category"].map(CATEGORY_ORDER).fillna(len(CATEGORY_ORDER))
    return ordered.sort_values(["_o", "_c"], kind="stable").drop(columns=["_o", "_c"]).reset_index(drop=True)


def _condition_keys(runs: pd.DataFrame) -> pd.DataFrame:
    cols = ["condition", *_present(runs, CONDITION_KEYS)]
    return runs[cols].drop_duplicates("condition")


def mean_sd(frame: pd.DataFrame, by: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Mean and sample sd (ddof = 1) of `values` per group of `by`, with the number of rows ``n_runs``.

    NaN keys (e.g. the rank of a full fine-tuning run) form groups of their own; the sd of a
    single row is NaN.

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import mean_sd
    >>> df = pd.DataFrame({"condition": ["A", "A", "A", "B"], "rho": [0.1, 0.2, 0.3, 0.25]})
    >>> mean_sd(df, ["condition"], ["rho"]).round(3)
      condition  n_runs  rho_mean  rho_sd
    0         A       3      0.20     0.1
    1         B       1      0.25     NaN
    """
    g = frame.groupby(list(by), dropna=False, sort=False)
    out = g.size().rename("n_runs").to_frame()
    for v in values:
        out[f"{v}_mean"] = g[v].mean()
        out[f"{v}_sd"] = g[v].std(ddof=1)
    return out.reset_index()


def _corrected(p: np.ndarray, method: str) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    if not np.isfinite(p).any():
        return np.full(p.shape, np.nan)
    return pg.multicomp(p, method=method)[1]


# --------------------------------------------------------------------------------------------
# Analysis 2: Spearman rho(entropy, AULC) per condition and per seed
# --------------------------------------------------------------------------------------------


def rho_by_condition(runs: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """Spearman rho(entropy, AULC) per condition: mean ± sd across seeds, combined and corrected p-values.

    Parameters
    ----------
    runs : DataFrame
        One row per run with ``condition``, ``seed``, ``rho``, ``p_val``, ``n`` and optionally
        ``diverged`` and the condition keys.
    alpha : float
        Significance level for the ``n_sig_seeds``, ``sig_bonf`` and ``sig_bh`` columns.

    Returns
    -------
    table : DataFrame
        One row per condition: keys, ``n_runs`` (usable), ``n_diverged``, ``n_incomplete`` (runs
        with an incomplete history, when the runs have ``history_complete``), ``seeds``,
        ``n_examples`` (median tracked examples per run), ``rho_mean``, ``rho_sd``, ``rho_min``,
        ``rho_max``, ``n_sig_seeds`` (seeds with p < alpha), ``p_max`` (the condition's p: the
        largest seed p-value, see the module docstring), ``p_bonf`` and ``p_bh`` (``p_max``
        corrected over conditions), ``sig_bonf``, ``sig_bh``.

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import rho_by_condition
    >>> runs = pd.DataFrame({"condition": ["A", "A", "A", "B", "C"], "seed": [1, 2, 3, 1, 1],
    ...                      "rho": [0.1, 0.2, 0.3, 0.25, 0.05], "n": 100,
    ...                      "p_val": [0.001, 0.01, 0.002, 0.04, 0.03]})
    >>> t = rho_by_condition(runs)
    >>> t[["condition", "n_runs", "rho_mean", "rho_sd", "p_max", "p_bonf", "p_bh"]].round(3)
      condition  n_runs  rho_mean  rho_sd  p_max  p_bonf  p_bh
    0         A       3      0.20     0.1   0.01    0.03  0.03
    1         B       1      0.25     NaN   0.04    0.12  0.04
    2         C       1      0.05     NaN   0.03    0.09  0.04
    """
    keys = _present(runs, CONDITION_KEYS)
    diverged = runs["diverged"].astype(bool) if "diverged" in runs else pd.Series(False, index=runs.index)
    excluded = _excluded(runs)
    incomplete = ~runs["history_complete"].astype(bool) if "history_complete" in runs else None
    rows = []
    for cond, grp in runs.groupby("condition", sort=False):
        ok = grp[~excluded.loc[grp.index]]
        p = ok["p_val"].astype(float)
        extra = {} if incomplete is None else {"n_incomplete": int((incomplete.loc[grp.index] & ~diverged.loc[grp.index]).sum())}
        rows.append(
            {
                "condition": cond,
                **{k: grp[k].iloc[0] for k in keys},
                "n_runs": len(ok),
                "n_diverged": int(diverged.loc[grp.index].sum()),
                **extra,
                "seeds": _seeds(ok["seed"]) if "seed" in ok else "—",
                "n_examples": float(ok["n"].median()) if len(ok) else np.nan,
                "rho_mean": ok["rho"].mean(),
                "rho_sd": ok["rho"].std(ddof=1),
                "rho_min": ok["rho"].min(),
                "rho_max": ok["rho"].max(),
                "n_sig_seeds": int((p < alpha).sum()),
                # Intersection-union: the condition is only as significant as its weakest seed; a seed
                # without a p-value (constant input) leaves the condition without one.
                "p_max": p.max() if len(p) and p.notna().all() else np.nan,
            }
        )
    out = pd.DataFrame(rows)
    out["p_bonf"] = _corrected(out["p_max"], "bonf")
    out["p_bh"] = _corrected(out["p_max"], "fdr_bh")
    out["sig_bonf"] = out["p_bonf"] < alpha
    out["sig_bh"] = out["p_bh"] < alpha
    return order_conditions(out)


def per_seed_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-run breakdown: rho, p-value (raw and corrected over all usable runs), tau, validation accuracy, status.

    Diverged runs are listed with ``status`` "diverged" and their rho over the examples whose
    losses stayed finite; runs with an incomplete history with ``status`` "incomplete history"
    (a ``status`` column of `runs` is kept); excluded runs get no corrected p-value (they are not
    part of the family), and ``exclusion`` says why when `runs` has it.

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import per_seed_table
    >>> runs = pd.DataFrame({"run_id": ["a", "b", "c"], "condition": "A", "seed": [1, 2, 3],
    ...                      "rho": [0.2, 0.3, 0.1], "p_val": [0.01, 0.02, 0.5], "n": 100,
    ...                      "diverged": [False, False, True]})
    >>> per_seed_table(runs)[["run_id", "status", "p_bonf", "p_bh"]]
      run_id    status  p_bonf  p_bh
    0      a        ok    0.02  0.02
    1      b        ok    0.04  0.02
    2      c  diverged     NaN   NaN
    """
    out = runs.copy()
    excluded = _excluded(out)
    if "status" not in out:
        out["status"] = np.where(excluded, "diverged", "ok")
    for col, method in (("p_bonf", "bonf"), ("p_bh", "fdr_bh")):
        out[col] = np.nan
        out.loc[~excluded, col] = _corrected(out.loc[~excluded, "p_val"], method)
    cols = ["run_id", "condition", *_present(out, CONDITION_KEYS), "seed", "status", "n", "rho", "p_val", "p_bonf",
            "p_bh", "tau", "validation_accuracy", "final_step", "n_nonfinite", "first_nonfinite_step",
            "max_mean_loss", "exclusion"]
    out = out[_present(out, cols)]
    return order_conditions(out.sort_values(["seed"] if "seed" in out else [], kind="stable"))


# --------------------------------------------------------------------------------------------
# Analysis 3: Delta L and AULC per entropy category
# --------------------------------------------------------------------------------------------


def category_means(examples: pd.DataFrame) -> pd.DataFrame:
    """Per run and entropy category (and "all"): n, mean Delta L, mean AULC, share with Delta L > 0.

    Examples whose AULC is NaN are left out.

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import category_means
    >>> ex = pd.DataFrame({"run_id": "r", "category": ["clean", "clean", "contested"],
    ...                    "delta_loss": [-1.0, -0.5, 0.4], "aulc": [0.2, 0.4, 1.5]})
    >>> category_means(ex).round(3)
      run_id   category  n  delta_loss  aulc  unlearning_share
    0      r      clean  2      -0.750   0.3             0.000
    1      r  contested  1       0.400   1.5             1.000
    2      r        all  3      -0.367   0.7             0.333
    """
    ex = examples[np.isfinite(examples["aulc"].to_numpy(float))]
    ex = ex.assign(_unlearned=(ex["delta_loss"] > 0).astype(float))
    both = pd.concat([ex, ex.assign(category="all")], ignore_index=True)
    g = both.groupby(["run_id", "category"], sort=False)
    out = g.agg(n=("aulc", "size"), delta_loss=("delta_loss", "mean"), aulc=("aulc", "mean"),
                unlearning_share=("_unlearned", "mean")).reset_index()
    out["_c"] = out["category"].map(CATEGORY_ORDER).fillna(99)
    out["_r"] = out.groupby("run_id", sort=False).ngroup()
    return out.sort_values(["_r", "_c"]).drop(columns=["_c", "_r"]).reset_index(drop=True)


def delta_loss_table(runs: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """Mean Delta L (and AULC, share of un-learned examples) per condition and entropy category.

    Per run, the mean over its examples of the category; then mean ± sd of those run means
    across the condition's seeds. Delta L > 0 means the loss rose over training (un-learning).

    Returns
    -------
    table : DataFrame
        ``condition``, keys, ``category`` (clean, ambiguous, contested, all), ``n_runs``,
        ``n_examples`` (per run, mean), ``delta_loss_mean``, ``delta_loss_sd``, ``aulc_mean``,
        ``aulc_sd``, ``unlearning_share_mean``.

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import delta_loss_table
    >>> runs = pd.DataFrame({"run_id": ["a", "b"], "condition": "A", "diverged": False})
    >>> ex = pd.DataFrame({"run_id": ["a", "a", "b", "b"], "category": ["clean", "contested"] * 2,
    ...                    "delta_loss": [-1.0, 0.5, -0.6, 0.3], "aulc": [0.3, 1.2, 0.4, 1.1]})
    >>> t = delta_loss_table(runs, ex)
    >>> t[["category", "n_runs", "delta_loss_mean", "delta_loss_sd"]].round(3)
        category  n_runs  delta_loss_mean  delta_loss_sd
    0      clean       2             -0.8          0.283
    1  contested       2              0.4          0.141
    2        all       2             -0.2          0.071
    """
    cm = category_means(examples).merge(_usable(runs)[["run_id", "condition"]], on="run_id")
    out = mean_sd(cm, ["condition", "category"], ["delta_loss", "aulc", "unlearning_share"])
    out = out.drop(columns=["unlearning_share_sd"])
    n_ex = cm.groupby(["condition", "category"], sort=False)["n"].mean().rename("n_examples").reset_index()
    out = out.merge(n_ex, on=["condition", "category"]).merge(_condition_keys(runs), on="condition")
    cols = ["condition", *_present(runs, CONDITION_KEYS), "category", "n_runs", "n_examples", "delta_loss_mean",
            "delta_loss_sd", "aulc_mean", "aulc_sd", "unlearning_share_mean"]
    return _category_sort(out[cols])


# --------------------------------------------------------------------------------------------
# Analyses 5 and 16: rank sweep, decoders vs encoders
# --------------------------------------------------------------------------------------------


def rank_sweep(runs: pd.DataFrame) -> pd.DataFrame:
    """rho per LoRA rank for every model x dataset with at least two ranks (main setting), with full FT beside.

    Returns
    -------
    table : DataFrame
        ``model``, ``architecture``, ``dataset``, ``method`` ("lora" rows by rank, then the
        "full" row with rank NaN when the model has a full fine-tuning run), ``rank``,
        ``n_runs``, ``seeds``, ``rho_mean``, ``rho_sd``.

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import rank_sweep
    >>> runs = pd.DataFrame({"model": "m", "architecture": "encoder", "dataset": "snli", "variant": "base",
    ...                      "method": ["lora", "lora", "lora", "full"], "rank": [4, 16, 16, None],
    ...                      "seed": [1, 1, 2, 1], "rho": [0.1, 0.3, 0.2, 0.05], "diverged": False})
    >>> rank_sweep(runs)[["method", "rank", "n_runs", "rho_mean"]]
      method  rank  n_runs  rho_mean
    0   lora   4.0       1      0.10
    1   lora  16.0       2      0.25
    2   full   NaN       1      0.05
    """
    u = _usable(runs)
    u = u[u["variant"] == "base"] if "variant" in u else u
    keys = ["model", "architecture", "dataset"]
    lora = u[(u["method"] == "lora") & u["rank"].notna()]
    n_ranks = lora.groupby(keys)["rank"].nunique()
    swept = n_ranks[n_ranks >= 2].index
    if len(swept) == 0:
        return pd.DataFrame(columns=[*keys, "method", "rank", "n_runs", "seeds", "rho_mean", "rho_sd"])
    sel = u.set_index(keys).index.isin(swept) & u["method"].isin(["lora", "full"])
    part = u[sel]
    out = mean_sd(part, [*keys, "method", "rank"], ["rho"])
    seeds = part.groupby([*keys, "method", "rank"], dropna=False)["seed"].apply(_seeds).rename("seeds")
    out = out.merge(seeds.reset_index(), on=[*keys, "method", "rank"])
    out = out[[*keys, "method", "rank", "n_runs", "seeds", "rho_mean", "rho_sd"]]
    return order_conditions(out)


def rank_trend(sweep: pd.DataFrame) -> pd.DataFrame:
    """Spearman correlation of LoRA rank with rho, per model x dataset of a `rank_sweep` table.

    The correlation is taken over the per-rank mean rho (one point per rank: seeds are
    replicates, not extra ranks); its p-value is scipy's exact / asymptotic Spearman p. It needs
    at least three ranks (two points always give +-1). ``monotonic`` is True when the mean rho
    strictly increases with rank; ``rho_full`` is the full fine-tuning mean rho for comparison.

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import rank_trend
    >>> sweep = pd.DataFrame({"model": "m", "architecture": "encoder", "dataset": "snli",
    ...                       "method": ["lora"] * 4 + ["full"], "rank": [4, 8, 16, 32, None],
    ...                       "rho_mean": [0.1, 0.2, 0.15, 0.3, 0.05]})
    >>> t = rank_trend(sweep)
    >>> t[["n_ranks", "spearman_r", "monotonic", "rho_full"]]
       n_ranks  spearman_r  monotonic  rho_full
    0        4         0.8      False      0.05
    """
    rows = []
    for (model, arch, dataset), grp in sweep.groupby(["model", "architecture", "dataset"], sort=False):
        lora = grp[grp["method"] == "lora"].sort_values("rank")
        full = grp[grp["method"] == "full"]["rho_mean"]
        r, p = np.nan, np.nan
        if len(lora) >= 3:
            res = stats.spearmanr(lora["rank"], lora["rho_mean"])
            r, p = float(res.statistic), float(res.pvalue)
        rows.append(
            {
                "model": model,
                "architecture": arch,
                "dataset": dataset,
                "ranks": ", ".join(str(int(k)) for k in lora["rank"]),
                "n_ranks": len(lora),
                "spearman_r": r,
                "p_val": p,
                "monotonic": bool(np.all(np.diff(lora["rho_mean"].to_numpy()) > 0)),
                "rho_lowest_rank": lora["rho_mean"].iloc[0] if len(lora) else np.nan,
                "rho_highest_rank": lora["rho_mean"].iloc[-1] if len(lora) else np.nan,
                "rho_full": full.iloc[0] if len(full) else np.nan,
            }
        )
    return pd.DataFrame(rows)


def architecture_table(runs: pd.DataFrame) -> pd.DataFrame:
    """rho of decoders vs encoders at each LoRA rank (main setting), pooled over models and seeds.

    Returns one row per dataset x rank x architecture: ``models``, ``n_models``, ``n_runs``,
    ``rho_mean``, ``rho_sd`` (sd over all runs, so between-model and between-seed spread together).

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import architecture_table
    >>> runs = pd.DataFrame({"model": ["e1", "e2", "d1"], "architecture": ["encoder", "encoder", "decoder"],
    ...                      "dataset": "snli", "variant": "base", "method": "lora", "rank": 8,
    ...                      "rho": [0.1, 0.2, 0.4], "diverged": False})
    >>> architecture_table(runs)[["architecture", "n_models", "rho_mean"]].round(2)
      architecture  n_models  rho_mean
    0      decoder         1      0.40
    1      encoder         2      0.15
    """
    u = _usable(runs)
    u = u[(u["method"] == "lora") & u["rank"].notna() & (u["variant"] == "base")]
    if u.empty:
        return pd.DataFrame(columns=["dataset", "rank", "architecture", "models", "n_models", "n_runs", "rho_mean",
                                     "rho_sd"])
    keys = ["dataset", "rank", "architecture"]
    out = mean_sd(u, keys, ["rho"])
    models = u.groupby(keys)["model"].agg(lambda m: ", ".join(sorted(set(m)))).rename("models")
    out = out.merge(models.reset_index(), on=keys)
    out["n_models"] = out["models"].str.count(", ") + 1
    out = out[[*keys, "models", "n_models", "n_runs", "rho_mean", "rho_sd"]]
    return out.sort_values(keys).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Analysis 6: partial correlation and multiple regression
# --------------------------------------------------------------------------------------------


def _finite(frame: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    return frame[np.isfinite(frame[list(cols)].to_numpy(float)).all(axis=1)]


def _run_meta(runs: pd.DataFrame) -> pd.DataFrame:
    return _usable(runs)[["run_id", "condition", *_present(runs, CONDITION_KEYS), *_present(runs, ["seed"])]]


def partial_correlation(runs: pd.DataFrame, examples: pd.DataFrame, covar: str = "token_length") -> pd.DataFrame:
    """Spearman partial correlation of entropy and AULC controlling for `covar`, per run (pingouin.partial_corr).

    Returns
    -------
    table : DataFrame
        Per usable run: keys, ``seed``, ``n``, ``rho`` (plain Spearman), ``partial_r``, ``ci_low``,
        ``ci_high``, ``p_val``. NaN when the covariate is constant in the run.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from analysis.tables import partial_correlation
    >>> rng = np.random.default_rng(0)
    >>> length = rng.integers(5, 50, 200)
    >>> h = rng.uniform(0, 1, 200)
    >>> ex = pd.DataFrame({"run_id": "r", "entropy": h, "token_length": length,
    ...                    "aulc": h + 0.05 * length + rng.normal(0, 0.3, 200)})
    >>> runs = pd.DataFrame({"run_id": ["r"], "condition": ["A"], "rho": [0.5], "diverged": [False]})
    >>> t = partial_correlation(runs, ex)
    >>> bool(t.partial_r.iloc[0] > 0.5), int(t.n.iloc[0])
    (True, 200)
    """
    meta = _run_meta(runs)
    rows = []
    for run_id, ex in examples.groupby("run_id", sort=False):
        d = _finite(ex, ["entropy", "aulc", covar])
        row = {"run_id": run_id, "n": len(d), "partial_r": np.nan, "ci_low": np.nan, "ci_high": np.nan,
               "p_val": np.nan}
        if len(d) > 3 and d[covar].nunique() > 1:
            res = pg.partial_corr(data=d, x="entropy", y="aulc", covar=covar, method="spearman")
            row.update(partial_r=float(res["r"].iloc[0]), p_val=float(res["p_val"].iloc[0]))
            row["ci_low"], row["ci_high"] = (float(v) for v in res["CI95"].iloc[0])
        rows.append(row)
    out = meta.merge(pd.DataFrame(rows), on="run_id")
    if "rho" in runs:
        out = out.merge(runs[["run_id", "rho"]], on="run_id")
    return order_conditions(out)


def _design(d: pd.DataFrame, label_names: Optional[Sequence[str]]) -> pd.DataFrame:
    """entropy, token_length and the gold label dummy-coded against the lowest label present.

    A column that adds nothing to the rank of the design (with the intercept) is left out, in
    that order of priority: e.g. a constant token length, or one that the label determines.
    """
    cols = {"entropy": d["entropy"].astype(float), "token_length": d["token_length"].astype(float)}
    labels = sorted(int(v) for v in d["label"].unique())
    for lab in labels[1:]:
        name = label_names[lab] if label_names is not None and lab < len(label_names) else str(lab)
        cols[f"label={name}"] = (d["label"] == lab).astype(float)
    kept, X = {}, np.ones((len(d), 1))
    for name, col in cols.items():
        trial = np.column_stack([X, col.to_numpy()])
        if np.linalg.matrix_rank(trial) == trial.shape[1]:
            kept[name], X = col, trial
    return pd.DataFrame(kept, index=d.index)


def regression(runs: pd.DataFrame, examples: pd.DataFrame, label_names: Optional[Sequence[str]] = None):
    """Multiple regression AULC ~ entropy + token_length + gold label (dummy-coded), per run (pingouin.linear_regression).

    The reference class of the label dummies is the lowest label id present (entailment for NLI).
    ``beta`` is the standardised coefficient, ``coef * sd(x) / sd(AULC)``. A term collinear with
    the ones before it (entropy, token_length, then the labels) is left out of that run's model.

    Returns
    -------
    table : DataFrame
        Per usable run and term: keys, ``seed``, ``term``, ``coef``, ``se``, ``T``, ``p_val``,
        ``ci_low``, ``ci_high``, ``beta``, ``r2``, ``adj_r2``, ``n``.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from analysis.tables import regression
    >>> rng = np.random.default_rng(0)
    >>> ex = pd.DataFrame({"run_id": "r", "entropy": rng.uniform(0, 1, 90),
    ...                    "token_length": rng.integers(5, 40, 90), "label": np.arange(90) % 3})
    >>> ex["aulc"] = 2 * ex.entropy + 0.01 * ex.token_length + 0.5 * (ex.label == 2)
    >>> runs = pd.DataFrame({"run_id": ["r"], "condition": ["A"], "diverged": [False]})
    >>> regression(runs, ex)[["term", "coef"]].round(3).replace(-0.0, 0.0)  # a rounding zero without its sign
               term  coef
    0     Intercept  0.00
    1       entropy  2.00
    2  token_length  0.01
    3       label=1  0.00
    4       label=2  0.50
    """
    meta = _run_meta(runs)
    frames = []
    for run_id, ex in examples.groupby("run_id", sort=False):
        d = _finite(ex, ["entropy", "aulc", "token_length"])
        X = _design(d, label_names)
        if len(d) <= X.shape[1] + 1:
            continue
        res = pg.linear_regression(X, d["aulc"].astype(float))
        sd_x = X.std(ddof=1)
        beta = [np.nan if name == "Intercept" else coef * sd_x[name] / d["aulc"].std(ddof=1)
                for name, coef in zip(res["names"], res["coef"])]
        frames.append(
            pd.DataFrame(
                {"run_id": run_id, "term": res["names"], "coef": res["coef"], "se": res["se"], "T": res["T"],
                 "p_val": res["pval"], "ci_low": res["CI2.5"], "ci_high": res["CI97.5"], "beta": beta,
                 "r2": res["r2"], "adj_r2": res["adj_r2"], "n": len(d)}
            )
        )
    if not frames:
        return pd.DataFrame(columns=["run_id", "term", "coef"])
    return meta.merge(pd.concat(frames, ignore_index=True), on="run_id", sort=False)


def summarize_terms(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per condition and regression term: mean ± sd of the coefficient across seeds, mean beta and R^2, max p.

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import summarize_terms
    >>> reg = pd.DataFrame({"condition": "A", "term": ["entropy", "entropy"], "coef": [1.0, 2.0],
    ...                     "beta": [0.3, 0.5], "p_val": [0.01, 0.02], "r2": [0.2, 0.4]})
    >>> summarize_terms(reg)[["term", "n_runs", "coef_mean", "beta_mean", "p_max", "r2_mean"]]
          term  n_runs  coef_mean  beta_mean  p_max  r2_mean
    0  entropy       2        1.5        0.4   0.02      0.3
    """
    if per_run.empty:
        return per_run
    out = mean_sd(per_run, ["condition", "term"], ["coef"])
    g = per_run.groupby(["condition", "term"], sort=False)
    extra = g.agg(beta_mean=("beta", "mean"), p_max=("p_val", "max"), r2_mean=("r2", "mean")).reset_index()
    out = out.merge(extra, on=["condition", "term"])
    keys = per_run[["condition", *_present(per_run, CONDITION_KEYS)]].drop_duplicates("condition")
    out = out.merge(keys, on="condition")
    cols = ["condition", *_present(per_run, CONDITION_KEYS), "term", "n_runs", "coef_mean", "coef_sd", "beta_mean",
            "p_max", "r2_mean"]
    ordered = order_conditions(out[cols])
    ordered["_t"] = ordered.groupby("condition", sort=False).ngroup()
    return ordered.sort_values("_t", kind="stable").drop(columns="_t").reset_index(drop=True)


def summarize_partial(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per condition: plain rho and partial rho (mean ± sd across seeds) and the largest partial p-value.

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import summarize_partial
    >>> pc = pd.DataFrame({"condition": "A", "rho": [0.3, 0.4], "partial_r": [0.25, 0.35], "p_val": [0.01, 0.03]})
    >>> summarize_partial(pc)[["condition", "n_runs", "rho_mean", "partial_r_mean", "p_max"]]
      condition  n_runs  rho_mean  partial_r_mean  p_max
    0         A       2      0.35             0.3   0.03
    """
    if per_run.empty:
        return per_run
    out = mean_sd(per_run, ["condition"], ["rho", "partial_r"]).drop(columns=["rho_sd"])
    p = per_run.groupby("condition", sort=False)["p_val"].max().rename("p_max").reset_index()
    out = out.merge(p, on="condition")
    keys = per_run[["condition", *_present(per_run, CONDITION_KEYS)]].drop_duplicates("condition")
    return order_conditions(out.merge(keys, on="condition"))


# --------------------------------------------------------------------------------------------
# Analysis 9: Kendall tau-b alongside Spearman
# --------------------------------------------------------------------------------------------


def kendall_vs_spearman(runs: pd.DataFrame):
    """Kendall tau-b against Spearman rho (entropy vs AULC) for every usable run, and their summary.

    Returns
    -------
    per_run : DataFrame
        ``run_id``, ``condition``, ``seed``, ``rho``, ``tau``, ``ratio`` (tau / rho; NaN when rho = 0),
        ``same_sign``.
    summary : DataFrame
        One row: ``n_runs``, ``ratio_mean``, ``ratio_median``, ``ratio_min``, ``ratio_max``,
        ``n_same_sign``, ``sign_concordance`` (share of runs where tau and rho share their sign).

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import kendall_vs_spearman
    >>> runs = pd.DataFrame({"run_id": ["a", "b"], "condition": "A", "rho": [0.3, -0.1], "tau": [0.2, 0.05]})
    >>> per_run, summary = kendall_vs_spearman(runs)
    >>> per_run.ratio.round(3).tolist(), summary.sign_concordance.item()
    ([0.667, -0.5], 0.5)
    """
    u = _usable(runs)
    cols = ["run_id", "condition", *_present(u, CONDITION_KEYS), *_present(u, ["seed"]), "rho", "tau"]
    per_run = u[cols].copy()
    rho, tau = per_run["rho"].to_numpy(float), per_run["tau"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_run["ratio"] = np.where(rho != 0, tau / rho, np.nan)
    per_run["same_sign"] = np.sign(rho) == np.sign(tau)
    ok = np.isfinite(rho) & np.isfinite(tau)
    ratio = per_run["ratio"][ok]
    summary = pd.DataFrame(
        [
            {
                "n_runs": int(ok.sum()),
                "ratio_mean": ratio.mean(),
                "ratio_median": ratio.median(),
                "ratio_min": ratio.min(),
                "ratio_max": ratio.max(),
                "n_same_sign": int(per_run["same_sign"][ok].sum()),
                "sign_concordance": per_run["same_sign"][ok].mean() if ok.any() else np.nan,
            }
        ]
    )
    return order_conditions(per_run), summary


# --------------------------------------------------------------------------------------------
# Analyses 7, 10, 11: a variant against its matching baseline (composition, noise, soft labels)
# --------------------------------------------------------------------------------------------


def variant_comparison(runs: pd.DataFrame, examples: pd.DataFrame, vary: str, baseline) -> pd.DataFrame:
    """Compare runs whose setting `vary` differs from `baseline` with the runs that match them in every other setting.

    For every group of runs equal in all of `MATCH_KEYS` except `vary` that holds at least one
    variant run, each level of `vary` (the baseline first) gets per category the mean ± sd
    across seeds of the per-run mean Delta L and AULC, and the run-level rho.

    Parameters
    ----------
    runs, examples : DataFrame
        From `load_study`.
    vary : str
        "composition", "label_noise" or "loss".
    baseline
        The baseline level: "all", 0.0 or "ce".

    Returns
    -------
    table : DataFrame
        The other match keys, `vary`, ``is_baseline``, ``category``, ``n_runs``, ``seeds``,
        ``n_examples``, ``delta_loss_mean``, ``delta_loss_sd``, ``aulc_mean``, ``aulc_sd``,
        ``rho_mean``, ``rho_sd``. Empty when no run differs from the baseline. A group without
        baseline runs has only its variant rows.

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import variant_comparison
    >>> runs = pd.DataFrame({"run_id": ["a", "b"], "model": "m", "method": "lora", "rank": 8,
    ...                      "dataset": "snli", "loss": ["ce", "soft_kl"], "seed": 1,
    ...                      "rho": [0.3, 0.1], "diverged": False})
    >>> ex = pd.DataFrame({"run_id": ["a", "a", "b", "b"], "category": ["clean", "contested"] * 2,
    ...                    "delta_loss": [-1.0, 0.5, -0.9, -0.2], "aulc": [0.3, 1.2, 0.4, 0.8]})
    >>> t = variant_comparison(runs, ex, "loss", "ce")
    >>> t[t.category == "contested"][["loss", "is_baseline", "delta_loss_mean", "rho_mean"]]
          loss  is_baseline  delta_loss_mean  rho_mean
    1       ce         True              0.5       0.3
    4  soft_kl        False             -0.2       0.1
    """
    u = _usable(runs)
    others = [k for k in _present(u, MATCH_KEYS) if k != vary]
    variants = u[u[vary] != baseline]
    if variants.empty:
        return pd.DataFrame()
    cm = category_means(examples[examples["run_id"].isin(u["run_id"])])
    cm = cm.merge(u[["run_id", *others, vary, "rho", *_present(u, ["seed"])]], on="run_id")
    wanted = variants[others].drop_duplicates()
    # NaN-safe matching on the other keys (rank is NaN for full fine-tuning and IA3).
    key = lambda f: pd.Series(list(zip(*(f[k].astype(str) for k in others))), index=f.index)  # noqa: E731
    cm = cm[key(cm).isin(set(key(wanted)))]
    by = [*others, vary, "category"]
    out = mean_sd(cm, by, ["delta_loss", "aulc", "rho"])
    g = cm.groupby(by, dropna=False, sort=False)
    extra = g["n"].mean().rename("n_examples").to_frame()
    extra["seeds"] = g["seed"].agg(_seeds) if "seed" in cm else "—"
    out = out.merge(extra.reset_index(), on=by)
    out["is_baseline"] = out[vary] == baseline
    cols = [*others, vary, "is_baseline", "category", "n_runs", "seeds", "n_examples", "delta_loss_mean",
            "delta_loss_sd", "aulc_mean", "aulc_sd", "rho_mean", "rho_sd"]
    out = out[cols].assign(_b=~out["is_baseline"], _c=out["category"].map(CATEGORY_ORDER),
                           _v=out[vary].astype(str))
    out = out.sort_values([*others, "_b", "_v", "_c"], kind="stable")
    return out.drop(columns=["_b", "_c", "_v"]).reset_index(drop=True)


def composition_comparison(runs: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """Training-set composition variants (low / high / balanced) against the matching "all" runs (see `variant_comparison`)."""
    return variant_comparison(runs, examples, "composition", "all") if "composition" in runs else pd.DataFrame()


def soft_label_comparison(runs: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """Soft-label (e.g. "soft_kl") runs against the matching hard-label ("ce") runs (see `variant_comparison`)."""
    return variant_comparison(runs, examples, "loss", "ce") if "loss" in runs else pd.DataFrame()


def noise_levels(runs: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """rho and mean Delta L per label-noise level, with the noise-free runs that match (see `variant_comparison`)."""
    return variant_comparison(runs, examples, "label_noise", 0.0) if "label_noise" in runs else pd.DataFrame()


def noise_tests(runs: pd.DataFrame, examples: pd.DataFrame, subsets: bool = True) -> pd.DataFrame:
    """Paired tests of per-example AULC between each noisy run and its noise-free twin.

    The twin is the usable run with ``label_noise`` 0 that equals the noisy run in every other
    setting, the seed included. Examples are paired by ``example_id`` (those tracked in both runs
    with finite AULC). Per pair and subset ("all"; with `subsets` also "noised" — the examples
    whose label the noise replaced — and "not noised"): the Wilcoxon signed-rank test
    (pingouin.wilcoxon, two-sided; zero differences dropped, continuity correction when scipy
    uses the normal approximation) and Cohen's d for paired samples (pingouin.compute_effsize,
    ``paired=True``: d_av, the mean difference over the square root of the average of the two
    variances). Positive d: higher AULC with noise.

    Returns
    -------
    table : DataFrame
        Match keys, ``seed``, ``label_noise``, ``run_id``, ``baseline_run_id``, ``subset``, ``n``,
        ``aulc_baseline_mean``, ``aulc_noisy_mean``, ``mean_diff``, ``W``, ``p_val``, ``rbc``,
        ``cohen_d``. Empty when no noisy run has a twin.
    """
    u = _usable(runs)
    if "label_noise" not in u or u.empty:
        return pd.DataFrame()
    others = [k for k in _present(u, MATCH_KEYS) if k != "label_noise"] + _present(u, ["seed"])
    noisy = u[u["label_noise"] > 0]
    clean = u[u["label_noise"] == 0]
    rows = []
    cols = ["example_id", "aulc", "noised"]
    for r in noisy.itertuples(index=False):
        r = r._asdict()
        match = clean
        for k in others:
            match = match[match[k].isna()] if pd.isna(r[k]) else match[match[k] == r[k]]
        if match.empty:
            continue
        base_id = match["run_id"].iloc[0]
        a = examples.loc[examples["run_id"] == base_id, cols]
        b = examples.loc[examples["run_id"] == r["run_id"], cols]
        pair = a.merge(b, on="example_id", suffixes=("_base", "_noisy"))
        pair = pair[np.isfinite(pair["aulc_base"]) & np.isfinite(pair["aulc_noisy"])]
        parts = [("all", pair)]
        if subsets:
            noised = pair["noised_noisy"].astype(bool)
            parts += [("noised", pair[noised]), ("not noised", pair[~noised])]
        for subset, d in parts:
            row = {**{k: r[k] for k in others}, "label_noise": r["label_noise"], "run_id": r["run_id"],
                   "baseline_run_id": base_id, "subset": subset, "n": len(d),
                   "aulc_baseline_mean": d["aulc_base"].mean(), "aulc_noisy_mean": d["aulc_noisy"].mean(),
                   "mean_diff": (d["aulc_noisy"] - d["aulc_base"]).mean(), "W": np.nan, "p_val": np.nan,
                   "rbc": np.nan, "cohen_d": np.nan}
            diff = d["aulc_noisy"].to_numpy() - d["aulc_base"].to_numpy()
            if len(d) >= 2 and np.any(diff != 0):
                w = pg.wilcoxon(d["aulc_noisy"].to_numpy(), d["aulc_base"].to_numpy())
                row.update(W=float(w["W_val"].iloc[0]), p_val=float(w["p_val"].iloc[0]), rbc=float(w["RBC"].iloc[0]))
                row["cohen_d"] = float(pg.compute_effsize(d["aulc_noisy"].to_numpy(), d["aulc_base"].to_numpy(),
                                                          paired=True, eftype="cohen"))
            rows.append(row)
    return order_conditions(pd.DataFrame(rows)) if rows else pd.DataFrame()


# --------------------------------------------------------------------------------------------
# Analysis 14: calibration; analysis 15: cartography
# --------------------------------------------------------------------------------------------


def calibration_table(runs: pd.DataFrame, calibration: pd.DataFrame) -> pd.DataFrame:
    """Calibration per condition, tracked set and entropy category at the final point, mean ± sd across seeds.

    Per run the numbers come from `hf_entropy_callback.dynamics.calibration` (mean entropy of the
    predicted distribution in nats, mean max-probability, ECE with 10 equal-width bins, accuracy).

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import calibration_table
    >>> runs = pd.DataFrame({"run_id": ["a", "b"], "condition": "A", "diverged": False})
    >>> cal = pd.DataFrame({"run_id": ["a", "b"], "set": "train", "category": "clean", "n": 10,
    ...                     "accuracy": [0.9, 0.8], "pred_entropy": [0.2, 0.4],
    ...                     "max_confidence": [0.9, 0.8], "ece": [0.05, 0.07]})
    >>> calibration_table(runs, cal)[["set", "category", "n_runs", "pred_entropy_mean", "ece_mean"]]
         set category  n_runs  pred_entropy_mean  ece_mean
    0  train    clean       2                0.3      0.06
    """
    if calibration.empty:
        return pd.DataFrame()
    cal = calibration.merge(_usable(runs)[["run_id", "condition"]], on="run_id")
    out = mean_sd(cal, ["condition", "set", "category"], ["pred_entropy", "max_confidence", "ece", "accuracy"])
    out = out.drop(columns=["accuracy_sd"])
    n = cal.groupby(["condition", "set", "category"], sort=False)["n"].mean().rename("n_examples").reset_index()
    out = out.merge(n, on=["condition", "set", "category"]).merge(_condition_keys(runs), on="condition")
    cols = ["condition", *_present(runs, CONDITION_KEYS), "set", "category", "n_runs", "n_examples",
            "pred_entropy_mean", "pred_entropy_sd", "max_confidence_mean", "max_confidence_sd", "ece_mean", "ece_sd",
            "accuracy_mean"]
    return _category_sort(out[cols], ["condition", "set"])


def _r2(X: pd.DataFrame, y: pd.Series) -> float:
    return float(pg.linear_regression(X, y, as_dataframe=False)["r2"])


def cartography_table(runs: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """Per run: Spearman of confidence vs AULC, and the incremental R^2 of entropy over confidence.

    Confidence is the Dataset-Cartography mean p(gold) over tracking points. Two OLS fits
    (pingouin.linear_regression): AULC ~ confidence (``r2_confidence``) and AULC ~ confidence +
    entropy (``r2_full``); ``delta_r2`` is their difference and ``p_delta`` the p-value of the
    nested-model F test, F = delta_r2 / ((1 - r2_full) / (n - 3)) with (1, n - 3) degrees of freedom.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from analysis.tables import cartography_table
    >>> rng = np.random.default_rng(0)
    >>> conf, h = rng.uniform(0.2, 0.9, 100), rng.uniform(0, 1, 100)
    >>> ex = pd.DataFrame({"run_id": "r", "confidence": conf, "entropy": h,
    ...                    "aulc": -np.log(conf) + 0.3 * h + rng.normal(0, 0.05, 100)})
    >>> runs = pd.DataFrame({"run_id": ["r"], "condition": ["A"], "diverged": [False]})
    >>> t = cartography_table(runs, ex)
    >>> bool(t.rho_conf_aulc.iloc[0] < -0.8), bool(t.delta_r2.iloc[0] > 0.05)
    (True, True)
    """
    meta = _run_meta(runs)
    rows = []
    for run_id, ex in examples.groupby("run_id", sort=False):
        d = _finite(ex, ["confidence", "aulc", "entropy"])
        row = {"run_id": run_id, "n": len(d), "rho_conf_aulc": np.nan, "p_conf_aulc": np.nan,
               "r2_confidence": np.nan, "r2_full": np.nan, "delta_r2": np.nan, "p_delta": np.nan}
        if len(d) > 4:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant input gives NaN, reported as such
                res = stats.spearmanr(d["confidence"], d["aulc"])
            y = d["aulc"].astype(float)
            r2c = _r2(d[["confidence"]].astype(float), y)
            r2f = _r2(d[["confidence", "entropy"]].astype(float), y)
            dof = len(d) - 3
            f = (r2f - r2c) / ((1.0 - r2f) / dof) if r2f < 1 else np.inf
            row.update(rho_conf_aulc=float(res.statistic), p_conf_aulc=float(res.pvalue), r2_confidence=r2c,
                       r2_full=r2f, delta_r2=r2f - r2c, p_delta=float(stats.f.sf(f, 1, dof)))
        rows.append(row)
    return order_conditions(meta.merge(pd.DataFrame(rows), on="run_id"))


def summarize_runs(per_run: pd.DataFrame, values: Sequence[str], p_cols: Sequence[str] = ()) -> pd.DataFrame:
    """Per condition: mean ± sd across seeds of `values` and the largest of each p-value column in `p_cols`.

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import summarize_runs
    >>> ct = pd.DataFrame({"condition": "A", "delta_r2": [0.01, 0.03], "p_delta": [0.2, 0.001]})
    >>> summarize_runs(ct, ["delta_r2"], ["p_delta"]).round(4)
      condition  n_runs  delta_r2_mean  delta_r2_sd  p_delta_max
    0         A       2           0.02       0.0141          0.2
    """
    if per_run.empty:
        return per_run
    out = mean_sd(per_run, ["condition"], values)
    for p in p_cols:
        out = out.merge(per_run.groupby("condition", sort=False)[p].max().rename(f"{p}_max").reset_index(),
                        on="condition")
    keys = per_run[["condition", *_present(per_run, CONDITION_KEYS)]].drop_duplicates("condition")
    out = out.merge(keys, on="condition")
    return order_conditions(out[["condition", *_present(per_run, CONDITION_KEYS), *[c for c in out if c not in keys]]])


# --------------------------------------------------------------------------------------------
# Analysis 8: mean AULC by fixed categories, quartile and tercile bins; analysis 4: entropy shares
# --------------------------------------------------------------------------------------------

BINNINGS = {"fixed": None, "quartile": quartile_bins, "tercile": tercile_bins}


def entropy_bins(entropy: np.ndarray, categories: np.ndarray, scheme: str) -> np.ndarray:
    """Bin labels of each example under a scheme: "fixed" (the category), "quartile" (Q1..Q4), "tercile" (T1..T3)."""
    if scheme == "fixed":
        return np.asarray(categories, dtype=object)
    prefix = {"quartile": "Q", "tercile": "T"}[scheme]
    return np.array([f"{prefix}{b + 1}" for b in BINNINGS[scheme](entropy)], dtype=object)


def binning_table(runs: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """Mean AULC per entropy bin (fixed categories, quartiles, terciles) per condition, with a monotonicity flag.

    Quantile bins are computed per run over its tracked examples (`hf_entropy_callback.entropy`:
    ties at an edge go to the lower bin, so a bin can be empty when many examples share H = 0).
    Per run the mean AULC of each bin, then mean ± sd across seeds. ``monotonic`` (per condition
    and scheme) is True when the mean AULC strictly increases from the lowest to the highest bin.

    Returns
    -------
    table : DataFrame
        ``condition``, keys, ``scheme``, ``bin``, ``bin_order``, ``n_runs``, ``n_examples``,
        ``entropy_min``, ``entropy_max``, ``aulc_mean``, ``aulc_sd``, ``monotonic``.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from analysis.tables import binning_table
    >>> h = np.linspace(0, 1, 12)
    >>> ex = pd.DataFrame({"run_id": "r", "entropy": h, "aulc": h,
    ...                    "category": np.where(h < 0.4, "clean", np.where(h <= 0.7, "ambiguous", "contested"))})
    >>> runs = pd.DataFrame({"run_id": ["r"], "condition": ["A"], "diverged": [False]})
    >>> t = binning_table(runs, ex)
    >>> t[t.scheme == "tercile"][["bin", "n_examples", "aulc_mean", "monotonic"]].round(3)
      bin  n_examples  aulc_mean  monotonic
    7  T1         4.0      0.136       True
    8  T2         4.0      0.500       True
    9  T3         4.0      0.864       True
    """
    u = _usable(runs)[["run_id", "condition"]]
    ex = _finite(examples[examples["run_id"].isin(u["run_id"])], ["entropy", "aulc"])
    if ex.empty:
        return pd.DataFrame()
    # Bin labels per run (quantiles are a run's own), then one groupby over all runs and schemes.
    parts = []
    for scheme in BINNINGS:
        labels = np.empty(len(ex), dtype=object)
        for idx in ex.groupby("run_id", sort=False).indices.values():
            labels[idx] = entropy_bins(ex["entropy"].to_numpy(float)[idx], ex["category"].to_numpy()[idx], scheme)
        parts.append(pd.DataFrame({"run_id": ex["run_id"].to_numpy(), "scheme": scheme, "bin": labels,
                                   "entropy": ex["entropy"].to_numpy(float), "aulc": ex["aulc"].to_numpy(float)}))
    long = pd.concat(parts, ignore_index=True)
    per_run = long.groupby(["run_id", "scheme", "bin"], sort=False).agg(
        n=("aulc", "size"), aulc=("aulc", "mean"), entropy_min=("entropy", "min"), entropy_max=("entropy", "max")
    ).reset_index().merge(u, on="run_id")
    by = ["condition", "scheme", "bin"]
    out = mean_sd(per_run, by, ["aulc"])
    extra = per_run.groupby(by, sort=False).agg(n_examples=("n", "mean"), entropy_min=("entropy_min", "min"),
                                                entropy_max=("entropy_max", "max")).reset_index()
    out = out.merge(extra, on=by)
    order = {**CATEGORY_ORDER, **{f"Q{i + 1}": i for i in range(4)}, **{f"T{i + 1}": i for i in range(3)}}
    out["bin_order"] = out["bin"].map(order)
    out["_s"] = out["scheme"].map({s: i for i, s in enumerate(BINNINGS)})
    out = out.sort_values(["condition", "_s", "bin_order"]).drop(columns="_s")
    mono = out.groupby(["condition", "scheme"], sort=False)["aulc_mean"].apply(
        lambda v: bool(np.all(np.diff(v.to_numpy()) > 0))
    )
    out = out.merge(mono.rename("monotonic").reset_index(), on=["condition", "scheme"])
    out = out.merge(_condition_keys(runs), on="condition")
    cols = ["condition", *_present(runs, CONDITION_KEYS), "scheme", "bin", "bin_order", "n_runs", "n_examples",
            "entropy_min", "entropy_max", "aulc_mean", "aulc_sd", "monotonic"]
    ordered = order_conditions(out[cols])
    ordered["_o"] = ordered.groupby("condition", sort=False).ngroup()
    ordered["_s"] = ordered["scheme"].map({s: i for i, s in enumerate(BINNINGS)})
    return ordered.sort_values(["_o", "_s", "bin_order"]).drop(columns=["_o", "_s"]).reset_index(drop=True)


def entropy_distribution(entropy: pd.DataFrame) -> pd.DataFrame:
    """Counts and shares of the entropy categories per dataset, over every tracked set (each example once).

    Examples
    --------
    >>> import pandas as pd
    >>> from analysis.tables import entropy_distribution
    >>> ent = pd.DataFrame({"dataset": "snli", "example_id": list("abcd"), "entropy": [0.1, 0.2, 0.5, 0.9],
    ...                     "category": ["clean", "clean", "ambiguous", "contested"]})
    >>> entropy_distribution(ent)[["category", "n", "share"]]
        category  n  share
    0      clean  2   0.50
    1  ambiguous  1   0.25
    2  contested  1   0.25
    3        all  4   1.00
    """
    rows = []
    for dataset, grp in entropy.drop_duplicates(["dataset", "example_id"]).groupby("dataset", sort=True):
        for cat in [c for c in CATEGORIES if (grp["category"] == c).any()] + ["all"]:
            sub = grp if cat == "all" else grp[grp["category"] == cat]
            rows.append({"dataset": dataset, "category": cat, "n": len(sub), "share": len(sub) / len(grp),
                         "entropy_mean": sub["entropy"].mean(), "entropy_min": sub["entropy"].min(),
                         "entropy_max": sub["entropy"].max()})
    return pd.DataFrame(rows)
