"""The fixed, seeded, stratified sample of a tracked set that the instruments measure."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..entropy import CATEGORIES


def stratified_sample(categories: Sequence[str], per_category: Optional[int], seed: int = 0) -> np.ndarray:
    """Positions of a sample with at most `per_category` examples of each entropy category.

    Categories are taken in the order clean, ambiguous, contested (then any other label, sorted); each
    draws without replacement from one generator seeded with `seed`, so the sample depends on the
    categories, the size and the seed only (not on the number of processes or on the model). A category
    with fewer examples than `per_category` is taken whole.

    Args:
        categories (`Sequence[str]`): the category of every example of the set.
        per_category (`int`, *optional*): examples per category; `None` takes the whole set.
        seed (`int`, *optional*, defaults to 0): seed of the draw.

    Returns:
        `np.ndarray` of int64 positions into the set, in increasing order.

    Example:
        >>> cats = ["clean"] * 5 + ["contested"] * 2 + ["ambiguous"] * 3
        >>> picked = stratified_sample(cats, 2, seed=0)
        >>> len(picked), sorted({cats[i] for i in picked})
        (6, ['ambiguous', 'clean', 'contested'])
        >>> stratified_sample(cats, None).tolist() == list(range(10))
        True
    """
    cats = np.asarray(categories).astype(str)
    if per_category is None:
        return np.arange(len(cats), dtype=np.int64)
    if isinstance(per_category, bool) or not isinstance(per_category, (int, np.integer)) or per_category < 1:
        raise ValueError(
            f"the instrument sample size per category must be an integer >= 1 or None, got {per_category!r}"
        )
    rng = np.random.default_rng(seed)
    order = [c for c in CATEGORIES if c in set(cats)] + sorted(set(cats) - set(CATEGORIES))
    picked = []
    for cat in order:
        members = np.flatnonzero(cats == cat)
        if len(members) <= per_category:
            picked.append(members)
        else:
            picked.append(rng.choice(members, size=int(per_category), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)
