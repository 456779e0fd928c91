"""Annotation entropy of label distributions and the study's entropy categories."""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np

#: The study's fixed thresholds in nats: clean < 0.4 <= ambiguous <= 0.7 < contested.
DEFAULT_THRESHOLDS: Tuple[float, float] = (0.4, 0.7)
#: Number of classes the study's thresholds are stated for (NLI: entailment, neutral, contradiction).
STUDY_NUM_CLASSES = 3
#: Category names, from low to high entropy.
CATEGORIES: Tuple[str, str, str] = ("clean", "ambiguous", "contested")

ArrayLike = Union[Sequence, np.ndarray]


def annotation_entropy(counts: ArrayLike, axis: int = -1) -> Union[float, np.ndarray]:
    """Shannon entropy, in nats, of annotator label counts.

    ``H = -sum_k p_k ln p_k`` with ``p_k = counts_k / sum(counts)`` and ``0 ln 0 = 0``. Works
    for any number of classes and is vectorised over all leading dimensions.

    Args:
        counts (`array-like` of shape `(..., K)`):
            Non-negative label counts (or probabilities) per class along `axis`.
        axis (`int`, *optional*, defaults to -1):
            The class axis.

    Returns:
        `float` for a single distribution, otherwise an `np.ndarray` with `axis` removed.

    Raises:
        ValueError: on negative or non-finite counts, or a distribution whose counts sum to 0.

    Example:
        >>> round(annotation_entropy([50, 50, 0]), 6)  # ln 2
        0.693147
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim == 0 or c.shape[axis] == 0:
        raise ValueError(f"annotation_entropy needs at least one class along axis {axis}, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("annotation_entropy: counts must be finite")
    if np.any(c < 0):
        raise ValueError("annotation_entropy: counts must be non-negative")
    total = c.sum(axis=axis, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("annotation_entropy: every distribution needs a positive total count")
    p = c / total
    # 0 ln 0 = 0: take the log only where p > 0.
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    h = -(p * logp).sum(axis=axis)
    # Rounding can give -0.0 or -1e-17 for a one-hot distribution.
    h = np.maximum(h, 0.0)
    return float(h) if h.ndim == 0 else h


def entropy_category(h: Union[float, ArrayLike], thresholds: Tuple[float, float] = DEFAULT_THRESHOLDS):
    """Map entropy (nats) to the study's category: "clean", "ambiguous" or "contested".

    clean: ``h < low``; ambiguous: ``low <= h <= high``; contested: ``h > high``.

    Args:
        h (`float` or `array-like`):
            Entropy value(s) in nats.
        thresholds (`Tuple[float, float]`, *optional*, defaults to `(0.4, 0.7)`):
            The `(low, high)` boundaries, `low <= high`.

    Returns:
        `str` for a scalar input, otherwise an `np.ndarray` of `str` with the input's shape.

    Example:
        >>> entropy_category([0.1, 0.4, 0.7, 0.71])
        array(['clean', 'ambiguous', 'ambiguous', 'contested'], dtype='<U9')
    """
    low, high = thresholds
    if not low <= high:
        raise ValueError(f"entropy_category: thresholds must satisfy low <= high, got {thresholds}")
    arr = np.asarray(h, dtype=np.float64)
    if np.any(np.isnan(arr)):
        raise ValueError("entropy_category: entropy contains NaN")
    out = np.where(arr < low, CATEGORIES[0], np.where(arr <= high, CATEGORIES[1], CATEGORIES[2]))
    return str(out) if out.ndim == 0 else out


def category_thresholds(num_classes: int, thresholds: Tuple[float, float] = DEFAULT_THRESHOLDS) -> Tuple[float, float]:
    """The study's category thresholds carried over to `num_classes` classes.

    The rule: a threshold keeps its share of the maximum entropy ``ln K``. The study's 0.4 and 0.7
    nats for K = 3 are 36.4% and 63.7% of ``ln 3``; for K classes they become
    ``0.4 * ln K / ln 3`` and ``0.7 * ln K / ln 3``. So "clean" means the same degree of agreement
    relative to the most uncertain distribution whatever the number of classes; for K = 3 the
    thresholds are exactly the study's.

    Args:
        num_classes (`int`): K, at least 2.
        thresholds (`Tuple[float, float]`, *optional*, defaults to `(0.4, 0.7)`): thresholds for K = 3.

    Returns:
        `Tuple[float, float]` in nats.

    Example:
        >>> category_thresholds(3)
        (0.4, 0.7)
        >>> [round(t, 4) for t in category_thresholds(2)]
        [0.2524, 0.4417]
    """
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"category_thresholds: num_classes must be an integer >= 2, got {num_classes}")
    if num_classes == STUDY_NUM_CLASSES:
        return tuple(float(t) for t in thresholds)
    scale = np.log(num_classes) / np.log(STUDY_NUM_CLASSES)
    return tuple(float(t * scale) for t in thresholds)


def quantile_bins(h: ArrayLike, n_bins: int) -> np.ndarray:
    """Assign each value to one of `n_bins` equal-frequency bins (0 = lowest entropy).

    Bin edges are the empirical quantiles of `h`; a value equal to an inner edge goes to the
    lower bin, so ties never straddle two bins. With many tied values (ChaosNLI has many
    examples at H = 0) some bins can be larger than others, or empty.

    Args:
        h (`array-like` of shape `(n,)`): entropy values.
        n_bins (`int`): number of bins (4 = quartiles, 3 = terciles).

    Returns:
        `np.ndarray` of `int` bin indices in `[0, n_bins)`.
    """
    arr = np.asarray(h, dtype=np.float64).ravel()
    if n_bins < 1:
        raise ValueError(f"quantile_bins: n_bins must be >= 1, got {n_bins}")
    if arr.size == 0:
        raise ValueError("quantile_bins: no values to bin")
    if np.any(np.isnan(arr)):
        raise ValueError("quantile_bins: values contain NaN")
    inner = np.quantile(arr, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(inner, arr, side="left").astype(np.int64)


def quartile_bins(h: ArrayLike) -> np.ndarray:
    """Quartile bins (0..3) of entropy values; see `quantile_bins`."""
    return quantile_bins(h, 4)


def tercile_bins(h: ArrayLike) -> np.ndarray:
    """Tercile bins (0..2) of entropy values; see `quantile_bins`."""
    return quantile_bins(h, 3)
