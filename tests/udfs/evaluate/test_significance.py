"""Bootstrap intervals, the paired tests (t, sign-flip randomisation, Wilcoxon), the effect size and
the Holm correction, each against an independent answer."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import udfs.evaluate.significance as significance
from udfs.evaluate.significance import bootstrap_mean_ci, holm, wilcoxon_p


def _column(a, b) -> np.ndarray:
    """The per-user differences a - b as the one column the paired functions take."""
    return (np.asarray(a, dtype=np.float64) - b).reshape(-1, 1)


@pytest.mark.parametrize(
    ("pvalues", "adjusted"),
    [
        # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
        ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),
        # 0.6 * 2 = 1.2 is capped at 1, and 0.7 may not fall below it
        ([0.6, 0.7, 0.01], [1.0, 1.0, 0.03]),
        ([0.5, 0.2], [0.5, 0.4]),
        ([0.02], [0.02]),
        ([], []),
    ],
)
def test_holm_matches_hand_computed_values(pvalues, adjusted):
    np.testing.assert_allclose(holm(np.array(pvalues)), adjusted, rtol=1e-12)


def test_holm_is_monotone_in_the_raw_order_and_never_below_the_raw_p():
    rng = np.random.default_rng(2)
    p = rng.uniform(0, 0.2, 40)
    adjusted = holm(p)
    order = np.argsort(p)
    assert (np.diff(adjusted[order]) >= 0).all()
    assert (adjusted >= p).all() and (adjusted <= 1).all()


def test_holm_rejects_values_that_are_not_probabilities():
    with pytest.raises(ValueError, match="must lie in"):
        holm(np.array([0.1, np.nan]))


def test_bootstrap_interval_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(123)
    covered = 0
    repeats = 200
    for repeat in range(repeats):
        sample = rng.normal(3.0, 2.0, 60)
        mean, lo, hi = bootstrap_mean_ci(sample, n_samples=400, alpha=0.05, seed=repeat)
        assert lo <= mean <= hi
        covered += lo <= 3.0 <= hi
    # Nominal 95%: a binomial(200, 0.95) count lies in 178..198 with probability > 0.999.
    assert 178 <= covered <= 198


def test_wider_confidence_gives_a_wider_interval():
    sample = np.random.default_rng(0).exponential(1.0, 100)
    _, lo_95, hi_95 = bootstrap_mean_ci(sample, n_samples=2000, alpha=0.05, seed=1)
    _, lo_50, hi_50 = bootstrap_mean_ci(sample, n_samples=2000, alpha=0.5, seed=1)
    assert lo_95 < lo_50 < hi_50 < hi_95


def test_same_seed_same_interval_and_another_seed_another():
    sample = np.random.default_rng(4).normal(size=80)
    assert bootstrap_mean_ci(sample, 500, seed=7) == bootstrap_mean_ci(sample, 500, seed=7)
    assert bootstrap_mean_ci(sample, 500, seed=7) != bootstrap_mean_ci(sample, 500, seed=8)
    a, b = sample, sample[::-1]
    assert bootstrap_mean_ci(a - b, 500, seed=3) == bootstrap_mean_ci(a - b, 500, seed=3)


def test_chunking_does_not_change_the_interval(monkeypatch):
    sample = np.random.default_rng(5).normal(size=97)
    whole = bootstrap_mean_ci(sample, 300, seed=9)
    monkeypatch.setattr(significance, "_MAX_DRAWS_PER_CHUNK", 97 * 7)
    significance._COUNTS_CACHE.clear()  # else the kept draws of the first call answer
    assert bootstrap_mean_ci(sample, 300, seed=9) == whole


def test_counts_give_the_means_of_the_textbook_resampling():
    """A sample's mean from its counts equals the mean of the values drawn by index."""
    values = np.random.default_rng(11).exponential(size=60)
    rng = np.random.default_rng(3)
    means = values[rng.integers(0, 60, size=(400, 60))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    significance._COUNTS_CACHE.clear()
    mean, got_lo, got_hi = bootstrap_mean_ci(values, 400, seed=3)
    assert mean == pytest.approx(values.mean(), rel=1e-12)
    assert (got_lo, got_hi) == pytest.approx((lo, hi), rel=1e-12)


def test_columns_resampled_together_get_their_own_intervals():
    columns = np.random.default_rng(12).normal(size=(70, 4))
    together = significance.bootstrap_mean_cis(columns, 300, seed=5)
    for j in range(4):
        significance._COUNTS_CACHE.clear()
        assert together[j] == pytest.approx(bootstrap_mean_ci(columns[:, j], 300, seed=5), rel=1e-12)


def test_kept_draws_serve_only_the_same_users_samples_and_seed():
    a = np.random.default_rng(13).normal(size=97)
    b = np.random.default_rng(14).normal(size=50)
    significance._COUNTS_CACHE.clear()
    fresh = {key: bootstrap_mean_ci(a, n, seed=seed) for key, (n, seed) in
             {"200/1": (200, 1), "300/1": (300, 1), "200/2": (200, 2)}.items()}
    significance._COUNTS_CACHE.clear()
    first = bootstrap_mean_ci(a, 200, seed=1)
    assert first == fresh["200/1"]
    assert bootstrap_mean_ci(a, 300, seed=1) == fresh["300/1"]
    assert bootstrap_mean_ci(a, 200, seed=2) == fresh["200/2"]
    bootstrap_mean_ci(b, 200, seed=1)  # other users: drawn anew
    assert bootstrap_mean_ci(a, 200, seed=1) == first


def test_identical_samples_give_p_one_and_a_zero_interval():
    values = np.random.default_rng(6).uniform(size=50)
    assert wilcoxon_p(values - values.copy()) == 1.0
    assert bootstrap_mean_ci(values - values.copy(), 200, seed=0) == (0.0, 0.0, 0.0)


def test_paired_interval_is_around_the_mean_difference():
    rng = np.random.default_rng(8)
    a = rng.uniform(size=300)
    b = a - 0.1 + rng.normal(0, 0.01, 300)
    mean_diff, lo, hi = bootstrap_mean_ci(a - b, 1000, seed=0)
    assert mean_diff == pytest.approx(np.mean(a - b))
    assert 0.09 < lo < mean_diff < hi < 0.11


def test_wilcoxon_exact_p_for_five_positive_differences():
    # All 5 signed ranks positive: 1 of 2^5 sign patterns per tail, so p = 2 / 32.
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert wilcoxon_p(a + np.array([1, 2, 3, 4, 5]) - a) == pytest.approx(0.0625)


def test_wilcoxon_separates_a_shift_from_noise():
    rng = np.random.default_rng(10)
    a = rng.uniform(size=200)
    assert wilcoxon_p(a + 0.05 + rng.normal(0, 0.05, 200) - a) < 1e-6
    assert wilcoxon_p(a + rng.normal(0, 0.05, 200) - a) > 0.01


def test_wilcoxon_drops_tied_users_by_default():
    # Most users tie (both representations miss them): only the 6 differing users count, all
    # positive, so the rank sum is 21 against a mean of 6*7/4 = 10.5 and a variance of
    # 6*7*13/24; scipy switches to the normal approximation once zeros are present.
    a = np.r_[np.zeros(100), [0.5, 0.4, 0.3, 0.2, 0.6, 0.7]]
    b = np.zeros_like(a)
    z = (21 - 10.5) / math.sqrt(6 * 7 * 13 / 24)
    assert wilcoxon_p(a - b) == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-9)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: wilcoxon_p(np.array([0.1, np.inf])), "NaN or infinite"),
        (lambda: bootstrap_mean_ci(np.array([]), 10), "is empty"),
        (lambda: bootstrap_mean_ci(np.array([1.0, np.nan]), 10), "NaN"),
        (lambda: bootstrap_mean_ci(np.ones(3), 0), "n_samples"),
        (lambda: bootstrap_mean_ci(np.ones(3), 10, alpha=1.5), "alpha"),
    ],
)
def test_bad_inputs_raise_errors_that_say_what_to_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# The paired t-test, the sign-flip randomisation test and the effect size.

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_t_matches_scipy_ttest_rel(seed):
    rng = np.random.default_rng(seed)
    a = rng.exponential(size=57)
    b = a + rng.normal(0.1 * seed, 0.5, 57)
    expected = scipy.stats.ttest_rel(a, b).pvalue
    assert significance.paired_t_ps(_column(a, b))[0] == pytest.approx(expected, rel=1e-10)


def test_paired_t_of_columns_equals_each_column_alone():
    d = np.random.default_rng(3).normal(0.05, 1, size=(40, 5))
    together = significance.paired_t_ps(d)
    for j in range(5):
        assert together[j] == pytest.approx(scipy.stats.ttest_1samp(d[:, j], 0).pvalue, rel=1e-10)


def test_paired_t_without_spread():
    # All zero: no evidence (scipy says NaN); all equal and not zero: certain; one user: nothing to test.
    assert significance.paired_t_ps(_column(np.ones(9), np.ones(9)))[0] == 1.0
    assert significance.paired_t_ps(_column(np.full(9, 0.3), np.full(9, 0.1)))[0] == 0.0
    assert significance.paired_t_ps(_column([0.5], [0.1]))[0] == 1.0


def _exact_sign_flip_p(d: np.ndarray) -> float:
    """Every one of the 2^n sign patterns: the share whose |sum| reaches the observed |sum|."""
    n = d.shape[0]
    patterns = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * -2 + 1
    sums = np.abs(patterns @ d)
    return float(np.mean(sums >= abs(d.sum()) - 1e-12))


@pytest.mark.parametrize("values", [
    [0.5, 0.2, 0.1, 0.0, 0.3, -0.1, 0.25, 0.0, 0.4, 0.15],
    [1.0, -1.0, 1.0, 1.0, 0.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0],  # many ties, as per-user hits are
    [0.1, 0.2, -0.15, 0.05, -0.3, 0.02, 0.3, -0.2],
])
def test_sign_flip_p_matches_the_enumeration_of_all_sign_patterns(values):
    d = np.array(values)
    exact = _exact_sign_flip_p(d)
    draws = 40_000
    got = significance.sign_flip_ps(_column(d, 0.0), n_draws=draws, seed=1)[0]
    # The Monte Carlo estimate lies within 5 standard errors of the exact p (plus the +1's bias).
    assert abs(got - exact) <= 5 * math.sqrt(exact * (1 - exact) / draws) + 2 / draws


def test_sign_flip_p_is_seeded_never_zero_and_one_without_differences():
    d = np.random.default_rng(4).normal(1.0, 0.2, size=(30, 1))
    p = significance.sign_flip_ps(d, 1000, seed=3)
    assert p[0] == pytest.approx(1 / 1001)  # no flip reaches an all-positive sum
    assert (significance.sign_flip_ps(d, 1000, seed=3) == p).all()
    assert significance.sign_flip_ps(_column(np.ones(7), np.ones(7)), 500)[0] == 1.0


def test_sign_flip_columns_share_draws_and_chunking_changes_nothing(monkeypatch):
    d = np.random.default_rng(5).normal(0.1, 1, size=(50, 3))
    together = significance.sign_flip_ps(d, 3000, seed=9)
    for j in range(3):
        assert significance.sign_flip_ps(d[:, [j]], 3000, seed=9)[0] == together[j]
    monkeypatch.setattr(significance, "_MAX_FLIPS_PER_CHUNK", 50 * 7)
    assert (significance.sign_flip_ps(d, 3000, seed=9) == together).all()


def test_the_default_draws_let_the_smallest_p_survive_holm_over_many_pairs():
    smallest = significance.sign_flip_ps(_column(np.full(40, 1.0), np.zeros(40)), seed=0)[0]
    assert smallest == pytest.approx(1 / (1 + significance.RANDOMIZATION_DRAWS))
    assert holm(np.full(45, smallest)).max() < 0.05


def test_effect_size_by_hand():
    # differences 1, 2, 3, 6: mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14 / 3.
    a = np.array([1.0, 2.0, 3.0, 6.0])
    assert significance.effect_sizes(_column(a, np.zeros(4)))[0] == pytest.approx(3 / math.sqrt(14 / 3))
    assert significance.effect_sizes(_column(np.zeros(4), a))[0] == pytest.approx(-3 / math.sqrt(14 / 3))
    assert significance.effect_sizes(_column(np.ones(5), np.ones(5)))[0] == 0.0
    assert significance.effect_sizes(_column(np.full(3, 2.0), np.ones(3)))[0] == math.inf


@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=2, max_size=30),
       st.floats(0.1, 10), st.floats(-0.5, 0.5))
@settings(max_examples=60, deadline=None)
def test_effect_size_and_t_do_not_depend_on_the_unit(values, scale, shift):
    d = np.array(values) + shift
    d = d.reshape(-1, 1)
    assume(d.std() > 1e-6)
    assert significance.effect_sizes(d * scale)[0] == pytest.approx(significance.effect_sizes(d)[0], rel=1e-9)
    assert significance.paired_t_ps(d * scale)[0] == pytest.approx(significance.paired_t_ps(d)[0], rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("test", significance.TESTS)
def test_every_test_finds_a_clear_shift_and_not_noise(test):
    rng = np.random.default_rng(10)
    shifted = (0.05 + rng.normal(0, 0.05, 200)).reshape(-1, 1)
    noise = rng.normal(0, 0.05, (200, 1))
    p = significance.paired_p_values(test, np.hstack([shifted, noise]), seed=1)
    assert p[0] < 1e-4 and p[1] > 0.01


def test_an_unknown_test_is_refused():
    with pytest.raises(ValueError, match="test must be one of"):
        significance.paired_p_values("welch", np.zeros((3, 1)))
