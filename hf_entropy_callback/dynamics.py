"""Per-example learning dynamics from stored log-probabilities: AULC, Delta L, cartography, calibration."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .entropy import CATEGORIES

# numpy >= 2 renamed trapz to trapezoid.
_trapezoid = getattr(np, "trapezoid", None) or np.trapz


def gold_loss(logprobs: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Unweighted cross-entropy of the gold label, ``-log p(gold)``.

    Args:
        logprobs (`np.ndarray` of shape `(points, examples, classes)`): log-probabilities.
        labels (`Sequence[int]` of length `examples`): gold label ids.

    Returns:
        `np.ndarray` of shape `(points, examples)`, float64.
    """
    lp = np.asarray(logprobs)
    if lp.dtype.kind != "f":
        lp = lp.astype(np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if lp.ndim != 3 or lp.shape[1] != y.shape[0]:
        raise ValueError(f"gold_loss: logprobs {lp.shape} do not match {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() >= lp.shape[2]):
        raise ValueError(f"gold_loss: labels must be in 0..{lp.shape[2] - 1}")
    # Pick the gold column first, then widen (float32 -> float64 is exact): the same numbers, a third of the work.
    return -np.take_along_axis(lp, y[None, :, None], axis=2)[..., 0].astype(np.float64)


def progress(steps: Sequence[int]) -> np.ndarray:
    """Training progress of each tracking point, ``step / last step``, in [0, 1]."""
    s = np.asarray(steps, dtype=np.float64)
    if s.size < 2 or s[-1] <= 0:
        raise ValueError(f"progress: need at least two tracking points ending at a step > 0, got steps {s.tolist()}")
    if np.any(np.diff(s) <= 0):
        raise ValueError(f"progress: tracking steps must increase strictly, got {s.tolist()}")
    return s / s[-1]


def aulc(losses: np.ndarray, steps: Sequence[int]) -> np.ndarray:
    """Area under each example's loss curve, trapezoidal over progress normalised to [0, 1].

    With progress in [0, 1] the AULC is the time-averaged loss, so runs of different lengths
    compare; lower means learned faster.

    Args:
        losses (`np.ndarray` of shape `(points, examples)`): per-example loss at each point.
        steps (`Sequence[int]` of length `points`): the optimizer step of each point.

    Returns:
        `np.ndarray` of shape `(examples,)`; NaN where any of the example's losses is NaN.

    Example:
        >>> aulc(np.array([[2.0], [1.0], [0.0]]), [0, 50, 100])
        array([1.])
    """
    x = progress(steps)
    loss = np.asarray(losses, dtype=np.float64)
    if loss.shape[0] != x.shape[0]:
        raise ValueError(f"aulc: {loss.shape[0]} loss rows for {x.shape[0]} tracking points")
    return _trapezoid(loss, x, axis=0)


def delta_loss(losses: np.ndarray) -> np.ndarray:
    """Loss at the last tracking point minus loss at the first (> 0 means un-learning)."""
    loss = np.asarray(losses, dtype=np.float64)
    return loss[-1] - loss[0]


def cartography_points(reasons: Sequence[str], which: str = "epoch_end") -> np.ndarray:
    """Indices of the tracking points Dataset Cartography uses.

    ``"epoch_end"`` (default, as Swayamdipta et al. 2020: one record per epoch): the points whose
    reason includes "epoch_end" (a partial last epoch ends at the final step); when a run has none,
    every point after step 0. ``"all"``: every tracking point, step 0 included.

    Example:
        >>> cartography_points(["step0", "interval", "epoch_end", "interval", "epoch_end+final"])
        array([2, 4])
    """
    reasons = [str(r) for r in reasons]
    if which == "all":
        return np.arange(len(reasons))
    if which != "epoch_end":
        raise ValueError(f"cartography points must be 'epoch_end' or 'all', got {which!r}")
    idx = np.array([i for i, r in enumerate(reasons) if "epoch_end" in r.split("+")], dtype=np.intp)
    if idx.size == 0:
        idx = np.array([i for i, r in enumerate(reasons) if "step0" not in r.split("+")], dtype=np.intp)
    return idx


def cartography(
    logprobs: np.ndarray,
    labels: Sequence[int],
    losses: Optional[np.ndarray] = None,
    points: Optional[Sequence[int]] = None,
):
    """Dataset Cartography statistics per example (Swayamdipta et al., 2020).

    confidence = mean p(gold) over the chosen tracking points; variability = its **population**
    standard deviation (ddof = 0, as in the original code); correctness = share of those points at
    which the argmax is the gold label.

    Args:
        logprobs (`np.ndarray` of shape `(points, examples, classes)`): log-probabilities.
        labels (`Sequence[int]`): gold labels.
        losses (`np.ndarray`, *optional*): `gold_loss(logprobs, labels)` when already computed.
        points (`Sequence[int]`, *optional*): indices of the points to use (`cartography_points`);
            default all.

    Returns:
        `pandas.DataFrame` with columns `confidence`, `variability`, `correctness`.
    """
    import pandas as pd

    lp = np.asarray(logprobs)
    if losses is None:
        losses = gold_loss(lp, labels)
    if points is not None:
        points = np.asarray(points, dtype=np.intp)
        lp, losses = lp[points], np.asarray(losses)[points]
    lp = lp.astype(np.float64)  # after picking the points (exact widening: the same argmax)
    p_gold = np.exp(-losses)
    correct = lp.argmax(axis=2) == np.asarray(labels)[None, :]
    return pd.DataFrame(
        {"confidence": p_gold.mean(axis=0), "variability": p_gold.std(axis=0), "correctness": correct.mean(axis=0)}
    )


def expected_calibration_error(probs: np.ndarray, labels: Sequence[int], n_bins: int = 10) -> float:
    """ECE with `n_bins` equal-width confidence bins: sum_b (n_b / n) |accuracy_b - confidence_b|."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if len(y) == 0:
        return float("nan")
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    # Bin b holds confidences in (b/n, (b+1)/n]; confidence 0 cannot occur for a distribution.
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def ece_bootstrap(
    probs: np.ndarray,
    labels: Sequence[int],
    n_bins: int = 10,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    resampler=None,
) -> np.ndarray:
    """`expected_calibration_error` on `n_boot` resamples of the examples (with replacement), vectorised.

    ECE = (1/n) sum_b |sum_{i in b} (correct_i - confidence_i)|, so all resamples' bin sums are one
    weighted `numpy.bincount`. The resamples are ``default_rng(seed).integers(0, n, size=(n_boot, n))``;
    a `hf_entropy_callback.inference.BootstrapResampler` (with the same `n_boot` and `seed`) passed as
    `resampler` draws them once per number of examples and reuses them (same replicates).

    Example:
        >>> p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]])
        >>> reps = ece_bootstrap(p, [0, 1, 1, 0], n_bins=5, n_boot=200, seed=0)
        >>> reps.shape, bool((reps >= 0).all() and (reps <= 1).all())
        ((200,), True)
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    n = len(y)
    if n_boot <= 0 or n == 0:
        return np.full(max(int(n_boot), 0), np.nan)
    conf = p.max(axis=1)
    diff = (p.argmax(axis=1) == y).astype(np.float64) - conf
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    if resampler is None:
        from .inference import BootstrapResampler

        resampler = BootstrapResampler(n_boot=n_boot, seed=seed, max_cells=0)
    elif (resampler.n_boot, resampler.seed) != (n_boot, seed):
        raise ValueError(
            f"ece_bootstrap: the resampler draws {resampler.n_boot} resamples with seed {resampler.seed}, "
            f"not {n_boot} with seed {seed}"
        )
    idx = resampler.indices(n)
    # Per resample and bin, the sum of (correct - confidence) over its draws: one weighted bincount
    # (into the resampler's work arrays: no fresh arrays of resamples x examples per call).
    cell, _, weight, _ = resampler.work_arrays(idx.shape)
    np.take(bins.astype(np.int64, copy=False), idx, out=cell, mode="clip")
    cell += np.arange(n_boot)[:, None] * n_bins
    np.take(diff, idx, out=weight, mode="clip")
    sums = np.bincount(cell.ravel(), weights=weight.ravel(), minlength=n_boot * n_bins).reshape(n_boot, n_bins)
    return np.abs(sums).sum(axis=1) / n


def calibration(
    logprobs_point: np.ndarray,
    labels: Sequence[int],
    categories: Sequence[str],
    n_bins: int = 10,
    *,
    n_boot: int = 0,
    seed: int = 0,
    resampler=None,
):
    """Calibration per entropy category at one tracking point.

    Args:
        logprobs_point (`np.ndarray` of shape `(examples, classes)`): log-probabilities at one point.
        labels (`Sequence[int]`): gold labels.
        categories (`Sequence[str]`): entropy category of each example.
        n_bins (`int`, *optional*, defaults to 10): ECE bins (equal width).
        n_boot (`int`, *optional*, defaults to 0): bootstrap resamples for the ECE interval (0: none).
        seed (`int`, *optional*, defaults to 0): bootstrap seed.
        resampler (`BootstrapResampler`, *optional*): reuses its resamples across calls (`ece_bootstrap`).

    Returns:
        `pandas.DataFrame` with one row per category (and "all"): `n`, `n_nan` (examples with
        non-finite log-probabilities, left out of the other columns), `accuracy`, `pred_entropy`
        (mean entropy of the predicted distribution, nats), `max_confidence`, `ece`, `ece_ci_low`,
        `ece_ci_high` (95% percentile bootstrap interval over examples; NaN without `n_boot`),
        `ece_bins`.
    """
    import pandas as pd

    from .inference import percentile_interval

    lp = np.asarray(logprobs_point, dtype=np.float64)
    finite = np.isfinite(lp).all(axis=1)
    n_nan_by = dict(zip(*np.unique(np.asarray(categories)[~finite], return_counts=True)))
    lp = lp[finite]
    probs = np.exp(lp)
    y = np.asarray(labels)[finite]
    cats = np.asarray(categories)[finite]
    pred_h = -(probs * np.where(probs > 0, lp, 0.0)).sum(axis=1)
    rows = []
    all_cats = np.asarray(categories)
    groups = [c for c in CATEGORIES if (all_cats == c).any()] + [
        c for c in dict.fromkeys(all_cats) if c not in CATEGORIES
    ]
    for name in groups + ["all"]:
        m = np.ones(len(y), bool) if name == "all" else cats == name
        if not m.any():
            nan = float("nan")
            n_nan = int(sum(n_nan_by.values())) if name == "all" else int(n_nan_by.get(name, 0))
            rows.append(
                {
                    "category": name,
                    "n": 0,
                    "n_nan": n_nan,
                    "accuracy": nan,
                    "pred_entropy": nan,
                    "max_confidence": nan,
                    "ece": nan,
                    "ece_ci_low": nan,
                    "ece_ci_high": nan,
                    "ece_bins": n_bins,
                }
            )
            continue
        lo, hi = (
            percentile_interval(ece_bootstrap(probs[m], y[m], n_bins, n_boot=n_boot, seed=seed, resampler=resampler))
            if n_boot
            else (float("nan"), float("nan"))
        )
        rows.append(
            {
                "category": name,
                "n": int(m.sum()),
                "n_nan": int(sum(n_nan_by.values())) if name == "all" else int(n_nan_by.get(name, 0)),
                "accuracy": float((probs[m].argmax(axis=1) == y[m]).mean()),
                "pred_entropy": float(pred_h[m].mean()),
                "max_confidence": float(probs[m].max(axis=1).mean()),
                "ece": expected_calibration_error(probs[m], y[m], n_bins),
                "ece_ci_low": lo,
                "ece_ci_high": hi,
                "ece_bins": n_bins,
            }
        )
    return pd.DataFrame(rows)


def accuracy(logprobs_point: np.ndarray, labels: Sequence[int]) -> float:
    """Share of examples whose most probable class is the gold label; NaN when any row is not finite
    (argmax would silently read a NaN row as a prediction of class 0)."""
    lp = np.asarray(logprobs_point)
    if not np.isfinite(lp).all():
        return float("nan")
    return float((lp.argmax(axis=-1) == np.asarray(labels)).mean())


def example_dynamics(run, name: str = "train", *, cartography_points_: str = "epoch_end"):
    """One row per tracked example of set `name`: its metadata plus aulc, delta_loss, first/last loss
    (all against the training label ``label``), the same against the label before noise
    (``aulc_original``, ``delta_loss_original``; NaN for a noised example of a version-1 run, whose
    original label is unknown), ``label_changed`` (1.0 where the noise changed the label, NaN where
    unknown) and the
    cartography statistics over `cartography_points_` ("epoch_end" or "all", see
    `cartography_points`).

    Args:
        run (`Run`): from `load_run`.
        name (`str`, *optional*, defaults to `"train"`): the tracked set.

    Returns:
        `pandas.DataFrame`
    """
    import pandas as pd

    ex = run.set_examples(name)
    loss = run.losses(name)
    # The new columns are built as arrays and joined to the examples once.
    cols = {"loss_first": loss[0], "loss_last": loss[-1], "aulc": aulc(loss, run.steps), "delta_loss": delta_loss(loss)}
    label = ex["label"].to_numpy()
    if "original_label" in ex:
        original = ex["original_label"].to_numpy()
    else:
        original = cols["original_label"] = label.copy()
    # 1.0 / 0.0, NaN where unknown (a noised example of a version-1 run).
    cols["label_changed"] = (label != original).astype(np.float64)
    if (original == label).all():
        cols["aulc_original"], cols["delta_loss_original"] = cols["aulc"].copy(), cols["delta_loss"].copy()
    else:
        loss_o = gold_loss(run.logprobs[name], original)
        cols["aulc_original"] = aulc(loss_o, run.steps)
        cols["delta_loss_original"] = delta_loss(loss_o)
    if not getattr(run, "original_label_known", True):
        unknown = ex["noised"].astype(bool).to_numpy()
        for col in ("aulc_original", "delta_loss_original", "label_changed"):
            cols[col] = np.where(unknown, np.nan, cols[col])
    pts = cartography_points(run.points["reason"].tolist(), cartography_points_) if hasattr(run, "points") else None
    carto = cartography(run.logprobs[name], label, losses=loss, points=pts)
    for col in carto.columns:
        cols[col] = carto[col].to_numpy()
    return pd.concat([ex, pd.DataFrame(cols, index=ex.index)], axis=1)


def correlation_table(x: np.ndarray, ys, x_name: str = "entropy"):
    """Spearman rho and Kendall tau-b (scipy) of `x` against each named array in `ys`, NaNs dropped.

    Returns:
        `pandas.DataFrame` with columns `x`, `y`, `method`, `n`, `r`, `p_val`.
    """
    import pandas as pd
    from scipy import stats

    rows = []
    x = np.asarray(x, dtype=np.float64)
    for y_name, y in ys.items():
        y = np.asarray(y, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        for method, fn in (("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
            if ok.sum() < 3:
                r, p = np.nan, np.nan
            else:
                res = fn(x[ok], y[ok])
                r, p = float(res.statistic), float(res.pvalue)
            rows.append({"x": x_name, "y": y_name, "method": method, "n": int(ok.sum()), "r": r, "p_val": p})
    return pd.DataFrame(rows)


def run_summary(run, name: str = "train", validation_set: Optional[str] = "validation") -> dict:
    """Headline numbers of one run.

    Spearman and Kendall tau-b (scipy's default tau-b) of entropy against AULC and against Delta L,
    with p-values and n; mean Delta L and AULC per entropy category; final accuracy on the
    validation set when it is tracked; how many examples have a NaN loss; and whether the trajectory
    covers the whole training (`history_complete`: False when the run resumed from a checkpoint
    without the trajectory recorded before it, so its AULC and Delta L miss the early points).

    Returns:
        `dict` with keys `correlations` (list of rows), `categories` (list of rows), `n_examples`,
        `n_nan`, `final_step`, `validation_accuracy` (or None) and `history_complete` (bool).
    """
    from .runs import history_complete

    dyn = example_dynamics(run, name)
    corr = correlation_table(dyn["entropy"].to_numpy(), {"aulc": dyn["aulc"], "delta_loss": dyn["delta_loss"]})
    cats = []
    for cat in [c for c in CATEGORIES if (dyn["category"] == c).any()]:
        sub = dyn[dyn["category"] == cat]
        cats.append(
            {
                "category": cat,
                "n": len(sub),
                "mean_delta_loss": float(sub["delta_loss"].mean()),
                "mean_aulc": float(sub["aulc"].mean()),
                "mean_loss_first": float(sub["loss_first"].mean()),
                "mean_loss_last": float(sub["loss_last"].mean()),
            }
        )
    val_acc = None
    if validation_set and validation_set in run.logprobs:
        vex = run.set_examples(validation_set)
        val_acc = accuracy(run.logprobs[validation_set][-1], vex["label"].to_numpy())
    return {
        "set": name,
        "n_examples": int(len(dyn)),
        "n_nan": int(np.isnan(dyn["aulc"]).sum()),
        "final_step": int(run.steps[-1]),
        "validation_accuracy": val_acc,
        "history_complete": history_complete(getattr(run, "config", None) or {}),
        "correlations": corr.to_dict("records"),
        "categories": cats,
    }


#: How far above chance (1 / number of classes) the validation accuracy must be for `format_summary`
#: to read the correlations: 5 accuracy points.
LEARNED_MARGIN = 0.05


def near_chance(accuracy: Optional[float], num_labels: int = 3, *, margin: float = LEARNED_MARGIN) -> bool:
    """Whether a validation accuracy is too close to chance to read the run's correlations.

    The rule: `accuracy < 1 / num_labels + margin` (by default, less than 5 points above chance: below
    0.3833 with the 3 NLI classes). A model that has not learned the task has loss trajectories that
    mostly reflect its initialisation and the class weights, so entropy correlations from it say little
    about learning dynamics. A missing or non-finite accuracy counts as near chance.

    Args:
        accuracy (`float`, *optional*): the validation accuracy, in [0, 1].
        num_labels (`int`, *optional*, defaults to 3): number of classes K; chance is 1 / K.
        margin (`float`, *optional*, defaults to `LEARNED_MARGIN`): accuracy points above chance required.

    Returns:
        `bool`

    Example:
        >>> near_chance(0.36), near_chance(0.54), near_chance(0.40, num_labels=2)
        (True, False, True)
    """
    if accuracy is None or not np.isfinite(accuracy):
        return True
    return bool(accuracy < 1.0 / num_labels + margin)


def format_summary(summary: dict) -> str:
    """A short human-readable rendering of `run_summary`'s result, with what its columns mean.

    Says whether the validation accuracy is far enough above chance to read the correlations
    (`near_chance`; the number of classes is `summary["num_labels"]`, default 3). A correlation row
    with `ci_low` / `ci_high` (and `ci_level`) shows that confidence interval next to r.
    """
    lines = [f"tracked set {summary['set']!r}: {summary['n_examples']} examples, final step {summary['final_step']}"]
    if summary.get("n_nan"):
        lines.append(f"WARNING: {summary['n_nan']} examples have a NaN loss (diverged run?)")
    if summary.get("history_complete") is False:
        lines.append(
            "WARNING: incomplete history: the run resumed from a checkpoint without the trajectory recorded before "
            "it, so AULC and Delta L miss the early tracking points; the analysis leaves this run out of its means"
        )
    accuracy, k = summary.get("validation_accuracy"), int(summary.get("num_labels") or 3)
    if accuracy is not None:
        chance = f"chance {1.0 / k:.4f} with {k} classes"
        if near_chance(accuracy, k):
            lines.append(
                f"ChaosNLI validation accuracy: {accuracy:.4f} ({chance}): NOT LEARNED: within {LEARNED_MARGIN * 100:g} "
                "points of chance, so the correlations below do not tell how this model learns; train longer, with a "
                "higher learning rate or a larger model before reading them"
            )
        else:
            lines.append(
                f"ChaosNLI validation accuracy: {accuracy:.4f} ({chance}; more than {LEARNED_MARGIN * 100:g} "
                "points above it, so the correlations below can be read)"
            )
    for row in summary["correlations"]:
        ci = ""
        if row.get("ci_low") is not None and np.isfinite(row["ci_low"]):
            ci = f"  {row.get('ci_level', 0.95) * 100:g}% CI [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        lines.append(
            f"{row['method']:>8} entropy vs {row['y']:<10} r = {row['r']:+.4f}{ci}  p = {row['p_val']:.3g}  n = {row['n']}"
        )
    lines.append(f"{'category':>10} {'n':>6} {'mean dL':>9} {'mean AULC':>10} {'loss0':>8} {'lossT':>8}")
    for c in summary["categories"]:
        lines.append(
            f"{c['category']:>10} {c['n']:>6} {c['mean_delta_loss']:>+9.4f} {c['mean_aulc']:>10.4f} "
            f"{c['mean_loss_first']:>8.4f} {c['mean_loss_last']:>8.4f}"
        )
    lines += [
        "r: Spearman rho / Kendall tau-b of annotation entropy against each example's AULC or Delta L, over the "
        "tracked examples"
        + (" (CI: bootstrap over examples)" if any("ci_low" in r for r in summary["correlations"]) else ""),
        "n: tracked examples per entropy category (by default clean H < 0.4 <= ambiguous <= 0.7 < contested, in nats)",
        "mean dL: mean Delta L = loss at the last tracking point minus loss at the first (> 0: un-learned)",
        "mean AULC: mean area under the loss curve over training progress 0..1 (lower: learned sooner)",
        "loss0 / lossT: mean loss at the first (step 0) / last tracking point",
    ]
    return "\n".join(lines)
