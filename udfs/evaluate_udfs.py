"""pandas wrappers that Spark ships to executors for the ``evaluate`` job.

The numbers come from ``udfs.metrics`` (per-user ranking metrics) and ``udfs.significance``
(bootstrap intervals, Wilcoxon, Holm); these functions only shape frames for
``groupBy(...).applyInPandas`` and run without a Spark session.

- ``user_metric_groups``: (representation, user_id, relevant list, recommended list ordered by
  rank) -> long rows (representation, user_id, metric, k, value).
- ``metric_summary``: one (representation, metric, k) group of per-user values -> its mean,
  bootstrap CI and number of users.
- ``comparison_groups``: one (metric, k) group of every representation's per-user values ->
  one row per pair of representations, paired over the users both have (the intersection),
  with Holm's correction over all the pairs of that metric@k.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from udfs import metrics as ranking
from udfs import significance

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


def paired_comparisons(values: pd.DataFrame, order: Sequence[str], n_samples: int, seed: int) -> pd.DataFrame:
    """All pairs (a, b), a before b in ``order``, of one metric@k: ``values`` has representation,
    user_id, value. Pairs without a common user are left out (the caller counts them)."""
    wide = values.pivot(index="user_id", columns="representation", values="value")
    present = [r for r in order if r in wide.columns]
    # Pairs over the same users (usually all of them) share one bootstrap: the same draws of
    # users, one matrix product for all their differences.
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
        cis = significance.bootstrap_mean_cis(x - y, n_samples, seed=seed)
        for j, ((a, b), (diff, lo, hi)) in enumerate(zip(pairs, cis)):
            rows[(a, b)] = {"representation_a": a, "representation_b": b, "mean_diff": diff, "ci_low": lo,
                            "ci_high": hi, "p_value": significance.wilcoxon_p(x[:, j], y[:, j]),
                            "n_users": int(mask.sum())}
    frame = pd.DataFrame([rows[p] for p in itertools.combinations(present, 2) if p in rows],
                         columns=["representation_a", "representation_b", "mean_diff", "ci_low",
                                  "ci_high", "p_value", "n_users"])
    frame["p_holm"] = significance.holm(frame["p_value"].to_numpy()) if len(frame) else []
    return frame


def comparison_groups(order: Sequence[str], n_samples: int, seed: int) -> Callable[[tuple, pd.DataFrame], pd.DataFrame]:
    """``groupBy(metric, k).applyInPandas`` function -> ``COMPARISONS_DDL``."""

    def run(key: tuple, group: pd.DataFrame) -> pd.DataFrame:
        metric, k = key
        frame = paired_comparisons(group, order, n_samples, seed)
        frame.insert(2, "metric", metric)
        frame.insert(3, "k", int(k))
        return frame[["representation_a", "representation_b", "metric", "k", "mean_diff", "ci_low", "ci_high",
                      "p_value", "p_holm", "n_users"]]

    return run
