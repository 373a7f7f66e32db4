"""Per-user full-ranking metrics, batch-first.

Two steps, so that the membership test (the only part that touches ids) runs once for every
metric and K:
1. `hit_matrix(recommended, relevant)` -> `hits` (u, K) bool, `n_relevant` (u,) int64.
2. `ranking_metrics(hits, n_relevant, ks)` -> {(metric, k): per-user values (u,) float64}.
`user_metrics_frame` turns that dict into the long (user_id, metric, k, value) frame of the
`user_metrics` table.

Definitions, for one user with relevant set R (|R| >= 1), ranked list r_1..r_K, hit_i = [r_i in R]
and hits@k = sum_{i<=k} hit_i:
- recall@k    = hits@k / |R|. (Some libraries divide by min(k, |R|) so that 1 is reachable when
                |R| > k; we use the standard |R|, as ranx, trec_eval and the paper's code do.)
- precision@k = hits@k / k (padding slots of a short list count as misses).
- hit_rate@k  = 1 if hits@k > 0 else 0.
- mrr@k       = 1 / (rank of the first hit) if that rank <= k else 0.
- ndcg@k      = DCG@k / IDCG@k, binary gains: DCG@k = sum_{i<=k} hit_i / log2(i + 1),
                IDCG@k = sum_{i<=min(k, |R|)} 1 / log2(i + 1).
- map@k       = sum_{i<=k} hit_i * precision@i / min(k, |R|): RecBole's convention, so that a
                perfect list scores 1 even when |R| > k (ranx and trec_eval divide by |R|).
Users with no relevant item have no defined recall or NDCG: the caller excludes (and counts)
them; `ranking_metrics` raises if one slips through. A list must not repeat an item.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

METRICS: tuple[str, ...] = ("recall", "ndcg", "precision", "map", "hit_rate", "mrr")


def hit_matrix(recommended: np.ndarray, relevant: Sequence[Iterable]) -> tuple[np.ndarray, np.ndarray]:
    """Mark which recommended items are relevant, for all users at once.

    recommended: (u, K) ids per user, best first; short lists padded with any id that is never
    relevant (None, "" or -1: the missing ids of `udfs.rank.topk`). relevant: one collection of ids
    per user, in the same row order. Returns (hits (u, K) bool, n_relevant (u,) int64), where
    n_relevant counts distinct relevant ids.
    """
    recommended = np.asarray(recommended)
    if recommended.ndim != 2:
        raise ValueError(f"recommended must be a 2-D (users, K) array of item ids, got shape {recommended.shape}")
    n_users, width = recommended.shape
    if len(relevant) != n_users:
        raise ValueError(
            f"relevant has {len(relevant)} entries but recommended has {n_users} rows: "
            "pass one collection of relevant ids per recommended row, in the same order"
        )
    relevant_lists = [np.asarray(r if isinstance(r, np.ndarray) else list(r), dtype=object).ravel() for r in relevant]
    lengths = np.fromiter((r.size for r in relevant_lists), dtype=np.int64, count=n_users)
    relevant_ids = np.concatenate(relevant_lists) if lengths.sum() else np.empty(0, dtype=object)
    if relevant_ids.size and pd.isna(relevant_ids).any():
        raise ValueError("relevant holds a missing id (None/NaN): drop it from the test interactions")

    # One shared integer code per id turns the (user, item) membership test into integer keys.
    all_ids = np.concatenate([recommended.ravel().astype(object), relevant_ids])
    codes, uniques = pd.factorize(all_ids, use_na_sentinel=True)
    n_codes = max(len(uniques), 1)
    _check_one_id_kind(uniques)
    recommended_codes = codes[: recommended.size].reshape(n_users, width)
    relevant_codes = codes[recommended.size :]

    relevant_users = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    relevant_keys = np.unique(relevant_users * n_codes + relevant_codes)
    n_relevant = np.bincount(relevant_keys // n_codes, minlength=n_users).astype(np.int64)
    recommended_keys = np.arange(n_users, dtype=np.int64)[:, None] * n_codes + recommended_codes
    hits = np.isin(recommended_keys, relevant_keys) & (recommended_codes >= 0)
    return hits, n_relevant


def _check_one_id_kind(ids: np.ndarray) -> None:
    """Refuse a mix of string and numeric ids: "7" never equals 7, so every hit would be lost silently."""
    kinds = {"string" if isinstance(i, (str, bytes)) else "number" if isinstance(i, (int, np.integer)) else type(i).__name__ for i in ids}
    if len(kinds) > 1:
        raise ValueError(
            f"recommended and relevant ids mix kinds {sorted(kinds)}: cast both to the string ids "
            "of the items table before computing metrics"
        )


def ranking_metrics(
    hits: np.ndarray,
    n_relevant: np.ndarray,
    ks: Sequence[int],
    metrics: Sequence[str] = METRICS,
) -> dict[tuple[str, int], np.ndarray]:
    """Per-user metrics at each K from a hit matrix (definitions in the module docstring).

    hits: (u, K) bool, best rank first; n_relevant: (u,) number of relevant items, all >= 1;
    ks: cut-offs, each <= K. Returns {(metric, k): (u,) float64} for every metric and k.
    """
    hits = np.asarray(hits, dtype=bool)
    n_relevant = np.asarray(n_relevant, dtype=np.int64)
    if hits.ndim != 2 or n_relevant.shape != (hits.shape[0],):
        raise ValueError(
            f"hits has shape {hits.shape} and n_relevant {n_relevant.shape}: "
            "pass a (users, K) hit matrix and one relevant count per user"
        )
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}: choose from {list(METRICS)}")
    width = hits.shape[1]
    bad_ks = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= width]
    if bad_ks:
        raise ValueError(
            f"ks {bad_ks} are outside 1..{width} (the recommendation list width): "
            "recommend at least max(ks) items per user or drop those cut-offs"
        )
    empty_users = np.flatnonzero(n_relevant < 1)
    if empty_users.size:
        raise ValueError(
            f"{empty_users.size} users (first at row {int(empty_users[0])}) have no relevant item: "
            "exclude users without test items before computing metrics, and report how many"
        )

    ranks = np.arange(1, width + 1, dtype=np.float64)
    hit_values = hits.astype(np.float64)
    cumulative_hits = np.cumsum(hit_values, axis=1)
    discounts = 1.0 / np.log2(ranks + 1.0)
    cumulative_dcg = np.cumsum(hit_values * discounts, axis=1)
    ideal_dcg = np.cumsum(discounts)
    cumulative_ap = np.cumsum(hit_values * cumulative_hits / ranks, axis=1)
    first_hit_rank = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, width + 1)

    values: dict[tuple[str, int], np.ndarray] = {}
    for k in ks:
        k = int(k)
        hits_at_k = cumulative_hits[:, k - 1]
        capped_relevant = np.minimum(n_relevant, k)
        per_metric = {
            "recall": lambda: hits_at_k / n_relevant,
            "precision": lambda: hits_at_k / k,
            "hit_rate": lambda: (hits_at_k > 0).astype(np.float64),
            "mrr": lambda: np.where(first_hit_rank <= k, 1.0 / first_hit_rank, 0.0),
            "ndcg": lambda: cumulative_dcg[:, k - 1] / ideal_dcg[capped_relevant - 1],
            "map": lambda: cumulative_ap[:, k - 1] / capped_relevant,
        }
        for metric in metrics:
            values[(metric, k)] = per_metric[metric]()
    return values


def user_metrics_frame(user_ids: Sequence, values: dict[tuple[str, int], np.ndarray]) -> pd.DataFrame:
    """Long frame (user_id, metric, k, value) of `ranking_metrics` output (at least one metric@k: the
    config never has an empty ks), rows in user order per (metric, k)."""
    user_ids = np.asarray(user_ids)
    frames = []
    for (metric, k), per_user in values.items():
        if per_user.shape != user_ids.shape:
            raise ValueError(
                f"{metric}@{k} has {per_user.shape[0]} values for {user_ids.shape[0]} user ids: "
                "pass the user ids of the rows the metrics were computed on"
            )
        frames.append(pd.DataFrame({"user_id": user_ids, "metric": metric, "k": np.int32(k), "value": per_user}))
    return pd.concat(frames, ignore_index=True)
