"""Full fine-tuning vs LoRA at matched learning rates (the sweeps' ``matched_lr`` matrix).

The study runs every configuration at one learning rate, so a difference between LoRA and full
fine-tuning could be a difference of effective step size. The matched grid trains both at the same
rates (1e-6, 5e-6, 1e-5, 5e-5 by default); this module compares them rate by rate: Spearman rho
(entropy vs AULC), mean Delta L per entropy category and validation accuracy.

**The low-rate regime.** At small rates LoRA (whose adapters start at zero) barely moves the model
and stays near chance, so its rho and Delta L describe an untrained model, not un-learning. A row is
flagged ``underfit`` when its mean validation accuracy is within ``margin`` (default 0.05, i.e. 5
points) of chance, ``1 / num_classes`` (33.3% for NLI); ``lora_underfit_regime`` marks every row of a
(model, dataset, rate) where LoRA is underfit while full fine-tuning is not: read rho and Delta L there
as "LoRA did not train", not as a difference in learning dynamics.

**Setting families.** Rates and methods are compared only between runs that agree on every other setting of
the condition key (bulk size, epochs, data files, tracked set, ...; LoRA alpha, dropout and target modules
come with the method): runs that differ in one are a separate family, with rows of their own whose
``settings`` column names what tells them apart (e.g. "bulk=2000"; the column is there only when some model
and dataset have several families).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from hf_entropy_callback.dynamics import LEARNED_MARGIN

from .conditions import METHOD_SETTINGS, method_label, setting_families

__all__ = ["UNDERFIT_MARGIN", "MATCHED_LR_COLUMNS", "matched_lr_table"]

#: Validation accuracy within this of chance counts as underfit: the margin the run summary and the
#: report's ``learned`` column use (`hf_entropy_callback.dynamics.LEARNED_MARGIN`), so the two never drift.
UNDERFIT_MARGIN = LEARNED_MARGIN
MATCHED_LR_COLUMNS = [
    "model",
    "dataset",
    "learning_rate",
    "method",
    "n_runs",
    "rho_mean",
    "rho_sd",
    "delta_loss_clean",
    "delta_loss_ambiguous",
    "delta_loss_contested",
    "validation_accuracy_mean",
    "validation_accuracy_sd",
    "underfit",
    "lora_underfit_regime",
]


def matched_lr_table(study: Any, *, num_classes: int = 3, margin: float = UNDERFIT_MARGIN) -> pd.DataFrame:
    """Compare methods at each matched learning rate.

    Uses the runs without a variant (composition all, no noise, CE) of LoRA and full fine-tuning,
    for each (model, dataset, setting family) trained at two or more learning rates. Runs excluded from
    the aggregates (diverged, incomplete) are left out. A setting family is the runs that agree on every
    setting of the condition key but learning rate, method and rank (and what comes with them: LoRA
    alpha, dropout, target modules); see the module docstring.

    Parameters
    ----------
    study : hf_entropy_callback.study.loading.Study
        Needs ``runs`` (``run_id``, ``model``, ``dataset``, ``method``, ``rank``, ``variant``,
        ``rho``, ``validation_accuracy``, ``excluded``), ``examples`` (``run_id``, ``category``,
        ``delta_loss``) and ``configs`` (``run_id -> config`` with ``learning_rate``).
    num_classes : int
        Number of classes (chance accuracy is ``1 / num_classes``).
    margin : float
        Underfit when mean validation accuracy ``<= 1 / num_classes + margin``.

    Returns
    -------
    table : DataFrame
        One row per model x dataset [x setting family] x learning rate x method, columns
        ``MATCHED_LR_COLUMNS`` (with ``settings`` after ``dataset`` when some model and dataset have
        several families), sorted by model, dataset, family, rate, method; empty (same columns) when no
        (model, dataset, family) has two rates.

    Examples
    --------
    >>> import pandas as pd
    >>> from types import SimpleNamespace
    >>> from hf_entropy_callback.study.matched_lr import matched_lr_table
    >>> runs = pd.DataFrame({
    ...     "run_id": list("abcd"), "model": "m", "dataset": "snli", "method": ["lora", "full"] * 2,
    ...     "rank": [8.0, float("nan")] * 2, "variant": "base", "rho": [0.02, 0.2, 0.3, 0.25],
    ...     "validation_accuracy": [0.35, 0.6, 0.62, 0.66], "excluded": False})
    >>> ex = pd.DataFrame({"run_id": list("aabbccdd"), "category": ["clean", "contested"] * 4,
    ...                    "delta_loss": [0.0, 0.01, -1.0, -0.5, -1.2, 0.3, -1.1, -0.4]})
    >>> cfg = {"a": {"learning_rate": 1e-6}, "b": {"learning_rate": 1e-6},
    ...        "c": {"learning_rate": 5e-5}, "d": {"learning_rate": 5e-5}}
    >>> t = matched_lr_table(SimpleNamespace(runs=runs, examples=ex, configs=cfg))
    >>> t[["method", "rho_mean", "delta_loss_contested", "underfit", "lora_underfit_regime"]]
         method  rho_mean  delta_loss_contested  underfit  lora_underfit_regime
    0  LoRA r=8      0.02                  0.01      True                  True
    1   full FT      0.20                 -0.50     False                  True
    2  LoRA r=8      0.30                  0.30     False                 False
    3   full FT      0.25                 -0.40     False                 False
    >>> t["learning_rate"].tolist()
    [1e-06, 1e-06, 5e-05, 5e-05]
    """
    for name in ("runs", "examples", "configs"):
        if not hasattr(study, name):
            raise TypeError(
                f"matched_lr_table: the study has no {name!r} (pass hf_entropy_callback.study.loading.Study)"
            )
    runs = study.runs
    need = {"run_id", "model", "dataset", "method", "rank", "variant", "rho", "validation_accuracy"}
    missing = need - set(runs.columns)
    if missing:
        raise KeyError(f"matched_lr_table: study.runs lacks the columns {sorted(missing)}")
    empty = pd.DataFrame(columns=MATCHED_LR_COLUMNS)
    runs = runs[(runs["variant"] == "base") & runs["method"].isin(["lora", "full"])]
    if "excluded" in runs:
        runs = runs[~runs["excluded"].astype(bool)]
    lr = runs["run_id"].map(lambda r: (study.configs.get(r) or {}).get("learning_rate"))
    runs = runs.assign(learning_rate=pd.to_numeric(lr, errors="coerce")).dropna(subset=["learning_rate"])
    if runs.empty:
        return empty
    # Rates and methods are compared within a setting family only (bulk size, epochs, ... all equal).
    runs = setting_families(
        runs,
        ("learning_rate", *METHOD_SETTINGS),
        within=("model", "dataset"),
        point=("learning_rate", "method", "rank"),
    )
    n_rates = runs.groupby(["model", "dataset", "family"])["learning_rate"].transform("nunique")
    runs = runs[n_rates >= 2]
    if runs.empty:
        return empty
    runs = runs.assign(
        method=[method_label(m, float(r)) for m, r in zip(runs["method"], runs["rank"])], _full=runs["method"] == "full"
    )
    ex = study.examples
    ex = ex[ex["run_id"].isin(runs["run_id"]) & ex["category"].isin(["clean", "ambiguous", "contested"])]
    per_run = ex.pivot_table(index="run_id", columns="category", values="delta_loss", aggfunc="mean")
    per_run = per_run.reindex(columns=["clean", "ambiguous", "contested"]).add_prefix("delta_loss_")
    runs = runs.merge(per_run, left_on="run_id", right_index=True, how="left")
    keys = ["model", "dataset", "settings", "family", "learning_rate", "method"]
    g = runs.groupby(keys, sort=True)
    out = g.agg(
        n_runs=("run_id", "size"),
        rho_mean=("rho", "mean"),
        rho_sd=("rho", "std"),
        delta_loss_clean=("delta_loss_clean", "mean"),
        delta_loss_ambiguous=("delta_loss_ambiguous", "mean"),
        delta_loss_contested=("delta_loss_contested", "mean"),
        validation_accuracy_mean=("validation_accuracy", "mean"),
        validation_accuracy_sd=("validation_accuracy", "std"),
        _full=("_full", "first"),
    ).reset_index()
    chance = 1.0 / num_classes
    acc = out["validation_accuracy_mean"]
    out["underfit"] = (acc <= chance + margin) & acc.notna()
    at = ["model", "dataset", "family", "learning_rate"]  # the regime is judged within a setting family
    lora_under = out[~out["_full"] & out["underfit"]].groupby(at).size()
    full_ok = out[out["_full"] & ~out["underfit"]].groupby(at).size()
    regime = set(lora_under.index) & set(full_ok.index)
    out["lora_underfit_regime"] = [k in regime for k in zip(*(out[c] for c in at))]
    out["_m"] = np.where(out["_full"], 1, 0)
    out = out.sort_values(["model", "dataset", "settings", "learning_rate", "_m", "method"], kind="stable")
    out["underfit"] = out["underfit"].astype(bool)
    for col in (
        "rho_mean",
        "rho_sd",
        "delta_loss_clean",
        "delta_loss_ambiguous",
        "delta_loss_contested",
        "validation_accuracy_mean",
        "validation_accuracy_sd",
    ):
        out[col] = out[col].astype(float).map(lambda v: v if not (isinstance(v, float) and math.isinf(v)) else np.nan)
    cols = list(MATCHED_LR_COLUMNS)
    if (out["settings"] != "").any():
        cols.insert(cols.index("dataset") + 1, "settings")
    return out[cols].reset_index(drop=True)
