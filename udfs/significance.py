"""Confidence intervals and paired tests over per-user metric values.

Every comparison is paired over users: `a[i]` and `b[i]` are the same user's value under two
representations. Bootstrap intervals are percentile intervals of the mean. A bootstrap sample
is drawn as a row of counts (how often each user is drawn), so a sample's mean is a dot product
and the samples of many columns over the same users are one matrix product. The draws come in
chunks of at most `_MAX_DRAWS_PER_CHUNK` indices, so memory stays bounded (about 128 MiB while
drawing, plus one kept chunk of counts) whatever the number of users and samples, and a fixed
seed gives the same interval.
"""
from __future__ import annotations

import numpy as np
import scipy.stats

_MAX_DRAWS_PER_CHUNK = 1 << 23


def bootstrap_mean_ci(
    values: np.ndarray, n_samples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): the sample mean and the percentile bootstrap (1 - alpha) interval of it."""
    (mean, lo, hi), = bootstrap_mean_cis(np.asarray(values, dtype=np.float64).reshape(-1, 1),
                                         n_samples, alpha, seed)
    return mean, lo, hi


def bootstrap_mean_cis(
    columns: np.ndarray, n_samples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> list[tuple[float, float, float]]:
    """``bootstrap_mean_ci`` of every column of ``columns`` (users x columns), all resampled with
    the same draws of users: one pass over the draws serves every column, so the comparisons
    of many representations over the same users cost little more than one. A column gets the
    same interval here as on its own."""
    columns = np.asarray(columns, dtype=np.float64)
    if columns.ndim != 2:
        raise ValueError(f"columns must be a users x columns matrix, got shape {columns.shape}")
    _as_sample(columns, "values")
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    n = columns.shape[0]
    means = np.empty((n_samples, columns.shape[1]), dtype=np.float64)
    for start, counts in _resample_counts(n, n_samples, seed):
        # A draw's mean is its count of each user times that user's value, over n.
        means[start:start + counts.shape[0]] = counts @ columns / n
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    return [(float(m), float(a), float(b)) for m, a, b in zip(columns.mean(axis=0), lo, hi)]


_COUNTS_CACHE: dict[tuple[int, int, int], list[tuple[int, np.ndarray]]] = {}


def _resample_counts(n: int, n_samples: int, seed: int):
    """Yield (first sample, counts): chunks of the (n_samples x n) matrix of how often each of
    the n users is drawn in each bootstrap sample, from ``seed``. The last matrix that fits
    in one chunk is kept: the evaluate job asks for the same (n, n_samples, seed) once per
    metric, representation and pair, and drawing is most of a bootstrap's cost."""
    key = (n, n_samples, seed)
    if key in _COUNTS_CACHE:
        yield from _COUNTS_CACHE[key]
        return
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _MAX_DRAWS_PER_CHUNK // n)
    chunks = []
    for start in range(0, n_samples, rows_per_chunk):
        rows = min(rows_per_chunk, n_samples - start)
        draws = rng.integers(0, n, size=(rows, n))
        draws += np.arange(rows)[:, None] * n
        counts = np.bincount(draws.ravel(), minlength=rows * n)
        del draws
        counts = counts.reshape(rows, n).astype(np.float64)
        chunks.append((start, counts))
        yield start, counts
    if len(chunks) == 1:
        _COUNTS_CACHE.clear()
        _COUNTS_CACHE[key] = chunks


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
