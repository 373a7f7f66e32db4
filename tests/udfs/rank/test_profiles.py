import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udfs.rank.profiles import SECONDS_PER_DAY, profiles_frame, recency_weights, user_profiles


def _random_history(seed: int, n_users: int, m: int, d: int):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, size=m)
    vectors = rng.normal(size=(m, d))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ts = rng.integers(0, 400 * 86_400, size=m)
    return users, vectors, ts


def _naive_profiles(users, vectors, ts, n_users, half_life_days=None):
    """Per-user loop, written independently of the vectorised code."""
    out = np.zeros((n_users, vectors.shape[1]))
    counts = np.zeros(n_users, dtype=int)
    for u in range(n_users):
        rows = [r for r in range(len(users)) if users[r] == u]
        counts[u] = len(rows)
        if not rows:
            continue
        if half_life_days is None:
            weights = [1.0] * len(rows)
        else:
            latest = max(ts[r] for r in rows)
            weights = [0.5 ** ((latest - ts[r]) / 86_400 / half_life_days) for r in rows]
        mean = sum(w * vectors[r] for w, r in zip(weights, rows)) / sum(weights)
        norm = np.linalg.norm(mean)
        # Vectors that cancel out (d = 1, opposite signs) have no direction: left zero.
        out[u] = mean / norm if norm > 0 else 0.0
    return out, counts


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_users=st.integers(1, 12),
    m=st.integers(0, 60),
    d=st.integers(1, 9),
    half_life=st.one_of(st.none(), st.floats(0.5, 500.0)),
)
def test_profiles_equal_a_naive_per_user_mean(seed, n_users, m, d, half_life):
    users, vectors, ts = _random_history(seed, n_users, m, d)
    profiles, n_history = user_profiles(users, vectors, ts, n_users, half_life)
    expected, counts = _naive_profiles(users, vectors, ts, n_users, half_life)
    assert profiles.dtype == np.float32 and profiles.shape == (n_users, d)
    np.testing.assert_array_equal(n_history, counts)
    np.testing.assert_allclose(profiles, expected, atol=1e-5)
    assert not profiles[counts == 0].any()


def test_profiles_are_unit_norm_and_users_without_history_are_zero():
    users, vectors, ts = _random_history(1, 20, 200, 16)
    users[users == 7] = 8
    profiles, n_history = user_profiles(users, vectors, ts, n_users=25)
    has = n_history > 0
    assert not has[7] and not has[20:].any()
    np.testing.assert_allclose(np.linalg.norm(profiles[has], axis=1), 1.0, atol=1e-6)
    assert not profiles[~has].any()


def test_unnormalised_item_vectors_are_normalised_first():
    vectors = np.array([[3.0, 0.0], [0.0, 1.0]])
    profiles, _ = user_profiles(np.array([0, 0]), vectors)
    np.testing.assert_allclose(profiles[0], [np.sqrt(0.5), np.sqrt(0.5)], atol=1e-6)


def test_recency_weight_halves_per_half_life():
    vectors = np.array([[1.0, 0.0], [0.0, 1.0]])
    ts = np.array([0, 10 * SECONDS_PER_DAY])
    weights = recency_weights(np.array([0, 0]), ts, half_life_days=10.0, n_users=1)
    np.testing.assert_allclose(weights, [0.5, 1.0])
    profiles, _ = user_profiles(np.array([0, 0]), vectors, ts, half_life_days=10.0)
    expected = np.array([0.5, 1.0]) / np.linalg.norm([0.5, 1.0])
    np.testing.assert_allclose(profiles[0], expected, atol=1e-6)


def test_huge_half_life_equals_plain_mean():
    users, vectors, ts = _random_history(2, 10, 150, 8)
    plain, _ = user_profiles(users, vectors, n_users=10)
    decayed, _ = user_profiles(users, vectors, ts, 10, half_life_days=1e12)
    np.testing.assert_allclose(decayed, plain, atol=1e-6)


def test_tiny_half_life_approaches_the_latest_item():
    users, vectors, _ = _random_history(3, 6, 90, 8)
    ts = np.random.default_rng(4).permutation(len(users)) * 3600  # distinct times
    profiles, n_history = user_profiles(users, vectors, ts, 6, half_life_days=1e-6)
    for u in np.flatnonzero(n_history):
        rows = np.flatnonzero(users == u)
        latest = rows[np.argmax(ts[rows])]
        np.testing.assert_allclose(profiles[u], vectors[latest], atol=1e-6)


def test_recency_is_relative_to_each_users_own_latest_item():
    # User 1's history is a year older than user 0's; weights are per user, so both get the
    # same profile from the same relative timing.
    vectors = np.array([[1.0, 0.0], [0.0, 1.0]] * 2)
    users = np.array([0, 0, 1, 1])
    year = 365 * SECONDS_PER_DAY
    ts = np.array([year, year + 5 * SECONDS_PER_DAY, 0, 5 * SECONDS_PER_DAY])
    profiles, _ = user_profiles(users, vectors, ts, half_life_days=5.0)
    np.testing.assert_allclose(profiles[0], profiles[1], atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(user_index=np.array([0, 3]), n_users=2), "outside \\[0, n_users=2\\)"),
        (dict(user_index=np.array([0.0, 1.0])), "integers"),
        (dict(item_vectors=np.ones((3, 2))), "one vector per history row"),
        (dict(item_vectors=np.array([[1.0, 0.0], [0.0, 0.0]])), "row 1 .* is zero"),
        (dict(half_life_days=5.0), "needs ts"),
        (dict(half_life_days=0.0, ts=np.array([0, 1])), "positive number of days"),
    ],
)
def test_bad_inputs_are_errors_that_say_what_to_fix(kwargs, message):
    args = dict(user_index=np.array([0, 1]), item_vectors=np.eye(2), ts=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        user_profiles(**args)


def _history_frame(seed=5, n_users=8, m=80, d=6):
    users, vectors, ts = _random_history(seed, n_users, m, d)
    return pd.DataFrame({
        "user_id": [f"u{u}" for u in users],
        "vector": [v.astype(np.float32) for v in vectors],
        "ts": ts.astype(np.int64),
    }), users, vectors, ts


def test_profiles_frame_matches_array_api_and_arrow_reads_array_float():
    df, users, vectors, ts = _history_frame()
    out = profiles_frame(df, half_life_days=30.0)
    assert list(out.columns) == ["user_id", "vector", "n_history"]
    expected, counts = _naive_profiles(users, vectors.astype(np.float32), ts, 8, 30.0)
    present = np.flatnonzero(counts)
    assert sorted(out["user_id"]) == sorted(f"u{u}" for u in present)
    for row in out.itertuples():
        u = int(row.user_id[1:])
        assert row.vector.dtype == np.float32
        np.testing.assert_allclose(row.vector, expected[u], atol=1e-5)
        assert row.n_history == counts[u]
    table = pa.Table.from_pandas(out, preserve_index=False)
    assert table.schema.field("vector").type == pa.list_(pa.float32())
    assert table.schema.field("n_history").type == pa.int32()


def test_profiles_frame_one_user_group_as_in_apply_in_pandas():
    df, *_ = _history_frame()
    group = df[df["user_id"] == df["user_id"].iloc[0]]
    out = profiles_frame(group)
    assert len(out) == 1 and out["n_history"].iloc[0] == len(group)
    mean = np.stack(group["vector"]).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(out["vector"].iloc[0], mean / np.linalg.norm(mean), atol=1e-6)


def test_profiles_frame_empty_and_bad_frames():
    df, *_ = _history_frame()
    empty = profiles_frame(df.iloc[:0])
    assert empty.empty and list(empty.columns) == ["user_id", "vector", "n_history"]
    with pytest.raises(ValueError, match="needs columns \\['ts'\\]"):
        profiles_frame(df.drop(columns="ts"), half_life_days=3.0)
    mixed = df.copy()
    mixed.at[4, "vector"] = np.ones(3, dtype=np.float32)
    with pytest.raises(ValueError, match="row 4 has 3 dimensions"):
        profiles_frame(mixed)
    nulls = df.copy()
    nulls.at[2, "vector"] = None
    with pytest.raises(ValueError, match="row 2 is null"):
        profiles_frame(nulls)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_items=st.integers(1, 10),
    m=st.integers(0, 60),
    half_life=st.one_of(st.none(), st.floats(0.5, 500.0)),
)
def test_item_indexed_history_gives_the_same_numbers_as_one_vector_per_row(seed, n_items, m, half_life):
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(n_items, 5)) * rng.uniform(0.1, 3.0, size=(n_items, 1))
    item_index = rng.integers(0, n_items, size=m)
    users, ts = rng.integers(0, 6, size=m), rng.integers(0, 400 * 86_400, size=m)
    per_row = user_profiles(users, items[item_index], ts, 6, half_life)
    per_item = user_profiles(users, items, ts, 6, half_life, item_index=item_index)
    np.testing.assert_array_equal(per_item[0], per_row[0])
    np.testing.assert_array_equal(per_item[1], per_row[1])


def test_profiles_frame_with_item_ids_normalises_each_item_once_to_the_same_numbers():
    rng = np.random.default_rng(3)
    items = {f"i{k}": rng.normal(size=7).astype(np.float32) for k in range(9)}
    ids = rng.choice(sorted(items), size=120)
    df = pd.DataFrame({"user_id": rng.choice([f"u{u}" for u in range(10)], size=120), "item_id": ids,
                       "vector": [items[i] for i in ids], "ts": rng.integers(0, 10**8, size=120)})
    for half_life in (None, 30.0):
        with_ids = profiles_frame(df, half_life)
        without = profiles_frame(df.drop(columns="item_id"), half_life)
        assert list(with_ids["user_id"]) == list(without["user_id"])
        assert list(with_ids["n_history"]) == list(without["n_history"])
        np.testing.assert_array_equal(np.stack(with_ids["vector"]), np.stack(without["vector"]))
    with pytest.raises(ValueError, match="null item_id"):
        profiles_frame(df.assign(item_id=[None] + list(ids[1:])))


@pytest.mark.parametrize("item_index, message", [
    (np.array([0]), "one integer per history row"),
    (np.array([0, 2]), "a row for every item_index value"),
])
def test_bad_item_index_is_an_error_that_says_what_to_fix(item_index, message):
    with pytest.raises(ValueError, match=message):
        user_profiles(np.array([0, 1]), np.eye(2), item_index=item_index)
