"""Split protocols on a real Spark session: ordering, coverage, determinism."""
from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udfs.spark.splits import SplitSpec, assign_split

pytestmark = pytest.mark.spark

SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

rows_strategy = st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 30), st.integers(0, 50)),  # user, item, ts
    min_size=1, max_size=120, unique_by=lambda r: (r[0], r[1], r[2]))


def run(spark, rows, spec) -> pd.DataFrame:
    df = spark.createDataFrame(pd.DataFrame(
        [(f"u{u}", f"i{i:02d}", t, None) for u, i, t in rows], columns=["user_id", "item_id", "ts", "label"]),
        "user_id string, item_id string, ts long, label string")
    return assign_split(df, spec).toPandas()


def _key(r):
    return (r.ts, r.item_id)


@SETTINGS
@given(rows=rows_strategy, protocol=st.sampled_from(["leave_one_out", "temporal_ratio"]))
def test_temporal_protocols_never_put_test_before_train(spark, rows, protocol):
    out = run(spark, rows, SplitSpec(protocol=protocol, min_user_interactions=3))
    for user, g in out.groupby("user_id"):
        train = [_key(r) for r in g.itertuples() if r.split == "train"]
        later = [_key(r) for r in g.itertuples() if r.split in ("valid", "test")]
        tests = [_key(r) for r in g.itertuples() if r.split == "test"]
        valids = [_key(r) for r in g.itertuples() if r.split == "valid"]
        if train and later:
            assert max(train) < min(later)
        if valids and tests:
            assert max(valids) < min(tests)
        # Every eligible user gets test items and keeps at least one train item.
        if len(g) >= 3:
            assert tests and train, (user, g.to_dict("records"))
        else:
            assert set(g.split) == {"train"}
    assert len(out) == len(rows)


@SETTINGS
@given(rows=rows_strategy, seed=st.integers(0, 1000))
def test_random_ratio_same_seed_same_split(spark, rows, seed):
    spec = SplitSpec(protocol="random_ratio", ratios=(0.6, 0.2, 0.2), seed=seed)
    a = run(spark, rows, spec).sort_values(["user_id", "item_id", "ts"]).reset_index(drop=True)
    b = run(spark, list(reversed(rows)), spec).sort_values(["user_id", "item_id", "ts"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    for _, g in a.groupby("user_id"):
        if len(g) >= 3:
            assert (g.split == "test").any() and (g.split == "train").any()


def test_random_ratio_seed_changes_assignment(spark):
    rows = [(u, i, i) for u in range(5) for i in range(20)]
    a = run(spark, rows, SplitSpec(protocol="random_ratio", seed=1)).sort_values(["user_id", "item_id"])
    b = run(spark, rows, SplitSpec(protocol="random_ratio", seed=2)).sort_values(["user_id", "item_id"])
    assert (a.split.values != b.split.values).any()


def test_temporal_ratio_shares(spark):
    rows = [(0, i, i) for i in range(20)]
    out = run(spark, rows, SplitSpec(protocol="temporal_ratio", ratios=(0.8, 0.1, 0.1)))
    assert out.split.value_counts().to_dict() == {"train": 16, "valid": 2, "test": 2}
    assert set(out[out.split == "test"].ts) == {18, 19}


def test_leave_one_out_last_is_test(spark):
    out = run(spark, [(0, i, 10 - i) for i in range(5)], SplitSpec(protocol="leave_one_out"))
    assert out.set_index("ts").split.to_dict() == {10: "test", 9: "valid", 8: "train", 7: "train", 6: "train"}


def test_global_time_cut_by_quantile_and_seconds(spark):
    rows = [(u, i, i) for u in range(2) for i in range(10)]
    q = run(spark, rows, SplitSpec(protocol="global_time", valid_cut=0.5, test_cut=0.8))
    assert q[q.split == "test"].ts.min() >= q[q.split == "valid"].ts.max() >= q[q.split == "train"].ts.max()
    s = run(spark, rows, SplitSpec(protocol="global_time", valid_cut=5, test_cut=8))
    assert set(s[s.split == "test"].ts) == {8, 9} and set(s[s.split == "valid"].ts) == {5, 6, 7}


def test_label_pass_through(spark):
    df = spark.createDataFrame([("u", "a", 1, "0"), ("u", "b", 2, "1"), ("u", "c", 3, "2"), ("u", "d", 4, "x")],
                               "user_id string, item_id string, ts long, label string")
    out = assign_split(df, SplitSpec(protocol="label")).toPandas().set_index("item_id").split.to_dict()
    assert out == {"a": "train", "b": "valid", "c": "test", "d": None}
