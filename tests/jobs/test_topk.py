"""The topk job on real Spark + Delta against a brute-force numpy top-k, and its Arrow wrappers
(pack -> block pair -> merge) against the same brute force for random block layouts."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs import tables, topk
from udfs.rank import scorers, topk_udfs

SEED = 42


@dataclass
class RandomDataset:
    """Integer-valued vectors (exact, tie-rich scores), Zipf-skewed interactions, and a second
    representation that misses some items (so the common candidate set is smaller than the catalog)."""

    name: str
    items: list[str]
    users: list[str]
    interactions: list[tuple]
    vectors: dict[str, dict[str, np.ndarray]]
    profiles: dict[str, dict[str, np.ndarray]]
    splits: dict[str, dict[str, set]] = field(default_factory=dict)

    def seen(self, user: str, exclude: tuple[str, ...]) -> set:
        return set().union(*(self.splits.get(s, {}).get(user, set()) for s in exclude))

    def common(self, representations: list[str]) -> list[str]:
        return sorted(set.intersection(*(set(self.vectors[r]) for r in representations)))

    def train_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, _, item, _, _, split in self.interactions:
            if split == "train":
                counts[item] = counts.get(item, 0) + 1
        return counts


def make_dataset(seed: int, n_users: int = 60, n_items: int = 40, dim: int = 4, per_user: int = 9) -> RandomDataset:
    rng = np.random.default_rng(seed)
    items = [f"i{j:03d}" for j in range(n_items)]
    users = [f"u{j:03d}" for j in range(n_users)]
    weights = 1.0 / np.arange(1, n_items + 1) ** 1.3
    popularity_order = rng.permutation(n_items)
    interactions, splits = [], {"train": {}, "valid": {}, "test": {}}
    for u, user in enumerate(users):
        if u == n_users - 1:
            continue  # a user with no interaction at all
        chosen = rng.choice(popularity_order, size=per_user, replace=False, p=weights / weights.sum())
        labels = ["train"] * (per_user - 3) + ["valid", "test", "test"]
        if u == n_users - 2:
            labels = ["test"] * per_user  # a user with test items but no train history
        for t, (j, split) in enumerate(zip(chosen, labels)):
            interactions.append(("rand", user, items[j], 1000 * u + t, 1.0, split))
            splits[split].setdefault(user, set()).add(items[j])

    def integer_vectors(names: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for name in names:
            v = rng.integers(-2, 3, dim).astype(np.float32)
            out[name] = v if v.any() else np.ones(dim, np.float32)
        return out

    train_users = sorted(splits["train"])
    vectors = {"title": integer_vectors(items), "visual": integer_vectors(items[5:])}
    profiles = {"title": integer_vectors(train_users), "visual": integer_vectors(train_users[3:])}
    return RandomDataset("rand", items, users, interactions, vectors, profiles, splits)


def write_dataset(spark, warehouse, data: RandomDataset, run_id: str) -> None:
    schema = tables.SCHEMAS
    tables.replace_slice(spark, warehouse, "interactions",
                         spark.createDataFrame([(*row, None) for row in data.interactions],  # no ingest_id
                                               schema["interactions"]), {"dataset": data.name})
    rows = [(data.name, item, rep, "integer-test-vectors", len(v), v.tolist(), None)
            for rep, by_item in data.vectors.items() for item, v in by_item.items()]
    tables.replace_slice(spark, warehouse, "item_embeddings",
                         spark.createDataFrame(rows, schema["item_embeddings"]), {"dataset": data.name})
    rows = [(run_id, user, rep, v.tolist(), 1) for rep, by_user in data.profiles.items() for user, v in by_user.items()]
    tables.replace_slice(spark, warehouse, "user_profiles",
                         spark.createDataFrame(rows, schema["user_profiles"]), {"run_id": run_id})


def brute_force(data: RandomDataset, rep: str, candidates: list[str], exclude: tuple[str, ...],
                k: int) -> dict[str, list[tuple[str, float]]]:
    """user -> [(item, score)] by a full sort: score descending, then item id ascending."""
    cand = np.array(candidates)
    if rep == "popularity":
        counts = data.train_counts()
        users = sorted(data.splits["train"])
        scores = np.tile(np.array([counts.get(i, 0) for i in cand], np.float32), (len(users), 1))
    elif rep == "random":
        users = sorted(data.splits["train"])
        scores = scorers.random_scores(np.array(users), cand, SEED)
    else:
        users = sorted(data.profiles[rep])
        profiles = np.stack([data.profiles[rep][u] for u in users])
        scores = profiles @ np.stack([data.vectors[rep][i] for i in cand]).T
    out = {}
    for row, user in enumerate(users):
        seen = data.seen(user, exclude)
        ranked = sorted((-float(s), i) for i, s in zip(cand, scores[row]) if i not in seen)
        out[user] = [(i, -s) for s, i in ranked[:k]]
    return out


def run_topk(spark, warehouse, argv: list[str], capsys) -> dict:
    base = ["--set", f"warehouse={warehouse}", "--set", "dataset.name=rand", "--set", "log_level=WARNING",
            "--set", "experiment.representations=[title,visual]", "--set", f"experiment.topk.seed={SEED}"]
    assert topk.main(base + argv, spark=spark) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["counts"]


def recommendation_lists(spark, warehouse, run_id: str) -> dict[str, dict[str, list[tuple[str, float]]]]:
    frame = (tables.read(spark, warehouse, "recommendations").filter(f"run_id = '{run_id}'")
             .orderBy("representation", "user_id", "rank").toPandas())
    out: dict[str, dict[str, list]] = {}
    for (rep, user), rows in frame.groupby(["representation", "user_id"], sort=False):
        assert rows["rank"].tolist() == list(range(1, len(rows) + 1)), (rep, user)
        out.setdefault(rep, {})[user] = list(zip(rows["item_id"], rows["score"].astype(float)))
    return out


CASES = {
    # user block, item block, K, excluded splits, on the driver (jobs.driver_inputs) or blockwise in Spark
    "small-blocks-train+valid": ("16", "9", 5, ("train", "valid"), False),
    "one-item-block-train-only": ("25", "64", 12, ("train",), False),
    "driver-train+valid": ("16", "9", 5, ("train", "valid"), True),
}


@pytest.mark.spark
@pytest.mark.parametrize("case", [
    pytest.param("small-blocks-train+valid"),
    pytest.param("one-item-block-train-only", marks=pytest.mark.slow),
    pytest.param("driver-train+valid"),
])
def test_blockwise_spark_topk_equals_brute_force(spark, tmp_path, capsys, case):
    """Both paths, the blockwise Spark join (whatever the block layout) and the driver's for
    small inputs, give the brute-force lists, scores, ties and counts."""
    user_block, item_block, k, exclude, on_driver = CASES[case]
    data = make_dataset(seed=len(case) if not on_driver else len("small-blocks-train+valid"))
    warehouse = tmp_path / "warehouse"
    write_dataset(spark, warehouse, data, "run-a")
    argv = ["--run-id", "run-a", "--k", str(k), "--set", f"experiment.evaluate.ks=[{k}]", "--user-block", user_block,
            "--item-block", item_block, "--exclude", ",".join(exclude)]
    argv += [] if on_driver else ["--set", "spark.driver_compute_mb=0"]
    counts = run_topk(spark, warehouse, argv, capsys)
    assert counts.get("computed_on_driver", 0) == int(on_driver)
    assert counts.get("driver_fallback_disabled", 0) == int(not on_driver)
    got = recommendation_lists(spark, warehouse, "run-a")
    candidates = data.common(["title", "visual"])
    assert set(got) == {"title", "visual", "popularity", "random"}
    for rep in got:
        expected = brute_force(data, rep, candidates, exclude, k)
        assert set(got[rep]) == {u for u, lst in expected.items() if lst}, rep
        for user, items in got[rep].items():
            assert [i for i, _ in items] == [i for i, _ in expected[user]], (rep, user)
            np.testing.assert_allclose([s for _, s in items], [s for _, s in expected[user]], rtol=1e-6)
            seen = data.seen(user, exclude)
            assert not seen & {i for i, _ in items}, (rep, user)
            unseen_candidates = len(set(candidates) - seen)
            assert len(items) == min(k, unseen_candidates), (rep, user)

    assert counts["candidates_title"] == len(candidates) == len(data.items) - 5
    # The flags are settings of the typed config, so the run's stored config shows them.
    stored = tables.read(spark, warehouse, "runs").filter("job = 'topk'").first()
    topk_settings = json.loads(stored.config)["experiment"]["topk"]
    assert (topk_settings["k"], topk_settings["user_block"], topk_settings["item_block"], topk_settings["exclude"]) \
        == (k, int(user_block), int(item_block), list(exclude))
    assert counts["users_without_profile_visual"] == 3
    # The user with test items only; a user with no interaction at all is in no table to count.
    assert counts["users_without_train"] == 1 and counts["users"] == len(data.users) - 1
    assert counts["rows_written"] == sum(len(v) for lists in got.values() for v in lists.values())
    for rep, lists in got.items():  # counted while the lists were written
        assert counts[f"recommended_users_{rep}"] == len(lists), rep
        assert counts[f"short_lists_{rep}"] == sum(len(v) < k for v in lists.values()), rep

    if case == "one-item-block-train-only":
        # A rerun with the same run id leaves the same table (the run's slice replaced atomically).
        run_topk(spark, warehouse, argv, capsys)
        assert recommendation_lists(spark, warehouse, "run-a") == got


def arrow_rows(ids: list[str], vectors: np.ndarray, seen: list[list[str]] | None) -> pa.RecordBatch:
    columns = {"id": ids, "vector": [v.tolist() for v in vectors]}
    if seen is not None:
        columns["seen"] = seen
    return pa.RecordBatch.from_pydict(columns)


def wrappers_topk(user_ids, profiles, seen, item_ids, items, k, user_block, item_block, batch_rows):
    """bucket -> pack -> cross join of blocks -> pair top-k -> merge, with plain Python in place
    of Spark (a bucket of ``batch_rows`` rows, packed into blocks of at most the block size)."""
    def packed(ids, vectors, extra, block):
        for start in range(0, len(ids), batch_rows):
            rows = pa.Table.from_batches([arrow_rows(ids[start:start + batch_rows], vectors[start:start + batch_rows],
                                                     None if extra is None else extra[start:start + batch_rows])])
            blocks = topk_udfs.pack_table(rows, block, extra is not None)
            yield from (pa.RecordBatch.from_pylist([row], blocks.schema) for row in blocks.to_pylist())

    user_blocks = list(packed(user_ids, profiles, seen, user_block))
    item_blocks = list(packed(item_ids, items, None, item_block))
    pair_rows = []
    for ub in user_blocks:
        for ib in item_blocks:
            joined = {f"u_{c}": ub.column(c) for c in ub.schema.names}
            joined.update({f"i_{c}": ib.column(c) for c in ib.schema.names})
            pair_rows += list(topk_udfs.pair_topk_batches(k)(iter([pa.RecordBatch.from_pydict(joined)])))
    merged = {}
    for ub in user_blocks:
        block_id = ub.column("block_id")[0].as_py()
        rows = pa.Table.from_batches([r for r in pair_rows if r.column("user_block")[0].as_py() == block_id])
        out = topk_udfs.merge_block_results(k)((pa.scalar("rep"),), rows).to_pandas()
        for user, group in out.groupby("user_id"):
            merged[user] = list(zip(group.sort_values("rank")["item_id"], group.sort_values("rank")["score"]))
    return merged


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_users=st.integers(1, 12), n_items=st.integers(1, 30),
       k=st.integers(1, 12), user_block=st.integers(1, 6), item_block=st.integers(1, 12),
       batch_rows=st.integers(1, 7))
def test_block_wrappers_equal_brute_force(seed, n_users, n_items, k, user_block, item_block, batch_rows):
    rng = np.random.default_rng(seed)
    user_ids = [f"u{j}" for j in rng.permutation(n_users)]
    item_ids = [f"i{j}" for j in rng.permutation(n_items)]
    profiles = rng.integers(-2, 3, (n_users, 3)).astype(np.float32)
    items = rng.integers(-2, 3, (n_items, 3)).astype(np.float32)
    seen = [sorted(rng.choice(item_ids, size=rng.integers(0, n_items + 1), replace=False).tolist())
            for _ in range(n_users)]
    got = wrappers_topk(user_ids, profiles, seen, item_ids, items, k, user_block, item_block, batch_rows)
    scores = profiles @ items.T
    for row, user in enumerate(user_ids):
        ranked = sorted((-float(s), i) for i, s in zip(item_ids, scores[row]) if i not in set(seen[row]))[:k]
        assert [(i, -s) for s, i in ranked] == [(i, float(s)) for i, s in got.get(user, [])]


def test_random_scores_are_a_seeded_function_of_the_ids():
    users, items = np.array(["a", "b"]), np.array([f"i{j}" for j in range(500)])
    first = scorers.random_scores(users, items, 7)
    assert np.array_equal(first, scorers.random_scores(users, items, 7))
    assert np.array_equal(first[:, 100:200], scorers.random_scores(users, items[100:200], 7))
    assert not np.array_equal(first, scorers.random_scores(users, items, 8))
    assert not np.array_equal(first[0], first[1])  # each user has their own order
    assert first.min() >= 0 and first.max() < 1


def test_pack_table_rejects_ragged_vectors():
    table = pa.table({"id": ["a", "b"], "vector": [[1.0, 0.0], [1.0]]})
    with pytest.raises(ValueError, match="'b' has a vector of length 1"):
        topk_udfs.pack_table(table, 4, False)


def test_users_seen_flags_train_users_and_lists_their_excluded_splits_items():
    interactions = pd.DataFrame({"user_id": ["u2", "u1", "u1", "u1", "u3"], "item_id": ["a", "c", "a", "c", "b"],
                                 "split": ["train", "valid", "train", "test", "test"]})
    got = topk_udfs.users_seen(interactions, ("train", "valid"))
    assert got["user_id"].tolist() == ["u1", "u2", "u3"] and got["has_train"].tolist() == [True, True, False]
    assert got["seen"].tolist() == [["a", "c"], ["a"], []]
    assert topk_udfs.users_seen(interactions, ("train",))["seen"].tolist() == [["a"], ["a"], []]


def test_users_table_gives_profiles_their_seen_items_and_baselines_the_train_users():
    users = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "has_train": [True, False, True],
                          "seen": [["a"], ["b", "c"], []]})
    profiles = pd.DataFrame({"user_id": ["u2", "u9"], "vector": [np.array([0.5, 1.0], np.float32), [1.0, 0.0]]})
    ranked = topk_udfs.users_table(users, profiles).to_pydict()
    assert ranked == {"user_id": ["u2", "u9"], "vector": [[0.5, 1.0], [1.0, 0.0]], "seen": [["b", "c"], []]}
    baseline = topk_udfs.users_table(users, None).to_pydict()
    assert baseline == {"user_id": ["u1", "u3"], "vector": [[1.0], [1.0]], "seen": [["a"], []]}


def test_baseline_items_carry_the_train_count_for_popularity_and_zero_for_random():
    train = pd.Series(["b", "a", "b", "z"]).value_counts()
    assert topk_udfs.baseline_items("popularity", ["a", "b", "c"], train).to_pydict() == {
        "item_id": ["a", "b", "c"], "vector": [[1.0], [2.0], [0.0]]}
    assert topk_udfs.baseline_items("random", ["a", "c"], train).to_pydict() == {
        "item_id": ["a", "c"], "vector": [[0.0], [0.0]]}


def test_pack_table_cuts_a_bucket_into_blocks_with_their_seen_lists():
    table = pa.table({"id": ["c", "a", "b"], "vector": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
                      "seen": [["x"], None, ["y", "z"]]})
    blocks = topk_udfs.pack_table(table, 2, True).to_pylist()
    assert [(b["block_id"], b["n"], b["dim"], b["ids"]) for b in blocks] == [("a", 2, 2, ["c", "a"]), ("b", 1, 2, ["b"])]
    assert [(b["seen_counts"], b["seen_ids"]) for b in blocks] == [([1, 0], ["x"]), ([2], ["y", "z"])]
    assert np.frombuffer(blocks[0]["vectors"], np.float32).tolist() == [1.0, 2.0, 3.0, 4.0]
