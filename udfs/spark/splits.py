"""Deterministic train/valid/test split protocols over an interactions frame.

Each function takes a Spark DataFrame with ``user_id, item_id, ts`` (and ``label`` for the
pass-through protocol) and returns it with a ``split`` column; none needs more than one
shuffle (by user), so a catalog-sized frame splits in one pass.

- ``label``: the source's own labels (MMRec ``x_label`` 0/1/2, or train/valid/test).
- ``leave_one_out``: per user by time, the last interaction is test, the one before valid.
- ``temporal_ratio``: per user by time, the last ``ratios[2]`` share test, the ``ratios[1]``
  share before it valid (each at least one interaction when its ratio is positive).
- ``global_time``: one time cut for everyone (quantiles of ts in (0, 1), or unix seconds).
- ``random_ratio``: per user, ``temporal_ratio`` over a seeded hash order instead of time.

Ties in time are broken by item id, so the same input always gives the same split. Users with
fewer than ``min_user_interactions`` interactions keep them all in train under the per-user
protocols (they still count as users with history, never as test users).
"""
from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from udfs.evaluate.splits import LABELS, PROTOCOLS, SplitError, SplitSpec

__all__ = ["LABELS", "PROTOCOLS", "SplitError", "SplitSpec", "assign_split", "label_column"]


def label_column(label: Column) -> Column:
    """Map a source label to train/valid/test; anything else becomes null (rejected upstream)."""
    mapping = F.create_map(*[F.lit(x) for kv in LABELS.items() for x in kv])
    return mapping[F.lower(F.trim(label.cast("string")))]


def _per_user(df: DataFrame, order: list[Column], spec: SplitSpec, loo: bool) -> DataFrame:
    by_user = Window.partitionBy("user_id")
    ordered = by_user.orderBy(*order)
    n = F.count(F.lit(1)).over(by_user)
    from_end = n - F.row_number().over(ordered)  # 0 for the user's last interaction
    if loo:
        n_test, n_valid = F.lit(1), F.lit(1)
    else:
        _, valid, test = spec.ratios
        n_test = F.greatest(F.floor(n * test), F.lit(1 if test > 0 else 0))
        n_valid = F.greatest(F.floor(n * valid), F.lit(1 if valid > 0 else 0))
    eligible = (n >= F.lit(max(spec.min_user_interactions, 1))) & (n - n_test - n_valid >= 1)
    split = (F.when(~eligible, "train").when(from_end < n_test, "test")
             .when(from_end < n_test + n_valid, "valid").otherwise("train"))
    return df.withColumn("split", split)


def assign_split(df: DataFrame, spec: SplitSpec) -> DataFrame:
    spec.validate()
    if spec.protocol == "label":
        # Every adapter emits a label column (null where the source has none).
        return df.withColumn("split", label_column(F.col("label")))
    if spec.protocol == "random_ratio":
        key = F.xxhash64(F.lit(spec.seed), F.col("user_id"), F.col("item_id"), F.col("ts"))
        return _per_user(df, [key, F.col("item_id"), F.col("ts")], spec, loo=False)
    if spec.protocol != "global_time":  # leave_one_out or temporal_ratio: by time
        return _per_user(df, [F.col("ts"), F.col("item_id")], spec, loo=spec.protocol == "leave_one_out")
    valid_cut, test_cut = spec.valid_cut, spec.test_cut
    if 0 < valid_cut < 1 or 0 < test_cut < 1:
        # Exact quantiles (relative error 0), so the cut does not depend on partitioning.
        q = df.approxQuantile("ts", [valid_cut, test_cut], 0.0)
        if not q:
            return df.withColumn("split", F.lit("train"))
        valid_cut = q[0] if 0 < spec.valid_cut < 1 else valid_cut
        test_cut = q[1] if 0 < spec.test_cut < 1 else test_cut
    split = (F.when(F.col("ts") >= F.lit(test_cut), "test")
             .when(F.col("ts") >= F.lit(valid_cut), "valid").otherwise("train"))
    return df.withColumn("split", split)
