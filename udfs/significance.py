"""Confidence intervals and paired tests over per-user metric values.

Every comparison is paired over users: `a[i]` and `b[i]` are the same user's value under two
representations. Bootstrap intervals are percentile intervals of the mean; the resampling is
vectorised in chunks of at most `_MAX_DRAWS_PER_CHUNK` indices, so memory stays bounded (about
128 MiB) whatever the number of users and samples, and a fixed seed gives the same interval.
"""
from __future__ import annotations

import numpy as np
import scipy.stats

_MAX_DRAWS_PER_CHUNK = 1 << 23


def bootstrap_mean_ci(
    values: np.ndarray, n_samples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): the sample mean and the percentile bootstrap (1 - alpha) interval of it."""
    values = _as_sample(values, "values")
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _MAX_DRAWS_PER_CHUNK // n)
    means = np.empty(n_samples, dtype=np.float64)
    for start in range(0, n_samples, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_samples)
        draws = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[draws].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(values.mean()), float(lo), float(hi)


def paired_bootstrap_ci(
    a: np.ndarray, b: np.ndarray, n_samples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean of a - b, lo, hi): users resampled as pairs, so the interval reflects paired variance."""
    a, b = _as_pair(a, b)
    return bootstrap_mean_ci(a - b, n_samples=n_samples, alpha=alpha, seed=seed)


def wilcoxon_p(a: np.ndarray, b: np.ndarray, zero_method: str = "wilcox") -> float:
    """Two-sided Wilcoxon signed-rank p-value of a vs b; 1.0 when every difference is zero.

    zero_method "wilcox" (scipy's default) drops the users whose values tie, the usual case for
    two representations that both miss a user; "pratt" and "zsplit" keep them.
    """
    a, b = _as_pair(a, b)
    if not np.any(a != b):
        return 1.0
    result = scipy.stats.wilcoxon(a, b, zero_method=zero_method, alternative="two-sided")
    return float(result.pvalue)


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values, in the input order, monotone and capped at 1.

    The i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) * p_(j)).
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"p-values must lie in [0, 1] without NaN, got {p.tolist()}")
    m = p.shape[0]
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m, dtype=np.float64)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def _as_sample(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty: a bootstrap needs at least one user's value")
    if not np.isfinite(array).all():
        raise ValueError(
            f"{name} holds {int((~np.isfinite(array)).sum())} NaN or infinite values: "
            "per-user metrics must be finite (exclude users without relevant items upstream)"
        )
    return array


def _as_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_sample(a, "a"), _as_sample(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"a has {a.shape[0]} values and b has {b.shape[0]}: a paired comparison needs the "
            "same users in the same order on both sides (join on user_id first)"
        )
    return a, b
