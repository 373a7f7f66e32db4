"""Whether a caption engine's descriptions carry information about what users like.

A weak engine can write nearly the same text for every image (the CPU ``tags`` engine calls 37%
of ml100k's posters "a comic book"); the ``lvlm`` representation then ranks no better than
chance and nothing else says why. These functions measure it, over plain arrays and frames:

- ``text_figures``: distinct texts over images, length in words (mean and percentiles),
  vocabulary size, the share of the most common text;
- ``mean_pairwise_cosine``: how alike the vectors of random item pairs are (descriptions
  against titles: near-duplicate texts give near-identical vectors);
- ``co_consumption``: on the train split only, how alike the vectors of two items one user
  consumed are, against the same first item paired with the item of an interaction drawn
  independently. The mean paired difference (the *lift*) is what a mean-of-history profile can
  use: when the descriptions say nothing about taste it is about 0, however distinct the texts.
  Both partners are drawn from interactions, so they lean towards popular items alike and
  popularity alone makes no lift.
- ``description_warning``: the warning when the figures say the descriptions carry (almost)
  no signal (``Thresholds``; calibrated in docs/BENCHMARKS.md, "Twelfth session").

A distinct-text ratio alone cannot tell a useless engine from a useful one: the synthetic
catalog's ``tags`` texts are less distinct (225 of 500) than ml100k's (1,082 of 1,624), yet
there ``lvlm`` beats ``random`` eight times over. The lift tells them apart.

The figures are floats; ``as_counts`` turns them into the integer counts of the ``runs`` table
(a fraction or a cosine in thousandths, keys ending ``_x1000``).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

# Pairs drawn per figure: with 200,000 the co-consumption lift varies by 0.0002-0.0005 from one
# seed to another on ml100k and the synthetic catalog (docs/BENCHMARKS.md, "Twelfth session"),
# a tenth of the threshold's margins; in chunks, in well under a second.
N_PAIRS = 200_000
# A mean cosine of random pairs is a tenth as noisy as a difference of two: fewer do.
COSINE_PAIRS = 20_000
SCALE = 1000
SCALED_SUFFIX = "_x1000"
COUNT_PREFIX = "descriptions_"
# Figures that are whole numbers by nature; every other one is stored in thousandths.
WHOLE_FIGURES = ("texts", "distinct", "vocabulary")


def text_figures(texts: Iterable[str | None]) -> dict[str, float]:
    """Figures over one engine's texts, one per image (missing texts are left out): ``texts``,
    ``distinct``, ``distinct_ratio``, ``words_mean``, ``words_p10``/``p50``/``p90``,
    ``vocabulary`` (distinct lower-cased words) and ``top_text_share``."""
    kept = [t for t in texts if isinstance(t, str)]
    if not kept:
        return {"texts": 0}
    words = [t.lower().split() for t in kept]
    lengths = np.array([len(w) for w in words], dtype=float)
    by_text = Counter(kept)
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90])
    return {"texts": len(kept), "distinct": len(by_text), "distinct_ratio": len(by_text) / len(kept),
            "words_mean": float(lengths.mean()), "words_p10": float(p10), "words_p50": float(p50),
            "words_p90": float(p90), "vocabulary": len({w for ws in words for w in ws}),
            "top_text_share": by_text.most_common(1)[0][1] / len(kept)}


def _row_cosines(vectors: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 16_384) -> np.ndarray:
    """cos(vectors[a[i]], vectors[b[i]]) for each i, a chunk of rows at a time: 200,000 pairs of
    384-d rows gathered at once would take 600 MB a side."""
    out = np.empty(len(a))
    for start in range(0, len(a), chunk):
        x, y = vectors[a[start:start + chunk]], vectors[b[start:start + chunk]]
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        out[start:start + chunk] = np.einsum("ij,ij->i", x, y) / np.where(norms > 0, norms, 1.0)
    return out


def mean_pairwise_cosine(vectors: np.ndarray, n_pairs: int = COSINE_PAIRS, seed: int = 0) -> float:
    """The mean cosine of ``n_pairs`` random pairs of distinct rows of ``vectors`` (seeded: the
    same pairs every run); NaN with fewer than two rows."""
    vectors = np.asarray(vectors, dtype=np.float32)
    n = len(vectors)
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    a = rng.integers(n, size=n_pairs)
    # An offset in [1, n) never lands on the same row.
    b = (a + rng.integers(1, n, size=n_pairs)) % n
    return float(_row_cosines(vectors, a, b).mean())


def co_consumption(item_ids: Sequence[str], vectors: np.ndarray, interactions: pd.DataFrame,
                   n_pairs: int = N_PAIRS, seed: int = 0) -> dict[str, float]:
    """``co_consumed_cosine`` (an item of a user's and another item of that user),
    ``random_cosine`` (the same first item and the item of an independently drawn interaction)
    and the mean paired difference ``lift``,
    over ``interactions`` (user_id, item_id: pass the train split only) of the items that have a
    row in ``vectors``. Users with fewer than two such items take no part. NaN when no user has
    two."""
    row_of = pd.Series(np.arange(len(item_ids)), index=pd.Index(item_ids))
    pairs = interactions[["user_id", "item_id"]].drop_duplicates()
    pairs = pairs[pairs["item_id"].isin(row_of.index)]
    pairs = pairs[pairs.groupby("user_id")["item_id"].transform("size") >= 2].sort_values(["user_id", "item_id"],
                                                                                          kind="stable")
    if pairs.empty:
        return {"co_consumed_cosine": float("nan"), "random_cosine": float("nan"), "lift": float("nan")}
    rows = row_of.loc[pairs["item_id"]].to_numpy()
    users = pairs["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    sizes = np.diff(np.r_[starts, len(users)])
    user_of = np.repeat(np.arange(len(starts)), sizes)
    rng = np.random.default_rng(seed)
    vectors = np.asarray(vectors, dtype=np.float32)
    # Same user: an interaction, then another one of its user (an offset in [1, size)).
    a = rng.integers(len(rows), size=n_pairs)
    start, size = starts[user_of[a]], sizes[user_of[a]]
    b = start + (a - start + rng.integers(1, size)) % size
    same = _row_cosines(vectors, rows[a], rows[b])
    # Each pair's counterpart: the same first item with the item of an interaction drawn
    # independently (as popular on average as the partner), so that what the first item is
    # like cancels out of the difference; one item twice is no pair.
    c = rng.integers(len(rows), size=n_pairs)
    keep = rows[c] != rows[a]
    other = _row_cosines(vectors, rows[a], rows[c])
    return {"co_consumed_cosine": float(same[keep].mean()), "random_cosine": float(other[keep].mean()),
            "lift": float((same - other)[keep].mean())}


def vector_figures(vectors: Mapping[str, tuple[Sequence[str], np.ndarray]], interactions: pd.DataFrame,
                   n_pairs: int = N_PAIRS, seed: int = 0) -> dict[str, float]:
    """For each ``name -> (item ids, vectors)`` (e.g. ``lvlm`` and ``title``): ``<name>_cosine``
    (``mean_pairwise_cosine``) and ``<name>_co_consumed_cosine``, ``<name>_random_cosine``,
    ``<name>_lift`` (``co_consumption`` over the train ``interactions``)."""
    out: dict[str, float] = {}
    for name, (ids, matrix) in vectors.items():
        # Rows by item id: the pairs drawn must not depend on the order a table was read in.
        by_id = np.argsort(np.asarray(ids, dtype=str), kind="stable")
        out[f"{name}_cosine"] = mean_pairwise_cosine(np.asarray(matrix)[by_id], min(n_pairs, COSINE_PAIRS), seed)
        out.update({f"{name}_{k}": v for k, v in co_consumption(ids, matrix, interactions, n_pairs, seed).items()})
    return out


@dataclass(frozen=True)
class Thresholds:
    """When the descriptions count as carrying no signal: their co-consumption lift is under
    ``min_lift``. Measured (docs/BENCHMARKS.md, "Twelfth session"): ml100k's ``tags``
    descriptions 0.0013 (their ``lvlm`` ranks below ``random``), ml100k's own overviews
    (``text``) 0.0044 and titles 0.0135 (both beat ``random``), the synthetic catalog's ``tags``
    descriptions 0.088; each within 0.0005 from one seed to another. The titles' lift is named
    beside it, not compared: where nothing but popularity predicts taste the descriptions carry
    no signal either, whatever the titles do."""

    min_lift: float = 0.003


def description_warning(figures: Mapping[str, float], representation: str = "lvlm",
                        thresholds: Thresholds = Thresholds()) -> str | None:
    """The warning for the ``lvlm_*`` (and ``title_*``) figures of ``vector_figures``, with the
    ``text_figures`` under plain names when known; None when the descriptions carry signal or
    no lift was measured."""
    lift = figures.get("lvlm_lift")
    if lift is None or not np.isfinite(lift) or lift >= thresholds.min_lift:
        return None
    title_lift = figures.get("title_lift")
    titles = (f"; the titles' is {title_lift:+.4f}" if title_lift is not None and np.isfinite(title_lift) else "")
    texts = (f" The texts: {int(figures['distinct']):,} distinct of {int(figures['texts']):,} images "
             f"({figures['distinct_ratio']:.0%}), the most common one describes "
             f"{figures['top_text_share']:.1%} of them, {int(figures['vocabulary']):,} words in all, "
             f"{figures['words_mean']:.1f} words each on average." if figures.get("texts") else "")
    both_cosines = np.isfinite(figures.get("lvlm_cosine", np.nan)) and np.isfinite(figures.get("title_cosine", np.nan))
    cosine = (f" Two random items' descriptions have a mean cosine of {figures['lvlm_cosine']:.3f} "
              f"(titles: {figures['title_cosine']:.3f})." if both_cosines else "")
    return (f"the descriptions of {representation} carry almost no signal about what users like: two items "
            f"one user consumed have descriptions no more alike than two random ones (co-consumption lift "
            f"{lift:+.4f} on the train split, under {thresholds.min_lift:.4f}{titles}).{texts}{cosine} "
            f"Its metrics measure the caption engine, not the method: describe the images with another engine "
            f"or model (experiment.caption.engine / .model) or another prompt (experiment.caption.prompt).")


def as_counts(figures: Mapping[str, float], prefix: str = COUNT_PREFIX) -> dict[str, int]:
    """Integer ``runs`` counts: whole numbers as they are, other finite figures in thousandths
    under ``<name>_x1000``; NaN figures are left out."""
    finite = {name: float(value) for name, value in figures.items() if np.isfinite(float(value))}
    return {**{f"{prefix}{name}": int(value) for name, value in finite.items() if name in WHOLE_FIGURES},
            **{f"{prefix}{name}{SCALED_SUFFIX}": int(round(value * SCALE))
               for name, value in finite.items() if name not in WHOLE_FIGURES}}

