"""Inference for the study's claims: bootstrap intervals, directional tests, exact permutation p-values, effect sizes.

Naming: ``*_bootstrap`` return resampled replicates or percentile intervals (seeded, examples
resampled with replacement), ``*_test`` return one result frame with fixed columns, ``cohen_d``
returns both paired effect sizes. Functions that return a table return one `pandas.DataFrame`
with the columns listed in their docstring, in that order.

Conventions
-----------
- Bootstrap intervals are percentile intervals over `n_boot` resamples drawn with
  ``numpy.random.default_rng(seed)``; with ``n_boot == 0`` the interval is NaN.
- Spearman's rho on a resample is the Pearson correlation of its average ranks (ties share their
  mean rank, as in `scipy.stats.spearmanr`); ranks are computed for all resamples at once with
  `scipy.stats.rankdata` along an axis, so a thousand resamples of a thousand examples take
  milliseconds.
- Resampling is over examples in the order given; callers that want the same resamples for
  several runs (the seeds of one condition) pass the examples in the same order (e.g. sorted by
  id) with the same seed, and get identical index draws.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from typing import Sequence

import numpy as np

__all__ = [
    "rank_rows",
    "spearman_rows",
    "spearman_bootstrap",
    "BootstrapResampler",
    "percentile_interval",
    "directional_test",
    "spearman_permutation_test",
    "cohen_d",
    "EXACT_MAX_N",
]

#: Up to this many points, `spearman_permutation_test` enumerates every permutation (8! = 40,320).
EXACT_MAX_N = 8


def rank_rows(a: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank) along the last axis.

    Args:
        a (`np.ndarray`): values, any shape.

    Returns:
        `np.ndarray` of float64, the same shape.

    Example:
        >>> rank_rows(np.array([[3.0, 1.0, 3.0], [0.5, 0.2, 0.1]]))
        array([[2.5, 1. , 2.5],
               [3. , 2. , 1. ]])
    """
    from scipy.stats import rankdata

    return rankdata(np.asarray(a, dtype=np.float64), axis=-1, method="average")


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho between corresponding rows of `x` and `y` (2-d, same shape); NaN for a constant row.

    Example:
        >>> x = np.array([[1.0, 2, 3, 4], [1, 2, 3, 4]])
        >>> y = np.array([[1.0, 3, 2, 4], [4, 3, 2, 1]])
        >>> spearman_rows(x, y)
        array([ 0.8, -1. ])
    """
    rx, ry = rank_rows(x), rank_rows(y)
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    num = (rx * ry).sum(axis=-1)
    den = np.sqrt((rx * rx).sum(axis=-1) * (ry * ry).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def spearman_bootstrap(x: Sequence[float], y: Sequence[float], *, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Spearman's rho of `x` vs `y` on `n_boot` resamples of the pairs (with replacement), vectorised.

    Non-finite pairs are dropped first. A resample whose `x` or `y` is constant gives NaN. To
    bootstrap many `y` against the same `x` (the seeds of one condition), `BootstrapResampler.spearman`
    returns the same replicates, drawing and ranking the resamples of `x` only once.

    Args:
        x, y (`Sequence[float]`): paired values.
        n_boot (`int`, *optional*, defaults to 1000): number of resamples (0: an empty array).
        seed (`int`, *optional*, defaults to 0): seed of ``numpy.random.default_rng``.

    Returns:
        `np.ndarray` of shape `(n_boot,)`.

    Example:
        >>> rng = np.random.default_rng(1)
        >>> x = rng.normal(size=200)
        >>> reps = spearman_bootstrap(x, x + rng.normal(size=200), n_boot=500, seed=3)
        >>> reps.shape, bool(0.5 < np.median(reps) < 0.8)
        ((500,), True)
    """
    return BootstrapResampler(n_boot=n_boot, seed=seed, max_cells=0).spearman(x, y)


class BootstrapResampler:
    """Bootstrap resamples drawn once and reused for every sample that shares them.

    The runs of one condition track the same examples and are resampled with the same seed, so
    their resamples are the same index draws; this object draws them (and, for Spearman, ranks the
    resampled `x`) once per distinct sample and keeps them for the next call, up to `max_cells`
    resample cells (``n_boot`` x examples; least recently used dropped first). One object per
    analysis, no module state.

    - `spearman` returns exactly (bit for bit) what `spearman_bootstrap` returns: the same draws
      (``default_rng(seed).integers`` in the same chunks), the same ranks, and sums that are exact
      (every term is a multiple of 1/4 below 2**51 for fewer than ~200,000 examples), so their
      order does not matter.
    - `indices` gives the index draws of `n` examples, ``default_rng(seed).integers(0, n, size=(n_boot, n))``
      (what `hf_entropy_callback.dynamics.ece_bootstrap` resamples with).

    Args:
        n_boot (`int`, *optional*, defaults to 1000): resamples per sample.
        seed (`int`, *optional*, defaults to 0): seed of ``numpy.random.default_rng`` (every sample
            starts from it).
        max_cells (`int`, *optional*, defaults to 32,000,000): resample cells kept between calls
            (about 16 bytes each for Spearman, 8 for `indices`); 0 keeps nothing.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=300)
        >>> boot = BootstrapResampler(n_boot=200, seed=5)
        >>> ys = [x + rng.normal(size=300) for _ in range(3)]
        >>> all(np.array_equal(boot.spearman(x, y), spearman_bootstrap(x, y, n_boot=200, seed=5)) for y in ys)
        True
    """

    def __init__(self, *, n_boot: int = 1000, seed: int = 0, max_cells: int = 32_000_000):
        self.n_boot = int(n_boot)
        self.seed = seed
        self.max_cells = int(max_cells)
        self._cache: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._cells = 0
        self._work: tuple = ()

    def work_arrays(self, shape):
        """Two int64 and two float64 work arrays of `shape` for the bootstrap functions, views of flat buffers
        kept between calls (overwritten by the next call): fresh arrays of resamples x examples would cost
        a page fault per 4 KiB on every call, a third of the time."""
        cells = int(np.prod(shape))
        if not self._work or self._work[0].size < cells:
            self._work = (np.empty(cells, np.int64), np.empty(cells, np.int64), np.empty(cells), np.empty(cells))
        return [w[:cells].reshape(shape) for w in self._work]

    def _cached(self, key, cells: int, make):
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        value = make()
        if 0 < cells <= self.max_cells:
            while self._cache and self._cells + cells > self.max_cells:
                _, (old_cells, _) = self._cache.popitem(last=False)
                self._cells -= old_cells
            self._cache[key] = (cells, value)
            self._cells += cells
            return (cells, value)
        return (cells, value)

    def indices(self, n: int) -> np.ndarray:
        """``default_rng(seed).integers(0, n, size=(n_boot, n))``: resample b draws examples ``indices[b]``.

        Drawn once per `n` and kept (read-only), so every sample of `n` examples gets the same resamples.
        """
        n = int(n)

        def make():
            idx = np.random.default_rng(self.seed).integers(0, n, size=(self.n_boot, n))
            idx.flags.writeable = False
            return idx

        return self._cached(("indices", n), self.n_boot * n, make)[1]

    def _spearman_x(self, x: np.ndarray):
        """The resamples of `x` (finite, in the caller's order): its sorting, and per chunk of resamples the
        draw counts (x-sorted order), counts * (rank - mean rank) and sum(counts * (rank - mean rank)^2)."""
        n = len(x)
        perm = np.argsort(x, kind="stable")
        inv = np.empty(n, dtype=np.intp)
        inv[perm] = np.arange(n)
        gx = _tie_groups(x[perm])
        rng = np.random.default_rng(self.seed)
        mid = (n + 1) / 2.0  # the mean of the ranks 1..n, ties or not
        chunks = []
        chunk = max(1, min(self.n_boot, 2_000_000 // max(n, 1)))  # bound memory: ~2M cells at a time
        for start in range(0, self.n_boot, chunk):
            b = min(chunk, self.n_boot - start)
            idx = rng.integers(0, n, size=(b, n))
            # How often each example is drawn, per resample; ranks then follow from counts (no sort per resample).
            # Draws index the examples in the caller's order; map them to the sorted order used here.
            counts = np.bincount((inv[idx] + (np.arange(b) * n)[:, None]).ravel(), minlength=b * n).reshape(b, n)
            dx = _resample_ranks(counts, *gx) - mid
            cdx = counts * dx
            chunks.append((counts, cdx, (cdx * dx).sum(axis=1)))
        return perm, chunks

    def spearman(self, x: Sequence[float], y: Sequence[float]) -> np.ndarray:
        """`spearman_bootstrap(x, y, n_boot=self.n_boot, seed=self.seed)`, reusing the resamples of an `x` seen before."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        n = len(x)
        if self.n_boot <= 0 or n < 3:
            return np.full(max(self.n_boot, 0), np.nan)
        x = np.ascontiguousarray(x)
        perm, chunks = self._cached(("spearman", x.tobytes()), self.n_boot * n, lambda: self._spearman_x(x))[1]
        # Work in y's sorted order: a resample's rank of each y follows from the running count of draws.
        order, starts, group = _tie_groups(y[perm])
        ties = len(starts) < n
        out = np.empty(self.n_boot)
        start = 0
        for counts, cdx, sxx in chunks:
            b = len(counts)
            c, dy2, fy2, g = self.work_arrays(counts.shape)
            np.take(counts, order, axis=1, out=c, mode="clip")  # the draw counts in y's sorted order
            per = np.add.reduceat(c, starts, axis=1) if ties else c
            # Twice the rank minus twice the mean rank, an integer: 2 cum - (c - 1) - (n + 1), in place.
            if ties:
                dy2 = np.cumsum(per, axis=1)
            else:
                np.cumsum(per, axis=1, out=dy2)
            dy2 *= 2
            dy2 -= per
            dy2 -= n
            if ties:
                dy2 = dy2[:, group[order]]
            np.copyto(fy2, dy2, casting="unsafe")
            np.take(cdx, order, axis=1, out=g, mode="clip")
            num = np.einsum("ij,ij->i", g, fy2) / 2.0
            dy2 *= dy2
            syy = np.einsum("ij,ij->i", c, dy2).astype(np.float64) / 4.0
            den = np.sqrt(sxx * syy)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[start : start + b] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
            start += b
        return out


def _tie_groups(v: np.ndarray):
    """(order, starts of each group of equal values in sorted order, group of each element)."""
    order = np.argsort(v, kind="stable")
    sv = v[order]
    new = np.r_[True, sv[1:] != sv[:-1]]
    starts = np.flatnonzero(new)
    group = np.empty(len(v), dtype=np.intp)
    group[order] = np.cumsum(new) - 1
    return order, starts, group


def _resample_ranks(counts: np.ndarray, order: np.ndarray, starts: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Average rank, within each resample, of every original element (used with weight = its count).

    The elements of a tie group occupy ranks cum - c + 1 .. cum in the resample (c: the group's
    count, cum: counts of it and all smaller groups); their average rank is cum - (c - 1) / 2.
    """
    sorted_counts = counts if np.array_equal(order, np.arange(len(order))) else counts[:, order]
    per_group = np.add.reduceat(sorted_counts, starts, axis=1)
    cum = np.cumsum(per_group, axis=1)
    return (cum - (per_group - 1) / 2.0)[:, group]


def percentile_interval(replicates: Sequence[float], confidence: float = 0.95):
    """The percentile interval of bootstrap `replicates` (NaN replicates ignored): ``(low, high)``.

    NaN when there are no finite replicates.

    Example:
        >>> [round(v, 6) for v in percentile_interval(np.arange(101.0))]
        [2.5, 97.5]
    """
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return (math.nan, math.nan)
    a = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(r, [a, 1.0 - a])
    return (float(lo), float(hi))


def directional_test(p_one_sided: Sequence[float], estimates: Sequence[float], alpha: float = 0.05):
    """Intersection-union test of a directional claim (e.g. rho > 0) over the seeds of one condition.

    The claim holds for the condition when **every** seed's one-sided p-value (alternative:
    estimate > 0) is below `alpha`; the condition's p-value is the largest of them. This is a valid
    level-alpha test whatever the dependence between seeds, and a seed whose estimate has the
    wrong sign has a one-sided p near 1, so mixed signs are never significant.

    Args:
        p_one_sided (`Sequence[float]`): one-sided p-values, one per seed.
        estimates (`Sequence[float]`): the estimates (for the sign count).
        alpha (`float`, *optional*, defaults to 0.05): level.

    Returns:
        `pandas.DataFrame`, one row: `n`, `n_positive` (estimates > 0), `n_pass` (p < alpha),
        `p_iut` (the largest p; NaN when any p is missing or there is none), `significant`.

    Example:
        >>> directional_test([1e-12, 1 - 1e-12, 1e-12], [0.2, -0.2, 0.2])
           n  n_positive  n_pass  p_iut  significant
        0  3           2       2    1.0        False
    """
    import pandas as pd

    p = np.asarray(p_one_sided, dtype=np.float64)
    est = np.asarray(estimates, dtype=np.float64)
    p_iut = float(p.max()) if p.size and np.isfinite(p).all() else math.nan
    return pd.DataFrame(
        [
            {
                "n": int(p.size),
                "n_positive": int((est > 0).sum()),
                "n_pass": int((p < alpha).sum()),
                "p_iut": p_iut,
                "significant": bool(np.isfinite(p_iut) and p_iut < alpha),
            }
        ]
    )


def spearman_permutation_test(
    x: Sequence[float], y: Sequence[float], *, alternative: str = "greater", n_resamples: int = 100_000, seed: int = 0
):
    """Permutation p-value of Spearman's rho of `x` vs `y`: exact for n <= `EXACT_MAX_N`, else Monte Carlo.

    Exact: all n! orderings of `y` against `x` are enumerated and p is the share whose rho is at
    least as extreme as the observed one (``greater``: rho_perm >= rho; ``less``: <=;
    ``two-sided``: |rho_perm| >= |rho|), the observed ordering included. Monte Carlo (n > 8):
    `n_resamples` random permutations from ``default_rng(seed)``, p = (1 + count) / (1 + n_resamples).
    A relative tolerance of 1e-12 counts ties of rho as "at least as extreme".

    Returns:
        `pandas.DataFrame`, one row: `n`, `rho`, `alternative`, `method` ("exact" or
        "monte carlo"), `n_permutations`, `p_val`.

    Example:
        6 perfectly monotone points: one ordering of 720 reaches rho = 1.

        >>> t = spearman_permutation_test([1, 2, 3, 4, 5, 6], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
        >>> t[["n", "rho", "method", "n_permutations"]]
           n  rho method  n_permutations
        0  6  1.0  exact             720
        >>> float(t.p_val.iloc[0]) == 1 / 720
        True
    """
    import pandas as pd

    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d of the same length, got {x.shape} and {y.shape}")
    n = len(x)
    nan_row = {
        "n": n,
        "rho": math.nan,
        "alternative": alternative,
        "method": "exact" if n <= EXACT_MAX_N else "monte carlo",
        "n_permutations": 0,
        "p_val": math.nan,
    }
    if n < 3 or not np.isfinite(x).all() or not np.isfinite(y).all():
        return pd.DataFrame([nan_row])
    rho = float(spearman_rows(x[None], y[None])[0])
    if not np.isfinite(rho):
        return pd.DataFrame([nan_row])
    ry = rank_rows(y)
    if n <= EXACT_MAX_N:
        perms = np.array(list(itertools.permutations(range(n))), dtype=np.intp)
        method, count = "exact", len(perms)
        sims = spearman_rows(np.broadcast_to(x, perms.shape), ry[perms])
    else:
        rng = np.random.default_rng(seed)
        method, count = "monte carlo", int(n_resamples)
        sims = np.empty(count)
        chunk = max(1, 2_000_000 // n)
        for s in range(0, count, chunk):
            m = min(chunk, count - s)
            perm = np.argsort(rng.random((m, n)), axis=1)
            sims[s : s + m] = spearman_rows(np.broadcast_to(x, (m, n)), ry[perm])
    tol = 1e-12 * max(1.0, abs(rho))
    if alternative == "greater":
        hits = int((sims >= rho - tol).sum())
    elif alternative == "less":
        hits = int((sims <= rho + tol).sum())
    else:
        hits = int((np.abs(sims) >= abs(rho) - tol).sum())
    p = hits / count if method == "exact" else (1 + hits) / (1 + count)
    return pd.DataFrame(
        [{"n": n, "rho": rho, "alternative": alternative, "method": method, "n_permutations": count, "p_val": float(p)}]
    )


def cohen_d(x: Sequence[float], y: Sequence[float]):
    """Paired effect sizes of ``x - y``: d_z and d_av (both labelled; they differ when the pairs correlate).

    - ``d_z`` = mean(x - y) / sd(x - y): the standardised mean difference of the paired
      differences (what a paired test sees);
    - ``d_av`` = mean(x - y) / sqrt((sd(x)^2 + sd(y)^2) / 2): the difference in units of the two
      conditions' average sd (pingouin's ``compute_effsize(paired=True, eftype="cohen")``).

    Sample sds (ddof = 1). NaN when a denominator is 0 or there are fewer than 2 pairs.

    Returns:
        `pandas.DataFrame`, one row: `n`, `mean_diff`, `d_z`, `d_av`, `r_pairs` (Pearson r of x and y).

    Example:
        >>> cohen_d([1.0, 2.0, 3.0, 4.0], [0.9, 1.8, 2.7, 3.6]).round(4)
           n  mean_diff     d_z    d_av  r_pairs
        0  4       0.25  1.9365  0.2036      1.0
    """
    import pandas as pd

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"cohen_d: x and y must have the same shape, got {x.shape} and {y.shape}")
    n = len(x)
    nan = math.nan
    if n < 2:
        return pd.DataFrame(
            [{"n": n, "mean_diff": float(np.mean(x - y)) if n else nan, "d_z": nan, "d_av": nan, "r_pairs": nan}]
        )
    diff = x - y
    md = float(diff.mean())
    sd_d = float(diff.std(ddof=1))
    sd_av = math.sqrt((float(x.var(ddof=1)) + float(y.var(ddof=1))) / 2.0)
    sx, sy = float(x.std()), float(y.std())
    r = float(np.corrcoef(x, y)[0, 1]) if sx > 0 and sy > 0 else nan
    return pd.DataFrame(
        [
            {
                "n": n,
                "mean_diff": md,
                "d_z": md / sd_d if sd_d > 0 else nan,
                "d_av": md / sd_av if sd_av > 0 else nan,
                "r_pairs": r,
            }
        ]
    )
