"""How a Spark path cuts its rows into the groups a ``udfs`` function is called on
(``groupBy(...).applyInPandas``/``applyInArrow``, ``cogroup``): by a hash bucket of a key, so
that all rows of one key (a user, an item, an image) meet in one group, and with as many buckets
as keep a group near ``rows_per_group`` rows. Spark's grouped functions hold a whole group in
memory, so a fixed number of buckets (say one per core) would let a group grow with the
catalog; this rule is the one every job's Spark path uses."""
from __future__ import annotations

from pyspark.sql import Column, SparkSession
from pyspark.sql import functions as F

ROWS_PER_GROUP = 200_000


def n_groups(spark: SparkSession, rows: int, rows_per_group: int = ROWS_PER_GROUP) -> int:
    """Buckets for ``rows`` rows: at least one per core, and about ``rows_per_group`` rows each."""
    return max(1, spark.sparkContext.defaultParallelism, -(-int(rows) // rows_per_group))


def task_threads(spark: SparkSession) -> int:
    """Cores one task may use (``spark.task.cpus``), for torch inside the Python workers."""
    return max(1, int(spark.sparkContext.getConf().get("spark.task.cpus", "1")))


def partitions_for(spark: SparkSession, n_rows: int, rows_per_task: int, min_rows_per_task: int) -> int:
    """One task per core, more when a task would exceed ``rows_per_task``, fewer when it would get
    under ``min_rows_per_task`` (each Python worker loads its own model: on a small input a
    second copy costs more than it saves)."""
    spread = min(spark.sparkContext.defaultParallelism, -(-n_rows // max(1, min_rows_per_task)))
    return max(1, spread, -(-n_rows // max(1, rows_per_task)))


def bucket(key: str | Column, n: int) -> Column:
    """The bucket (0..n-1) of ``key``'s value: xxhash64, Spark's 64-bit hash, spread over ``n``."""
    return F.pmod(F.xxhash64(F.col(key) if isinstance(key, str) else key), F.lit(n))
