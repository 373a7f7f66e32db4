"""Exact top-k by cosine similarity, computed block by block.

Cosine similarity is the inner product of L2-normalised vectors: the callers store normalised
profiles and items (`udfs.encode.vectors.l2_normalise`), and these kernels only take inner
products, so that integer-valued test vectors give exact, tie-rich scores.

The `topk` job scores each (user block, item block) pair with an `ItemBlock` and merges a user
block's per-item-block lists with `merge_topk` (`udfs.rank.topk_udfs`, on the driver or in Spark
tasks); the tests compare that composition against a full sort.

Conventions shared by every function here:
- Order: score descending, then item id ascending (numpy's ordering of the ids: numeric for
  integer ids, code point for strings). The same rule in `topk_block` and `merge_topk` makes the
  merged block results equal the top-k of one full sort.
- Seen items get score -inf before the selection and are never returned.
- A row is shorter than k only when its candidates run out. The arrays stay rectangular:
  missing slots hold score -inf and index -1 (`topk_block`) or the missing id (`block_item_ids`,
  `merge_topk`: None unless the caller names another).
- Memory: `topk_block` holds one (u, n) float32 score matrix; pick block sizes so that
  4 * u * n bytes fits (1,024 x 32,768 take 128 MiB).

Candidate selection uses `torch.topk` rather than `np.argpartition(s, -k)`: on a (1000, 100000)
float32 score matrix on the 2-core machine it took 0.05-0.14 s against 0.8-1.1 s, and the whole
kernel ran 1.6x the numpy matmul + argpartition baseline (`benchmarks/bench_topk_kernels.py`).
Either leaves ties at the boundary score arbitrary; those are resolved by item id afterwards, so
the choice changes speed only. ``ItemBlock(..., use_torch=False)`` does both with numpy for a
caller that scores a handful of profiles and must not pay torch's import (``recommend``'s cold
start: about a second of its two); the selection rule, hence the ids, are the same.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd

# Seen items: one array of item indices (into the block's items) per user, or a (u, n) sparse
# matrix whose stored non-zero entries mark seen items, or None. (A string: scipy and torch are
# imported where they are used, so that ``recommend`` starts without them.)
SeenItems = "Sequence[np.ndarray] | scipy.sparse.spmatrix | scipy.sparse.sparray | None"


class ItemBlock:
    """One block of items prepared once (validated float32 matrix, the ids' tie-break order) for
    scoring many chunks of profiles against it: the Spark job scores a whole user block against
    one item block ``score_rows`` profiles at a time, and redoing this per chunk cost a copy of
    the block and a sort of its ids each time."""

    def __init__(self, items: np.ndarray, item_ids: np.ndarray, use_torch: bool = True):
        self.items = _as_matrix(items, "items")
        self.item_ids = np.asarray(item_ids)
        if self.item_ids.shape != (self.items.shape[0],):
            raise ValueError(
                f"item_ids has shape {self.item_ids.shape} but items has {self.items.shape[0]} rows: "
                "pass one id per item row"
            )
        self.id_rank = _id_rank(self.item_ids, "item_ids")
        self.use_torch = use_torch
        if use_torch:
            import torch

            self._items_t = torch.from_numpy(self.items)

    def topk(self, profiles: np.ndarray, k: int, seen: SeenItems = None) -> tuple[np.ndarray, np.ndarray]:
        """``topk_block`` of ``profiles`` against this block (see there)."""
        profiles = _as_matrix(profiles, "profiles")
        if profiles.shape[1] != self.items.shape[1]:
            raise ValueError(
                f"profiles have dimension {profiles.shape[1]} but items have {self.items.shape[1]}: "
                "both must come from the same representation"
            )
        _check_k(k)
        width = min(k, self.items.shape[0])  # 0 for a block without items: (u, 0) arrays
        if self.use_torch:
            import torch

            scores = (torch.from_numpy(profiles) @ self._items_t.T).numpy()
        else:
            scores = profiles @ self.items.T
        return self.select(scores, width, seen)

    def select(self, scores: np.ndarray, width: int, seen: SeenItems = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices) of the ``width`` best columns of each row of a (u, block items) score
        matrix, by score descending then item id ascending, after the ``seen`` items (as in
        ``topk``) get -inf in place; -inf slots get index -1. Any scorer (the seeded random
        baseline too) masks and selects through this one rule, so block results merge into the
        order of one full sort."""
        rows, cols = _seen_coordinates(seen, *scores.shape)
        scores[rows, cols] = -np.inf
        indices = _select_topk(scores, self.id_rank, width, self.use_torch)
        top_scores = np.take_along_axis(scores, indices, axis=1)
        indices[np.isneginf(top_scores)] = -1
        return top_scores, indices


def topk_block(
    profiles: np.ndarray,
    items: np.ndarray,
    item_ids: np.ndarray,
    k: int,
    seen: SeenItems = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items of one item block for each profile, by inner product.

    profiles: (u, d) float32; items: (n, d) float32; item_ids: (n,) unique ids, used only to
    break ties; seen: per-user item indices into `items`, or a (u, n) sparse mask, or None.
    Returns (scores (u, k') float32, indices (u, k') int64 into `items`), k' = min(k, n), each
    row ordered by score descending then item id ascending; slots past a user's unseen
    candidates hold score -inf and index -1. To score many profile chunks against one block,
    build an ``ItemBlock`` once instead.
    """
    return ItemBlock(items, item_ids).topk(profiles, k, seen)


def block_item_ids(indices: np.ndarray, item_ids: np.ndarray, missing_id: object = None) -> np.ndarray:
    """Map `topk_block` indices to ids (an object array); index -1 becomes `missing_id`."""
    if len(item_ids) == 0:
        return np.full(indices.shape, missing_id, dtype=object)
    ids = np.asarray(item_ids, dtype=object)[np.where(indices < 0, 0, indices)]
    ids[indices < 0] = missing_id
    return ids


def merge_topk(
    blocks: Sequence[tuple[np.ndarray, np.ndarray]], k: int, missing_id: object = None
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-block top-k lists of the same users into the overall top-k.

    blocks: (scores (u, k_b), item_ids (u, k_b)) per item block, rows aligned on the same users;
    a slot with score -inf is empty whatever its id. The blocks must hold disjoint items.
    Returns (scores (u, k') float32, item_ids (u, k')), k' = min(k, sum of k_b), ordered by
    score descending then item id ascending (an object array); empty slots hold -inf and
    `missing_id`. The blocks come from the block kernel (`topk_block`, `ItemBlock`), whose
    inputs are checked finite: no NaN score reaches the merge.
    """
    _check_k(k)
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s, _ in blocks], axis=1)
    ids = np.concatenate([np.asarray(i, dtype=object) for _, i in blocks], axis=1)
    width = min(k, scores.shape[1])
    empty = np.isneginf(scores)
    ranks = np.full(scores.shape, np.iinfo(np.int64).max, dtype=np.int64)
    # A hash factorisation sorts only the distinct ids: 4x faster than np.unique's full sort
    # of every slot on string ids, with the same (ascending) codes.
    ranks[~empty] = pd.factorize(ids[~empty], sort=True)[0]
    order = np.lexsort((ranks, -scores), axis=1)[:, :width]
    merged_scores = np.take_along_axis(scores, order, axis=1)
    merged_ids = np.take_along_axis(ids, order, axis=1)
    merged_ids[np.isneginf(merged_scores)] = missing_id
    return merged_scores, merged_ids


def _select_topk(scores: np.ndarray, id_rank: np.ndarray, width: int, use_torch: bool = True) -> np.ndarray:
    """Indices of the `width` best columns per row, by score descending then id rank ascending."""
    n_items = scores.shape[1]
    if width < n_items:
        # topk leaves ties at the boundary score arbitrary. The (width + 1)-th best score shows
        # them without another pass over the matrix: a row whose next score equals its lowest
        # selected one is redone below by id.
        if use_torch:
            import torch

            values, picked = torch.topk(torch.from_numpy(scores), width + 1, dim=1, sorted=True)
            values, picked = values.numpy(), picked.numpy()
        else:
            picked = np.argpartition(scores, n_items - width - 1, axis=1)[:, n_items - width - 1:]
            values = np.take_along_axis(scores, picked, axis=1)
            order = np.argsort(-values, axis=1, kind="stable")
            values, picked = np.take_along_axis(values, order, axis=1), np.take_along_axis(picked, order, axis=1)
        indices = picked[:, :width].astype(np.int64)
        threshold = values[:, width - 1]
        for row in np.flatnonzero((values[:, width] == threshold) & np.isfinite(threshold)):
            candidates = np.flatnonzero(scores[row] >= threshold[row])
            best = np.lexsort((id_rank[candidates], -scores[row, candidates]))[:width]
            indices[row] = candidates[best]
    else:
        indices = np.broadcast_to(np.arange(n_items, dtype=np.int64), scores.shape).copy()
    picked_scores = np.take_along_axis(scores, indices, axis=1)
    order = np.lexsort((id_rank[indices], -picked_scores), axis=1)
    return np.take_along_axis(indices, order, axis=1)


def _as_matrix(vectors: np.ndarray, name: str) -> np.ndarray:
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if not matrix.flags.writeable:
        # Arrow hands over read-only buffers, which torch.from_numpy warns about on every call.
        matrix = matrix.copy()
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows, dim), got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        row = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise ValueError(f"{name} row {row} has a NaN or infinite value: recompute or drop that vector")
    return matrix


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _id_rank(item_ids: np.ndarray, name: str) -> np.ndarray:
    """Position of each id in ascending id order; duplicate ids are an error (ties need a total order)."""
    order = np.argsort(item_ids, kind="stable")
    ordered = item_ids[order]
    duplicate = np.flatnonzero(ordered[1:] == ordered[:-1])
    if duplicate.size:
        raise ValueError(
            f"{name} repeats id {ordered[duplicate[0]].tolist()!r}: every item row needs its own id "
            "(deduplicate the item table before the top-k)"
        )
    rank = np.empty(item_ids.shape[0], dtype=np.int64)
    rank[order] = np.arange(item_ids.shape[0])
    return rank


def _seen_coordinates(seen: SeenItems, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(user rows, item columns) of the seen pairs, validated against the block's shape."""
    if seen is None:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    # A sparse mask exists only once scipy.sparse is loaded: asking the module only then keeps
    # scipy out of a process that never made one.
    sparse = sys.modules.get("scipy.sparse")
    if sparse is not None and sparse.issparse(seen):
        if seen.shape != (n_users, n_items):
            raise ValueError(
                f"seen mask has shape {seen.shape} but the block is {n_users} users x {n_items} items: "
                "slice the mask to the same user and item block"
            )
        coo = sparse.coo_matrix(seen)
        stored = coo.data != 0
        return coo.row[stored].astype(np.int64), coo.col[stored].astype(np.int64)
    if len(seen) != n_users:
        raise ValueError(
            f"seen has {len(seen)} entries but there are {n_users} profiles: "
            "pass one array of item indices per user (empty for a user with none)"
        )
    lengths = np.fromiter((len(s) for s in seen), dtype=np.int64, count=n_users)
    rows = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    cols = (
        np.concatenate([np.asarray(s, dtype=np.int64).ravel() for s in seen])
        if lengths.sum()
        else np.empty(0, np.int64)
    )
    out_of_range = np.flatnonzero((cols < 0) | (cols >= n_items))
    if out_of_range.size:
        bad = int(out_of_range[0])
        raise ValueError(
            f"seen item index {int(cols[bad])} for user row {int(rows[bad])} is outside 0..{n_items - 1}: "
            "seen indices must point into this block's items"
        )
    return rows, cols
