"""Agreement between a model's predicted distribution and the human (annotator) distribution.

The metrics of the ChaosNLI / LeWiDi line of work, per example, from stored log-probabilities and
the annotators' ``label_counts``; natural logarithms throughout (nats):

- ``kl``: KL(human || model) = sum_k h_k (ln h_k - ln q_k), with 0 ln 0 = 0;
- ``js_divergence``: Jensen–Shannon divergence, 0.5 KL(h || m) + 0.5 KL(q || m), m = (h + q) / 2
  (in [0, ln 2]);
- ``js_distance``: its square root, the Jensen–Shannon *distance* that ChaosNLI's scoreboard
  reports (as ``scipy.spatial.distance.jensenshannon`` with its default natural log);
- ``cross_entropy``: soft-label cross-entropy -sum_k h_k ln q_k (= KL + the human entropy);
- ``l1``: Manhattan distance sum_k |h_k - q_k| (in [0, 2]);
- ``accuracy``: whether the model's most probable class is the majority label.

Examples without annotations (all counts 0, e.g. bulk examples) get NaN.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["METRICS", "human_distribution", "agreement_metrics", "agreement_table"]

#: The per-example metrics, in column order.
METRICS = ("kl", "js_divergence", "js_distance", "cross_entropy", "l1", "accuracy")


def human_distribution(label_counts) -> np.ndarray:
    """Annotator counts (..., K) as shares; rows with no annotation become NaN.

    Example:
        >>> human_distribution([[90, 5, 5], [0, 0, 0]])
        array([[0.9 , 0.05, 0.05],
               [ nan,  nan,  nan]])
    """
    c = np.asarray(
        [list(v) for v in label_counts] if not isinstance(label_counts, np.ndarray) else label_counts, dtype=np.float64
    )
    tot = c.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, c / np.where(tot > 0, tot, 1.0), np.nan)


def _xlogy_ratio(p: np.ndarray, logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """sum_k p_k (log p_k - log q_k) with 0 * anything = 0."""
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (logp - logq), 0.0)
    return terms.sum(axis=-1)


def agreement_metrics(logprobs: np.ndarray, label_counts, majority: Optional[Sequence[int]] = None) -> dict:
    """Per-example agreement metrics of model log-probabilities with the human distribution.

    Args:
        logprobs (`np.ndarray` of shape `(..., examples, classes)`): model log-probabilities (one
            tracking point, or all points stacked in front).
        label_counts: annotator counts, `(examples, classes)`.
        majority (`Sequence[int]`, *optional*): the majority label per example; default the argmax
            of the counts (the first class among tied maxima).

    Returns:
        `dict` of `np.ndarray`, one per name in `METRICS`, each of shape `logprobs.shape[:-1]`.

    Example:
        >>> lp = np.log(np.array([[0.7, 0.2, 0.1]]))
        >>> m = agreement_metrics(lp, [[80, 10, 10]])
        >>> {k: round(float(v[0]), 4) for k, v in m.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'kl': 0.0375, 'js_divergence': 0.0102, 'js_distance': 0.1008, 'cross_entropy': 0.6765, 'l1': 0.2,
         'accuracy': 1.0}
    """
    lq = np.asarray(logprobs, dtype=np.float64)
    h = human_distribution(label_counts)
    if lq.shape[-2:] != h.shape:
        raise ValueError(f"agreement_metrics: logprobs {lq.shape} do not match label counts {h.shape}")
    q = np.exp(lq)
    with np.errstate(divide="ignore"):
        lh = np.log(h)
    m = 0.5 * (h + q)
    with np.errstate(divide="ignore"):
        lm = np.log(m)
    kl = _xlogy_ratio(h, lh, lq)
    jsd = 0.5 * _xlogy_ratio(h, lh, lm) + 0.5 * _xlogy_ratio(q, lq, lm)
    jsd = np.maximum(jsd, 0.0)  # rounding can give -1e-17
    with np.errstate(invalid="ignore"):
        ce = -np.where(h > 0, h * lq, 0.0).sum(axis=-1)
    l1 = np.abs(h - q).sum(axis=-1)
    maj = np.argmax(np.nan_to_num(h, nan=-1.0), axis=-1) if majority is None else np.asarray(majority)
    acc = (lq.argmax(axis=-1) == maj).astype(np.float64)
    missing = ~np.isfinite(h).all(axis=-1)
    out = {"kl": kl, "js_divergence": jsd, "js_distance": np.sqrt(jsd), "cross_entropy": ce, "l1": l1, "accuracy": acc}
    bad = missing | ~np.isfinite(lq).all(axis=-1)
    for k in out:
        out[k] = np.where(bad, np.nan, out[k])
    return out


def agreement_table(
    logprobs: np.ndarray,
    label_counts,
    categories: Sequence[str],
    majority: Optional[Sequence[int]] = None,
    steps: Optional[Sequence[int]] = None,
):
    """Mean agreement metrics per tracking point and entropy category (and "all").

    Args:
        logprobs (`np.ndarray` of shape `(points, examples, classes)`).
        label_counts: `(examples, classes)` annotator counts.
        categories (`Sequence[str]`): entropy category per example.
        majority (`Sequence[int]`, *optional*): majority labels (see `agreement_metrics`).
        steps (`Sequence[int]`, *optional*): the optimizer step of each point.

    Returns:
        `pandas.DataFrame` with columns `point`, `step`, `category`, `n` (examples with finite
        metrics), then the mean of each metric in `METRICS` over those examples.

    Example:
        >>> lp = np.log(np.array([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]))
        >>> t = agreement_table(lp, [[80, 10, 10], [10, 45, 45]], ["clean", "contested"])
        >>> t[["category", "n", "accuracy"]]
            category  n  accuracy
        0      clean  1       1.0
        1  contested  1       0.0
        2        all  2       0.5
    """
    import pandas as pd

    from .entropy import CATEGORIES

    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 3:
        raise ValueError(f"agreement_table: logprobs must be (points, examples, classes), got {lp.shape}")
    met = agreement_metrics(lp, label_counts, majority)
    cats = np.asarray(categories).astype(str)
    steps = np.arange(lp.shape[0]) if steps is None else np.asarray(steps)
    names = [c for c in CATEGORIES if (cats == c).any()] + sorted(set(cats) - set(CATEGORIES)) + ["all"]
    n_pts = lp.shape[0]
    ns, means = [], {k: [] for k in METRICS}
    for cat in names:
        sel = np.ones(len(cats), bool) if cat == "all" else cats == cat
        ok = np.isfinite(met["kl"][:, sel])
        n = ok.sum(axis=1)
        ns.append(n)
        for k in METRICS:
            v = met[k][:, sel]
            with np.errstate(invalid="ignore"):
                means[k].append(np.where(n > 0, np.nansum(np.where(ok, v, 0.0), axis=1) / np.maximum(n, 1), np.nan))
    # One frame, category-major with the points in order within each category.
    out = {
        "point": np.tile(np.arange(n_pts), len(names)),
        "step": np.tile(steps, len(names)),
        "category": np.repeat(np.array(names, dtype=object), n_pts),
        "n": np.concatenate(ns),
    }
    out.update({k: np.concatenate(means[k]) for k in METRICS})
    return pd.DataFrame(out)
