"""The ``profiles`` job's rules over frames, written once for both of its paths.

On a small catalog the job reads its inputs with delta-rs and calls these functions on the
driver; on a large one Spark only partitions the rows by a bounded bucket of user (or item) ids
and calls the same functions per group (``groupBy(...).applyInPandas``, ``cogroup``). A group
holds whole users (or items), so the rows do not depend on how they were grouped. The arithmetic
is ``udfs.rank.profiles`` (the mean, via ``udfs.encode.embedding_udfs.profile_groups``) and ``udfs.fusion.fusion``
(via ``udfs.encode.embedding_udfs.fused_vector_batches``).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from udfs.encode.embedding_udfs import OK, fused_vector_batches, profile_groups
from udfs.representations import ALS, Representation

PROFILE_COLUMNS = ["user_id", "representation", "vector", "n_history"]
# ``jobs.tables.ingest_id_summary``'s columns, what ``jobs.tables.same_ingest`` decides from.
INGEST_COLUMNS = ("name", "low", "high", "n", "tagged")


@dataclass(frozen=True)
class ProfileFacts:
    """What the job checks and counts before it builds a profile, however it was computed."""

    ingest: list[dict]  # one ``INGEST_COLUMNS`` row per table (items, interactions)
    train_rows: int
    users: int
    train_users: int  # users with a train row
    history_rows: dict[str, int]  # per representation: train rows whose item has a vector

    @classmethod
    def of(cls, item_ingest_ids: pd.Series, interactions: pd.DataFrame, history: pd.DataFrame) -> ProfileFacts:
        """The facts of one dataset's items' ingest ids, its interactions (user_id, split,
        ingest_id) and its ``history_rows``."""
        per_user = (interactions["split"] == "train").groupby(interactions["user_id"], dropna=False).sum()
        ingest = [ingest_summary("items", item_ingest_ids), ingest_summary("interactions", interactions["ingest_id"])]
        return cls(ingest, int(per_user.sum()), len(per_user), int((per_user > 0).sum()),
                   {str(k): int(v) for k, v in history.groupby("representation").size().items()})


def ingest_summary(name: str, ingest_ids: pd.Series) -> dict:
    """``jobs.tables.ingest_id_summary``'s row for table ``name``: the smallest and largest
    ingest id (``low``, ``high``; None without one), the rows (``n``) and the rows with an id
    (``tagged``) of one dataset's slice."""
    tagged = ingest_ids.dropna()
    return {"name": name, "low": tagged.min() if len(tagged) else None,
            "high": tagged.max() if len(tagged) else None, "n": len(ingest_ids), "tagged": len(tagged)}


def history_rows(interactions: pd.DataFrame, vectors: pd.DataFrame) -> pd.DataFrame:
    """(representation, user_id, item_id, vector, ts): each train interaction joined with every
    vector of its item (``vectors``: representation, item_id, vector, one row per item and
    representation); an item without a vector in a representation gives no row there. The
    ``item_id`` lets the profile kernel normalise each item once (``udfs.rank.profiles.profiles_frame``)."""
    train = interactions.loc[interactions["split"] == "train", ["user_id", "item_id", "ts"]]
    # An inner join on item_id, as Spark's; a null key joins nothing there (pandas would match nulls).
    vectors = vectors[vectors["item_id"].notna()]
    history = train.merge(vectors[["representation", "item_id", "vector"]], on="item_id", how="inner")
    return history[["representation", "user_id", "item_id", "vector", "ts"]]


def no_profiles() -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series([], dtype=object), "representation": pd.Series([], dtype=object),
                         "vector": pd.Series([], dtype=object), "n_history": pd.Series([], dtype=np.int32)})


def profile_rows(half_life_days: float | None, fusions: Sequence[tuple[Representation, dict[str, float] | None]] = ()
                 ) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """``groupBy(<user bucket>).applyInPandas`` function: the ``history_rows`` of whole users ->
    their ``PROFILE_COLUMNS`` rows: each representation's profile, then each fusion (with its
    concat weights, or None) of the part profiles of the users with a profile in every part,
    whose ``n_history`` is the smallest of the parts'. A fusion whose parts cancel out for a
    user gives that user no row."""
    profile = profile_groups(half_life_days)

    def rows(history: pd.DataFrame) -> pd.DataFrame:
        made = [profile((name, 0), group.reset_index(drop=True))
                for name, group in history.groupby("representation", sort=True)]
        made = [frame for frame in made if len(frame)]
        base = pd.concat(made, ignore_index=True)[PROFILE_COLUMNS] if made else no_profiles()
        return pd.concat([base, *(_fused(base, rep, weights) for rep, weights in fusions)], ignore_index=True)

    return rows


def _fused(profiles: pd.DataFrame, rep: Representation, weights: dict[str, float] | None) -> pd.DataFrame:
    parts = [profiles.loc[profiles["representation"] == part, ["user_id", "vector", "n_history"]]
             .rename(columns={"vector": f"part_{j}", "n_history": f"_n_{j}"}) for j, part in enumerate(rep.parts)]
    joined = functools.reduce(lambda left, right: left.merge(right, on="user_id", how="inner"), parts)
    joined["n_history"] = joined[[f"_n_{j}" for j in range(len(rep.parts))]].min(axis=1).astype(np.int32)
    fuse = fused_vector_batches(rep.kind, rep.parts, weights, key="user_id")
    fused = list(fuse(iter([joined.reset_index(drop=True)])))
    if not fused:
        return no_profiles()
    rows = pd.concat(fused, ignore_index=True)
    usable = rows.loc[rows["status"] == OK, ["user_id", "vector", "n_history"]]
    return usable.assign(representation=rep.name)[PROFILE_COLUMNS]


def in_user_groups(history: pd.DataFrame, rows: Callable[[pd.DataFrame], pd.DataFrame],
                   rows_per_group: int) -> pd.DataFrame:
    """``rows`` (a ``profile_rows`` function) over groups of whole users, as Spark's tasks call it:
    a group holds about ``rows_per_group`` rows of each representation, since the profile
    kernel's float64 copies of one representation's vectors are what a group's size bounds."""
    n_groups = max(1, math.ceil(max(history.groupby("representation").size().tolist(), default=0) / rows_per_group))
    group_of = pd.factorize(history["user_id"])[0] % n_groups
    return pd.concat([rows(history[group_of == group]) for group in range(n_groups)], ignore_index=True)


def als_user_rows(user_factors: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """``cogroup(<user bucket>).applyInPandas`` function: the ``PROFILE_COLUMNS`` rows of the
    ALS user factors (user_id, vector) of whole users whose ``train`` rows (user_id, ...) are
    given: ``n_history`` is the user's train rows. A factor of a user without train rows gives
    no row (there is none: the fit sees only train rows)."""
    counts = train.groupby("user_id", sort=True).size()
    n_history = pd.DataFrame({"user_id": counts.index.to_numpy(dtype=object),
                              "n_history": counts.to_numpy(dtype=np.int32)})
    rows = user_factors[["user_id", "vector"]].merge(n_history, on="user_id", how="inner")
    return rows.assign(representation=ALS)[PROFILE_COLUMNS]


def als_item_rows(dataset: str, rank: int, run_id: str) -> Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame]:
    """``cogroup(<item bucket>).applyInPandas`` function: the catalog (item_id) and the ALS item
    factors (item_id, vector) of whole items -> ``item_embeddings`` rows, sorted by item id, for
    every item of either (an item interacted with but missing from ``items``, an older ingest,
    keeps its factor); an item without a factor gets the zero vector. The encoder names the
    fit's run (``spark-ml-als:<run id>``), so that ``topk`` can refuse another run's factors."""
    zeros = np.zeros(rank, dtype=np.float32)

    def rows(catalog: pd.DataFrame, item_factors: pd.DataFrame) -> pd.DataFrame:
        factors = dict(zip(item_factors["item_id"], item_factors["vector"]))
        ids = sorted({*catalog["item_id"].dropna(), *factors})
        return pd.DataFrame({
            "dataset": dataset, "item_id": pd.Series(ids, dtype=object), "representation": ALS,
            "encoder": f"spark-ml-als:{run_id}", "dim": np.int32(rank), "source_sha256": None,
            "vector": [np.asarray(factors[i], dtype=np.float32) if i in factors else zeros for i in ids]})

    return rows


def profile_table(profiles: pd.DataFrame, run_id: str) -> pa.Table:
    """``PROFILE_COLUMNS`` rows keyed by ``run_id``, typed as the ``user_profiles`` columns."""
    return pa.table({
        "run_id": pa.array([run_id] * len(profiles), pa.string()),
        "user_id": pa.array(profiles["user_id"].tolist(), pa.string()),
        "representation": pa.array(profiles["representation"].tolist(), pa.string()),
        "vector": pa.array([np.asarray(v, dtype=np.float32) for v in profiles["vector"]], pa.list_(pa.float32())),
        "n_history": pa.array(profiles["n_history"].to_numpy(dtype=np.int32), pa.int32()),
    })
