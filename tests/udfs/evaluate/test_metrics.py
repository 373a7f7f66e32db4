"""Ranking metrics: hand-computed goldens, ranx, a textbook per-user loop, and properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udfs.evaluate.metrics import METRICS, hit_matrix, ranking_metrics, user_metrics_frame


def compute(recommended, relevant, ks):
    hits, n_relevant = hit_matrix(np.asarray(recommended, dtype=object), relevant)
    return ranking_metrics(hits, n_relevant, ks)


def textbook_metrics(ranking, relevant, k):
    """One user's metrics from the definitions, one loop; padding (None) never matches."""
    top = ranking[:k]
    hit = [item is not None and item in relevant for item in top]
    n_hits = sum(hit)
    first = next((rank for rank, h in enumerate(hit, start=1) if h), None)
    dcg = sum(1 / math.log2(rank + 1) for rank, h in enumerate(hit, start=1) if h)
    idcg = sum(1 / math.log2(rank + 1) for rank in range(1, min(k, len(relevant)) + 1))
    precisions = [sum(hit[:rank]) / rank for rank, h in enumerate(hit, start=1) if h]
    return {
        "recall": n_hits / len(relevant),
        "precision": n_hits / k,
        "hit_rate": float(n_hits > 0),
        "mrr": 1 / first if first else 0.0,
        "ndcg": dcg / idcg,
        "map": sum(precisions) / min(k, len(relevant)),
    }


def test_golden_values_computed_by_hand():
    recommended = [["a", "b", "c", "d"], ["x", "y", "z", "w"], ["p", None, None, None]]
    relevant = [{"a", "c"}, {"w", "q", "r"}, {"p"}]
    values = compute(recommended, relevant, [1, 2, 4])
    golden = {
        # user 0: hits at ranks 1 and 3 of 2 relevant
        ("recall", 1): [0.5, 0, 1], ("recall", 2): [0.5, 0, 1], ("recall", 4): [1, 1 / 3, 1],
        ("precision", 1): [1, 0, 1], ("precision", 2): [0.5, 0, 0.5], ("precision", 4): [0.5, 0.25, 0.25],
        ("hit_rate", 2): [1, 0, 1], ("hit_rate", 4): [1, 1, 1],
        ("mrr", 2): [1, 0, 1], ("mrr", 4): [1, 0.25, 1],
        ("ndcg", 1): [1, 0, 1],
        ("ndcg", 2): [1 / (1 + 1 / math.log2(3)), 0, 1],
        ("ndcg", 4): [(1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)), (1 / math.log2(5)) / (1 + 1 / math.log2(3) + 1 / math.log2(4)), 1],
        ("map", 1): [1, 0, 1], ("map", 2): [0.5, 0, 1], ("map", 4): [(1 + 2 / 3) / 2, (1 / 4) / 3, 1],
    }
    for key, expected in golden.items():
        np.testing.assert_allclose(values[key], expected, rtol=1e-12, err_msg=str(key))


def random_rankings(rng, n_users, width, n_items, short_lists):
    universe = np.array([f"i{j}" for j in range(n_items)], dtype=object)
    recommended = np.full((n_users, width), None, dtype=object)
    relevant = []
    for user in range(n_users):
        length = int(rng.integers(1, width + 1)) if short_lists else width
        recommended[user, :length] = rng.choice(universe, size=length, replace=False)
        relevant.append(set(rng.choice(universe, size=min(int(rng.integers(1, 15)), n_items), replace=False)))
    return recommended, relevant


def test_matches_a_textbook_per_user_loop_on_random_rankings():
    rng = np.random.default_rng(11)
    recommended, relevant = random_rankings(rng, n_users=300, width=20, n_items=60, short_lists=True)
    ks = [1, 3, 10, 20]
    values = compute(recommended, relevant, ks)
    for user in range(len(relevant)):
        for k in ks:
            expected = textbook_metrics(list(recommended[user]), relevant[user], k)
            for metric in METRICS:
                assert values[(metric, k)][user] == pytest.approx(expected[metric], rel=1e-12, abs=1e-15), (user, metric, k)


@pytest.mark.slow  # ranx compiles its numba kernels on first use: about a minute on 2 cores
def test_matches_ranx_on_random_rankings():
    import ranx

    rng = np.random.default_rng(5)
    recommended, relevant = random_rankings(rng, n_users=200, width=20, n_items=60, short_lists=True)
    ks = [1, 5, 10, 20]
    values = compute(recommended, relevant, ks)
    users = [f"u{i}" for i in range(len(relevant))]
    qrels = ranx.Qrels({u: {item: 1 for item in rel} for u, rel in zip(users, relevant)})
    run = ranx.Run({
        u: {item: float(len(row) - rank) for rank, item in enumerate(row) if item is not None}
        for u, row in zip(users, recommended)
    })
    # Our metric names are ranx's metric names.
    ranx.evaluate(qrels, run, [f"{m}@{k}" for m in METRICS for k in ks], save_results_in_run=True)
    n_relevant = np.array([len(r) for r in relevant])
    for metric in METRICS:
        for k in ks:
            theirs = np.array([run.scores[f"{metric}@{k}"][u] for u in users])
            if metric == "map":
                # ranx divides average precision by |R|; ours by min(k, |R|) (see udfs.evaluate.metrics).
                theirs = theirs * n_relevant / np.minimum(k, n_relevant)
            np.testing.assert_allclose(values[(metric, k)], theirs, rtol=1e-9, err_msg=f"{metric}@{k}")


def test_integer_ids_with_minus_one_padding():
    hits, n_relevant = hit_matrix(np.array([[3, -1, -1], [7, 3, 9]]), [np.array([3, 9]), [9, 9]])
    assert hits.tolist() == [[True, False, False], [False, False, True]]
    assert n_relevant.tolist() == [2, 1]


@st.composite
def perfect_rankings(draw):
    width = draw(st.integers(1, 12))
    n_users = draw(st.integers(1, 6))
    recommended, relevant = [], []
    for user in range(n_users):
        n_rel = draw(st.integers(1, width + 5))
        rel = [f"r{user}_{j}" for j in range(n_rel)]
        row = (rel + [f"n{user}_{j}" for j in range(width)])[:width]
        recommended.append(row)
        relevant.append(set(rel))
    return recommended, relevant, width


@settings(max_examples=80, deadline=None)
@given(perfect_rankings())
def test_a_perfect_ranking_scores_one(problem):
    recommended, relevant, width = problem
    ks = list(range(1, width + 1))
    values = compute(recommended, relevant, ks)
    n_relevant = np.array([len(r) for r in relevant])
    for k in ks:
        for metric in ("ndcg", "hit_rate", "mrr", "map"):
            np.testing.assert_allclose(values[(metric, k)], 1.0, err_msg=f"{metric}@{k}")
        np.testing.assert_allclose(values[("precision", k)], np.minimum(n_relevant, k) / k)
        fits = n_relevant <= k
        np.testing.assert_allclose(values[("recall", k)][fits], 1.0)
        assert (values[("recall", k)][~fits] < 1).all()


@st.composite
def any_rankings(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    width = draw(st.integers(1, 15))
    n_items = draw(st.integers(width, 30))
    return random_rankings(np.random.default_rng(seed), draw(st.integers(1, 10)), width, n_items, draw(st.booleans())), width


@settings(max_examples=80, deadline=None)
@given(any_rankings())
def test_recall_hit_rate_and_mrr_never_fall_as_k_grows_and_all_lie_in_0_1(problem):
    (recommended, relevant), width = problem
    ks = list(range(1, width + 1))
    values = compute(recommended, relevant, ks)
    for metric in METRICS:
        stacked = np.stack([values[(metric, k)] for k in ks])
        assert ((stacked >= 0) & (stacked <= 1 + 1e-12)).all(), metric
        if metric in ("recall", "hit_rate", "mrr"):
            assert (np.diff(stacked, axis=0) >= 0).all(), metric


def test_user_metrics_frame_is_long_with_one_row_per_user_metric_and_k():
    values = compute([["a", "b"], ["c", "a"]], [{"a"}, {"a"}], [1, 2])
    frame = user_metrics_frame(np.array(["u1", "u2"]), values)
    assert list(frame.columns) == ["user_id", "metric", "k", "value"]
    assert len(frame) == 2 * len(METRICS) * 2
    row = frame[(frame.user_id == "u2") & (frame.metric == "mrr") & (frame.k == 2)]
    assert row.value.tolist() == [0.5]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: compute([["a"], ["b"]], [{"a"}, set()], [1]), "no relevant item"),
        (lambda: compute([["a", "b"]], [{"a"}], [3]), r"ks \[3\] are outside 1..2"),
        (lambda: compute([["a"]], [{"a"}, {"b"}], [1]), "one collection of relevant ids"),
        (lambda: hit_matrix(np.array([[1, 2]]), [["1"]]), "mix kinds"),
        (lambda: ranking_metrics(np.ones((1, 2), bool), np.array([1]), [1], ["auc"]), "unknown metrics"),
        (lambda: hit_matrix(np.array([["a"]]), [["a", None]]), "missing id"),
    ],
)
def test_bad_inputs_raise_errors_that_say_what_to_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()
