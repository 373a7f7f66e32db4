"""The ``profiles`` job's table rules in pandas, for its driver path (``jobs.driver_inputs``).

On a small catalog the job reads its inputs with delta-rs and computes on the driver; these
functions are the pandas form of what its Spark path writes in Spark SQL (the ingest-id summary,
the totals, the history join, the join of a fusion's part profiles), so both paths apply the
same rules. The arithmetic is not here: profiles come from ``udfs.embedding_udfs.profile_groups``
and fusions from ``udfs.embedding_udfs.fused_vector_batches``, the functions the Spark tasks run.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from udfs.embedding_udfs import OK, fused_vector_batches, profile_groups

PROFILE_COLUMNS = ["user_id", "representation", "vector", "n_history"]


def ingest_summary(name: str, ingest_ids: pd.Series) -> dict:
    """``jobs.tables.ingest_id_summary``'s row for table ``name``: the smallest and largest
    ingest id (``low``, ``high``; None without one), the rows (``n``) and the rows with an id
    (``tagged``) of one dataset's slice."""
    tagged = ingest_ids.dropna()
    return {"name": name, "low": tagged.min() if len(tagged) else None,
            "high": tagged.max() if len(tagged) else None, "n": len(ingest_ids), "tagged": len(tagged)}


def train_totals(interactions: pd.DataFrame) -> dict:
    """Over a dataset's interactions (``user_id``, ``split``): ``rows`` (train rows; None
    without any user, as Spark's sum over no rows), ``users`` and ``train_users`` (users with a
    train row)."""
    per_user = (interactions["split"] == "train").groupby(interactions["user_id"], dropna=False).sum()
    return {"rows": int(per_user.sum()) if len(per_user) else None, "users": len(per_user),
            "train_users": int((per_user > 0).sum())}


def history_rows(interactions: pd.DataFrame, vectors: pd.DataFrame) -> pd.DataFrame:
    """(representation, user_id, item_id, vector, ts): each train interaction joined with every
    vector of its item (``vectors``: representation, item_id, vector, one row per item and
    representation); an item without a vector in a representation gives no row there. The
    ``item_id`` lets the profile kernel normalise each item once (``udfs.profiles.profiles_frame``)."""
    train = interactions.loc[interactions["split"] == "train", ["user_id", "item_id", "ts"]]
    # An inner join on item_id, as Spark's; a null key joins nothing there (pandas would match nulls).
    vectors = vectors[vectors["item_id"].notna()]
    history = train.merge(vectors[["representation", "item_id", "vector"]], on="item_id", how="inner")
    return history[["representation", "user_id", "item_id", "vector", "ts"]]


def base_profiles(history: pd.DataFrame, half_life_days: float | None, rows_per_group: int) -> pd.DataFrame:
    """``PROFILE_COLUMNS`` rows: every representation's profiles from its history rows, with
    the function Spark applies per group. As there, a group holds whole users and about
    ``rows_per_group`` rows: the kernel's float64 copies of a group's vectors bound the memory."""
    profile = profile_groups(half_life_days)
    frames = []
    for name, rows in history.groupby("representation", sort=True):
        n_groups = max(1, math.ceil(len(rows) / rows_per_group))
        group_of = pd.factorize(rows["user_id"])[0] % n_groups
        for group in range(n_groups):
            frames.append(profile((name, group), rows[group_of == group].reset_index(drop=True)))
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({"user_id": pd.Series([], dtype=object), "representation": pd.Series([], dtype=object),
                             "vector": pd.Series([], dtype=object), "n_history": pd.Series([], dtype=np.int32)})
    return pd.concat(frames, ignore_index=True)[PROFILE_COLUMNS]


def fusion_parts(profiles: pd.DataFrame, parts: Sequence[str]) -> pd.DataFrame:
    """(user_id, part_0..part_{k-1}, n_history) for the users with a profile in every part;
    ``n_history`` is the smallest of the parts'."""
    joined = None
    for j, part in enumerate(parts):
        frame = profiles.loc[profiles["representation"] == part, ["user_id", "vector", "n_history"]]
        frame = frame.rename(columns={"vector": f"part_{j}", "n_history": f"_n_{j}"})
        joined = frame if joined is None else joined.merge(frame, on="user_id", how="inner")
    counts = joined[[f"_n_{j}" for j in range(len(parts))]]
    joined["n_history"] = counts.min(axis=1).astype(np.int32)
    return joined[["user_id", *[f"part_{j}" for j in range(len(parts))], "n_history"]].reset_index(drop=True)


def fused_profiles(profiles: pd.DataFrame, kind: str, parts: Sequence[str],
                   weights: dict[str, float] | None) -> pd.DataFrame:
    """(user_id, vector, status, n_history): the fusion ``kind`` of each user's part profiles,
    with the function Spark maps over the joined rows; ``status`` is not ``ok`` where the parts
    cancel out."""
    joined = fusion_parts(profiles, parts)
    frames = list(fused_vector_batches(kind, parts, weights, key="user_id")(iter([joined])))
    if not frames:
        return pd.DataFrame({"user_id": pd.Series([], dtype=object), "vector": pd.Series([], dtype=object),
                             "status": pd.Series([], dtype=object), "n_history": pd.Series([], dtype=np.int32)})
    return pd.concat(frames, ignore_index=True)


def usable(fused: pd.DataFrame, representation: str) -> pd.DataFrame:
    """The ``ok`` rows of ``fused_profiles`` as ``PROFILE_COLUMNS`` rows of ``representation``."""
    rows = fused.loc[fused["status"] == OK, ["user_id", "vector", "n_history"]]
    return rows.assign(representation=representation)[PROFILE_COLUMNS]


def train_rows_per_user(interactions: pd.DataFrame) -> pd.DataFrame:
    """(user_id, n_history): each user's train rows, for the users with any."""
    train = interactions.loc[interactions["split"] == "train", "user_id"]
    counts = train.groupby(train, sort=True).size()
    return pd.DataFrame({"user_id": counts.index.to_numpy(dtype=object),
                         "n_history": counts.to_numpy(dtype=np.int32)})


def als_user_rows(user_factors: pd.DataFrame, n_history: pd.DataFrame, representation: str) -> pd.DataFrame:
    """``PROFILE_COLUMNS`` rows of the ALS user factors (user_id, vector): ``n_history`` is the
    user's train rows (``train_rows_per_user``); as the Spark path's inner join, a factor of a
    user without train rows gives no row (there is none: the fit sees only train rows)."""
    rows = user_factors[["user_id", "vector"]].merge(n_history, on="user_id", how="inner")
    return rows.assign(representation=representation)[PROFILE_COLUMNS]


def als_item_rows(dataset: str, catalog: Sequence[str], item_factors: pd.DataFrame, rank: int,
                  representation: str, encoder: str) -> pa.Table:
    """``item_embeddings`` rows of the ALS item factors (item_id, vector) for every item of
    ``catalog`` and every item with a factor (an item interacted with but missing from ``items``,
    an older ingest, keeps its factor); an item without a factor gets the zero vector."""
    factors = dict(zip(item_factors["item_id"], item_factors["vector"]))
    ids = sorted({*(i for i in catalog if i is not None), *factors})
    zeros = np.zeros(rank, dtype=np.float32)
    return pa.table({
        "dataset": pa.array([dataset] * len(ids), pa.string()),
        "item_id": pa.array(ids, pa.string()),
        "representation": pa.array([representation] * len(ids), pa.string()),
        "encoder": pa.array([encoder] * len(ids), pa.string()),
        "dim": pa.array([rank] * len(ids), pa.int32()),
        "vector": pa.array([np.asarray(factors[i], dtype=np.float32) if i in factors else zeros for i in ids],
                           pa.list_(pa.float32())),
        "source_sha256": pa.array([None] * len(ids), pa.string()),
    })


def profile_table(profiles: pd.DataFrame, run_id: str) -> pa.Table:
    """``PROFILE_COLUMNS`` rows keyed by ``run_id``, typed as the ``user_profiles`` columns."""
    return pa.table({
        "run_id": pa.array([run_id] * len(profiles), pa.string()),
        "user_id": pa.array(profiles["user_id"].tolist(), pa.string()),
        "representation": pa.array(profiles["representation"].tolist(), pa.string()),
        "vector": pa.array([np.asarray(v, dtype=np.float32) for v in profiles["vector"]], pa.list_(pa.float32())),
        "n_history": pa.array(profiles["n_history"].to_numpy(dtype=np.int32), pa.int32()),
    })
