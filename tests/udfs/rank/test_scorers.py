"""One contract every scorer passes (shape, dtype, row independence, empty blocks, misaligned
input refused), each scorer's own meaning, and the blockwise top-k over each scorer equal to a
full sort (score descending, item id ascending) with seen items removed."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

from udfs.rank import scorers, topk_udfs

NAMES = sorted(scorers.SCORERS)


def block(seed: int, n_users: int = 7, n_items: int = 11, dim: int = 4, name: str = "cosine"):
    rng = np.random.default_rng(seed)
    user_ids = np.array([f"u{i}" for i in range(n_users)], dtype=object)
    item_ids = np.array([f"i{j:02d}" for j in rng.permutation(n_items)], dtype=object)
    if name == "popularity":
        users = np.ones((n_users, 1), np.float32)
        items = rng.integers(0, 4, size=(n_items, 1)).astype(np.float32)  # counts: many ties
    else:
        users = rng.normal(size=(n_users, dim)).astype(np.float32)
        items = rng.normal(size=(n_items, dim)).astype(np.float32)
        users /= np.linalg.norm(users, axis=1, keepdims=True)
        items /= np.linalg.norm(items, axis=1, keepdims=True)
    return user_ids, users, item_ids, items


@pytest.mark.parametrize("name", NAMES)
def test_contract_shape_dtype_and_rows_independent_of_the_block(name):
    scorer = scorers.make_scorer(name, seed=5)
    user_ids, users, item_ids, items = block(1, name=name)
    full = scorer.scores(user_ids, users, item_ids, items)
    assert full.shape == (len(user_ids), len(item_ids)) and full.dtype == np.float32
    assert np.isfinite(full).all()
    # A user's scores do not depend on who else is in the block, nor on the item order.
    part = scorer.scores(user_ids[2:5], users[2:5], item_ids[::-1], items[::-1])
    np.testing.assert_array_equal(part, full[2:5, ::-1])
    np.testing.assert_array_equal(scorer.scores(user_ids, users, item_ids, items), full)


@pytest.mark.parametrize("name", NAMES)
def test_contract_empty_blocks(name):
    scorer = scorers.make_scorer(name)
    user_ids, users, item_ids, items = block(2, name=name)
    assert scorer.scores(user_ids[:0], users[:0], item_ids, items).shape == (0, len(item_ids))
    assert scorer.scores(user_ids, users, item_ids[:0], items[:0]).shape == (len(user_ids), 0)


# The random scorer reads no vector, so it has no alignment to check.
@pytest.mark.parametrize("name", [n for n in NAMES if n != "random"])
def test_contract_misaligned_ids_and_vectors_are_refused(name):
    scorer = scorers.make_scorer(name)
    user_ids, users, item_ids, items = block(3, name=name)
    with pytest.raises(ValueError, match="one row per item"):
        scorer.scores(user_ids, users, item_ids[:-1], items)
    with pytest.raises(ValueError, match="one row per user"):
        scorer.scores(user_ids[:-1], users, item_ids, items)


def test_each_scorer_means_what_it_says():
    user_ids, users, item_ids, items = block(4)
    np.testing.assert_allclose(scorers.make_scorer("cosine").scores(user_ids, users, item_ids, items),
                               users @ items.T, rtol=1e-6)
    raw = users * 3
    np.testing.assert_allclose(scorers.make_scorer("dot").scores(user_ids, raw, item_ids, items),
                               3 * (users @ items.T), atol=1e-5)
    user_ids, ones, item_ids, counts = block(4, name="popularity")
    pop = scorers.make_scorer("popularity").scores(user_ids, ones, item_ids, counts)
    assert (pop == counts[:, 0][None, :]).all()
    rand = scorers.make_scorer("random", seed=9).scores(user_ids, ones, item_ids, counts)
    assert ((0 <= rand) & (rand < 1)).all()
    assert not np.array_equal(rand, scorers.make_scorer("random", seed=10).scores(user_ids, ones, item_ids, counts))
    with pytest.raises(ValueError, match="unknown scorer 'cosin'"):
        scorers.make_scorer("cosin")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_topk_over_every_scorer_equals_a_full_sort(name, seed):
    user_ids, users, item_ids, items = block(seed, n_users=9, n_items=23, name=name)
    rng = np.random.default_rng(seed + 100)
    seen = scipy.sparse.csr_matrix(rng.random((len(user_ids), len(item_ids))) < 0.3)
    k = 6
    got_scores, got_ids = topk_udfs.pair_topk(user_ids, users, seen, item_ids, items, k, name, seed=7, score_rows=4)
    expected = scorers.make_scorer(name, seed=7).scores(user_ids, users, item_ids, items)
    dense = seen.toarray()
    for row in range(len(user_ids)):
        ranked = sorted((-float(expected[row, j]), item_ids[j]) for j in range(len(item_ids)) if not dense[row, j])
        want = [i for _, i in ranked[:k]]
        have = [i for i in got_ids[row] if i is not None]
        assert have == want, (name, row)
        np.testing.assert_allclose(got_scores[row, :len(want)], [-s for s, _ in ranked[:k]], rtol=1e-6)


def test_als_factors_are_ranked_by_dot_content_vectors_by_cosine_and_baselines_by_their_own():
    assert scorers.scorer_for("als") == "dot"
    assert {scorers.scorer_for(n) for n in ("title", "visual", "naive", "lvlm:tags:m:p")} == {"cosine"}
    assert (scorers.scorer_for("popularity"), scorers.scorer_for("random")) == ("popularity", "random")
    # On unnormalised factors the two orders differ: a long item vector wins the dot product.
    user, items = np.array([[1.0, 0.0]]), np.array([[3.0, 3.0], [1.0, 0.1]])
    ids = np.array(["long", "aligned"])
    dot = scorers.make_scorer("dot").scores(np.array(["u"]), user, ids, items)
    cosine = scorers.make_scorer("cosine").scores(np.array(["u"]), user, ids, items / np.linalg.norm(items, axis=1)[:, None])
    assert ids[dot[0].argmax()] == "long" and ids[cosine[0].argmax()] == "aligned"
