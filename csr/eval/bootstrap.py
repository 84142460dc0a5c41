"""The paired bootstrap the evaluations share: resample the evaluated items (POPE questions, test
images) with replacement, the same draws for both sides of a comparison, so that an interval
reflects only the items whose result differs; 95% percentile intervals."""

from __future__ import annotations


def resample_indices(n: int, n_resamples: int, seed: int = 0):
    """(n_resamples, n) item indices drawn with replacement from numpy's default generator at `seed`."""
    import numpy as np

    if n < 1 or n_resamples < 1:
        raise ValueError(f"resampling needs at least one item and one resample (got {n} items, "
                         f"{n_resamples} resamples)")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def interval95(samples) -> list[float]:
    """The 2.5th and 97.5th percentiles of resampled values (numpy's linear interpolation)."""
    import numpy as np

    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]
