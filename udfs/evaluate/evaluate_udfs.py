"""The ``evaluate`` job's steps, each written once as a pandas function that needs no Spark
session. The job calls them on the driver over whole frames (small inputs) or has Spark call
them per bucket of users or items (``pmod(hash(key), n)``), per group of one metric@k, and
adds up what they return; the functions never know which.

Per bucket (a bucket holds whole users, or whole items: what the function needs together):

- ``udfs.evaluate.protocol.relevant_rows`` (by item): each user's test rows that are candidates.
- ``user_lists`` (by user): per representation and user, the relevant items, the candidate
  test rows' counts and the ranked list.
- ``user_metric_rows`` (by user): those lists -> per-user metrics (``udfs.evaluate.metrics``), long rows.
- ``topk_facts`` (recommendations by user, candidates by item), ``test_facts`` (interactions by
  user), ``list_facts`` (lists by user): what the job checks and counts, as ``FACT_COLUMNS`` rows
  that add up across buckets into ``evaluation_facts`` (an ``EvaluationFacts``).

Per group: ``metric_summary`` (one representation's metric@k: mean, bootstrap CI) and
``comparison_groups`` (one metric@k: every pair of representations paired over their common
users, effect size, the chosen test's p-value, Holm over the pairs); ``apply_by_group`` is
``groupBy(...).applyInPandas`` on the driver. The numbers come from ``udfs.evaluate.metrics`` and
``udfs.evaluate.significance``.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from udfs.evaluate import metrics as ranking
from udfs.evaluate import protocol, significance

# What these functions emit is declared as Spark DDL with every output schema in
# ``udfs.spark.schemas`` (``USER_METRICS_DDL``, ``METRICS_DDL``, ``COMPARISONS_DDL``, and
# ``RELEVANT_DDL``, ``USER_LISTS_DDL``, ``FACTS_DDL`` for the rows that never reach a table).
# One dtype per fact column, whichever columns a bucket's rows fill: nullable counts, string ids.
FACT_DTYPES = {"representation": "string", "recommendations": "Int64", "recommendations_from": "string",
               "recommendations_to": "string", "candidates": "Int64", "candidates_from": "string",
               "candidates_to": "string", "candidate_test_rows": "Int64", "excluded_test_rows": "Int64",
               "users_with_relevant": "Int64", "users_without_list": "Int64", "test_rows": "Int64",
               "test_users": "Int64", "test_users_without_train": "Int64"}
FACT_COLUMNS = list(FACT_DTYPES)

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
    hits, n_relevant = ranking.hit_matrix(recommended_matrix(users["recommended"].tolist(), max(ks)),
                                          [np.asarray(r, dtype=object) for r in users["relevant"].tolist()])
    return ranking.user_metrics_frame(users["user_id"].to_numpy(dtype=object),
                                      ranking.ranking_metrics(hits, n_relevant, ks))


def user_metric_rows(ks: Sequence[int], order: Sequence[str]) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """``user_lists`` rows -> ``USER_METRICS_DDL`` rows of those measured: a representation of
    ``order``, a relevant item and a list (the others are counted by ``list_facts``)."""

    def run(lists: pd.DataFrame) -> pd.DataFrame:
        measured = (lists["representation"].isin(list(order)) & (lists["relevant"].map(len) > 0)
                    & lists["recommended"].notna())
        frames = [user_metrics(users, ks).assign(representation=representation)
                  for representation, users in lists.loc[measured].groupby("representation", sort=True)]
        columns = ["representation", "user_id", "metric", "k", "value"]
        return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)

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
def comparison_groups(order: Sequence[str], n_samples: int, seed: int,
                      test: str) -> Callable[[tuple, pd.DataFrame], pd.DataFrame]:
    """``groupBy(metric, k).applyInPandas`` function -> ``COMPARISONS_DDL``: all pairs (a, b), a
    before b in ``order``, of one metric@k (``values``: representation, user_id, value). Per
    pair, over the users both have: the mean of a - b with its paired bootstrap CI, Cohen's d_z
    (``effect_size``), the p-value of ``test`` (one of ``significance.TESTS``) and its Holm
    correction over every pair of the metric@k (the family does not depend on which
    representation a report later picks as its reference). Pairs without a common user are left
    out (the caller counts them)."""
    if test not in significance.TESTS:
        raise ValueError(f"test must be one of {list(significance.TESTS)}, got {test!r}")

    def run(key: tuple, values: pd.DataFrame) -> pd.DataFrame:
        metric, k = key
        wide = values.pivot(index="user_id", columns="representation", values="value")
        present = [r for r in order if r in wide.columns]
        # Pairs over the same users (usually all of them) share one bootstrap and one set of sign
        # flips: the same draws of users, one matrix product for all their differences.
        by_users: dict[bytes, tuple[np.ndarray, list[tuple[str, str]]]] = {}
        has = wide.notna().to_numpy()
        column = {r: i for i, r in enumerate(wide.columns)}
        for a, b in itertools.combinations(present, 2):
            both = has[:, column[a]] & has[:, column[b]]
            if both.any():
                by_users.setdefault(both.tobytes(), (both, []))[1].append((a, b))
        rows = {}
        for mask, pairs in by_users.values():
            differences = (wide[[a for a, _ in pairs]].to_numpy(np.float64)[mask]
                           - wide[[b for _, b in pairs]].to_numpy(np.float64)[mask])
            cis = significance.bootstrap_mean_cis(differences, n_samples, seed=seed)
            p_values = significance.paired_p_values(test, differences, seed=seed)
            effects = significance.effect_sizes(differences)
            for j, ((a, b), (diff, lo, hi)) in enumerate(zip(pairs, cis)):
                rows[(a, b)] = {"representation_a": a, "representation_b": b, "metric": metric, "k": int(k),
                                "mean_diff": diff, "ci_low": lo, "ci_high": hi, "effect_size": float(effects[j]),
                                "test": test, "p_value": float(p_values[j]), "n_users": int(mask.sum())}
        frame = pd.DataFrame([rows[p] for p in itertools.combinations(present, 2) if p in rows],
                             columns=[c for c in COMPARISON_COLUMNS if c != "p_holm"])
        frame["p_holm"] = significance.holm(frame["p_value"].to_numpy()) if len(frame) else []
        return frame[COMPARISON_COLUMNS]

    return run


def apply_by_group(frame: pd.DataFrame, keys: Sequence[str], function: Callable[[tuple, pd.DataFrame], pd.DataFrame],
                   columns: Sequence[str]) -> pd.DataFrame:
    """What ``frame.groupBy(*keys).applyInPandas(function, ...)`` returns: ``function(key,
    group)`` for each group, concatenated (an empty frame with ``columns`` without a group)."""
    parts = [function(key, group) for key, group in frame.groupby(list(keys), sort=True)]
    if not parts:
        return pd.DataFrame({c: [] for c in columns})
    return pd.concat(parts, ignore_index=True)[list(columns)]


USER_KEY = ["representation", "user_id"]
USER_LIST_COLUMNS = [*USER_KEY, "relevant", "n_rows", "n_excluded", "recommended"]


def user_lists(relevant: pd.DataFrame, recommendations: pd.DataFrame) -> pd.DataFrame:
    """One row per representation and user with a test row among its candidates (``relevant``:
    ``udfs.evaluate.protocol.relevant_rows``): ``relevant`` (the ids not excluded, maybe none),
    ``n_rows`` / ``n_excluded`` (the candidate test rows / of those the excluded ones) and
    ``recommended`` (the ranked list by rank, then item id; None for a user without one).
    ``recommendations``: representation, user_id, rank, item_id. Both inputs must hold whole
    users: all of a user's rows or none."""
    if relevant.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in USER_LIST_COLUMNS})
    per_user = relevant.groupby(USER_KEY, sort=True).agg(n_rows=("item_id", "size"), n_excluded=("excluded", "sum"))
    kept = relevant.loc[~relevant["excluded"]].groupby(USER_KEY, sort=False)["item_id"].agg(list)
    ranked = (recommendations.sort_values([*USER_KEY, "rank", "item_id"], kind="stable")
              .groupby(USER_KEY, sort=False)["item_id"].agg(list))
    per_user = per_user.join(kept.rename("relevant")).join(ranked.rename("recommended"))
    per_user["relevant"] = [r if isinstance(r, list) else [] for r in per_user["relevant"]]
    per_user["recommended"] = [r if isinstance(r, list) else None for r in per_user["recommended"]]
    return per_user.reset_index()[USER_LIST_COLUMNS]


# What evaluate checks and counts. Each function below gives ``FACT_COLUMNS`` rows from the rows
# of one bucket (any split of the input that keeps a user's rows together); the rows of every
# bucket add up (sums, and the smallest and largest topk id) into ``evaluation_facts``.


@dataclass(frozen=True)
class RepresentationFacts:
    """What evaluate checks and counts of one representation (all zero: none of its rows)."""

    recommendations: int = 0  # rows of its ranked lists
    candidates: int = 0  # rows of its stored candidate set
    topk_ids: tuple[str, ...] = ()  # the topk runs that wrote its lists and its candidates
    candidate_test_rows: int = 0  # test rows that are among its candidates
    excluded_test_rows: int = 0  # of those, the ones an excluded split holds too
    users_with_relevant: int = 0
    users_without_list: int = 0  # of those, users without a ranked list (no profile)


@dataclass(frozen=True)
class EvaluationFacts:
    """What evaluate checks and counts, the same from either path: the test split's totals and
    each representation's facts (``of``)."""

    test_rows: int = 0  # distinct (user, item) test rows
    test_users: int = 0
    test_users_without_train: int = 0
    representations: Mapping[str, RepresentationFacts] = field(default_factory=dict)

    def of(self, representation: str) -> RepresentationFacts:
        return self.representations.get(representation, RepresentationFacts())


def topk_facts(counted: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """Rows (``counted``: recommendations or candidates, each with a topk_id) -> per
    representation their number and their smallest and largest topk id (nulls skipped)."""

    def run(rows: pd.DataFrame) -> pd.DataFrame:
        ids = rows.astype({"topk_id": "string"}).groupby("representation")["topk_id"]
        found = ids.agg(**{counted: "size", f"{counted}_from": "min", f"{counted}_to": "max"})
        return found.reset_index().reindex(columns=FACT_COLUMNS).astype(FACT_DTYPES)

    return run


def test_facts(interactions: pd.DataFrame) -> pd.DataFrame:
    """Interactions (user_id, item_id, split) of whole users -> their distinct test rows, test
    users and test users without a train row (a null user id is one user, as in SQL)."""
    split = interactions["split"]
    tests = interactions.loc[split == protocol.RELEVANT_SPLIT, ["user_id", "item_id"]]
    tests = tests.dropna(subset=["item_id"]).drop_duplicates()
    users = tests["user_id"].drop_duplicates()
    with_train = set(interactions.loc[split == protocol.TRAIN_SPLIT, "user_id"])
    found = pd.DataFrame({"test_rows": [len(tests)], "test_users": [len(users)],
                          "test_users_without_train": [int((~users.isin(with_train)).sum())]})
    return found.reindex(columns=FACT_COLUMNS).astype(FACT_DTYPES)


def list_facts(lists: pd.DataFrame) -> pd.DataFrame:
    """``user_lists`` rows -> per representation the candidate test rows, the excluded ones,
    the users with a relevant item and of those the ones without a list."""
    with_relevant = lists["relevant"].map(len) > 0
    users = lists.assign(users_with_relevant=with_relevant,
                         users_without_list=with_relevant & lists["recommended"].isna())
    found = users.groupby("representation").agg(
        candidate_test_rows=("n_rows", "sum"), excluded_test_rows=("n_excluded", "sum"),
        users_with_relevant=("users_with_relevant", "sum"), users_without_list=("users_without_list", "sum"))
    return found.reset_index().reindex(columns=FACT_COLUMNS).astype(FACT_DTYPES)


def evaluation_facts(rows: pd.DataFrame) -> EvaluationFacts:
    """The facts of every bucket's ``FACT_COLUMNS`` rows added up."""
    ids = [c for c in FACT_COLUMNS if c.endswith(("_from", "_to"))]
    counts = [c for c in FACT_COLUMNS[1:] if c not in ids]
    per_rep = rows.dropna(subset=["representation"]).astype(FACT_DTYPES).groupby("representation").agg(
        **{c: (c, "sum") for c in counts}, **{c: (c, "min" if c.endswith("_from") else "max") for c in ids})
    totals = rows[counts].sum()
    return EvaluationFacts(
        **{c: int(totals[c]) for c in ("test_rows", "test_users", "test_users_without_train")},
        representations={rep: RepresentationFacts(
            **{c: int(row[c]) for c in counts if c in RepresentationFacts.__dataclass_fields__},
            topk_ids=tuple(sorted(set(row[ids].dropna())))) for rep, row in per_rep.iterrows()})
