"""Confidence intervals and paired tests over per-user metric values.

Every comparison is paired over users: `a[i]` and `b[i]` are the same user's value under two
representations. Bootstrap intervals are percentile intervals of the mean. A bootstrap sample
is drawn as a row of counts (how often each user is drawn), so a sample's mean is a dot product
and the samples of many columns over the same users are one matrix product. The draws come in
chunks of at most `_MAX_DRAWS_PER_CHUNK` indices, so memory stays bounded (about 128 MiB while
drawing, plus one kept chunk of counts) whatever the number of users and samples, and a fixed
seed gives the same interval.

Three paired tests of "the mean difference is 0" give a comparison's p-value (``TESTS``,
``paired_p_values``): the paired t-test, a sign-flip randomisation test and Wilcoxon's
signed-rank test. Per-user differences of ranking metrics are zero-heavy and skewed, and
Wilcoxon tests symmetry about 0, not a zero mean: on this project's own differences it rejects
a true zero mean far more often than its nominal rate (docs/BENCHMARKS.md, twelfth session),
where the t-test and the randomisation test hold it (Ihemelandu & Ekstrand, SIGIR 2023). The
randomisation test draws its sign flips the way the bootstrap draws users: one matrix of
random signs times the difference columns, in bounded chunks, from a seed.
"""
from __future__ import annotations

import numpy as np

# scipy.stats is imported where a p-value needs it: the config imports ``TESTS`` from here, and
# every job (``recommend``'s cold start too) imports the config.

_MAX_DRAWS_PER_CHUNK = 1 << 23
# Sign flips per chunk of the randomisation test (float64 signs: 32 MiB).
_MAX_FLIPS_PER_CHUNK = 1 << 22

TESTS = ("t", "randomization", "wilcoxon")
# Enough draws for the smallest p-value, 1 / (1 + draws) = 5e-5, to stay below 0.05 after Holm
# over several hundred comparisons (45 pairs of a metric@K need 20 * 45 = 900 at least).
RANDOMIZATION_DRAWS = 20_000


def bootstrap_mean_ci(
    values: np.ndarray, n_samples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): the sample mean and the percentile bootstrap (1 - alpha) interval of it."""
    return bootstrap_mean_cis(np.asarray(values, dtype=np.float64).reshape(-1, 1), n_samples, alpha, seed)[0]


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


def wilcoxon_p(differences: np.ndarray, zero_method: str = "wilcox") -> float:
    """Two-sided Wilcoxon signed-rank p-value of the paired differences (a - b per user), as
    ``scipy.stats.wilcoxon(a, b)``; 1.0 when every difference is zero.

    zero_method "wilcox" (scipy's default) drops the users whose values tie, the usual case for
    two representations that both miss a user; "pratt" and "zsplit" keep them.
    """
    d = _as_sample(differences, "differences")
    if not np.any(d != 0):
        return 1.0
    import scipy.stats

    return float(scipy.stats.wilcoxon(d, zero_method=zero_method, alternative="two-sided").pvalue)


def paired_t_ps(differences: np.ndarray) -> np.ndarray:
    """Two-sided paired t-test p-value of each column of ``differences`` (users x columns, a - b
    per user): the t-test of a mean of 0, as ``scipy.stats.ttest_rel(a, b)``. A column whose
    differences are all zero gets 1.0 (no evidence of a difference; scipy gives NaN), one whose
    differences are all equal and not zero gets 0.0 (no spread: the difference is certain), and
    a column of fewer than two users gets 1.0 (nothing to test with)."""
    d = _as_columns(differences)
    n = d.shape[0]
    out = np.ones(d.shape[1], dtype=np.float64)
    if n < 2:
        return out
    mean = d.mean(axis=0)
    sd, spread = _spread(d)
    t = np.divide(mean, sd / np.sqrt(n), out=np.zeros_like(mean), where=spread)
    import scipy.stats

    out[spread] = 2 * scipy.stats.t.sf(np.abs(t[spread]), df=n - 1)
    out[~spread & (mean != 0)] = 0.0
    return out


def sign_flip_ps(differences: np.ndarray, n_draws: int = RANDOMIZATION_DRAWS, seed: int = 0) -> np.ndarray:
    """Two-sided paired randomisation p-value of each column of ``differences`` (users x
    columns): under "a and b are exchangeable for each user" every difference's sign is a fair
    coin, so each draw flips each user's sign at random (the same draw for every column: one
    matrix product serves all pairs over the same users) and
    p = (1 + #draws with |mean*| >= |mean|) / (1 + n_draws), never 0. Signs are drawn in chunks
    of at most ``_MAX_FLIPS_PER_CHUNK`` (memory stays bounded); a fixed seed gives the same p."""
    d = _as_columns(differences)
    if isinstance(n_draws, bool) or not isinstance(n_draws, (int, np.integer)) or n_draws < 1:
        raise ValueError(f"n_draws must be a positive integer, got {n_draws!r}")
    n = d.shape[0]
    observed = np.abs(d.sum(axis=0))
    # A flipped sum equal to the observed one up to rounding counts as "as extreme" (exact ties
    # are common: many users share the same few metric values).
    threshold = observed - 1e-9 * np.maximum(np.abs(d).sum(axis=0), 1e-300)
    extreme = np.zeros(d.shape[1], dtype=np.int64)
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _MAX_FLIPS_PER_CHUNK // max(n, 1))
    for start in range(0, n_draws, rows_per_chunk):
        rows = min(rows_per_chunk, n_draws - start)
        # Each draw takes whole 64-bit words (one bit a user), so the chunk size never changes the draws.
        words = rng.integers(0, np.iinfo(np.uint64).max, size=(rows, -(-n // 64)), dtype=np.uint64, endpoint=True)
        bits = np.unpackbits(words.view(np.uint8), axis=1, count=n)
        signs = 1.0 - 2.0 * bits
        extreme += (np.abs(signs @ d) >= threshold).sum(axis=0)
    return (1.0 + extreme) / (1.0 + n_draws)


def effect_sizes(differences: np.ndarray) -> np.ndarray:
    """Cohen's d_z of each column of ``differences`` (users x columns): the mean difference over
    the standard deviation of the differences (ddof 1), a size that does not grow with the
    number of users as a p-value does. 0 where every difference is 0; +-inf where all are equal
    and not 0; NaN for fewer than two users."""
    d = _as_columns(differences)
    mean = d.mean(axis=0)
    if d.shape[0] < 2:
        return np.full(d.shape[1], np.nan)
    sd, spread = _spread(d)
    out = np.where(mean > 0, np.inf, -np.inf)
    out[mean == 0] = 0.0
    np.divide(mean, sd, out=out, where=spread)
    return out


def paired_p_values(test: str, differences: np.ndarray, seed: int = 0,
                    n_draws: int = RANDOMIZATION_DRAWS) -> np.ndarray:
    """The two-sided p-value of ``test`` (one of ``TESTS``) for each column of ``differences``
    (users x columns, a - b per user); ``seed`` and ``n_draws`` serve the randomisation test."""
    d = _as_columns(differences)
    if test == "t":
        return paired_t_ps(d)
    if test == "randomization":
        return sign_flip_ps(d, n_draws, seed)
    if test == "wilcoxon":
        return np.array([wilcoxon_p(d[:, j]) for j in range(d.shape[1])], dtype=np.float64)
    raise ValueError(f"test must be one of {list(TESTS)}, got {test!r}")


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


def _spread(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(standard deviation (ddof 1), whether it is a spread) of each column: a spread that is
    rounding noise of equal differences counts as none."""
    sd = d.std(axis=0, ddof=1)
    return sd, sd > 1e-12 * np.maximum(np.abs(d).max(axis=0), 1e-300)


def _as_columns(differences: np.ndarray) -> np.ndarray:
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"differences must be a users x columns matrix, got shape {d.shape}")
    _as_sample(d, "differences")
    return d
