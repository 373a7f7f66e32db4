"""Explanations: the history shares decompose the profile's cosine exactly; shared phrases."""
from __future__ import annotations

import numpy as np
import pytest

from udfs.rank import explanations
from udfs.rank.profiles import recency_weights, user_profiles
from udfs.encode.vectors import l2_normalise


def unit(rng, n, d):
    return l2_normalise(rng.normal(size=(n, d)))[0].astype(np.float32)


@pytest.mark.parametrize("half_life", [None, 30.0])
def test_shares_sum_to_the_profile_cosine(half_life):
    rng = np.random.default_rng(0)
    history, items = unit(rng, 7, 16), unit(rng, 5, 16)
    ts = rng.integers(0, 200 * 86_400, size=7).astype(np.float64)
    profile, _ = user_profiles(np.zeros(7, np.int64), history, ts, 1, half_life)
    weights = None if half_life is None else recency_weights(np.zeros(7, np.int64), ts, half_life, 1)
    shares = explanations.history_shares(history, items, weights)
    assert shares.shape == (5, 7)
    np.testing.assert_allclose(shares.sum(axis=1), items @ profile[0], atol=1e-6)


def test_plain_mean_share_is_dot_over_n_times_mean_norm():
    h = np.array([[1.0, 0.0], [0.0, 1.0]])
    x = np.array([1.0, 0.0])
    # mean = (.5, .5), |mean| = 1/sqrt(2); share_1 = 1 / (2 / sqrt(2)), share_2 = 0
    np.testing.assert_allclose(explanations.history_shares(h, x), [1 / np.sqrt(2), 0.0])


def test_cancelling_history_is_an_error():
    with pytest.raises(ValueError, match="cancel out"):
        explanations.history_shares(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([1.0, 0.0]))


def test_shared_phrases_keep_the_longest():
    item = "A red leather handbag with gold buckles, suitable for evening"
    history = ["Black leather boots", "A small red leather handbag for the office"]
    got = explanations.shared_phrases(item, history)
    assert got[0] == "red leather handbag"
    assert "leather" not in got and "red" not in got  # inside the longer shared phrase
    assert explanations.shared_phrases(item, ["green cotton scarf"]) == []
    assert explanations.shared_phrases(None, history) == []


def test_records_name_recommended_and_history_items_by_title():
    from udfs.recommender import Contribution, Explanation, Recommendations

    why = Explanation((Contribution("h1", 0.25, 0.5), Contribution("h2", -0.1, -0.2)), exact=True)
    result = Recommendations("run", "title", [None, "u1"], np.array([["a", None], ["b", None]], dtype=object),
                             np.array([[0.15, -np.inf], [0.3, -np.inf]], np.float32),
                             explanations=[[why], [why]], titles={"a": "Alpha", "h1": "History one"},
                             unknown=[["x9"], []])
    first, second = result.records()
    assert first["unknown_items"] == ["x9"] and second["unknown_items"] == []
    assert first["items"] == [{"rank": 1, "item_id": "a", "title": "Alpha", "score": pytest.approx(0.15),
                               "shares_exact": True,
                               "because": [{"item_id": "h1", "title": "History one", "share": 0.25, "similarity": 0.5},
                                           {"item_id": "h2", "title": None, "share": -0.1, "similarity": -0.2}]}]
    assert "title" not in second["items"][0]  # an item the catalog has no title for
    known = Recommendations("run", "title", ["u1"], np.array([["a"]], dtype=object), np.array([[0.1]], np.float32))
    assert "unknown_items" not in known.records()[0]  # known users: no history of theirs to report on
