"""The pandas form of the ``profiles`` job's table rules (its driver path), on hand-made frames
whose right answers are written out."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from udfs.rank import profile_inputs
from udfs.fusion.fusion import fuse
from udfs.representations import parse_representation


def unit(*values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    return v / np.linalg.norm(v)


INTERACTIONS = pd.DataFrame({
    "user_id": ["a", "a", "a", "b", "c", "c"],
    "item_id": ["i1", "i2", "i3", "i1", "i2", "i9"],
    "ts": [10, 20, 30, 10, 5, 6],
    "split": ["train", "train", "test", "valid", "train", "train"],
})
VECTORS = pd.DataFrame({
    "representation": ["t", "t", "v", "v"],
    "item_id": ["i1", "i2", "i2", "i3"],
    "vector": [unit(1, 0), unit(0, 1), unit(1, 1, 0), unit(0, 0, 1)],
})


def test_ingest_summary_is_min_max_and_counts_over_the_tagged_rows():
    assert profile_inputs.ingest_summary("items", pd.Series(["b", None, "a", "b"])) == {
        "name": "items", "low": "a", "high": "b", "n": 4, "tagged": 3}
    assert profile_inputs.ingest_summary("interactions", pd.Series([], dtype=object)) == {
        "name": "interactions", "low": None, "high": None, "n": 0, "tagged": 0}


def test_facts_count_train_rows_users_and_history_rows_per_representation():
    history = profile_inputs.history_rows(INTERACTIONS, VECTORS)
    facts = profile_inputs.ProfileFacts.of(pd.Series(["x", "x"]), INTERACTIONS.assign(ingest_id="x"), history)
    assert (facts.train_rows, facts.users, facts.train_users) == (4, 3, 2)
    assert facts.history_rows == {"t": 3, "v": 2}
    assert [row["name"] for row in facts.ingest] == ["items", "interactions"]
    assert facts.ingest[1] == {"name": "interactions", "low": "x", "high": "x", "n": 6, "tagged": 6}
    none = profile_inputs.ProfileFacts.of(pd.Series([], dtype=object), INTERACTIONS.iloc[:0].assign(ingest_id=None),
                                          history.iloc[:0])
    assert (none.train_rows, none.users, none.train_users, none.history_rows) == (0, 0, 0, {})


def test_history_joins_train_rows_with_every_vector_of_their_item():
    history = profile_inputs.history_rows(INTERACTIONS, VECTORS)
    assert list(history.columns) == ["representation", "user_id", "item_id", "vector", "ts"]
    got = sorted(zip(history["representation"], history["user_id"], history["ts"]))
    # a's test row (i3) and b's valid row are not history; c's i9 has no vector anywhere.
    assert got == [("t", "a", 10), ("t", "a", 20), ("t", "c", 5), ("v", "a", 20), ("v", "c", 5)]


def test_base_profiles_are_the_kernels_per_representation():
    history = profile_inputs.history_rows(INTERACTIONS, VECTORS)
    made = profile_inputs.profile_rows(None)(history).set_index(["representation", "user_id"])
    assert sorted(made.index) == [("t", "a"), ("t", "c"), ("v", "a"), ("v", "c")]
    np.testing.assert_allclose(made.loc[("t", "a"), "vector"], unit(1, 1), atol=1e-6)
    assert made.loc[("t", "a"), "n_history"] == 2 and made["n_history"].dtype == np.int32
    empty = profile_inputs.in_user_groups(history.iloc[:0], profile_inputs.profile_rows(None, FUSIONS), 1000)
    assert list(empty.columns) == profile_inputs.PROFILE_COLUMNS and empty.empty


FUSIONS = [(parse_representation("naive"), None), (parse_representation("concat"), {"title": 1.0, "visual": 2.0})]


def random_history(n: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"representation": rng.choice(["title", "visual"], n),
                         "user_id": rng.choice(list("abcdefghij"), n),
                         "vector": list(rng.normal(size=(n, 4)).astype(np.float32)), "ts": rng.integers(0, 10**7, n)})


def by_key(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.set_index(["representation", "user_id"]).sort_index()


@pytest.mark.parametrize("half_life", [None, 30.0])
def test_groups_of_whole_users_give_the_rows_of_one_group(half_life):
    # What the two paths differ in: the driver cuts the history into groups of whole users by
    # row count, Spark by a hash bucket of the user id; either gives every row of one call.
    history = random_history()
    rows = profile_inputs.profile_rows(half_life, FUSIONS)
    one = by_key(rows(history))
    bucket = history["user_id"].map(lambda u: hash(u) % 3)
    for grouped in (profile_inputs.in_user_groups(history, rows, 7),
                    pd.concat([rows(group) for _, group in history.groupby(bucket)], ignore_index=True)):
        many = by_key(grouped)
        assert list(many.index) == list(one.index) and len(one) == 4 * 10
        assert (many["n_history"] == one["n_history"]).all()
        assert all(np.array_equal(a, b) for a, b in zip(many["vector"], one["vector"]))


def test_fused_profiles_keep_users_with_every_part_and_the_smallest_history():
    history = pd.DataFrame({
        "representation": ["title"] * 3 + ["visual"] * 3, "user_id": ["a", "a", "b", "a", "c", "a"],
        "vector": [unit(1, 0), unit(1, 0), unit(0, 1), unit(1, 1, 0), unit(0, 0, 1), unit(1, 1, 0)],
        "ts": [1, 2, 3, 4, 5, 6]})
    made = profile_inputs.profile_rows(None, FUSIONS[1:])(history)
    fused = made[made["representation"] == "concat"]
    assert list(fused["user_id"]) == ["a"] and list(fused["n_history"]) == [2]
    assert list(fused.columns) == profile_inputs.PROFILE_COLUMNS
    weights = {"title": 1.0, "visual": 2.0}
    expected = fuse("concat", {"title": unit(1, 0)[None], "visual": unit(1, 1, 0)[None]}, weights)[0]
    np.testing.assert_allclose(fused["vector"].iloc[0], expected, atol=1e-6)
    only_t = profile_inputs.profile_rows(None, FUSIONS)(history[history["representation"] == "title"])
    assert set(only_t["representation"]) == {"title"}  # no fusion without every part


def test_parts_that_cancel_out_give_no_fused_row():
    history = pd.DataFrame({"representation": ["title", "visual", "title", "visual"], "user_id": ["a", "a", "b", "b"],
                            "vector": [unit(1, 0), unit(-1, 0), unit(1, 0), unit(0, 1)], "ts": [1, 1, 1, 1]})
    made = profile_inputs.profile_rows(None, FUSIONS[:1])(history)
    assert list(made.loc[made["representation"] == "naive", "user_id"]) == ["b"]


def test_als_user_rows_count_each_users_train_rows():
    factors = pd.DataFrame({"user_id": ["b", "a", "z"], "vector": [unit(1, 0), unit(0, 1), unit(1, 1)]})
    train = pd.DataFrame({"user_id": ["a", "b", "a", "a"]})
    rows = profile_inputs.als_user_rows(factors, train)
    assert list(rows.columns) == profile_inputs.PROFILE_COLUMNS
    assert list(zip(rows["user_id"], rows["n_history"], rows["representation"])) == [("b", 1, "als"), ("a", 3, "als")]
    assert rows["n_history"].dtype == np.int32


def test_als_item_rows_cover_the_catalog_and_every_factor_with_zeros_without_one():
    factors = pd.DataFrame({"item_id": ["i3", "old"], "vector": [np.array([1.5, -2.0]), np.array([0.5, 0.25])]})
    rows = profile_inputs.als_item_rows("ds", 2, "run-1")(pd.DataFrame({"item_id": ["i3", "i1", None]}), factors)
    assert list(rows["item_id"]) == ["i1", "i3", "old"]  # sorted; an older ingest's item keeps its factor
    assert set(rows["encoder"]) == {"spark-ml-als:run-1"} and set(rows["dataset"]) == {"ds"}
    assert set(rows["representation"]) == {"als"} and set(rows["dim"]) == {2}
    assert [v.tolist() for v in rows["vector"]] == [[0.0, 0.0], [1.5, -2.0], [0.5, 0.25]]
    assert all(v.dtype == np.float32 for v in rows["vector"])
    assert profile_inputs.als_item_rows("ds", 2, "r")(pd.DataFrame({"item_id": []}), factors.iloc[:0]).empty


def test_profile_table_has_the_user_profiles_types():
    rows = pd.DataFrame({"user_id": ["a"], "representation": ["t"], "vector": [unit(3, 4)],
                         "n_history": np.array([2], dtype=np.int32)})
    table = profile_inputs.profile_table(rows, "run-1")
    assert table.schema == pa.schema([("run_id", pa.string()), ("user_id", pa.string()),
                                      ("representation", pa.string()), ("vector", pa.list_(pa.float32())),
                                      ("n_history", pa.int32())])
    assert table.to_pylist() == [{"run_id": "run-1", "user_id": "a", "representation": "t",
                                  "vector": pytest.approx([0.6, 0.8]), "n_history": 2}]
