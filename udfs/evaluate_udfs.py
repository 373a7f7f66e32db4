"""pandas wrappers that Spark ships to executors for the ``evaluate`` job.

The numbers come from ``udfs.metrics`` (per-user ranking metrics) and ``udfs.significance``
(bootstrap intervals, the paired tests, effect sizes, Holm); these functions only shape frames for
``groupBy(...).applyInPandas`` and run without a Spark session.

- ``user_metric_groups``: (representation, user_id, relevant list, recommended list ordered by
  rank) -> long rows (representation, user_id, metric, k, value).
- ``metric_summary``: one (representation, metric, k) group of per-user values -> its mean,
  bootstrap CI and number of users.
- ``comparison_groups``: one (metric, k) group of every representation's per-user values ->
  one row per pair of representations, paired over the users both have (the intersection):
  the mean difference with its CI, the effect size, the chosen test's p-value and Holm's
  correction over all the pairs of that metric@k.

The job's driver path (inputs under ``spark.driver_compute_mb``) computes on pandas frames what
its Spark path computes with joins and aggregates: ``user_lists`` (each user's relevant items
and ranked list), ``evaluation_facts`` (the checks' and counts' numbers) and ``apply_by_group``
(``groupBy(...).applyInPandas`` of the same functions above over the same groups).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from udfs import metrics as ranking
from udfs import protocol, significance

log = logging.getLogger(__name__)

# What the functions below emit (``USER_METRICS_DDL``, ``METRICS_DDL``, ``COMPARISONS_DDL``) is
# declared with every other Spark output schema in ``udfs.spark.schemas``.

# Pads a list shorter than max(ks): never an item id, so it never counts as a hit.
MISSING_ITEM = ""


def recommended_matrix(lists: Sequence, width: int) -> np.ndarray:
    """(users, width) object array of ids, each row a list truncated or padded with ``MISSING_ITEM``."""
    out = np.full((len(lists), width), MISSING_ITEM, dtype=object)
    for row, items in enumerate(lists):
        items = [] if items is None else list(items)[:width]
        out[row, :len(items)] = items
    return out


def user_metrics(users: pd.DataFrame, ks: Sequence[int]) -> pd.DataFrame:
    """Per-user metrics of one representation: ``users`` has user_id, relevant (ids), recommended
    (ids, best first); every user must have at least one relevant id."""
    ks = sorted({int(k) for k in ks})
    recommended = recommended_matrix(users["recommended"].tolist(), max(ks))
    relevant = [np.asarray(r, dtype=object) for r in users["relevant"].tolist()]
    hits, n_relevant = ranking.hit_matrix(recommended, relevant)
    values = ranking.ranking_metrics(hits, n_relevant, ks)
    return ranking.user_metrics_frame(users["user_id"].to_numpy(dtype=object), values)


def user_metric_groups(ks: Sequence[int]) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """``applyInPandas`` function over groups of users (any representations) -> ``USER_METRICS_DDL``."""

    def run(group: pd.DataFrame) -> pd.DataFrame:
        frames = []
        for representation, users in group.groupby("representation", sort=True):
            frame = user_metrics(users, ks)
            frame.insert(0, "representation", representation)
            frames.append(frame)
        if not frames:
            return pd.DataFrame({c: [] for c in ("representation", "user_id", "metric", "k", "value")})
        return pd.concat(frames, ignore_index=True)

    return run


def metric_summary(n_samples: int, seed: int) -> Callable[[tuple, pd.DataFrame], pd.DataFrame]:
    """``groupBy(representation, metric, k).applyInPandas`` function -> ``METRICS_DDL``; users are
    resampled in user_id order, so the interval does not depend on Spark's row order."""

    def run(key: tuple, group: pd.DataFrame) -> pd.DataFrame:
        representation, metric, k = key
        # Spark delivers rows in no fixed order; the seeded resampling needs one to be reproducible.
        values = group.sort_values("user_id")["value"].to_numpy(np.float64)
        mean, lo, hi = significance.bootstrap_mean_ci(values, n_samples, seed=seed)
        return pd.DataFrame({"representation": [representation], "metric": [metric], "k": [int(k)],
                             "value": [mean], "n_users": [len(group)], "ci_low": [lo], "ci_high": [hi]})

    return run


COMPARISON_COLUMNS = ["representation_a", "representation_b", "metric", "k", "mean_diff", "ci_low", "ci_high",
                      "effect_size", "test", "p_value", "p_holm", "n_users"]


def paired_comparisons(values: pd.DataFrame, order: Sequence[str], n_samples: int, seed: int,
                       test: str) -> pd.DataFrame:
    """All pairs (a, b), a before b in ``order``, of one metric@k: ``values`` has representation,
    user_id, value. Per pair, over the users both have: the mean of a - b with its paired
    bootstrap CI, Cohen's d_z (``effect_size``), the p-value of ``test`` (one of
    ``significance.TESTS``) and its Holm correction over every pair of the metric@k (the family
    does not depend on which representation a report later picks as its reference). Pairs
    without a common user are left out (the caller counts them)."""
    if test not in significance.TESTS:
        raise ValueError(f"test must be one of {list(significance.TESTS)}, got {test!r}")
    wide = values.pivot(index="user_id", columns="representation", values="value")
    present = [r for r in order if r in wide.columns]
    # Pairs over the same users (usually all of them) share one bootstrap and one set of sign
    # flips: the same draws of users, one matrix product for all their differences.
    by_users: dict[bytes, list[tuple[str, str]]] = {}
    has = wide.notna().to_numpy()
    column = {r: i for i, r in enumerate(wide.columns)}
    for a, b in itertools.combinations(present, 2):
        both = has[:, column[a]] & has[:, column[b]]
        if both.any():
            by_users.setdefault(both.tobytes(), []).append((a, b))
    rows = {}
    for pairs in by_users.values():
        a0, b0 = pairs[0]
        mask = has[:, column[a0]] & has[:, column[b0]]
        x = wide[[a for a, _ in pairs]].to_numpy(np.float64)[mask]
        y = wide[[b for _, b in pairs]].to_numpy(np.float64)[mask]
        differences = x - y
        cis = significance.bootstrap_mean_cis(differences, n_samples, seed=seed)
        p_values = significance.paired_p_values(test, differences, seed=seed)
        effects = significance.effect_sizes(differences)
        for j, ((a, b), (diff, lo, hi)) in enumerate(zip(pairs, cis)):
            rows[(a, b)] = {"representation_a": a, "representation_b": b, "mean_diff": diff, "ci_low": lo,
                            "ci_high": hi, "effect_size": float(effects[j]), "test": test,
                            "p_value": float(p_values[j]), "n_users": int(mask.sum())}
    frame = pd.DataFrame([rows[p] for p in itertools.combinations(present, 2) if p in rows],
                         columns=["representation_a", "representation_b", "mean_diff", "ci_low",
                                  "ci_high", "effect_size", "test", "p_value", "n_users"])
    frame["p_holm"] = significance.holm(frame["p_value"].to_numpy()) if len(frame) else []
    return frame


def comparison_groups(order: Sequence[str], n_samples: int, seed: int,
                      test: str) -> Callable[[tuple, pd.DataFrame], pd.DataFrame]:
    """``groupBy(metric, k).applyInPandas`` function -> ``COMPARISONS_DDL``."""

    def run(key: tuple, group: pd.DataFrame) -> pd.DataFrame:
        metric, k = key
        frame = paired_comparisons(group, order, n_samples, seed, test)
        frame.insert(2, "metric", metric)
        frame.insert(3, "k", int(k))
        return frame[COMPARISON_COLUMNS]

    return run


# The driver path of ``evaluate``: the Spark path's joins and aggregates on pandas frames.

USER_KEY = ["representation", "user_id"]
USER_LIST_COLUMNS = [*USER_KEY, "relevant", "n_rows", "n_excluded", "recommended"]


def ranked_lists(recommendations: pd.DataFrame) -> pd.Series:
    """(representation, user_id) -> the user's item ids by rank (rank, then item id: Spark's
    ``array_sort`` of (rank, item_id) structs); ``recommendations``: representation, user_id,
    rank, item_id."""
    ordered = recommendations.sort_values([*USER_KEY, "rank", "item_id"], kind="stable")
    return ordered.groupby(USER_KEY, sort=False)["item_id"].agg(list).rename("recommended")


def user_lists(relevant: pd.DataFrame, recommendations: pd.DataFrame) -> pd.DataFrame:
    """One row per representation and user with a test row among its candidates (``relevant``:
    ``udfs.protocol.relevant_rows``): ``relevant`` (the ids not excluded, maybe none),
    ``n_rows`` / ``n_excluded`` (the candidate test rows / of those the excluded ones) and
    ``recommended`` (the ranked list, None for a user without one)."""
    if relevant.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in USER_LIST_COLUMNS})
    grouped = relevant.groupby(USER_KEY, sort=True)
    per_user = grouped.agg(n_rows=("item_id", "size"), n_excluded=("excluded", "sum"))
    kept = relevant.loc[~relevant["excluded"]].groupby(USER_KEY, sort=False)["item_id"].agg(list)
    per_user = per_user.join(kept.rename("relevant")).join(ranked_lists(recommendations))
    per_user["relevant"] = [r if isinstance(r, list) else [] for r in per_user["relevant"]]
    per_user["recommended"] = [r if isinstance(r, list) else None for r in per_user["recommended"]]
    return per_user.reset_index()[USER_LIST_COLUMNS]


def scored_users(lists: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """The rows of ``user_lists`` that are measured: a representation of ``order``, a relevant
    item and a list; the input of ``user_metric_groups``."""
    keep = (lists["representation"].isin(list(order)) & (lists["relevant"].map(len) > 0)
            & lists["recommended"].notna())
    return lists.loc[keep, ["representation", "user_id", "relevant", "recommended"]].reset_index(drop=True)


def _id_range(values: pd.Series) -> tuple[str | None, str | None]:
    """(smallest, largest) of the non-null ids, as Spark's min/max: (None, None) without one."""
    known = [v for v in values if isinstance(v, str)]
    return (min(known), max(known)) if known else (None, None)


def _fact(representation=None, a=None, b=None, c=None, d=None, lo=None, hi=None) -> dict:
    return {"representation": representation, "a": a, "b": b, "c": c, "d": d, "lo": lo, "hi": hi}


def evaluation_facts(recommendations: pd.DataFrame, candidates: pd.DataFrame, interactions: pd.DataFrame,
                     lists: pd.DataFrame) -> dict[str, dict]:
    """kind -> representation -> row, the numbers ``jobs.evaluate.prepare_facts`` asks Spark for:
    ``ranked`` (lo/hi: the recommendations' topk ids), ``stored`` (a: candidate rows, lo/hi:
    their topk ids), ``tests`` (under None: a = distinct test rows, b = test users, c = of those
    without a train row) and ``status`` (from ``user_lists``: a = candidate test rows, b = of
    those excluded, c = users with a relevant item, d = of those without a list)."""
    facts: dict[str, dict] = {"ranked": {}, "stored": {}, "tests": {}, "status": {}}
    for rep, ids in recommendations.groupby("representation", sort=True)["topk_id"]:
        lo, hi = _id_range(ids)
        facts["ranked"][rep] = _fact(rep, lo=lo, hi=hi)
    for rep, ids in candidates.groupby("representation", sort=True)["topk_id"]:
        lo, hi = _id_range(ids)
        facts["stored"][rep] = _fact(rep, a=len(ids), lo=lo, hi=hi)
    split = interactions["split"]
    tests = interactions.loc[split == protocol.RELEVANT_SPLIT, ["user_id", "item_id"]]
    tests = tests.dropna(subset=["item_id"]).drop_duplicates()
    users = tests["user_id"].drop_duplicates()
    with_train = set(interactions.loc[split == protocol.TRAIN_SPLIT, "user_id"])
    facts["tests"][None] = _fact(a=len(tests), b=len(users), c=int((~users.isin(with_train)).sum()))
    for rep, group in lists.groupby("representation", sort=True):
        has_relevant = group["relevant"].map(len) > 0
        facts["status"][rep] = _fact(rep, a=int(group["n_rows"].sum()), b=int(group["n_excluded"].sum()),
                                     c=int(has_relevant.sum()),
                                     d=int((has_relevant & group["recommended"].isna()).sum()))
    return facts


def apply_by_group(frame: pd.DataFrame, keys: Sequence[str], function: Callable[[tuple, pd.DataFrame], pd.DataFrame],
                   columns: Sequence[str]) -> pd.DataFrame:
    """What ``frame.groupBy(*keys).applyInPandas(function, ...)`` returns: ``function(key,
    group)`` for each group, concatenated (an empty frame with ``columns`` without a group)."""
    parts = [function(key, group) for key, group in frame.groupby(list(keys), sort=True)]
    if not parts:
        return pd.DataFrame({c: [] for c in columns})
    return pd.concat(parts, ignore_index=True)[list(columns)]
