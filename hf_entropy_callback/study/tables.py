"""The study's tables, as tidy DataFrames, built from the ``runs`` and ``examples`` tables of
`hf_entropy_callback.study.loading.load_study`.

Conventions
-----------
- ``runs``: one row per run with ``run_id``, ``condition`` and its keys (model, architecture,
  method, rank, dataset, variant, composition, label_noise, loss), ``seed``, ``diverged``, and
  the run's Spearman ``rho`` / ``p_val`` / ``n`` and Kendall ``tau`` of entropy vs AULC.
- ``examples``: one row per (run, tracked example) from `hf_entropy_callback.dynamics.example_dynamics`
  plus ``run_id``.
- Excluded runs never enter an aggregate; they stay visible in `per_seed_table`. A run is excluded
  when ``excluded`` is True (diverged, or an incomplete history: see `hf_entropy_callback.study.loading`); frames
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

from hf_entropy_callback.agreement import METRICS as AGREEMENT_METRICS
from hf_entropy_callback.entropy import CATEGORIES, quartile_bins, tercile_bins
from hf_entropy_callback.inference import cohen_d, percentile_interval, spearman_permutation_test

from .conditions import (
    CONDITION_KEYS,
    KEY_COLUMNS,
    METHOD_SETTINGS,
    MODEL_SETTINGS,
    SHORT_NAMES,
    order_conditions,
    setting_families,
)

ALPHA = 0.05
#: Settings that must agree between a variant run and the run it is compared with: every key column
#: (`hf_entropy_callback.study.conditions.KEY_COLUMNS`) except the varied setting and what it determines (`VARIED_WITH`).
MATCH_KEYS = KEY_COLUMNS
#: What else a varied setting changes by construction: a composition selects other tracked examples;
#: the noise-drawing rule exists only with noise.
VARIED_WITH = {"composition": ("tracked_set",), "label_noise": ("noise_rule",), "loss": ()}
#: Correction families of the condition test.
FAMILIES = ("main", "all")
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
    >>> from hf_entropy_callback.study.tables import mean_sd
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


def condition_mean_interval(boot: dict, run_ids: Sequence[str]):
    """95% percentile interval of a condition's mean rho from its runs' bootstrap replicates.

    Replicate b of the mean is the mean over the condition's runs of their replicate b; the runs of
    one condition track the same examples and were resampled with the same seed after sorting by
    example id, so replicate b resamples the same examples in every seed (examples are the
    resampled unit; the spread across seeds is reported separately as the sd).

    >>> import numpy as np
    >>> lo, hi = condition_mean_interval({"a": np.arange(101.0), "b": np.arange(101.0) + 1}, ["a", "b"])
    >>> round(lo, 6), round(hi, 6)
    (3.0, 98.0)
    """
    reps = [np.asarray(boot[r], dtype=float) for r in run_ids if r in boot and len(boot[r])]
    if not reps or len({len(r) for r in reps}) != 1:
        return (np.nan, np.nan)
    return percentile_interval(np.mean(np.vstack(reps), axis=0))


def rho_by_condition(
    runs: pd.DataFrame, alpha: float = ALPHA, *, boot: Optional[dict] = None, family: str = "main"
) -> pd.DataFrame:
    """Spearman rho(entropy, AULC) per condition: mean ± sd across seeds, bootstrap CI, directional test.

    The claim is directional (rho > 0). A condition is significant when **every** seed's one-sided
    p-value (``p_greater``, alternative rho > 0) passes: its p-value ``p_max`` is the largest of
    them (intersection-union test, see the module docstring), so rho = +0.2, -0.2, +0.2 is never
    significant however small the two-sided p-values. ``p_max`` is corrected (Bonferroni, BH) over
    the conditions of the *family*: ``family="main"`` the study's main-matrix conditions present
    (``in_main_family``, see `hf_entropy_callback.study.conditions.is_main_matrix`), ``"all"`` every condition.
    Conditions outside the family keep ``p_max`` but get no corrected p.

    Parameters
    ----------
    runs : DataFrame
        One row per run with ``condition``, ``seed``, ``rho``, ``p_greater`` (or ``p_val`` as a
        stand-in when absent, with a note in ``test``), ``n``, optionally ``excluded`` /
        ``diverged``, ``in_main_family``, ``run_id`` and the condition keys.
    alpha : float
        Significance level.
    boot : dict, optional
        Bootstrap replicates of each run's rho by ``run_id`` (`Study.boot`) for ``rho_ci_low`` /
        ``rho_ci_high`` (`condition_mean_interval`).
    family : {"main", "all"}
        The correction family.

    Returns
    -------
    table : DataFrame
        One row per condition: keys, ``n_runs`` (usable), ``n_diverged``, ``n_incomplete``, ``n_not_learned``
        (usable runs whose ``learned`` is False; only when `runs` has ``learned``),
        ``seeds``, ``n_examples``, ``rho_mean``, ``rho_sd``, ``rho_ci_low``, ``rho_ci_high``,
        ``rho_min``, ``rho_max``, ``n_positive``, ``n_sig_seeds`` (seeds with one-sided p < alpha),
        ``p_max``, ``in_family``, ``p_bonf``, ``p_bh``, ``sig_bonf``, ``sig_bh``.

    Examples
    --------
    >>> import pandas as pd
    >>> from hf_entropy_callback.study.tables import rho_by_condition
    >>> runs = pd.DataFrame({"condition": ["A", "A", "A", "B", "C"], "seed": [1, 2, 3, 1, 1],
    ...                      "rho": [0.1, 0.2, 0.3, 0.25, 0.05], "n": 100,
    ...                      "p_greater": [0.001, 0.01, 0.002, 0.04, 0.03]})
    >>> t = rho_by_condition(runs, family="all")
    >>> t[["condition", "n_runs", "rho_mean", "rho_sd", "p_max", "p_bonf", "p_bh"]].round(3)
      condition  n_runs  rho_mean  rho_sd  p_max  p_bonf  p_bh
    0         A       3      0.20     0.1   0.01    0.03  0.03
    1         B       1      0.25     NaN   0.04    0.12  0.04
    2         C       1      0.05     NaN   0.03    0.09  0.04
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    keys = _present(runs, CONDITION_KEYS)
    diverged = runs["diverged"].astype(bool) if "diverged" in runs else pd.Series(False, index=runs.index)
    excluded = _excluded(runs)
    incomplete = ~runs["history_complete"].astype(bool) if "history_complete" in runs else None
    p_col = "p_greater" if "p_greater" in runs else "p_val"
    from .conditions import is_main_matrix

    main = runs["in_main_family"].astype(bool) if "in_main_family" in runs else is_main_matrix(runs)
    rows = []
    for cond, grp in runs.groupby("condition", sort=False):
        ok = grp[~excluded.loc[grp.index]]
        p = ok[p_col].astype(float)
        extra = (
            {}
            if incomplete is None
            else {"n_incomplete": int((incomplete.loc[grp.index] & ~diverged.loc[grp.index]).sum())}
        )
        lo, hi = (
            condition_mean_interval(boot, list(ok["run_id"]))
            if boot is not None and "run_id" in ok
            else (np.nan, np.nan)
        )
        rows.append(
            {
                "condition": cond,
                **{k: grp[k].iloc[0] for k in keys},
                "n_runs": len(ok),
                "n_diverged": int(diverged.loc[grp.index].sum()),
                **extra,
                **({"n_not_learned": int(ok["learned"].eq(False).sum())} if "learned" in ok else {}),
                "seeds": _seeds(ok["seed"]) if "seed" in ok else "—",
                "n_examples": float(ok["n"].median()) if len(ok) else np.nan,
                "rho_mean": ok["rho"].mean(),
                "rho_sd": ok["rho"].std(ddof=1),
                "rho_ci_low": lo,
                "rho_ci_high": hi,
                "rho_min": ok["rho"].min(),
                "rho_max": ok["rho"].max(),
                "n_positive": int((ok["rho"] > 0).sum()),
                "n_sig_seeds": int((p < alpha).sum()),
                # Intersection-union over the one-sided p-values: significant only if every seed is; a seed
                # without a p-value (constant input) leaves the condition without one.
                "p_max": p.max() if len(p) and p.notna().all() else np.nan,
                "in_family": bool(family == "all" or main.loc[grp.index].iloc[0]),
            }
        )
    out = pd.DataFrame(rows)
    fam = out["in_family"].to_numpy(bool)
    for col, method in (("p_bonf", "bonf"), ("p_bh", "fdr_bh")):
        out[col] = np.nan
        if fam.any():
            out.loc[fam, col] = _corrected(out.loc[fam, "p_max"], method)
    out["sig_bonf"] = out["p_bonf"] < alpha
    out["sig_bh"] = out["p_bh"] < alpha
    return order_conditions(out)


def per_seed_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-run breakdown: rho with its bootstrap CI, p-values (two-sided ``p_val``, one-sided ``p_greater``; the
    two-sided corrected over all usable runs), tau, validation accuracy, status.

    Diverged runs are listed with ``status`` "diverged" and their rho over the examples whose
    losses stayed finite; runs with an incomplete history with ``status`` "incomplete history"
    (a ``status`` column of `runs` is kept); excluded runs get no corrected p-value (they are not
    part of the family), and ``exclusion`` says why when `runs` has it.

    Examples
    --------
    >>> import pandas as pd
    >>> from hf_entropy_callback.study.tables import per_seed_table
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
    cols = [
        "run_id",
        "condition",
        *_present(out, CONDITION_KEYS),
        "seed",
        "status",
        "n",
        "rho",
        "rho_ci_low",
        "rho_ci_high",
        "p_val",
        "p_greater",
        "p_bonf",
        "p_bh",
        "tau",
        "validation_accuracy",
        "learned",
        "final_step",
        "tracked_set",
        "n_nonfinite",
        "first_nonfinite_step",
        "max_mean_loss",
        "duplicate_of",
        "exclusion",
    ]
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
    >>> from hf_entropy_callback.study.tables import category_means
    >>> ex = pd.DataFrame({"run_id": "r", "category": ["clean", "clean", "contested"],
    ...                    "delta_loss": [-1.0, -0.5, 0.4], "aulc": [0.2, 0.4, 1.5]})
    >>> category_means(ex).round(3)
      run_id   category  n  delta_loss  aulc  unlearning_share
    0      r      clean  2      -0.750   0.3             0.000
    1      r  contested  1       0.400   1.5             1.000
    2      r        all  3      -0.367   0.7             0.333
    """
    examples = examples[[c for c in ("run_id", "category", "delta_loss", "aulc") if c in examples]]
    ex = examples[np.isfinite(examples["aulc"].to_numpy(float))]
    ex = ex.assign(_unlearned=(ex["delta_loss"] > 0).astype(float))
    both = pd.concat([ex, ex.assign(category="all")], ignore_index=True)
    g = both.groupby(["run_id", "category"], sort=False)
    out = g.agg(
        n=("aulc", "size"),
        delta_loss=("delta_loss", "mean"),
        aulc=("aulc", "mean"),
        unlearning_share=("_unlearned", "mean"),
    ).reset_index()
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
    >>> from hf_entropy_callback.study.tables import delta_loss_table
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
    cols = [
        "condition",
        *_present(runs, CONDITION_KEYS),
        "category",
        "n_runs",
        "n_examples",
        "delta_loss_mean",
        "delta_loss_sd",
        "aulc_mean",
        "aulc_sd",
        "unlearning_share_mean",
    ]
    return _category_sort(out[cols])


# --------------------------------------------------------------------------------------------
# Analyses 5 and 16: rank sweep, decoders vs encoders
# --------------------------------------------------------------------------------------------


#: A rank sweep's lines: one per model x dataset x setting family.
RANK_KEYS = ["model", "architecture", "dataset"]


def _with_settings(frame: pd.DataFrame, cols: Sequence[str], after: str) -> list:
    """`cols` with ``settings`` after `after` when some row of `frame` names its setting family (so a
    report with one family per comparison keeps the table it always had)."""
    cols = list(cols)
    if "settings" in frame and (frame["settings"] != "").any():
        cols.insert(cols.index(after) + 1, "settings")
    return cols


def rank_families(runs: pd.DataFrame) -> pd.DataFrame:
    """The usable main-setting LoRA and full fine-tuning runs, split into the setting families of a rank sweep.

    A sweep line combines only runs that agree on every setting of the condition key but method, rank and
    what comes with them (`hf_entropy_callback.study.conditions.METHOD_SETTINGS`: LoRA alpha, dropout,
    target modules): runs at another bulk size, learning rate, number of epochs, data file, tracked set,
    ... are a line of their own (`hf_entropy_callback.study.conditions.setting_families`; ``settings``
    names what tells the lines of a model x dataset apart, e.g. "bulk=2000"). A full fine-tuning run goes
    with every LoRA line of its family.
    """
    u = _usable(runs)
    u = u[u["variant"] == "base"] if "variant" in u else u
    u = u[u["method"].isin(["lora", "full"])]
    return setting_families(u, METHOD_SETTINGS, within=_present(u, RANK_KEYS), point=("method", "rank"))


def rank_sweep(runs: pd.DataFrame) -> pd.DataFrame:
    """rho per LoRA rank for every model x dataset x setting family with at least two ranks (main setting),
    with full FT beside.

    Runs that differ in a setting other than method and rank (and LoRA alpha, dropout and target modules,
    which come with them) are never averaged together: each setting family is a sweep of its own
    (`rank_families`), and ``settings`` names the settings that tell the sweeps of a model x dataset apart
    (e.g. "bulk=2000"; the column is there only when some model x dataset has several).

    Returns
    -------
    table : DataFrame
        ``model``, ``architecture``, ``dataset``, [``settings``], ``method`` ("lora" rows by rank, then
        the "full" row with rank NaN when the family has a full fine-tuning run), ``rank``, ``n_runs``,
        ``seeds``, ``rho_mean``, ``rho_sd``.

    Examples
    --------
    >>> import pandas as pd
    >>> from hf_entropy_callback.study.tables import rank_sweep
    >>> runs = pd.DataFrame({"model": "m", "architecture": "encoder", "dataset": "snli", "variant": "base",
    ...                      "method": ["lora", "lora", "lora", "full"], "rank": [4, 16, 16, None],
    ...                      "seed": [1, 1, 2, 1], "rho": [0.1, 0.3, 0.2, 0.05], "diverged": False})
    >>> rank_sweep(runs)[["method", "rank", "n_runs", "rho_mean"]]
      method  rank  n_runs  rho_mean
    0   lora   4.0       1      0.10
    1   lora  16.0       2      0.25
    2   full   NaN       1      0.05
    >>> rank_sweep(runs.assign(bulk_size=[2000, 2000, 20000, 2000]))[["settings", "method", "rank", "rho_mean"]]
      settings method  rank  rho_mean
    0  bulk=2000   lora   4.0      0.10
    1  bulk=2000   lora  16.0      0.30
    2  bulk=2000   full   NaN      0.05
    """
    keys = RANK_KEYS
    fam = rank_families(runs)
    lora = fam[(fam["method"] == "lora") & fam["rank"].notna()]
    n_ranks = lora.groupby([*keys, "family"])["rank"].nunique()
    swept = n_ranks[n_ranks >= 2].index
    if len(swept) == 0:
        return pd.DataFrame(columns=[*keys, "method", "rank", "n_runs", "seeds", "rho_mean", "rho_sd"])
    part = fam[fam.set_index([*keys, "family"]).index.isin(swept)]
    by = [*keys, "settings", "family", "method", "rank"]
    out = mean_sd(part, by, ["rho"])
    seeds = part.groupby(by, dropna=False)["seed"].apply(_seeds).rename("seeds")
    out = out.merge(seeds.reset_index(), on=by)
    out = order_conditions(out)
    # Each family's rows together (the method and rank order within it kept).
    out = out.sort_values([*_present(out, ["dataset", "architecture", "model"]), "settings"], kind="stable")
    cols = _with_settings(out, [*keys, "method", "rank", "n_runs", "seeds", "rho_mean", "rho_sd"], "dataset")
    return out[cols].reset_index(drop=True)


def rank_trend(sweep: pd.DataFrame) -> pd.DataFrame:
    """Spearman correlation of LoRA rank with rho, per model x dataset (x setting family) of a `rank_sweep` table.

    The correlation is taken over the per-rank mean rho (one point per rank: seeds are
    replicates, not extra ranks). ``p_val`` is the **one-sided permutation p** for "rho grows with
    rank" (`hf_entropy_callback.inference.spearman_permutation_test`, alternative "greater"):
    exact, by enumerating all n! orderings, for up to 8 ranks (``p_method`` "exact"), else Monte
    Carlo with 100,000 seeded permutations. Six perfectly monotone ranks give 1/720 = 0.00139
    (two-sided it would be 2/720). It needs at least three ranks (two points always give +-1).
    ``monotonic`` is True when the mean rho strictly increases with rank; ``rho_full`` is the full
    fine-tuning mean rho for comparison. A sweep with a ``settings`` column is tested per setting
    family (the column is kept).

    Examples
    --------
    >>> import pandas as pd
    >>> from hf_entropy_callback.study.tables import rank_trend
    >>> sweep = pd.DataFrame({"model": "m", "architecture": "encoder", "dataset": "snli",
    ...                       "method": ["lora"] * 4 + ["full"], "rank": [4, 8, 16, 32, None],
    ...                       "rho_mean": [0.1, 0.2, 0.15, 0.3, 0.05]})
    >>> t = rank_trend(sweep)
    >>> t[["n_ranks", "spearman_r", "monotonic", "rho_full"]]
       n_ranks  spearman_r  monotonic  rho_full
    0        4         0.8      False      0.05
    """
    keys = [*RANK_KEYS, *_present(sweep, ["settings"])]
    rows = []
    for key, grp in sweep.groupby(keys, sort=False):
        lora = grp[grp["method"] == "lora"].sort_values("rank")
        full = grp[grp["method"] == "full"]["rho_mean"]
        r, p, method = np.nan, np.nan, ""
        if len(lora) >= 3:
            res = spearman_permutation_test(
                lora["rank"].to_numpy(float), lora["rho_mean"].to_numpy(float), alternative="greater"
            )
            r, p, method = float(res["rho"].iloc[0]), float(res["p_val"].iloc[0]), str(res["method"].iloc[0])
        rows.append(
            {
                **dict(zip(keys, key)),
                "ranks": ", ".join(str(int(k)) for k in lora["rank"]),
                "n_ranks": len(lora),
                "spearman_r": r,
                "p_val": p,
                "p_method": method,
                "monotonic": bool(np.all(np.diff(lora["rho_mean"].to_numpy()) > 0)),
                "rho_lowest_rank": lora["rho_mean"].iloc[0] if len(lora) else np.nan,
                "rho_highest_rank": lora["rho_mean"].iloc[-1] if len(lora) else np.nan,
                "rho_full": full.iloc[0] if len(full) else np.nan,
            }
        )
    return pd.DataFrame(rows)


def architecture_table(runs: pd.DataFrame) -> pd.DataFrame:
    """rho of decoders vs encoders at each LoRA rank (main setting), pooled over models and seeds.

    Pooled over the models of an architecture (their path and target modules differ by design), but only
    within a setting family: runs that differ in any other setting of the condition key (bulk size,
    learning rate, epochs, data files, tracked set, LoRA alpha, ...) are separate rows, and ``settings``
    names what tells the families at a dataset x rank apart (e.g. "bulk=2000"; the column is there only
    when some dataset x rank has several).

    Returns one row per dataset x rank x architecture [x setting family]: ``models``, ``n_models``,
    ``n_runs``, ``rho_mean``, ``rho_sd`` (sd over all runs, so between-model and between-seed spread
    together).

    Examples
    --------
    >>> import pandas as pd
    >>> from hf_entropy_callback.study.tables import architecture_table
    >>> runs = pd.DataFrame({"model": ["e1", "e2", "d1"], "architecture": ["encoder", "encoder", "decoder"],
    ...                      "dataset": "snli", "variant": "base", "method": "lora", "rank": 8,
    ...                      "rho": [0.1, 0.2, 0.4], "diverged": False})
    >>> architecture_table(runs)[["architecture", "n_models", "rho_mean"]].round(2)
      architecture  n_models  rho_mean
    0      decoder         1      0.40
    1      encoder         2      0.15
    >>> t = architecture_table(runs.assign(bulk_size=[20000, 2000, 20000]))
    >>> t[["architecture", "settings", "models", "rho_mean"]].round(2)
      architecture    settings models  rho_mean
    0      decoder  bulk=20000     d1       0.4
    1      encoder   bulk=2000     e2       0.2
    2      encoder  bulk=20000     e1       0.1
    """
    u = _usable(runs)
    u = u[(u["method"] == "lora") & u["rank"].notna() & (u["variant"] == "base")]
    if u.empty:
        return pd.DataFrame(
            columns=["dataset", "rank", "architecture", "models", "n_models", "n_runs", "rho_mean", "rho_sd"]
        )
    keys = ["dataset", "rank", "architecture"]
    fam = setting_families(u, MODEL_SETTINGS, within=["dataset", "rank"], point=("model", "architecture"))
    by = [*keys, "settings", "family"]
    out = mean_sd(fam, by, ["rho"])
    models = fam.groupby(by)["model"].agg(lambda m: ", ".join(sorted(set(m)))).rename("models")
    out = out.merge(models.reset_index(), on=by)
    out["n_models"] = out["models"].str.count(", ") + 1
    out = out.sort_values([*keys, "settings"])
    out = out[_with_settings(out, [*keys, "models", "n_models", "n_runs", "rho_mean", "rho_sd"], "architecture")]
    return out.reset_index(drop=True)


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
        ``ci_high`` (95% Fisher-z interval with n - 1 - 3 degrees of freedom, as pingouin's but not
        rounded), ``p_val``. NaN when the covariate is constant in the run.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from hf_entropy_callback.study.tables import partial_correlation
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
    # Only the columns used: grouping the whole examples table copies every column of every run.
    for run_id, ex in examples[["run_id", "entropy", "aulc", covar]].groupby("run_id", sort=False):
        d = _finite(ex, ["entropy", "aulc", covar])
        row = {"run_id": run_id, "n": len(d), "partial_r": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p_val": np.nan}
        if len(d) > 3 and d[covar].nunique() > 1:
            res = pg.partial_corr(data=d, x="entropy", y="aulc", covar=covar, method="spearman")
            r = float(res["r"].iloc[0])
            row.update(partial_r=r, p_val=float(res["p_val"].iloc[0]))
            # pingouin rounds its CI; the same Fisher-z interval (n - 1 covariate - 3 dof), unrounded:
            se = 1.0 / np.sqrt(len(d) - 1 - 3)
            z, crit = np.arctanh(np.clip(r, -1 + 1e-15, 1 - 1e-15)), stats.norm.ppf(0.975)
            row["ci_low"], row["ci_high"] = float(np.tanh(z - crit * se)), float(np.tanh(z + crit * se))
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
    >>> from hf_entropy_callback.study.tables import regression
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
    for run_id, ex in examples[["run_id", "entropy", "aulc", "token_length", "label"]].groupby("run_id", sort=False):
        d = _finite(ex, ["entropy", "aulc", "token_length"])
        X = _design(d, label_names)
        if len(d) <= X.shape[1] + 1:
            continue
        res = pg.linear_regression(X, d["aulc"].astype(float))
        sd_x = X.std(ddof=1)
        beta = [
            np.nan if name == "Intercept" else coef * sd_x[name] / d["aulc"].std(ddof=1)
            for name, coef in zip(res["names"], res["coef"])
        ]
        frames.append(
            pd.DataFrame(
                {
                    "run_id": run_id,
                    "term": res["names"],
                    "coef": res["coef"],
                    "se": res["se"],
                    "T": res["T"],
                    "p_val": res["pval"],
                    "ci_low": res["CI2.5"],
                    "ci_high": res["CI97.5"],
                    "beta": beta,
                    "r2": res["r2"],
                    "adj_r2": res["adj_r2"],
                    "n": len(d),
                }
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
    >>> from hf_entropy_callback.study.tables import summarize_terms
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
    cols = [
        "condition",
        *_present(per_run, CONDITION_KEYS),
        "term",
        "n_runs",
        "coef_mean",
        "coef_sd",
        "beta_mean",
        "p_max",
        "r2_mean",
    ]
    ordered = order_conditions(out[cols])
    ordered["_t"] = ordered.groupby("condition", sort=False).ngroup()
    return ordered.sort_values("_t", kind="stable").drop(columns="_t").reset_index(drop=True)


def summarize_partial(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per condition: plain rho and partial rho (mean ± sd across seeds) and the largest partial p-value.

    Examples
    --------
    >>> import pandas as pd
    >>> from hf_entropy_callback.study.tables import summarize_partial
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
    >>> from hf_entropy_callback.study.tables import kendall_vs_spearman
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


def _match_columns(runs: pd.DataFrame, vary: str) -> list:
    """The key columns a variant and its baseline must share: all but `vary` and what it determines."""
    skip = {vary, *VARIED_WITH.get(vary, ())}
    return [k for k in _present(runs, MATCH_KEYS) if k not in skip]


def _key_series(frame: pd.DataFrame, cols: Sequence[str]) -> pd.Series:
    """NaN-safe tuple of `cols` per row (NaN and None compare equal)."""

    def norm(v):
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)

    return pd.Series(
        [tuple(norm(v) for v in row) for row in frame[list(cols)].itertuples(index=False)],
        index=frame.index,
        dtype=object,
    )


def unmatched_variants(runs: pd.DataFrame, vary: str, baseline) -> list:
    """Notes for variant runs without a baseline run equal in every other setting, naming what differs.

    Example: a noisy run at learning rate 1e-4 with only 2e-4 baselines gets "no twin; the closest
    baselines differ in lr".
    """
    u = _usable(runs)
    if vary not in u:
        return []
    cols = _match_columns(u, vary)
    base = u[u[vary] == baseline]
    var = u[u[vary] != baseline]
    bkeys = set(_key_series(base, cols)) if len(base) else set()
    notes = []
    for idx, r in var.iterrows():
        key = _key_series(var.loc[[idx]], cols).iloc[0]
        if key in bkeys:
            continue
        # The baselines closest to it (fewest differing settings), and those settings.
        best, diff = None, None
        for _, b in base.iterrows():
            d = [
                c
                for c in cols
                if _key_series(pd.DataFrame([r[cols]]), [c]).iloc[0]
                != _key_series(pd.DataFrame([b[cols]]), [c]).iloc[0]
            ]
            if best is None or len(d) < len(diff):
                best, diff = b, d
        what = (
            "; the closest baseline runs differ in " + ", ".join(SHORT_NAMES.get(c, c) for c in diff)
            if diff
            else "; there is no baseline run"
        )
        notes.append(
            f"{r.get('run_id', idx)} ({vary}={r[vary]}): no baseline ({vary}={baseline}) equal in every "
            f"other setting{what}; not compared"
        )
    return notes


def variant_comparison(runs: pd.DataFrame, examples: pd.DataFrame, vary: str, baseline) -> pd.DataFrame:
    """Compare runs whose setting `vary` differs from `baseline` with the runs that match them in every other setting.

    Runs are grouped by every key column (`MATCH_KEYS`) except `vary` and what it determines
    (`VARIED_WITH`: a composition changes the tracked set; the noise rule goes with the noise);
    each group that holds at least one variant run gets, for each level of `vary` (the baseline
    first) and category, the mean ± sd across seeds of the per-run mean Delta L and AULC, and the
    run-level rho. Variant runs without such a baseline are listed by `unmatched_variants` and
    appear here without baseline rows.

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
        ``rho_mean``, ``rho_sd`` (and, for label noise, the same of ``aulc_original`` /
        ``delta_loss_original``: against the label before noise). Empty when no run differs from
        the baseline.

    Examples
    --------
    >>> import pandas as pd
    >>> from hf_entropy_callback.study.tables import variant_comparison
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
    others = _match_columns(u, vary)
    extra_cols = [c for c in VARIED_WITH.get(vary, ()) if c in u]
    variants = u[u[vary] != baseline]
    if variants.empty:
        return pd.DataFrame()
    used = ["run_id", "category", "delta_loss", "aulc", "aulc_original", "delta_loss_original"]
    ex = examples[[c for c in used if c in examples]]
    ex = ex[ex["run_id"].isin(u["run_id"])]
    cm = category_means(ex)
    values = ["delta_loss", "aulc", "rho"]
    if vary == "label_noise" and "aulc_original" in ex:
        orig = category_means(ex.assign(aulc=ex["aulc_original"], delta_loss=ex["delta_loss_original"]))
        cm = cm.merge(
            orig[["run_id", "category", "aulc", "delta_loss"]].rename(
                columns={"aulc": "aulc_original", "delta_loss": "delta_loss_original"}
            ),
            on=["run_id", "category"],
        )
        values += ["delta_loss_original", "aulc_original"]
    cm = cm.merge(u[["run_id", *others, vary, *extra_cols, "rho", *_present(u, ["seed"])]], on="run_id")
    wanted = set(_key_series(variants, others))
    cm = cm[_key_series(cm, others).isin(wanted)]
    if cm.empty:
        return pd.DataFrame()
    by = [*others, vary, *[c for c in extra_cols if c != "tracked_set"], "category"]
    # Key columns hold None for unrecorded settings; groupby drops None/NaN keys unless dropna=False.
    out = mean_sd(cm, by, values)
    g = cm.groupby(by, dropna=False, sort=False)
    extra = g["n"].mean().rename("n_examples").to_frame()
    extra["seeds"] = g["seed"].agg(_seeds) if "seed" in cm else "—"
    out = out.merge(extra.reset_index(), on=by)
    out["is_baseline"] = out[vary] == baseline
    cols = [
        *others,
        vary,
        *[c for c in extra_cols if c != "tracked_set"],
        "is_baseline",
        "category",
        "n_runs",
        "seeds",
        "n_examples",
        "delta_loss_mean",
        "delta_loss_sd",
        "aulc_mean",
        "aulc_sd",
    ]
    if "aulc_original" in values:
        cols += ["delta_loss_original_mean", "delta_loss_original_sd", "aulc_original_mean", "aulc_original_sd"]
    cols += ["rho_mean", "rho_sd"]
    out = out[cols].assign(
        _g=_key_series(out, others).astype(str),
        _b=~out["is_baseline"],
        _c=out["category"].map(CATEGORY_ORDER),
        _v=out[vary].astype(str),
    )
    out = out.sort_values(["_g", "_b", "_v", "_c"], kind="stable")
    return out.drop(columns=["_g", "_b", "_c", "_v"]).reset_index(drop=True)


def composition_comparison(runs: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """Training-set composition variants (low / high / balanced) against the matching "all" runs (see `variant_comparison`)."""
    return variant_comparison(runs, examples, "composition", "all") if "composition" in runs else pd.DataFrame()


def soft_label_comparison(runs: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """Soft-label (e.g. "soft_kl") runs against the matching hard-label ("ce") runs (see `variant_comparison`)."""
    return variant_comparison(runs, examples, "loss", "ce") if "loss" in runs else pd.DataFrame()


def noise_levels(runs: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """rho and mean Delta L per label-noise level, with the noise-free runs that match (see `variant_comparison`)."""
    return variant_comparison(runs, examples, "label_noise", 0.0) if "label_noise" in runs else pd.DataFrame()


NOISE_TARGETS = {
    "training": ("aulc", "the training (noisy) label"),
    "original": ("aulc_original", "the label before noise"),
}


def noise_tests(runs: pd.DataFrame, examples: pd.DataFrame, subsets: bool = True) -> pd.DataFrame:
    """Paired tests of per-example AULC between each noisy run and its noise-free twin, against both targets.

    The twin is the usable run with ``label_noise`` 0 equal to the noisy run in every other key
    column (`MATCH_KEYS` but the noise and its drawing rule: model, method, rank, alpha, learning
    rate, epochs, batch, data, tracked set, ...) **and the seed**; a noisy run without one is not
    tested (`unmatched_variants` says why). Examples are paired by ``example_id`` (finite AULC in
    both runs). Per pair, target and subset ("all"; with `subsets` also "noised" — the examples
    chosen for noise — and "not noised"):

    - target "training": the noisy run's AULC against its training label (what it was trained on)
      vs the twin's AULC (its label is the original);
    - target "original": both against the label before noise (the noisy run's ``aulc_original``),
      so both sides measure the loss of the same class.

    Tests: Wilcoxon signed-rank (pingouin.wilcoxon, two-sided; zero differences dropped), and
    Cohen's d of noisy minus baseline as ``d_z`` (mean difference / sd of differences: paired)
    and ``d_av`` (mean difference / mean of the two variances' root: pingouin's paired
    ``compute_effsize``). Positive: higher AULC with noise.

    Returns
    -------
    table : DataFrame
        Match keys, ``seed``, ``label_noise``, ``noise_rule``, ``run_id``, ``baseline_run_id``,
        ``target``, ``subset``, ``n``, ``n_noised``, ``n_label_changed`` (noised examples whose label
        the draw actually changed), ``share_changed``, ``aulc_baseline_mean``, ``aulc_noisy_mean``,
        ``mean_diff``, ``W``, ``p_val``, ``rbc``, ``d_z``, ``d_av``. Empty when no noisy run has a
        twin. Rows of target "original" are NaN for a version-1 run with noise (original unknown).
    """
    u = _usable(runs)
    if "label_noise" not in u or u.empty:
        return pd.DataFrame()
    others = _match_columns(u, "label_noise") + _present(u, ["seed"])
    noisy = u[u["label_noise"] > 0]
    clean = u[u["label_noise"] == 0]
    if noisy.empty or clean.empty:
        return pd.DataFrame()
    clean_keys = _key_series(clean, others)
    rows = []
    cols = ["example_id", "aulc", "aulc_original", "noised", "label_changed"]
    # Each run's rows by position, found once (not by scanning every run's examples per noisy run).
    used = examples[[c for c in cols if c in examples]]
    by_run = examples.groupby("run_id", sort=False).indices
    none = np.array([], dtype=np.intp)
    for idx, r in noisy.iterrows():
        key = _key_series(noisy.loc[[idx]], others).iloc[0]
        match = clean[clean_keys == key]
        if match.empty:
            continue
        base_id = match["run_id"].iloc[0]
        a = used.iloc[by_run.get(base_id, none)]
        b = used.iloc[by_run.get(r["run_id"], none)]
        if "aulc_original" not in a:
            a = a.assign(aulc_original=a["aulc"])
            b = b.assign(aulc_original=b["aulc"], label_changed=np.nan)
        pair = a.merge(b, on="example_id", suffixes=("_base", "_noisy"))
        pair = pair[np.isfinite(pair["aulc_base"].to_numpy(float)) & np.isfinite(pair["aulc_noisy"].to_numpy(float))]
        noised = pair["noised_noisy"].astype(bool)
        changed = pd.to_numeric(pair["label_changed_noisy"], errors="coerce")
        n_changed = float(changed[noised].sum()) if changed[noised].notna().all() else np.nan
        parts = [("all", pair)]
        if subsets:
            parts += [("noised", pair[noised]), ("not noised", pair[~noised])]
        for target, (col, _) in NOISE_TARGETS.items():
            for subset, d in parts:
                y_noisy = d[f"{col}_noisy"].to_numpy(float)
                y_base = (
                    d["aulc_original_base"].to_numpy(float)
                    if col == "aulc_original"
                    else d["aulc_base"].to_numpy(float)
                )
                ok = np.isfinite(y_noisy) & np.isfinite(y_base)
                y_noisy, y_base = y_noisy[ok], y_base[ok]
                row = {
                    **{k: r[k] for k in others},
                    "label_noise": r["label_noise"],
                    "noise_rule": r.get("noise_rule"),
                    "run_id": r["run_id"],
                    "baseline_run_id": base_id,
                    "target": target,
                    "subset": subset,
                    "n": int(ok.sum()),
                    "n_noised": int(noised.sum()),
                    "n_label_changed": n_changed,
                    "share_changed": n_changed / noised.sum() if noised.sum() else np.nan,
                    "aulc_baseline_mean": y_base.mean() if ok.any() else np.nan,
                    "aulc_noisy_mean": y_noisy.mean() if ok.any() else np.nan,
                    "mean_diff": (y_noisy - y_base).mean() if ok.any() else np.nan,
                    "W": np.nan,
                    "p_val": np.nan,
                    "rbc": np.nan,
                    "d_z": np.nan,
                    "d_av": np.nan,
                }
                diff = y_noisy - y_base
                if ok.sum() >= 2 and np.any(diff != 0):
                    w = pg.wilcoxon(y_noisy, y_base)
                    row.update(
                        W=float(w["W_val"].iloc[0]), p_val=float(w["p_val"].iloc[0]), rbc=float(w["RBC"].iloc[0])
                    )
                    d_ = cohen_d(y_noisy, y_base)
                    row.update(d_z=float(d_["d_z"].iloc[0]), d_av=float(d_["d_av"].iloc[0]))
                rows.append(row)
    return order_conditions(pd.DataFrame(rows)) if rows else pd.DataFrame()


# --------------------------------------------------------------------------------------------
# Analysis 14: calibration; analysis 15: cartography
# --------------------------------------------------------------------------------------------


def calibration_table(runs: pd.DataFrame, calibration: pd.DataFrame) -> pd.DataFrame:
    """Calibration per condition, tracked set and entropy category at the final point, mean ± sd across seeds.

    Per run the numbers come from `hf_entropy_callback.dynamics.calibration` (mean entropy of the
    predicted distribution in nats, mean max-probability, ECE with the run's equal-width bins,
    ``--ece-bins``, default 10; accuracy). Per-run ECE intervals: `calibration_runs`.

    Examples
    --------
    >>> import pandas as pd
    >>> from hf_entropy_callback.study.tables import calibration_table
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
    cols = [
        "condition",
        *_present(runs, CONDITION_KEYS),
        "set",
        "category",
        "n_runs",
        "n_examples",
        "pred_entropy_mean",
        "pred_entropy_sd",
        "max_confidence_mean",
        "max_confidence_sd",
        "ece_mean",
        "ece_sd",
        "accuracy_mean",
    ]
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
    >>> from hf_entropy_callback.study.tables import cartography_table
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
    for run_id, ex in examples[["run_id", "confidence", "aulc", "entropy"]].groupby("run_id", sort=False):
        d = _finite(ex, ["confidence", "aulc", "entropy"])
        row = {
            "run_id": run_id,
            "n": len(d),
            "rho_conf_aulc": np.nan,
            "p_conf_aulc": np.nan,
            "r2_confidence": np.nan,
            "r2_full": np.nan,
            "delta_r2": np.nan,
            "p_delta": np.nan,
        }
        if len(d) > 4:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant input gives NaN, reported as such
                res = stats.spearmanr(d["confidence"], d["aulc"])
            y = d["aulc"].astype(float)
            r2c = _r2(d[["confidence"]].astype(float), y)
            r2f = _r2(d[["confidence", "entropy"]].astype(float), y)
            dof = len(d) - 3
            f = (r2f - r2c) / ((1.0 - r2f) / dof) if r2f < 1 else np.inf
            row.update(
                rho_conf_aulc=float(res.statistic),
                p_conf_aulc=float(res.pvalue),
                r2_confidence=r2c,
                r2_full=r2f,
                delta_r2=r2f - r2c,
                p_delta=float(stats.f.sf(f, 1, dof)),
            )
        rows.append(row)
    return order_conditions(meta.merge(pd.DataFrame(rows), on="run_id"))


def summarize_runs(per_run: pd.DataFrame, values: Sequence[str], p_cols: Sequence[str] = ()) -> pd.DataFrame:
    """Per condition: mean ± sd across seeds of `values` and the largest of each p-value column in `p_cols`.

    Examples
    --------
    >>> import pandas as pd
    >>> from hf_entropy_callback.study.tables import summarize_runs
    >>> ct = pd.DataFrame({"condition": "A", "delta_r2": [0.01, 0.03], "p_delta": [0.2, 0.001]})
    >>> summarize_runs(ct, ["delta_r2"], ["p_delta"]).round(4)
      condition  n_runs  delta_r2_mean  delta_r2_sd  p_delta_max
    0         A       2           0.02       0.0141          0.2
    """
    if per_run.empty:
        return per_run
    out = mean_sd(per_run, ["condition"], values)
    for p in p_cols:
        out = out.merge(
            per_run.groupby("condition", sort=False)[p].max().rename(f"{p}_max").reset_index(), on="condition"
        )
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
    >>> from hf_entropy_callback.study.tables import binning_table
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
    ex = examples[["run_id", "entropy", "aulc", "category"]]
    ex = _finite(ex[ex["run_id"].isin(u["run_id"])], ["entropy", "aulc"])
    if ex.empty:
        return pd.DataFrame()
    # Bin labels per run (quantiles are a run's own), then one groupby over all runs and schemes.
    parts = []
    # Columns as arrays once, not once per run (a string column's conversion costs as much as the column is long).
    entropy, category = ex["entropy"].to_numpy(float), ex["category"].to_numpy()
    groups = list(ex.groupby("run_id", sort=False).indices.values())
    for scheme in BINNINGS:
        labels = np.empty(len(ex), dtype=object)
        for idx in groups:
            labels[idx] = entropy_bins(entropy[idx], category[idx], scheme)
        parts.append(
            pd.DataFrame(
                {
                    "run_id": ex["run_id"].to_numpy(),
                    "scheme": scheme,
                    "bin": labels,
                    "entropy": ex["entropy"].to_numpy(float),
                    "aulc": ex["aulc"].to_numpy(float),
                }
            )
        )
    long = pd.concat(parts, ignore_index=True)
    per_run = (
        long.groupby(["run_id", "scheme", "bin"], sort=False)
        .agg(n=("aulc", "size"), aulc=("aulc", "mean"), entropy_min=("entropy", "min"), entropy_max=("entropy", "max"))
        .reset_index()
        .merge(u, on="run_id")
    )
    by = ["condition", "scheme", "bin"]
    out = mean_sd(per_run, by, ["aulc"])
    extra = (
        per_run.groupby(by, sort=False)
        .agg(n_examples=("n", "mean"), entropy_min=("entropy_min", "min"), entropy_max=("entropy_max", "max"))
        .reset_index()
    )
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
    cols = [
        "condition",
        *_present(runs, CONDITION_KEYS),
        "scheme",
        "bin",
        "bin_order",
        "n_runs",
        "n_examples",
        "entropy_min",
        "entropy_max",
        "aulc_mean",
        "aulc_sd",
        "monotonic",
    ]
    ordered = order_conditions(out[cols])
    ordered["_o"] = ordered.groupby("condition", sort=False).ngroup()
    ordered["_s"] = ordered["scheme"].map({s: i for i, s in enumerate(BINNINGS)})
    return ordered.sort_values(["_o", "_s", "bin_order"]).drop(columns=["_o", "_s"]).reset_index(drop=True)


def entropy_distribution(entropy: pd.DataFrame) -> pd.DataFrame:
    """Counts and shares of the entropy categories per dataset, over every tracked set (each example once).

    Examples
    --------
    >>> import pandas as pd
    >>> from hf_entropy_callback.study.tables import entropy_distribution
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
            rows.append(
                {
                    "dataset": dataset,
                    "category": cat,
                    "n": len(sub),
                    "share": len(sub) / len(grp),
                    "entropy_mean": sub["entropy"].mean(),
                    "entropy_min": sub["entropy"].min(),
                    "entropy_max": sub["entropy"].max(),
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Beyond the study: agreement with the human distribution; per-run calibration intervals
# --------------------------------------------------------------------------------------------


def calibration_runs(runs: pd.DataFrame, calibration: pd.DataFrame) -> pd.DataFrame:
    """Per usable run, tracked set and category at the final point: ECE with its bootstrap interval and the rest.

    ``ece_ci_low`` / ``ece_ci_high``: 95% percentile interval over bootstrap resamples of the
    examples (`hf_entropy_callback.dynamics.ece_bootstrap`); ``ece_bins``: the equal-width bins.
    """
    if calibration.empty:
        return pd.DataFrame()
    out = _run_meta(runs).merge(calibration, on="run_id")
    return _category_sort(out, ["condition", "run_id", "set"])


def agreement_by_condition(runs: pd.DataFrame, agreement: pd.DataFrame, point: str = "final") -> pd.DataFrame:
    """Agreement of the predicted with the human distribution per condition, tracked set and category.

    Per run, the mean over a category's examples of each metric of
    `hf_entropy_callback.agreement.METRICS` (KL(human || model), Jensen–Shannon divergence and
    distance, soft-label cross-entropy, L1 distance, accuracy against the majority label) at the
    final tracking point (`point="final"`) or the first (`"first"`); then mean ± sd across seeds.

    Examples
    --------
    >>> import pandas as pd
    >>> from hf_entropy_callback.study.tables import agreement_by_condition
    >>> runs = pd.DataFrame({"run_id": ["a", "b"], "condition": "A", "diverged": False})
    >>> ag = pd.DataFrame({"run_id": ["a", "a", "b", "b"], "set": "validation", "category": "all",
    ...                    "point": [0, 1, 0, 1], "n": 10, "kl": [0.9, 0.3, 0.8, 0.5],
    ...                    "js_divergence": 0.1, "js_distance": 0.3, "cross_entropy": 1.0, "l1": 0.5,
    ...                    "accuracy": [0.4, 0.7, 0.5, 0.8]})
    >>> agreement_by_condition(runs, ag)[["set", "category", "n_runs", "kl_mean", "accuracy_mean"]]
              set category  n_runs  kl_mean  accuracy_mean
    0  validation      all       2      0.4           0.75
    """
    if agreement.empty:
        return pd.DataFrame()
    ag = agreement.merge(_usable(runs)[["run_id", "condition"]], on="run_id")
    last = ag.groupby("run_id")["point"].transform("max" if point == "final" else "min")
    ag = ag[ag["point"] == last]
    out = mean_sd(ag, ["condition", "set", "category"], list(AGREEMENT_METRICS))
    n = ag.groupby(["condition", "set", "category"], sort=False)["n"].mean().rename("n_examples").reset_index()
    out = out.merge(n, on=["condition", "set", "category"]).merge(_condition_keys(runs), on="condition")
    metric_cols = [f"{m}_{s}" for m in AGREEMENT_METRICS for s in ("mean", "sd")]
    cols = ["condition", *_present(runs, CONDITION_KEYS), "set", "category", "n_runs", "n_examples", *metric_cols]
    return _category_sort(out[cols], ["condition", "set"])
