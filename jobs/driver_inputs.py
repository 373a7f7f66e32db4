"""Small inputs computed on the driver: the fast path of ``profiles``, ``topk``, ``evaluate``
and, on a local master, ``embed``.

On a catalog of a few thousand items each of these jobs moves a few MB, yet its Spark path pays
for every action (scheduling, a Python worker round trip per stage, a Delta log replay per
table read): 10-20 s a job at ml100k against well under a second of arithmetic. So while each
table a job reads holds at most ``spark.driver_compute_mb`` MiB of Parquet (1024 by default) and
``MAX_ROWS`` rows, after skipping files by partition values and statistics, the job reads its
slices with delta-rs and runs, on the driver, the same pure kernels its Spark tasks run
(``udfs.profiles``, ``udfs.topk_udfs``, ``udfs.evaluate_udfs``, ``udfs.embedding_udfs``);
it commits the same rows and counts to the same slices (as Arrow: on a local master
delta-rs commits them, elsewhere Spark does, ``jobs.tables``). The decision is by size alone, as Spark's own broadcast threshold is, so a cluster runs
the same code: a full catalog takes the distributed path there and here. ``0`` turns this off.
The job's ``runs`` row says which path ran (``computed_on_driver``).

The distributed path runs instead when a table is missing (its messages name the job to run
first) or delta-rs cannot read one (logged), so this path never changes what fails and how.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession

from .job_run import JobRun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slice:
    """Rows of ``table`` whose columns equal ``equal``'s values and lie in ``within``'s lists."""

    table: str
    equal: Mapping[str, object] = field(default_factory=dict)
    within: Mapping[str, Sequence[object]] = field(default_factory=dict)
    columns: Sequence[str] | None = None
    # A table that may not exist yet (a first run): read as None instead of leaving the driver path.
    optional: bool = False


# Rows of one table the driver path holds: pandas keeps string columns as Python objects (about
# 60 bytes a value), so a few million rows of ids are already a GB, whatever their Parquet size.
MAX_ROWS = 5_000_000


def limit_bytes(run: JobRun) -> int:
    return int(run.config.spark.driver_compute_mb) << 20


def read_on_driver(run: JobRun, slices: Mapping[str, Slice],
                   declines: Callable[[dict], str | None] | None = None) -> dict[str, pa.Table | None] | None:
    """Every slice as an Arrow table (keyed as ``slices``), or None when the job must take its
    Spark path: ``spark.driver_compute_mb`` is 0, a table's files to read exceed it (checked
    before any byte is read), a table is missing (an ``optional`` slice's reads as None),
    delta-rs fails, or ``declines(what was read)`` gives a reason (what the job would build from
    the inputs is too large to hold)."""
    from udfs.warehouse_reader import TableMissing, TooLarge, check_size, read_table

    limit = limit_bytes(run)
    if limit <= 0:
        return None
    read: dict[str, pa.Table] = {}

    try:
        # Every slice's size first, from the Delta logs, so that no table is read whole before a
        # later one turns out too large.
        absent = set()
        for key, part in slices.items():
            try:
                check_size(run.warehouse, part.table, dict(part.equal), dict(part.within), limit, MAX_ROWS)
            except TableMissing:
                if not part.optional:
                    raise
                absent.add(key)
        for key, part in slices.items():
            read[key] = None if key in absent else read_table(
                run.warehouse, part.table, equal=dict(part.equal), within=dict(part.within),
                columns=list(part.columns) if part.columns is not None else None)
    except TooLarge as exc:
        log.info("%s: %s (spark.driver_compute_mb = %d, at most %d rows a table); computing with Spark",
                 run.job, exc, run.config.spark.driver_compute_mb, MAX_ROWS)
        return None
    except TableMissing:
        return None
    except Exception as exc:  # noqa: BLE001 - any failure of the fast path leaves the Spark path
        log.info("%s: reading its inputs with delta-rs failed (%s); computing with Spark", run.job, exc)
        return None
    reason = declines(read) if declines is not None else None
    if reason:
        log.info("%s: %s (spark.driver_compute_mb = %d); computing with Spark", run.job, reason,
                 run.config.spark.driver_compute_mb)
        return None
    run.count("computed_on_driver")
    return read


def to_spark(spark: SparkSession, table: pa.Table, schema) -> DataFrame:
    """A frame of ``table`` (Arrow, no row-by-row conversion) typed as ``schema``: a DDL string,
    or a contract ``StructType`` (``jobs.tables.SCHEMAS``), which keeps what DDL cannot say
    (``containsNull = false`` of a vector's elements, which the table's own cast requires)."""
    from pyspark.sql.types import StructType

    struct = StructType.fromDDL(schema) if isinstance(schema, str) else schema
    table = table.select(struct.fieldNames())
    return spark.createDataFrame(table, schema=struct)


def fits_on_driver(run: JobRun, *sources: DataFrame) -> bool:
    """Whether rows derived from ``sources`` (each output row from at most one input row, as an
    ingest's are) may be collected on a local master and committed from the driver (delta-rs,
    ``jobs.tables``). The decision is Spark's own estimate of the sources' size, the statistic
    its broadcast threshold reads, against ``spark.driver_compute_mb``: taken on the sources,
    before any window or cache, where it follows the files' sizes; a source Spark cannot size
    (a Python one, say) estimates as unbounded and keeps the Spark writes."""
    limit = limit_bytes(run)
    if limit <= 0 or not run.spark.sparkContext.master.startswith("local"):
        return False
    total = 0
    for frame in sources:
        try:
            total += int(str(frame._jdf.queryExecution().optimizedPlan().stats().sizeInBytes()))
        except Exception as exc:  # noqa: BLE001 - no estimate: Spark writes the rows
            log.debug("%s: no size estimate for an input (%s)", run.job, exc)
            return False
    if total > limit:
        log.info("%s: Spark estimates its inputs at %d MiB (spark.driver_compute_mb = %d): Spark commits "
                 "the rows", run.job, total >> 20, run.config.spark.driver_compute_mb)
        return False
    return True
