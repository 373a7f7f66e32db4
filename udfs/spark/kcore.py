"""Iterative k-core filtering: keep interactions whose user and item both have at least k.

Removing sparse users can make items sparse and the other way round, so the two filters repeat
until nothing changes (or ``max_rounds``). Each round cuts the lineage with a local checkpoint so
that the plan does not grow with the number of rounds.
"""
from __future__ import annotations

import logging

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

log = logging.getLogger(__name__)


def kcore(df: DataFrame, k: int, max_rounds: int = 50) -> tuple[DataFrame, int]:
    """(filtered frame, rounds used). ``k <= 1`` returns the frame unchanged."""
    if k <= 1:
        return df, 0
    current = df.localCheckpoint()
    size = current.count()
    for rounds in range(1, max_rounds + 1):
        users = current.groupBy("user_id").count().filter(F.col("count") >= k).select("user_id")
        items = current.groupBy("item_id").count().filter(F.col("count") >= k).select("item_id")
        current = current.join(users, "user_id", "left_semi").join(items, "item_id", "left_semi").localCheckpoint()
        new_size = current.count()
        log.info("k-core round %d: %d -> %d interactions", rounds, size, new_size)
        if new_size == size:
            return current, rounds
        size = new_size
    log.warning("k-core did not converge in %d rounds; keeping the last round's result", max_rounds)
    return current, max_rounds
