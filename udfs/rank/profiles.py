"""User profiles: the (optionally recency-weighted) mean of a user's train item vectors.

The paper's profile of user u with train items H(u) is

    p_u = normalise( sum_{i in H(u)} w_ui * x_i / sum w_ui ),   x_i L2-normalised,

with w_ui = 1 (the paper), or, with a half-life h (days), an exponential recency decay
w_ui = 0.5 ** ((t_max(u) - t_ui) / h), where t_max(u) is the user's latest train timestamp:
the latest item weighs 1, one a half-life older 0.5. Dividing by sum w does not change the
direction, so it is skipped; the result is re-normalised so that a dot product with an item
vector is the cosine.

Timestamps are in seconds (the unit of ``interactions.ts``).

Everything is vectorised over users (one sort and ``np.add.reduceat``); the pandas wrapper
``profiles_frame`` takes a frame of whole users' history rows, as the ``profiles`` job's driver
and its Spark tasks hand it (``udfs.rank.profile_inputs.profile_rows``).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from udfs.encode.vectors import l2_normalise

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400.0
# A weighted mean shorter than this cannot be re-normalised into a meaningful direction
# (the user's item vectors cancel out).
DEGENERATE_NORM = 1e-6


def recency_weights(user_index: np.ndarray, ts: np.ndarray, half_life_days: float, n_users: int) -> np.ndarray:
    """Per-row weights ``0.5 ** ((t_max(user) - t) / half_life)``, t in seconds, of the rows of
    users ``0..n_users-1``."""
    if not np.isfinite(half_life_days) or half_life_days <= 0:
        raise ValueError(
            f"half_life_days must be a positive number of days, got {half_life_days!r}: "
            "use None for the plain (unweighted) mean"
        )
    user_index = np.asarray(user_index)
    ts = np.asarray(ts, dtype=np.float64)
    if ts.shape != user_index.shape:
        raise ValueError(
            f"ts has shape {ts.shape} but user_index has shape {user_index.shape}: "
            "pass one timestamp per interaction row"
        )
    if not np.isfinite(ts).all():
        row = int(np.flatnonzero(~np.isfinite(ts))[0])
        raise ValueError(f"ts[{row}] is {ts[row]}: every interaction needs a timestamp")
    t_max = np.full(n_users, -np.inf)
    np.maximum.at(t_max, user_index, ts)
    age_days = (t_max[user_index] - ts) / SECONDS_PER_DAY
    return np.power(0.5, age_days / half_life_days)


def _checked(user_index, item_vectors, item_index, n_users: int | None):
    """``user_profiles``' arguments as arrays, and ``n_users``, once they hold together; without
    ``item_index``, history row r is item vector r."""
    user_index = np.asarray(user_index)
    item_vectors = np.asarray(item_vectors)
    if user_index.ndim != 1:
        raise ValueError(f"user_index must be 1-D, got shape {user_index.shape}")
    if user_index.size and not np.issubdtype(user_index.dtype, np.integer):
        raise ValueError(
            f"user_index must hold integers, got dtype {user_index.dtype}: "
            "map string ids to 0..n_users-1 first (pandas.factorize)"
        )
    if item_index is not None:
        item_index = np.asarray(item_index)
        if item_index.shape != user_index.shape or (item_index.size and not np.issubdtype(item_index.dtype, np.integer)):
            raise ValueError(
                f"item_index must hold one integer per history row ({user_index.shape[0]}), got "
                f"shape {item_index.shape} and dtype {item_index.dtype}"
            )
        if item_vectors.ndim != 2 or (item_index.size and not 0 <= item_index.min() <= item_index.max()
                                      < item_vectors.shape[0]):
            raise ValueError(
                f"item_vectors must have shape (k, d) with a row for every item_index value, got "
                f"{item_vectors.shape} for indices up to {int(item_index.max()) if item_index.size else None}"
            )
    elif item_vectors.ndim != 2 or item_vectors.shape[0] != user_index.shape[0]:
        raise ValueError(
            f"item_vectors must have shape (m, d) with m = len(user_index) = "
            f"{user_index.shape[0]}, got {item_vectors.shape}: pass one vector per history row"
        )
    else:
        item_index = np.arange(user_index.shape[0])
    m = user_index.shape[0]
    if n_users is None:
        n_users = int(user_index.max()) + 1 if m else 0
    if m and (user_index.min() < 0 or user_index.max() >= n_users):
        bad = int(user_index[(user_index < 0) | (user_index >= n_users)][0])
        raise ValueError(
            f"user_index holds {bad}, outside [0, n_users={n_users}): pass n_users larger than "
            "every user index"
        )
    return user_index, item_vectors, item_index, n_users


def user_profiles(
    user_index: np.ndarray,
    item_vectors: np.ndarray,
    ts: np.ndarray | None = None,
    n_users: int | None = None,
    half_life_days: float | None = None,
    item_index: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Profiles of users ``0..n_users-1`` from ``m`` (user, item vector[, ts]) history rows.

    ``user_index`` (m,) ints in ``[0, n_users)``; ``item_vectors`` (m, d), one row per history
    row (re-normalised here, so any positive scaling of a row is harmless); ``ts`` (m,)
    seconds, needed only with ``half_life_days``. ``n_users`` defaults to
    ``max(user_index) + 1``. With ``item_index`` (m,) ints, ``item_vectors`` is (k, d), one row
    per item, and history row r is item ``item_index[r]``: each item is normalised once instead
    of once per row (the same numbers: normalisation is per row).

    Returns ``(profiles, n_history)``: ``profiles`` (n_users, d) float32, L2-normalised;
    ``n_history`` (n_users,) int64 history rows per user. A user with no rows has
    ``n_history == 0`` and a zero row: not a profile, the caller drops and counts it. A user
    whose weighted mean is (numerically) zero, i.e. whose vectors cancel out, also gets a zero
    row, with its true ``n_history``; it is logged.
    """
    user_index, item_vectors, item_index, n_users = _checked(user_index, item_vectors, item_index, n_users)
    m, d = user_index.shape[0], item_vectors.shape[1]
    profiles = np.zeros((n_users, d), dtype=np.float32)
    n_history = np.bincount(user_index.astype(np.int64), minlength=n_users).astype(np.int64)
    if m == 0:
        return profiles, n_history

    # Normalisation is per row: each item once, then its rows, gives the numbers of each row alone.
    units, bad_items = l2_normalise(item_vectors, dtype=np.float64)
    x, bad_rows = units[item_index], bad_items[item_index]
    if bad_rows.any():
        row = int(np.flatnonzero(bad_rows)[0])
        raise ValueError(
            f"item_vectors row {int(item_index[row])} (user index {int(user_index[row])}) is zero or not finite: "
            "drop history rows whose item has no vector before building profiles"
        )
    if half_life_days is not None:
        if ts is None:
            raise ValueError("half_life_days needs ts: pass the interaction timestamps")
        x *= recency_weights(user_index, ts, half_life_days, n_users)[:, None]

    order = np.argsort(user_index, kind="stable")
    sorted_users = user_index[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    sums = np.add.reduceat(x[order], starts, axis=0)
    unit, degenerate = l2_normalise(sums, min_norm=DEGENERATE_NORM, dtype=np.float64)
    ok = ~degenerate
    if not ok.all():
        log.warning(
            "user_profiles: %d users have item vectors that cancel out; their profile is left "
            "zero", int((~ok).sum())
        )
    owners = sorted_users[starts]
    profiles[owners[ok]] = unit[ok].astype(np.float32)
    return profiles, n_history


def profiles_frame(df: pd.DataFrame, half_life_days: float | None = None) -> pd.DataFrame:
    """Profiles of the users in ``df`` (columns ``user_id``, ``vector``[, ``ts``][, ``item_id``]).

    Each call must hold all of a user's history rows (any number of users: a group of
    ``groupBy(<user bucket>).applyInPandas``). ``vector`` holds one array per row. With
    an ``item_id`` column, the rows of one item must carry its one vector (rows joined with a
    table keyed by item): its first row's vector is normalised once for all of them.

    Returns columns ``user_id``, ``vector`` (one float32 numpy array per row, which Arrow writes
    as ``array<float>``) and ``n_history`` (int32). Users without a usable profile (no rows, or
    vectors that cancel out) are absent; the caller counts them.
    """
    needed = {"user_id", "vector"} if half_life_days is None else {"user_id", "vector", "ts"}
    missing = needed - set(df.columns)
    if missing:
        raise ValueError(
            f"profiles_frame needs columns {sorted(missing)}, got {list(df.columns)}"
        )
    if df.empty:
        return pd.DataFrame({"user_id": pd.Series([], dtype=df["user_id"].dtype), "vector": pd.Series([], dtype=object),
                             "n_history": pd.Series([], dtype=np.int32)})
    codes, uniques = _codes(df, "user_id")
    ts = df["ts"].to_numpy(dtype=np.float64) if half_life_days is not None else None
    item_codes, vectors = None, df["vector"]
    if "item_id" in df.columns:
        item_codes = _codes(df, "item_id")[0]
        vectors = vectors.iloc[np.unique(item_codes, return_index=True)[1]]  # each item's first row
    profiles, n_history = user_profiles(codes, _stack_vectors(vectors), ts, len(uniques), half_life_days, item_codes)
    keep = np.linalg.norm(profiles, axis=1) > 0
    return pd.DataFrame({
        "user_id": np.asarray(uniques)[keep],
        "vector": list(profiles[keep]),
        "n_history": n_history[keep].astype(np.int32),
    })


def _codes(df: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``pandas.factorize`` of a history column that must hold no null."""
    codes, uniques = pd.factorize(df[column], sort=False)
    if (codes < 0).any():
        row = int(np.flatnonzero(codes < 0)[0])
        raise ValueError(f"row {row} of the history has a null {column}: drop it upstream")
    return codes, uniques


def _stack_vectors(column: pd.Series) -> np.ndarray:
    values = column.to_numpy()
    lengths = np.fromiter((-1 if v is None else len(v) for v in values), dtype=np.int64,
                          count=len(values))
    if (lengths < 0).any():
        row = int(np.flatnonzero(lengths < 0)[0])
        raise ValueError(
            f"vector of history row {row} is null: drop history "
            "rows whose item has no vector before building profiles"
        )
    if (lengths != lengths[0]).any():
        row = int(np.flatnonzero(lengths != lengths[0])[0])
        raise ValueError(
            f"vector of history row {row} has {lengths[row]} dimensions, row 0 has {lengths[0]}: "
            "profiles are built per representation; do not mix representations in one call"
        )
    return np.stack([np.asarray(v, dtype=np.float32) for v in values])
