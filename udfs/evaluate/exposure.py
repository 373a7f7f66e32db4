"""Beyond-accuracy figures of a representation's lists: catalog coverage, mean popularity
percentile of the recommended items, and the Gini coefficient of exposure. Pure numpy/pandas.

All three are measured over the candidate set the lists were ranked from (the run's stored
``candidates``), so every representation of a run is measured against the same catalog.

- coverage: the share of candidates that appear in at least one list.
- popularity percentile of an item: the share of candidates strictly less popular (train
  interaction count) plus half the share equally popular (the mid-rank), in [0, 1); the mean
  is taken over every recommended slot, so an item shown to many users counts as often.
- Gini of exposure: with e_(1) <= ... <= e_(n) the number of lists each candidate appears in
  (zeros included), G = sum_i (2i - n - 1) e_(i) / (n sum_i e_i): 0 when every candidate is
  shown equally often, (n - 1) / n when one item takes all the exposure.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

BEYOND_ACCURACY = ("coverage", "popularity_percentile", "exposure_gini")


def exposure_counts(recommended: Iterable[str], candidates: Iterable[str]) -> np.ndarray:
    """(n,) how many times each candidate appears in ``recommended`` (one entry per list slot),
    in the order of ``candidates``; a recommended id outside the candidates is an error."""
    index = {item: i for i, item in enumerate(candidates)}
    counts = np.zeros(len(index), np.int64)
    for item in recommended:
        if item not in index:
            raise ValueError(f"recommended item {item!r} is not a candidate: measure lists against the "
                             "candidate set they were ranked from")
        counts[index[item]] += 1
    return counts


def gini(exposure: np.ndarray) -> float:
    """The Gini coefficient of non-negative counts (0 for an empty or all-zero array)."""
    e = np.sort(np.asarray(exposure, np.float64))
    n, total = e.size, e.sum()
    if n == 0 or total == 0:
        return 0.0
    if (e < 0).any():
        raise ValueError("exposure counts must be non-negative")
    return float(np.sum((2 * np.arange(1, n + 1) - n - 1) * e) / (n * total))


def popularity_percentiles(popularity: np.ndarray) -> np.ndarray:
    """(n,) mid-rank percentile of each count among all of them: (#less + #equal / 2) / n."""
    p = np.asarray(popularity, np.float64)
    order = np.sort(p)
    less = np.searchsorted(order, p, side="left")
    equal = np.searchsorted(order, p, side="right") - less
    return (less + equal / 2) / p.size if p.size else p


def beyond_accuracy(recommended: Iterable[str], candidates: Iterable[str],
                    train_counts: Mapping[str, int]) -> dict[str, float]:
    """coverage, popularity_percentile and exposure_gini of one representation's lists.
    ``train_counts``: item -> train interactions (missing: 0)."""
    candidates = list(candidates)
    exposure = exposure_counts(recommended, candidates)
    percentiles = popularity_percentiles(np.array([train_counts.get(i, 0) for i in candidates], np.float64))
    slots = exposure.sum()
    return {"coverage": float((exposure > 0).mean()) if exposure.size else 0.0,
            "popularity_percentile": float((exposure * percentiles).sum() / slots) if slots else float("nan"),
            "exposure_gini": gini(exposure)}


def beyond_accuracy_frame(recommendations: pd.DataFrame, candidates: pd.DataFrame,
                          train_counts: Mapping[str, int]) -> pd.DataFrame:
    """One row per representation of ``recommendations`` (representation, item_id): its
    ``BEYOND_ACCURACY`` figures against its own rows of ``candidates`` (representation, item_id)."""
    rows = [{"representation": rep, **beyond_accuracy(
                lists["item_id"], candidates.loc[candidates["representation"] == rep, "item_id"], train_counts)}
            for rep, lists in recommendations.groupby("representation", sort=False)]
    return pd.DataFrame(rows, columns=["representation", *BEYOND_ACCURACY])
