"""One seeded sample of class ids for every stage: evaluation scores it, export writes and verifies
it, so their figures are about the same classes whatever k is."""
from __future__ import annotations

import numpy as np

SAMPLE_SEED = 0


def seeded_sample(k: int, n: int) -> np.ndarray:
    """n distinct class ids of k, sorted, the same on every call; every id when k <= n."""
    if k <= n:
        return np.arange(k)
    return np.sort(np.random.default_rng(SAMPLE_SEED).choice(k, n, replace=False))


def class_sample(num_classes: int, size: int | None) -> np.ndarray | None:
    """A seeded sample of `size` classes; None (every class) when size is None or >= k."""
    if size is None or size >= num_classes:
        return None
    return seeded_sample(num_classes, size)
