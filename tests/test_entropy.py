import math

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from hf_entropy_callback import annotation_entropy, entropy_category, quartile_bins, tercile_bins
from hf_entropy_callback.entropy import quantile_bins


def test_hand_worked_cases():
    assert annotation_entropy([100, 0, 0]) == 0.0
    assert annotation_entropy([50, 50, 0]) == pytest.approx(math.log(2))
    assert annotation_entropy([1, 1, 1]) == pytest.approx(math.log(3))
    # 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    assert annotation_entropy([2, 1, 1]) == pytest.approx(1.5 * math.log(2))


def test_matches_scipy_vectorised_any_k():
    rng = np.random.default_rng(1)
    for k in (2, 3, 5):
        counts = rng.integers(0, 20, size=(50, k))
        counts[:, 0] += 1  # no all-zero rows
        counts[::7, 1:] = 0  # one-hot rows exercise 0 ln 0
        got = annotation_entropy(counts)
        want = scipy_entropy(counts, axis=1)
        assert got.shape == (50,)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    # class axis other than the last
    counts = rng.integers(1, 9, size=(3, 4, 6))
    np.testing.assert_allclose(annotation_entropy(counts, axis=0), scipy_entropy(counts, axis=0))


def test_base2_relation_with_chaosnli_field():
    counts = [4, 67, 29]
    assert annotation_entropy(counts) / math.log(2) == pytest.approx(scipy_entropy(counts, base=2))


@pytest.mark.parametrize("bad", [[0, 0, 0], [-1, 2, 3], [np.nan, 1, 1], []])
def test_bad_counts(bad):
    with pytest.raises(ValueError):
        annotation_entropy(bad)


def test_categories_on_boundaries():
    assert entropy_category(0.0) == "clean"
    assert entropy_category(np.nextafter(0.4, 0)) == "clean"
    assert entropy_category(0.4) == "ambiguous"
    assert entropy_category(0.7) == "ambiguous"
    assert entropy_category(np.nextafter(0.7, 1)) == "contested"
    assert entropy_category(math.log(3)) == "contested"
    out = entropy_category(np.array([[0.1, 0.5], [0.9, 0.4]]))
    assert out.tolist() == [["clean", "ambiguous"], ["contested", "ambiguous"]]
    assert entropy_category(0.5, thresholds=(0.6, 0.8)) == "clean"
    with pytest.raises(ValueError):
        entropy_category(0.5, thresholds=(0.8, 0.6))
    with pytest.raises(ValueError):
        entropy_category([0.1, np.nan])


def test_quantile_bins_equal_frequency_and_monotone():
    h = np.random.default_rng(2).random(400)
    q = quartile_bins(h)
    assert np.bincount(q).tolist() == [100, 100, 100, 100]
    t = tercile_bins(h)
    assert set(np.bincount(t).tolist()) <= {133, 134}
    # bins are ordered: every value of bin b is <= every value of bin b+1
    for b in range(3):
        assert h[q == b].max() <= h[q == b + 1].min()
    # agrees with pandas' qcut on distinct values
    import pandas as pd

    np.testing.assert_array_equal(q, pd.qcut(h, 4, labels=False))


def test_quantile_bins_ties_stay_together():
    h = np.array([0.0] * 6 + [0.5, 0.6, 0.9, 1.0])
    b = quantile_bins(h, 4)
    assert len(set(b[:6].tolist())) == 1
    with pytest.raises(ValueError):
        quantile_bins([], 3)
