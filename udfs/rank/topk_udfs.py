"""The ``topk`` job's rules as Arrow/pandas functions, and the wrappers Spark ships to executors.

The rules, each written once and called whole on the driver or per bounded bucket by Spark:
``users_seen`` (each user's train flag and seen items), ``users_table`` (the users a
representation or baseline ranks, with their seen items), ``baseline_items`` (a baseline's
candidates and the vector its scorer reads), ``pair_topk`` (one user block against one item
block) and ``_rank_rows`` (the merge of a user block's per-item-block lists into ranks).
``rank_in_process`` is the driver's composition of the last two.

The Spark path moves vectors between tasks as packed blocks, one Spark row per block:

1. ``pack_table`` turns one bucket's rows (id, vector[, seen]) into block rows (block_id, n,
   dim, ids, vectors = float32 bytes [, seen_counts, seen_ids]) of at most ``block_size`` rows
   each (``item_blocks``, ``profile_user_blocks``, ``baseline_user_blocks``,
   ``baseline_item_blocks``: the rules above, then the packing, per bucket). ``block_id`` is the
   block's smallest id, unique because every id sits in exactly one block.
2. ``pair_topk_batches`` (``mapInArrow`` over the cross join of user blocks with item blocks)
   scores one user block against one item block with a ``udfs.rank.scorers`` scorer (the inner
   product ones through ``udfs.rank.topk.ItemBlock``'s BLAS kernel, the others as a score matrix),
   masks the users' seen items of that block to -inf, and keeps the top k per
   user: one row (user_block, user_ids, width, scores bytes, item_ids) per block pair.
3. ``merge_block_results`` (``groupBy(representation, user_block).applyInArrow``) merges a user
   block's per-item-block lists with ``udfs.rank.topk.merge_topk`` into rank rows.

Memory per task is set by the block sizes: one item block, one user block, and one
(``score_rows`` x item block) float32 score matrix, whatever the catalog size.

Order everywhere: score descending, then item id ascending (code point order of the string
ids), so the merged lists equal one full sort whatever the block layout.

Everything here runs without a Spark session: tests feed it lists of Arrow batches.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse

from udfs.evaluate import protocol
from udfs.rank import scorers
from udfs.rank import topk as topk_kernels

COSINE = scorers.CosineScorer.name
POPULARITY = scorers.PopularityScorer.name
RANDOM = scorers.RandomScorer.name

# What the wrappers emit (``BLOCK_DDL``, ``USER_BLOCK_DDL``, ``PAIR_DDL``, ``RANKS_DDL``) is
# declared with every other Spark output schema in ``udfs.spark.schemas``.

_BLOCK_FIELDS = [pa.field("block_id", pa.string()), pa.field("n", pa.int32()), pa.field("dim", pa.int32()),
                 pa.field("ids", pa.list_(pa.string())), pa.field("vectors", pa.binary())]
BLOCK_ARROW = pa.schema(_BLOCK_FIELDS)
USER_BLOCK_ARROW = pa.schema(_BLOCK_FIELDS + [pa.field("seen_counts", pa.list_(pa.int32())),
                                              pa.field("seen_ids", pa.list_(pa.string()))])
PAIR_ARROW = pa.schema([pa.field("user_block", pa.string()), pa.field("user_ids", pa.list_(pa.string())),
                        pa.field("width", pa.int32()), pa.field("scores", pa.binary()),
                        pa.field("item_ids", pa.list_(pa.string()))])

def set_torch_threads(threads: int) -> None:
    """One task gets ``spark.task.cpus`` cores; more torch threads would oversubscribe them."""
    import torch

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _vectors_of(column: pa.Array, ids: np.ndarray, what: str) -> np.ndarray:
    """(rows, dim) float32 from an Arrow list<float> column; a null or ragged row is an error."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        bad = ids[np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0]]
        raise ValueError(f"{what} {bad!r} has a null vector: recompute its embedding or drop the row")
    lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) == 0:
        return np.empty((0, 0), np.float32)
    dim = int(lengths[0])
    if (lengths != dim).any():
        bad = ids[np.flatnonzero(lengths != dim)[0]]
        raise ValueError(
            f"{what} {bad!r} has a vector of length {int(lengths[lengths != dim][0])} but others have "
            f"{dim}: one representation must have one dimension (re-run the embed job)"
        )
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(lengths), dim)


def pack_table(table: pa.Table, block_size: int, with_seen: bool) -> pa.Table:
    """Block rows (``USER_BLOCK_DDL`` with seen, else ``BLOCK_DDL``) of ``table``'s rows (id,
    vector[, seen list<string>]), at most ``block_size`` rows a block: the rows of one bucket,
    which the job sizes to about one block (``block_size``: ``experiment.topk``'s, 1 or more)."""
    ids = table.column(0).to_numpy(zero_copy_only=False).astype(object)
    vectors = _vectors_of(table.column(1), ids, "id")
    starts = range(0, len(ids), block_size)
    columns = {"block_id": [str(min(ids[s:s + block_size])) for s in starts],
               "n": [len(ids[s:s + block_size]) for s in starts], "dim": [int(vectors.shape[1])] * len(starts),
               "ids": [ids[s:s + block_size].tolist() for s in starts],
               "vectors": [np.ascontiguousarray(vectors[s:s + block_size]).tobytes() for s in starts]}
    if with_seen:
        seen = [s or [] for s in table.column(2).to_pylist()]
        columns["seen_counts"] = [[len(x) for x in seen[s:s + block_size]] for s in starts]
        columns["seen_ids"] = [[i for x in seen[s:s + block_size] for i in x] for s in starts]
    return pa.Table.from_pydict(columns, schema=USER_BLOCK_ARROW if with_seen else BLOCK_ARROW)


def users_seen(interactions: pd.DataFrame, exclude: Sequence[str]) -> pd.DataFrame:
    """(user_id, has_train, seen): each user of ``interactions`` (user_id, item_id, split), in id
    order, whether they have train interactions, and their seen items (the seen-item rule,
    ``udfs.evaluate.protocol.seen_items``), sorted."""
    seen = protocol.seen_items(interactions, exclude)
    train = set(interactions.loc[interactions["split"] == protocol.TRAIN_SPLIT, "user_id"])
    users = sorted(interactions["user_id"].unique())
    return pd.DataFrame({"user_id": pd.Series(users, dtype=object), "has_train": [u in train for u in users],
                         "seen": [sorted(seen.get(u, ())) for u in users]})


def users_table(users: pd.DataFrame, profiles: pd.DataFrame | None) -> pa.Table:
    """(user_id, vector, seen) rows to rank: each profile (``profiles``: user_id, vector) with its
    user's seen items from ``users_seen``'s frame (none for a user without interactions), or,
    for a baseline (``profiles`` None), each user with train interactions and the vector [1.0]."""
    seen = dict(zip(users["user_id"], users["seen"]))
    if profiles is None:
        ids = users.loc[users["has_train"].astype(bool), "user_id"]
        vectors = [[1.0]] * len(ids)
    else:
        ids, vectors = profiles["user_id"], profiles["vector"]
    return pa.table({"user_id": pa.array(ids, pa.string()), "vector": pa.array(vectors, pa.list_(pa.float32())),
                     "seen": pa.array([list(seen.get(u, ())) for u in ids], pa.list_(pa.string()))})


def baseline_items(name: str, candidates: Sequence[str], train_counts: pd.Series) -> pa.Table:
    """(item_id, vector) of a baseline's candidates, the one-dimensional vector its scorer reads:
    ``popularity`` the item's train interactions (``train_counts``, indexed by item id; 0 when
    absent), ``random`` 0 (its scores are a hash of the ids)."""
    if name == POPULARITY:
        values = [[float(train_counts.get(i, 0))] for i in candidates]
    else:
        values = [[0.0]] * len(candidates)
    return pa.table({"item_id": pa.array(list(candidates), pa.string()),
                     "vector": pa.array(values, pa.list_(pa.float32()))})


def seen_by_user(exclude: Sequence[str]) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """``groupBy(user bucket).applyInPandas`` function: ``users_seen`` of the bucket's interactions."""
    return lambda interactions: users_seen(interactions, exclude)


def item_blocks(block_size: int) -> Callable[[pa.Table], pa.Table]:
    """``groupBy(item bucket).applyInArrow`` function: a bucket's (item_id, vector) -> blocks."""
    return lambda items: pack_table(items, block_size, False)


def profile_user_blocks(block_size: int) -> Callable[[pa.Table, pa.Table], pa.Table]:
    """``cogroup(user bucket).applyInArrow`` function: a bucket's profiles (user_id, vector) and
    ``users_seen`` rows -> the user blocks of a representation."""
    return lambda profiles, users: pack_table(users_table(users.to_pandas(), profiles.to_pandas()), block_size, True)


def baseline_user_blocks(block_size: int) -> Callable[[pa.Table], pa.Table]:
    """``groupBy(user bucket).applyInArrow`` function: a bucket's ``users_seen`` rows -> a
    baseline's user blocks."""
    return lambda users: pack_table(users_table(users.to_pandas(), None), block_size, True)


def baseline_item_blocks(name: str, block_size: int) -> Callable[[pa.Table, pa.Table], pa.Table]:
    """``cogroup(item bucket).applyInArrow`` function: a bucket's candidates (item_id) and train
    counts (item_id, n: one row per item, so a bucket stays as small as its candidates) -> the
    item blocks of baseline ``name``."""
    return lambda candidates, train: pack_table(
        baseline_items(name, candidates.column("item_id").to_pylist(),
                       pd.Series(train.column("n").to_numpy(), index=train.column("item_id").to_pylist())),
        block_size, False)


def _unpack(batch: pa.RecordBatch, position: int, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(batch.column(f"{prefix}ids")[position].as_py(), dtype=str)
    dim = int(batch.column(f"{prefix}dim")[position].as_py())
    # The block's float32 bytes, read in place (no copy of a whole item block).
    vectors = np.frombuffer(batch.column(f"{prefix}vectors")[position].as_buffer(), dtype=np.float32)
    return ids, vectors.reshape(len(ids), dim) if len(ids) else np.empty((0, dim), np.float32)


def seen_mask(seen_counts: list[int], seen_ids: list[str], item_ids: np.ndarray) -> scipy.sparse.csr_matrix:
    """(users, items of this block) boolean mask of each user's seen items that lie in the block."""
    n_users = len(seen_counts)
    rows = np.repeat(np.arange(n_users, dtype=np.int64), np.asarray(seen_counts, dtype=np.int64))
    cols = pd.Index(item_ids).get_indexer(np.asarray(seen_ids, dtype=object)) if len(seen_ids) else np.empty(0, np.int64)
    inside = cols >= 0
    data = np.ones(int(inside.sum()), dtype=np.bool_)
    return scipy.sparse.csr_matrix((data, (rows[inside], cols[inside])), shape=(n_users, len(item_ids)))


def pair_topk(
    user_ids: np.ndarray, user_vectors: np.ndarray, seen: scipy.sparse.csr_matrix,
    item_ids: np.ndarray, item_vectors: np.ndarray, k: int, scorer: str = COSINE,
    seed: int = 0, score_rows: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one item block for each user of one user block, ``score_rows`` users at a time.

    Returns (scores (u, k') float32, item ids (u, k') object), k' = min(k, items in the block);
    a slot past a user's unseen candidates holds -inf and None.
    """
    scoring = scorers.make_scorer(scorer, seed)
    width = min(k, len(item_ids))
    scores = np.full((len(user_ids), width), -np.inf, np.float32)
    ids = np.full((len(user_ids), width), None, dtype=object)
    if width == 0:
        return scores, ids
    block = topk_kernels.ItemBlock(item_vectors, item_ids)
    for start in range(0, len(user_ids), max(1, score_rows)):
        stop = min(start + max(1, score_rows), len(user_ids))
        mask = seen[start:stop]
        if scoring.by_inner_product:
            chunk_scores, indices = block.topk(user_vectors[start:stop], k, mask)
        else:
            chunk = scoring.scores(user_ids[start:stop], user_vectors[start:stop], item_ids, item_vectors)
            chunk_scores, indices = block.select(chunk, width, mask)
        scores[start:stop] = chunk_scores
        ids[start:stop] = topk_kernels.block_item_ids(indices, item_ids, None)
    return scores, ids


def pair_topk_batches(
    k: int, scorer: str = COSINE, seed: int = 0, score_rows: int = 1024, threads: int = 1,
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """``mapInArrow`` function over cross-joined block rows (``u_``-prefixed user block columns,
    ``i_``-prefixed item block columns) -> ``PAIR_DDL`` rows, one per block pair."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        set_torch_threads(threads)
        for batch in batches:
            # One row at a time: each carries a whole item block, so a batch is never expanded at once.
            for position in range(batch.num_rows):
                user_ids, user_vectors = _unpack(batch, position, "u_")
                item_ids, item_vectors = _unpack(batch, position, "i_")
                mask = seen_mask(batch.column("u_seen_counts")[position].as_py(),
                                 batch.column("u_seen_ids")[position].as_py(), item_ids)
                scores, ids = pair_topk(user_ids, user_vectors, mask, item_ids, item_vectors, k,
                                        scorer, seed, score_rows)
                yield pa.RecordBatch.from_pydict({
                    "user_block": [batch.column("u_block_id")[position].as_py()],
                    "user_ids": [user_ids.tolist()],
                    "width": [scores.shape[1]], "scores": [scores.tobytes()],
                    "item_ids": [ids.ravel().tolist()],
                }, schema=PAIR_ARROW)

    return run


def merge_block_results(k: int) -> Callable[[tuple, pa.Table], pa.Table]:
    """``groupBy(representation, user_block).applyInArrow`` function: one user block's
    ``PAIR_DDL`` rows (one per item block) -> ``RANKS_DDL`` rows, ranks 1..k per user, empty
    slots dropped (a list is short of k only when the candidates ran out)."""

    def run(key: tuple, table: pa.Table) -> pa.Table:
        user_ids = np.asarray(table.column("user_ids")[0].as_py(), dtype=object)
        pairs = zip(table.column("width").to_pylist(), table.column("scores").to_pylist(),
                    table.column("item_ids").to_pylist())
        blocks = [(np.frombuffer(scores, dtype=np.float32).reshape(len(user_ids), width),
                   np.asarray(ids, dtype=object).reshape(len(user_ids), width)) for width, scores, ids in pairs]
        return _rank_rows(key[0].as_py(), user_ids, blocks, k)

    return run


def _rank_rows(representation: str, user_ids: np.ndarray, blocks: list[tuple[np.ndarray, np.ndarray]],
               k: int) -> pa.Table:
    """``RANKS_DDL`` rows of one user block from its per-item-block (scores, ids) lists."""
    merged_scores, merged_ids = topk_kernels.merge_topk(blocks, k, None)
    keep = ~np.isneginf(merged_scores)
    rows, cols = np.nonzero(keep)
    return pa.table({
        "representation": pa.array([representation] * len(rows), pa.string()),
        "user_id": pa.array(np.asarray(user_ids, dtype=object)[rows], pa.string()),
        "rank": pa.array(cols + 1, pa.int32()),
        "item_id": pa.array(merged_ids[rows, cols], pa.string()),
        "score": pa.array(merged_scores[rows, cols], pa.float32()),
    })


def rank_in_process(representation: str, users: pa.Table, items: pa.Table, k: int, scorer: str = COSINE,
                    seed: int = 0, score_rows: int = 1024, item_block: int = 32768) -> pa.Table:
    """``RANKS_DDL`` rows of one representation without Spark (the ``topk`` job's driver path):
    ``users`` (user_id, vector, seen list<string>) as one user block against ``items``
    (item_id, vector) in blocks of ``item_block`` items, through the same block-pair kernel and
    merge as the blockwise path, so a score matrix never exceeds ``score_rows`` x ``item_block``;
    lists, scores and ties equal that path's whatever its block layout."""
    user_ids = np.asarray(users.column("user_id").to_pylist(), dtype=str)
    item_ids = np.asarray(items.column("item_id").to_pylist(), dtype=str)
    user_vectors = _vectors_of(users.column("vector"), user_ids, "user")
    item_vectors = _vectors_of(items.column("vector"), item_ids, "item")
    seen = [s or [] for s in users.column("seen").to_pylist()]
    counts, flat = [len(s) for s in seen], [i for s in seen for i in s]
    blocks = [pair_topk(user_ids, user_vectors, seen_mask(counts, flat, item_ids[s:s + item_block]),
                        item_ids[s:s + item_block], item_vectors[s:s + item_block], k, scorer, seed, score_rows)
              for s in range(0, max(1, len(item_ids)), item_block)]  # no item: one empty block
    return _rank_rows(representation, user_ids, blocks, k)
