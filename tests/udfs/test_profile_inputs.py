"""The pandas form of the ``profiles`` job's table rules (its driver path), on hand-made frames
whose right answers are written out."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from udfs import profile_inputs
from udfs.fusion import fuse


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


def test_train_totals_count_users_with_and_without_train():
    assert profile_inputs.train_totals(INTERACTIONS) == {"rows": 4, "users": 3, "train_users": 2}
    assert profile_inputs.train_totals(INTERACTIONS.iloc[:0]) == {"rows": None, "users": 0, "train_users": 0}


def test_history_joins_train_rows_with_every_vector_of_their_item():
    history = profile_inputs.history_rows(INTERACTIONS, VECTORS)
    assert list(history.columns) == ["representation", "user_id", "item_id", "vector", "ts"]
    got = sorted(zip(history["representation"], history["user_id"], history["ts"]))
    # a's test row (i3) and b's valid row are not history; c's i9 has no vector anywhere.
    assert got == [("t", "a", 10), ("t", "a", 20), ("t", "c", 5), ("v", "a", 20), ("v", "c", 5)]


def test_base_profiles_are_the_kernels_per_representation():
    history = profile_inputs.history_rows(INTERACTIONS, VECTORS)
    made = profile_inputs.base_profiles(history, None, 1000).set_index(["representation", "user_id"])
    assert sorted(made.index) == [("t", "a"), ("t", "c"), ("v", "a"), ("v", "c")]
    np.testing.assert_allclose(made.loc[("t", "a"), "vector"], unit(1, 1), atol=1e-6)
    assert made.loc[("t", "a"), "n_history"] == 2 and made["n_history"].dtype == np.int32
    empty = profile_inputs.base_profiles(history.iloc[:0], None, 1000)
    assert list(empty.columns) == profile_inputs.PROFILE_COLUMNS and empty.empty


def test_groups_of_whole_users_give_the_profiles_of_one_group():
    rng = np.random.default_rng(0)
    n = 200
    history = pd.DataFrame({"representation": rng.choice(["t", "v"], n), "user_id": rng.choice(list("abcdefgh"), n),
                            "vector": list(rng.normal(size=(n, 4)).astype(np.float32)), "ts": rng.integers(0, 10**7, n)})
    one = profile_inputs.base_profiles(history, 30.0, 10**6).set_index(["representation", "user_id"]).sort_index()
    many = profile_inputs.base_profiles(history, 30.0, 7).set_index(["representation", "user_id"]).sort_index()
    assert list(many.index) == list(one.index) and len(one) == 16
    assert (many["n_history"] == one["n_history"]).all()
    np.testing.assert_array_equal(np.stack(many["vector"]), np.stack(one["vector"]))


def test_fused_profiles_keep_users_with_every_part_and_the_smallest_history():
    made = pd.DataFrame({
        "user_id": ["a", "b", "a", "c"], "representation": ["t", "t", "v", "v"],
        "vector": [unit(1, 0), unit(0, 1), unit(1, 1, 0), unit(0, 0, 1)], "n_history": [3, 1, 2, 5],
    })
    fused = profile_inputs.fused_profiles(made, "concat", ["t", "v"], {"t": 1.0, "v": 2.0})
    assert list(fused["user_id"]) == ["a"] and list(fused["n_history"]) == [2]
    expected = fuse("concat", {"t": unit(1, 0)[None], "v": unit(1, 1, 0)[None]}, {"t": 1.0, "v": 2.0})[0]
    np.testing.assert_allclose(fused.loc[0, "vector"], expected, atol=1e-6)
    rows = profile_inputs.usable(fused, "concat")
    assert list(rows.columns) == profile_inputs.PROFILE_COLUMNS and list(rows["representation"]) == ["concat"]
    none = profile_inputs.fused_profiles(made[made["representation"] == "t"], "naive", ["t", "v"], None)
    assert none.empty and profile_inputs.usable(none, "naive").empty


def test_parts_that_cancel_out_are_flagged_not_written():
    made = pd.DataFrame({"user_id": ["a", "a", "b", "b"], "representation": ["x", "y", "x", "y"],
                         "vector": [unit(1, 0), unit(-1, 0), unit(1, 0), unit(0, 1)], "n_history": [1, 1, 1, 1]})
    fused = profile_inputs.fused_profiles(made, "naive", ["x", "y"], None).set_index("user_id")
    assert fused.loc["a", "status"] != "ok" and fused.loc["b", "status"] == "ok"
    assert list(profile_inputs.usable(fused.reset_index(), "naive")["user_id"]) == ["b"]


def test_profile_table_has_the_user_profiles_types():
    rows = pd.DataFrame({"user_id": ["a"], "representation": ["t"], "vector": [unit(3, 4)],
                         "n_history": np.array([2], dtype=np.int32)})
    table = profile_inputs.profile_table(rows, "run-1")
    assert table.schema == pa.schema([("run_id", pa.string()), ("user_id", pa.string()),
                                      ("representation", pa.string()), ("vector", pa.list_(pa.float32())),
                                      ("n_history", pa.int32())])
    assert table.to_pylist() == [{"run_id": "run-1", "user_id": "a", "representation": "t",
                                  "vector": pytest.approx([0.6, 0.8]), "n_history": 2}]
