"""The pandas forms of evaluate's Spark joins and aggregates (its driver path), on small frames
with a known answer, and the two bootstrap wrappers' independence of row order (Spark delivers
a group's rows in any order; the driver path in its own)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from udfs import evaluate_udfs, protocol

INTERACTIONS = pd.DataFrame({
    "user_id": ["u1", "u1", "u1", "u1", "u1", "u2", "u2", "u3", "u3", "u4", None],
    "item_id": ["a",  "b",  "c",  "b",  "c",  "a",  "d",  "c",  "c",  "a",  "a"],
    "split":   ["train", "valid", "test", "test", "test", "train", "test", "test", "test", "train", "test"],
})
# "d" is no candidate; "c" is a candidate of title twice (a doubled row joins twice, as in SQL).
CANDIDATES = pd.DataFrame({"representation": ["title", "title", "title", "title", "visual"],
                           "item_id": ["a", "b", "c", "c", "c"],
                           "topk_id": ["topk-1", "topk-1", None, "topk-1", "topk-2"]})


def as_set(frame: pd.DataFrame) -> set:
    return set(map(tuple, frame.to_numpy().tolist()))


def test_relevant_rows_are_distinct_test_rows_that_are_candidates_flagged_when_excluded():
    rows = protocol.relevant_rows(INTERACTIONS, CANDIDATES, ["train", "valid"])
    assert list(rows.columns) == protocol.RELEVANT_COLUMNS
    # u1's test b is also a valid item (excluded); u1/u3's doubled test c counts once per
    # candidate row; u2's d is no candidate; the null user matches nothing.
    assert sorted(map(tuple, rows.to_numpy().tolist())) == sorted([
        ("title", "u1", "b", True), ("title", "u1", "c", False), ("title", "u1", "c", False),
        ("visual", "u1", "c", False), ("title", "u3", "c", False), ("title", "u3", "c", False),
        ("visual", "u3", "c", False)])
    only_train = protocol.relevant_rows(INTERACTIONS, CANDIDATES, ["train"])
    assert not only_train["excluded"].any()
    # The reference rule (relevant_items) is what the rows say once the flagged ones are dropped.
    kept = only_train[~only_train["excluded"] & (only_train["representation"] == "title")]
    reference = protocol.relevant_items(INTERACTIONS.dropna(), ["a", "b", "c"], ["train"])
    assert {u: set(g["item_id"]) for u, g in kept.groupby("user_id")} == reference
    with pytest.raises(ValueError, match="cannot exclude split"):
        protocol.relevant_rows(INTERACTIONS, CANDIDATES, ["test"])


RECOMMENDATIONS = pd.DataFrame({
    "representation": ["title", "title", "title", "visual", "title"],
    "user_id":        ["u1",    "u1",    "u1",    "u3",     "u9"],
    "rank":           [3,       1,       2,       1,        1],
    "item_id":        ["c",     "a",     "d",     "c",      "b"],
    "topk_id":        ["topk-1", "topk-1", "topk-1", "topk-2", "topk-1"],
})


def test_user_lists_hold_relevant_items_counts_and_the_list_by_rank():
    relevant = protocol.relevant_rows(INTERACTIONS, CANDIDATES, ["train", "valid"])
    lists = evaluate_udfs.user_lists(relevant, RECOMMENDATIONS).set_index(["representation", "user_id"])
    assert list(lists.reset_index().columns) == evaluate_udfs.USER_LIST_COLUMNS
    assert lists.loc[("title", "u1"), "recommended"] == ["a", "d", "c"]
    assert lists.loc[("title", "u1"), "relevant"] == ["c", "c"]
    assert (lists.loc[("title", "u1"), "n_rows"], lists.loc[("title", "u1"), "n_excluded"]) == (3, 1)
    assert lists.loc[("title", "u3"), "recommended"] is None  # a relevant item but no list
    assert lists.loc[("visual", "u3"), "recommended"] == ["c"]
    assert ("title", "u9") not in lists.index  # a list but no candidate test row
    scored = evaluate_udfs.scored_users(lists.reset_index(), ["title"])
    assert scored[["representation", "user_id"]].values.tolist() == [["title", "u1"]]
    empty = evaluate_udfs.user_lists(relevant.iloc[:0], RECOMMENDATIONS)
    assert empty.empty and list(empty.columns) == evaluate_udfs.USER_LIST_COLUMNS


def test_user_lists_give_an_all_excluded_user_no_relevant_item():
    relevant = protocol.relevant_rows(INTERACTIONS, CANDIDATES, ["train", "valid"])
    only_b = relevant[relevant["item_id"] == "b"]
    lists = evaluate_udfs.user_lists(only_b, RECOMMENDATIONS)
    assert lists[["user_id", "relevant", "n_rows", "n_excluded"]].values.tolist() == [["u1", [], 1, 1]]
    assert evaluate_udfs.scored_users(lists, ["title"]).empty


def test_evaluation_facts_count_what_prepare_facts_counts():
    relevant = protocol.relevant_rows(INTERACTIONS, CANDIDATES, ["train", "valid"])
    lists = evaluate_udfs.user_lists(relevant, RECOMMENDATIONS)
    facts = evaluate_udfs.evaluation_facts(RECOMMENDATIONS, CANDIDATES, INTERACTIONS, lists)
    assert {r: (f["lo"], f["hi"]) for r, f in facts["ranked"].items()} == {"title": ("topk-1", "topk-1"),
                                                                          "visual": ("topk-2", "topk-2")}
    # A null topk id (a row from before the column) is not an id: Spark's min/max skip it.
    assert {r: (f["a"], f["lo"], f["hi"]) for r, f in facts["stored"].items()} == {
        "title": (4, "topk-1", "topk-1"), "visual": (1, "topk-2", "topk-2")}
    # Distinct test rows: u1 b, u1 c, u2 d, u3 c, None a; users u1, u2, u3, None; without
    # train: u3 and the null user (a null user id is one user, as in Spark's groupBy).
    tests = facts["tests"][None]
    assert (tests["a"], tests["b"], tests["c"]) == (5, 4, 2)
    status = {r: (f["a"], f["b"], f["c"], f["d"]) for r, f in facts["status"].items()}
    assert status == {"title": (5, 1, 2, 1), "visual": (2, 0, 2, 1)}
    nothing = evaluate_udfs.evaluation_facts(RECOMMENDATIONS.iloc[:0], CANDIDATES.iloc[:0], INTERACTIONS.iloc[:0],
                                             evaluate_udfs.user_lists(relevant.iloc[:0], RECOMMENDATIONS))
    assert nothing["ranked"] == nothing["stored"] == nothing["status"] == {}
    assert (nothing["tests"][None]["a"], nothing["tests"][None]["b"]) == (0, 0)


def per_user_values(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    users = [f"u{i:03d}" for i in range(40)]
    rows = [(rep, u, metric, k, float(rng.random()))
            for rep in ("title", "visual", "random") for u in users
            for metric in ("recall", "ndcg") for k in (5, 10)
            if not (rep == "visual" and u < "u005")]  # visual misses five users
    return pd.DataFrame(rows, columns=["representation", "user_id", "metric", "k", "value"])


def test_bootstrap_wrappers_do_not_depend_on_row_order():
    values = per_user_values(3)
    shuffled = values.sample(frac=1.0, random_state=7).reset_index(drop=True)
    summary = evaluate_udfs.metric_summary(200, 42)
    # The randomisation test: its sign flips, like the bootstrap's draws, follow the users' order.
    comparisons = evaluate_udfs.comparison_groups(["title", "visual", "random"], 200, 42, "randomization")
    columns = ["representation", "metric", "k", "value", "n_users", "ci_low", "ci_high"]
    pairs = evaluate_udfs.COMPARISON_COLUMNS
    ordered_summary, shuffled_summary = (
        evaluate_udfs.apply_by_group(frame, ["representation", "metric", "k"], summary, columns)
        for frame in (values, shuffled))
    ordered_pairs, shuffled_pairs = (evaluate_udfs.apply_by_group(frame, ["metric", "k"], comparisons, pairs)
                                     for frame in (values, shuffled))
    pd.testing.assert_frame_equal(ordered_summary, shuffled_summary, check_exact=True)
    pd.testing.assert_frame_equal(ordered_pairs, shuffled_pairs, check_exact=True)
    assert len(ordered_summary) == 3 * 2 * 2 and len(ordered_pairs) == 3 * 2 * 2
    assert ordered_summary.set_index(["representation", "metric", "k"]).loc[("visual", "ndcg", 5), "n_users"] == 35


def test_apply_by_group_passes_each_key_and_group_and_returns_columns_without_groups():
    frame = pd.DataFrame({"g": ["b", "a", "b"], "k": [1, 1, 1], "x": [1.0, 2.0, 3.0]})

    def total(key, group):
        return pd.DataFrame({"g": [key[0]], "k": [key[1]], "x": [group["x"].sum()], "n": [len(group)]})

    got = evaluate_udfs.apply_by_group(frame, ["g", "k"], total, ["g", "x", "n"])
    assert got.values.tolist() == [["a", 2.0, 1], ["b", 4.0, 2]]
    empty = evaluate_udfs.apply_by_group(frame.iloc[:0], ["g", "k"], total, ["g", "x", "n"])
    assert empty.empty and list(empty.columns) == ["g", "x", "n"]
