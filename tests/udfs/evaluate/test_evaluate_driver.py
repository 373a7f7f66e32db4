"""evaluate's step functions on small frames with a known answer: the relevance rows, the user
lists, the per-user metrics and the facts; that what they give for buckets of whole users (or
items) adds up to what they give for the whole input, as the Spark path adds them up; and the
two bootstrap wrappers' independence of row order (Spark delivers a group's rows in any order;
the driver in its own)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from udfs.evaluate import evaluate_udfs, protocol
from udfs.spark import schemas

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
    # Once the flagged rows are dropped: each user's test items that are candidates and not seen.
    kept = only_train[~only_train["excluded"] & (only_train["representation"] == "title")]
    assert {u: set(g["item_id"]) for u, g in kept.groupby("user_id")} == {"u1": {"b", "c"}, "u3": {"c"}}
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
    # Measured: a representation of the order, a relevant item and a list (title's u1 only).
    measured = evaluate_udfs.user_metric_rows([1, 3], ["title"])(lists.reset_index())
    assert set(zip(measured["representation"], measured["user_id"])) == {("title", "u1")}
    assert list(measured.columns) == ["representation", "user_id", "metric", "k", "value"]
    # u1's list a, d, c holds its relevant c at rank 3: recall@1 0, recall@3 1.
    recall = measured[measured["metric"] == "recall"].set_index("k")["value"]
    assert (recall[1], recall[3]) == (0.0, 1.0)
    empty = evaluate_udfs.user_lists(relevant.iloc[:0], RECOMMENDATIONS)
    assert empty.empty and list(empty.columns) == evaluate_udfs.USER_LIST_COLUMNS


def test_user_lists_give_an_all_excluded_user_no_relevant_item():
    relevant = protocol.relevant_rows(INTERACTIONS, CANDIDATES, ["train", "valid"])
    only_b = relevant[relevant["item_id"] == "b"]
    lists = evaluate_udfs.user_lists(only_b, RECOMMENDATIONS)
    assert lists[["user_id", "relevant", "n_rows", "n_excluded"]].values.tolist() == [["u1", [], 1, 1]]
    assert evaluate_udfs.user_metric_rows([1], ["title"])(lists).empty


def facts_of(recommendations, candidates, interactions, lists) -> evaluate_udfs.EvaluationFacts:
    return evaluate_udfs.evaluation_facts(pd.concat([
        evaluate_udfs.topk_facts("recommendations")(recommendations),
        evaluate_udfs.topk_facts("candidates")(candidates),
        evaluate_udfs.test_facts(interactions), evaluate_udfs.list_facts(lists)], ignore_index=True))


def test_evaluation_facts_count_rows_users_and_topk_ids():
    relevant = protocol.relevant_rows(INTERACTIONS, CANDIDATES, ["train", "valid"])
    lists = evaluate_udfs.user_lists(relevant, RECOMMENDATIONS)
    facts = facts_of(RECOMMENDATIONS, CANDIDATES, INTERACTIONS, lists)
    # A null topk id (a row from before the column) is not an id: Spark's min/max skip it.
    assert {r: (f.recommendations, f.candidates, f.topk_ids) for r, f in facts.representations.items()} == {
        "title": (4, 4, ("topk-1",)), "visual": (1, 1, ("topk-2",))}
    # Distinct test rows: u1 b, u1 c, u2 d, u3 c, None a; users u1, u2, u3, None; without
    # train: u3 and the null user (a null user id is one user, as in Spark's groupBy).
    assert (facts.test_rows, facts.test_users, facts.test_users_without_train) == (5, 4, 2)
    status = {r: (f.candidate_test_rows, f.excluded_test_rows, f.users_with_relevant, f.users_without_list)
              for r, f in facts.representations.items()}
    assert status == {"title": (5, 1, 2, 1), "visual": (2, 0, 2, 1)}
    assert facts.of("text") == evaluate_udfs.RepresentationFacts()
    nothing = facts_of(RECOMMENDATIONS.iloc[:0], CANDIDATES.iloc[:0], INTERACTIONS.iloc[:0],
                       evaluate_udfs.user_lists(relevant.iloc[:0], RECOMMENDATIONS))
    assert nothing == evaluate_udfs.EvaluationFacts()


def test_facts_of_two_topk_runs_name_both():
    later = CANDIDATES.assign(topk_id="topk-0")
    facts = facts_of(RECOMMENDATIONS, later, INTERACTIONS.iloc[:0], evaluate_udfs.user_lists(
        protocol.relevant_rows(INTERACTIONS.iloc[:0], later, ["train"]), RECOMMENDATIONS))
    assert facts.of("title").topk_ids == ("topk-0", "topk-1")


def bucket(frame: pd.DataFrame, key: str, n: int) -> list[pd.DataFrame]:
    codes = frame[key].map(lambda v: sum(map(ord, str(v))) % n)
    return [frame[codes == b] for b in range(n)]


def test_buckets_of_whole_users_or_items_add_up_to_the_whole():
    """What the Spark path does: relevance per item bucket, lists and metrics per user bucket,
    facts per bucket, added up."""
    exclude = ["train", "valid"]
    relevant = pd.concat([protocol.relevant_rows(i, c, exclude) for i, c in zip(
        bucket(INTERACTIONS, "item_id", 3), bucket(CANDIDATES, "item_id", 3))], ignore_index=True)
    lists = pd.concat([evaluate_udfs.user_lists(r, rec) for r, rec in zip(
        bucket(relevant, "user_id", 2), bucket(RECOMMENDATIONS, "user_id", 2))], ignore_index=True)
    whole = evaluate_udfs.user_lists(protocol.relevant_rows(INTERACTIONS, CANDIDATES, exclude), RECOMMENDATIONS)
    key = ["representation", "user_id"]
    pd.testing.assert_frame_equal(lists.sort_values(key, ignore_index=True).drop(columns="relevant"),
                                  whole.drop(columns="relevant"), check_dtype=False)
    parts = [evaluate_udfs.topk_facts("recommendations")(r) for r in bucket(RECOMMENDATIONS, "user_id", 2)]
    parts += [evaluate_udfs.topk_facts("candidates")(c) for c in bucket(CANDIDATES, "item_id", 3)]
    parts += [evaluate_udfs.test_facts(i) for i in bucket(INTERACTIONS, "user_id", 2)]
    parts += [evaluate_udfs.list_facts(part) for part in bucket(lists, "user_id", 2)]
    assert evaluate_udfs.evaluation_facts(pd.concat(parts, ignore_index=True)) == facts_of(
        RECOMMENDATIONS, CANDIDATES, INTERACTIONS, whole)
    metric_rows = evaluate_udfs.user_metric_rows([1, 3], ["title", "visual"])
    key = ["representation", "user_id", "metric", "k"]
    in_buckets = pd.concat([metric_rows(part) for part in bucket(lists, "user_id", 2) if len(part)])
    pd.testing.assert_frame_equal(in_buckets.sort_values(key, ignore_index=True),
                                  metric_rows(whole).sort_values(key, ignore_index=True), check_exact=True)


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


@pytest.mark.parametrize("ddl, columns", [(schemas.RELEVANT_DDL, protocol.RELEVANT_COLUMNS),
                                          (schemas.USER_LISTS_DDL, evaluate_udfs.USER_LIST_COLUMNS),
                                          (schemas.FACTS_DDL, evaluate_udfs.FACT_COLUMNS),
                                          (schemas.COMPARISONS_DDL, evaluate_udfs.COMPARISON_COLUMNS)])
def test_the_functions_emit_the_columns_their_spark_schema_declares(ddl, columns):
    fields = [part.split() for part in ddl.split(", ")]  # no type here holds ", "
    assert [name for name, _ in fields] == columns
    if columns == evaluate_udfs.FACT_COLUMNS:
        assert [evaluate_udfs.FACT_DTYPES[name] for name, _ in fields] == [
            "Int64" if kind == "long" else "string" for _, kind in fields]
