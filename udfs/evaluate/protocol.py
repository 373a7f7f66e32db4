"""The evaluation protocol's rules, in one place, as pure functions over pandas frames.

- Candidate rule (``candidate_items``): which items each representation ranks. ``common``: the
  items with a vector in EVERY vector representation, the same set for all of them and for the
  baselines (the catalog when there is no vector representation); ``all``: each vector
  representation its own items, the baselines the whole catalog.
- Seen-item rule (``seen_items``): a user's items in the excluded splits (``train,valid`` at
  test time) are removed from their ranking.
- Relevance rule (``relevant_rows``): a user's relevant items are their ``test`` items that are
  candidates; those also in an excluded split are flagged, since no ranking can hold them.

``topk`` computes the candidates with ``candidate_items`` and stores them; ``topk`` and
``evaluate`` apply the seen and relevance rules through ``seen_splits`` / ``RELEVANT_SPLIT`` (in
Spark, over the whole interactions table); the functions here are the rules' reference
definitions, which the tests hold the jobs to. ``relevant_rows`` is the relevance rule in the
row form ``evaluate`` measures from, its only definition: the job calls it over all the rows on
the driver (small inputs) or per bucket of whole items on Spark.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

COMMON = "common"
ALL = "all"
CANDIDATE_POLICIES = (COMMON, ALL)
TRAIN_SPLIT = "train"
VALID_SPLIT = "valid"  # early stopping and tuning only
RELEVANT_SPLIT = "test"
EXCLUDABLE_SPLITS = (TRAIN_SPLIT, VALID_SPLIT)
# The vector-free baselines, ranked beside every representation over the same candidates.
POPULARITY, RANDOM = "popularity", "random"
BASELINES = (POPULARITY, RANDOM)

CANDIDATE_COLUMNS = ["representation", "item_id"]


def seen_splits(exclude: Iterable[str]) -> tuple[str, ...]:
    """The splits whose items are removed from a ranking; a split that cannot be excluded (the
    test split, which is what is measured) is an error naming the allowed ones."""
    splits = tuple(dict.fromkeys(exclude))
    wrong = [s for s in splits if s not in EXCLUDABLE_SPLITS]
    if wrong:
        raise ValueError(f"cannot exclude split(s) {wrong}: choose among {list(EXCLUDABLE_SPLITS)}")
    return splits


def needs_catalog(representations: Sequence[str], baselines: Sequence[str], policy: str) -> bool:
    """Whether ``candidate_items`` reads the catalog: ``all`` with a baseline, ``common`` without
    a vector representation."""
    return bool(baselines) if policy == ALL else not representations


def candidate_items(embedded: pd.DataFrame, representations: Sequence[str], baselines: Sequence[str],
                    catalog: Iterable[str], policy: str, interacted: Iterable[str] = ()) -> pd.DataFrame:
    """(representation, item_id) rows, sorted: the items each representation ranks.

    ``embedded``: (representation, item_id) of the items with a vector, any duplicates;
    ``catalog``: the dataset's item ids (the ``items`` table; read only when ``needs_catalog``),
    else, when it has none, ``interacted``: the items of its interactions."""
    if policy not in CANDIDATE_POLICIES:
        raise ValueError(f"unknown candidate policy {policy!r}: choose one of {list(CANDIDATE_POLICIES)}")
    catalog = set(catalog) or set(interacted)
    embedded = embedded.loc[embedded["representation"].isin(list(representations)), CANDIDATE_COLUMNS].drop_duplicates()
    names = list(dict.fromkeys([*representations, *baselines]))
    if policy == COMMON:
        if representations:
            per_item = embedded.groupby("item_id")["representation"].nunique()
            common = sorted(per_item.index[per_item == len(set(representations))])
        else:
            common = sorted(set(catalog))
        frame = pd.DataFrame({"representation": [n for n in names for _ in common],
                              "item_id": [i for _ in names for i in common]}, columns=CANDIDATE_COLUMNS)
    else:
        whole = sorted(set(catalog)) if baselines else []
        own = pd.DataFrame({"representation": [b for b in baselines for _ in whole],
                            "item_id": [i for _ in baselines for i in whole]}, columns=CANDIDATE_COLUMNS)
        frame = pd.concat([embedded, own], ignore_index=True)
    return frame.astype({"representation": object, "item_id": object}).sort_values(
        CANDIDATE_COLUMNS, ignore_index=True)


def seen_items(interactions: pd.DataFrame, exclude: Iterable[str]) -> dict[str, set[str]]:
    """user -> the items of their excluded splits (``interactions``: user_id, item_id, split)."""
    splits = seen_splits(exclude)
    seen = interactions.loc[interactions["split"].isin(list(splits)), ["user_id", "item_id"]]
    return {user: set(items) for user, items in seen.groupby("user_id")["item_id"]}


RELEVANT_COLUMNS = ["representation", "user_id", "item_id", "excluded"]


def relevant_rows(interactions: pd.DataFrame, candidates: pd.DataFrame, exclude: Iterable[str]) -> pd.DataFrame:
    """(representation, user_id, item_id, excluded): each user's distinct test items that are
    candidates of a representation (``candidates``: representation, item_id), ``excluded`` when
    one of the excluded splits also holds the item. The SQL join's semantics: a null key
    matches nothing, a candidate listed twice gives two rows. Rows in no particular order. Every
    join is on the item id, so any split of the inputs that keeps an item's rows together (a
    bucket of items) gives the same rows, a part in each."""
    splits = list(seen_splits(exclude))
    keys = ["user_id", "item_id"]
    known = interactions.dropna(subset=keys)
    test = known.loc[known["split"] == RELEVANT_SPLIT, keys].drop_duplicates()
    seen = known.loc[known["split"].isin(splits), keys].drop_duplicates()
    rows = test.merge(candidates.dropna(subset=["item_id"])[["representation", "item_id"]], on="item_id")
    rows = rows.merge(seen, on=keys, how="left", indicator="excluded")
    rows["excluded"] = rows["excluded"].eq("both")
    return rows[RELEVANT_COLUMNS].reset_index(drop=True)
