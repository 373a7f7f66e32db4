"""Blockwise exact top-k against a full sort written here from the definition."""
from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse
from hypothesis import given, settings
from hypothesis import strategies as st

from udfs.encode.vectors import l2_normalise
from udfs.rank.topk import ItemBlock, block_item_ids, merge_topk, topk_block
from udfs.rank.topk_udfs import rank_in_process


def full_sort_topk(profiles, items, item_ids, k, seen_lists):
    """Per user: every unseen item, sorted by (score descending, id ascending), first k."""
    scores = profiles.astype(np.float64) @ items.astype(np.float64).T
    result = []
    for user, seen in enumerate(seen_lists):
        excluded = set(int(i) for i in seen)
        candidates = [j for j in range(items.shape[0]) if j not in excluded]
        ranked = sorted(candidates, key=lambda j: (-scores[user, j], item_ids[j]))[:k]
        result.append([(item_ids[j], scores[user, j]) for j in ranked])
    return result


@st.composite
def ranking_problems(draw):
    n_users = draw(st.integers(1, 8))
    n_items = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Small integers: float32 products are exact, so block shapes cannot change a score, and
    # many scores tie, which exercises the id tie rule.
    profiles = rng.integers(-2, 3, (n_users, dim)).astype(np.float32)
    items = rng.integers(-2, 3, (n_items, dim)).astype(np.float32)
    if draw(st.booleans()):
        item_ids = np.array([f"item{j:03d}" for j in rng.permutation(n_items)])
    else:
        item_ids = rng.choice(10 * n_items, size=n_items, replace=False).astype(np.int64)
    seen_fraction = draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    seen = [np.flatnonzero(rng.random(n_items) < seen_fraction) for _ in range(n_users)]
    k = draw(st.integers(1, 45))
    user_block = draw(st.integers(1, 9))
    item_block = draw(st.integers(1, 41))
    as_sparse = draw(st.booleans())
    return profiles, items, item_ids, k, seen, user_block, item_block, as_sparse


def sparse_mask(seen, n_items):
    rows = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
    cols = np.concatenate(seen) if rows.size else np.empty(0, np.int64)
    return scipy.sparse.csr_matrix((np.ones(rows.size, bool), (rows, cols)), shape=(len(seen), n_items))


def blockwise_topk(profiles, items, item_ids, k, seen, user_block, item_block):
    """The topk job's composition (``rank_in_process``: ``user_block`` profiles scored at a time
    against each block of ``item_block`` items, then the merge) as (user row, ids, scores) lists."""
    ids = np.array([str(i) for i in item_ids])
    users = pa.table({"user_id": [f"u{u}" for u in range(len(profiles))], "vector": list(profiles),
                      "seen": [ids[s].tolist() for s in seen]})
    ranks = rank_in_process("rep", users, pa.table({"item_id": ids, "vector": list(items)}), k,
                            score_rows=user_block, item_block=item_block).to_pandas()
    return [(ranks.loc[ranks["user_id"] == f"u{u}", "item_id"].tolist(),
             ranks.loc[ranks["user_id"] == f"u{u}", "score"].to_numpy()) for u in range(len(profiles))]


@settings(max_examples=150, deadline=None)
@given(ranking_problems())
def test_blockwise_topk_equals_full_sort(problem):
    # The job's ids are strings (code point order): integer ids are ranked as their text.
    profiles, items, item_ids, k, seen, user_block, item_block, _ = problem
    item_ids = np.array([str(i) for i in item_ids])
    got = blockwise_topk(profiles, items, item_ids, k, seen, user_block, item_block)
    expected = full_sort_topk(profiles, items, item_ids, k, seen)

    for (got_ids, got_scores), want, seen_items in zip(got, expected, seen):
        n_unseen = items.shape[0] - len(seen_items)
        # A list is short of k only when the unseen candidates run out, and never holds a seen item.
        assert len(want) == min(k, n_unseen) == len(got_ids)
        assert got_ids == [i for i, _ in want]
        np.testing.assert_array_equal(got_scores, np.array([s for _, s in want], np.float32))
        assert not set(got_ids) & set(item_ids[seen_items].tolist())


@settings(max_examples=100, deadline=None)
@given(ranking_problems())
def test_topk_block_indices_match_full_sort(problem):
    profiles, items, item_ids, k, seen, _, _, as_sparse = problem
    mask = sparse_mask(seen, items.shape[0]) if as_sparse else seen
    scores, indices = topk_block(profiles, items, item_ids, k, mask)
    expected = full_sort_topk(profiles, items, item_ids, k, seen)

    assert scores.dtype == np.float32 and indices.dtype == np.int64
    for user, want in enumerate(expected):
        valid = indices[user] >= 0
        assert valid.sum() == len(want)
        assert item_ids[indices[user, valid]].tolist() == [i for i, _ in want]
        assert np.isneginf(scores[user, ~valid]).all()
        assert not set(indices[user, valid].tolist()) & set(seen[user].tolist())


@settings(max_examples=100, deadline=None)
@given(ranking_problems())
def test_the_numpy_kernel_ranks_as_the_torch_one(problem):
    # recommend scores with numpy (it must start without torch); the topk job with torch.
    profiles, items, item_ids, k, seen, _, _, as_sparse = problem
    mask = sparse_mask(seen, items.shape[0]) if as_sparse else seen
    with_torch = ItemBlock(items, item_ids).topk(profiles, k, mask)
    with_numpy = ItemBlock(items, item_ids, use_torch=False).topk(profiles, k, mask)
    for ours, theirs in zip(with_numpy, with_torch):
        np.testing.assert_array_equal(ours, theirs)


def test_ties_are_broken_by_item_id_ascending_whatever_the_row_order():
    items = np.ones((6, 2), np.float32)
    profiles = np.array([[1.0, 0.0]], np.float32)
    item_ids = np.array(["e", "b", "f", "a", "d", "c"])
    _, indices = topk_block(profiles, items, item_ids, 4)
    assert item_ids[indices[0]].tolist() == ["a", "b", "c", "d"]
    [(ids, _)] = blockwise_topk(profiles, items, item_ids, 4, [np.array([], int)], 1, 2)
    assert ids == ["a", "b", "c", "d"]


def test_boundary_ties_keep_the_lowest_ids_among_many_equal_scores():
    # 1 clear winner, then 200 items tied: a selection that ignored ids would pick any of them.
    items = np.vstack([np.full((1, 1), 2.0), np.ones((200, 1))]).astype(np.float32)
    item_ids = np.arange(1000, 1201)[::-1].copy()
    profiles = np.ones((3, 1), np.float32)
    scores, indices = topk_block(profiles, items, item_ids, 5)
    assert item_ids[indices[0]].tolist() == [1200, 1000, 1001, 1002, 1003]
    np.testing.assert_array_equal(scores[0], [2, 1, 1, 1, 1])


def test_a_user_who_has_seen_everything_gets_an_empty_row_of_missing_slots():
    profiles = np.eye(2, dtype=np.float32)
    items = np.eye(2, dtype=np.float32)
    scores, indices = topk_block(profiles, items, np.array([10, 20]), 3, [np.array([0, 1]), np.array([1])])
    assert indices.tolist() == [[-1, -1], [0, -1]]
    assert np.isneginf(scores[0]).all() and scores[1, 0] == 0.0
    got = blockwise_topk(profiles, items, np.array(["a", "b"]), 3, [np.array([0, 1]), np.array([1])], 2, 1)
    assert [ids for ids, _ in got] == [[], ["a"]]


def test_merge_topk_orders_by_score_then_id_and_pads_empty_slots():
    block_a = (np.array([[0.9, 0.5, -np.inf]], np.float32), np.array([["z", "m", ""]]))
    block_b = (np.array([[0.9, 0.7]], np.float32), np.array([["c", "q"]]))
    scores, ids = merge_topk([block_a, block_b], 4)
    assert ids.tolist() == [["c", "z", "q", "m"]]
    np.testing.assert_array_equal(scores, np.array([[0.9, 0.9, 0.7, 0.5]], np.float32))
    scores, ids = merge_topk([block_a, block_b], 10, missing_id="<none>")
    assert ids.tolist() == [["c", "z", "q", "m", "<none>"]]
    assert np.isneginf(scores[0, 4])


def test_block_item_ids_maps_missing_index_to_the_missing_id():
    assert block_item_ids(np.array([[2, -1]]), np.array([5, 6, 7])).tolist() == [[7, None]]
    assert block_item_ids(np.array([[0, -1]]), np.array(["x", "y"], dtype=object)).tolist() == [["x", None]]


def test_normalised_float_vectors_rank_by_cosine():
    rng = np.random.default_rng(3)
    items = rng.standard_normal((50, 8)) * rng.uniform(0.1, 10, (50, 1))
    profiles = rng.standard_normal((4, 8))
    item_ids = np.array([f"i{j:02d}" for j in range(50)])
    got = blockwise_topk(l2_normalise(profiles)[0], l2_normalise(items)[0], item_ids, 5, [[]] * 4, 4, 7)
    cosine = (profiles @ items.T) / np.linalg.norm(profiles, axis=1)[:, None] / np.linalg.norm(items, axis=1)
    assert [ids for ids, _ in got] == item_ids[np.argsort(-cosine, axis=1)[:, :5]].tolist()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: topk_block(np.ones((1, 2)), np.ones((3, 3)), np.arange(3), 1), "dimension"),
        (lambda: topk_block(np.ones((1, 2)), np.ones((3, 2)), np.arange(2), 1), "one id per item"),
        (lambda: topk_block(np.ones((1, 2)), np.ones((3, 2)), np.array([1, 2, 1]), 1), "repeats id 1"),
        (lambda: topk_block(np.ones((1, 2)), np.ones((3, 2)), np.arange(3), 0), "positive integer"),
        (lambda: topk_block(np.ones((1, 2)), np.ones((3, 2)), np.arange(3), 1, [np.array([3])]), "outside 0..2"),
        (lambda: topk_block(np.ones((2, 2)), np.ones((3, 2)), np.arange(3), 1, [np.array([0])]), "one array"),
        (lambda: topk_block(np.ones((1, 2)), np.ones((3, 2)), np.arange(3), 1, scipy.sparse.csr_matrix((1, 4))), "slice"),
        (lambda: topk_block(np.array([[np.nan, 1.0]]), np.ones((3, 2)), np.arange(3), 1), "profiles row 0"),
    ],
)
def test_bad_inputs_raise_errors_that_name_the_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_read_only_arrow_style_inputs_work_without_warnings():
    profiles = np.eye(2, dtype=np.float32)
    items = np.eye(2, dtype=np.float32)
    profiles.flags.writeable = False
    items.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, indices = topk_block(profiles, items, np.array(["a", "b"]), 1)
    assert indices.tolist() == [[0], [1]]
