"""Small inputs computed on the driver: the fast path of ``profiles``, ``topk``, ``evaluate``
and, on a local master, ``embed``.

On a catalog of a few thousand items each of these jobs moves a few MB, yet its Spark path pays
for every action (scheduling, a Python worker round trip per stage, a Delta log replay per
table read): 10-20 s a job at ml100k against well under a second of arithmetic. So while each
table a job reads holds at most ``spark.driver_compute_mb`` MiB of Parquet (1024 by default) and
``MAX_ROWS`` rows, after skipping files by partition values and statistics, the job reads its
slices with delta-rs and runs, on the driver, the same pure kernels its Spark tasks run
(``udfs.rank.profiles``, ``udfs.rank.topk_udfs``, ``udfs.evaluate.evaluate_udfs``, ``udfs.encode.embedding_udfs``);
it commits the same rows and counts to the same slices (as Arrow: on a local master
delta-rs commits them, elsewhere Spark does, ``jobs.tables``). The decision is by size alone, as Spark's own broadcast threshold is, so a cluster runs
the same code: a full catalog takes the distributed path there and here. ``0`` turns this off.
The job's ``runs`` row says which path ran (``computed_on_driver``).

The distributed path runs instead for a named reason only, counted in the ``runs`` row as
``driver_fallback_<reason>`` and logged: the path is off, the inputs are too large, a table is
missing (its messages name the job to run first), delta-rs cannot open the object store, or
(for a commit from the driver) the master is a cluster or Spark cannot size the inputs. Any
other error fails the job, as it would on the Spark path: a broken fast path is never hidden
behind a slower one.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
from pyspark.sql import DataFrame

from udfs.io.warehouse_reader import fallback_reason

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


def fallback(run: JobRun, reason: str, why: str) -> None:
    """Count (``driver_fallback_<reason>``) and log one named reason for taking the Spark path."""
    run.count(f"driver_fallback_{reason}")
    log.info("%s: %s (spark.driver_compute_mb = %d, at most %d rows a table); computing with Spark",
             run.job, why, run.config.spark.driver_compute_mb, MAX_ROWS)


def read_on_driver(run: JobRun, slices: Mapping[str, Slice],
                   declines: Callable[[dict], str | None] | None = None) -> dict[str, pa.Table | None] | None:
    """Every slice as an Arrow table (keyed as ``slices``), or None when the job must take its
    Spark path, for one of these named reasons, each counted as ``driver_fallback_<reason>``:
    ``disabled`` (``spark.driver_compute_mb`` is 0), ``too_large`` (a table's files to read exceed
    it, checked before any byte is read, or ``declines(what was read)`` says what the job would
    build is too large to hold), ``no_table`` (a table is missing; an ``optional`` slice's reads
    as None) and ``store_unreadable`` (delta-rs cannot open the object store). Any other error
    is the job's: it fails, it does not turn into a slower path."""
    from udfs.io.warehouse_reader import FALLBACK_REASONS, TableMissing, check_size, read_table

    limit = limit_bytes(run)
    if limit <= 0:
        fallback(run, "disabled", "the driver path is off")
        return None
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
        read = {key: None if key in absent else read_table(
                    run.warehouse, part.table, equal=dict(part.equal), within=dict(part.within),
                    columns=list(part.columns) if part.columns is not None else None)
                for key, part in slices.items()}
    except tuple(FALLBACK_REASONS) as exc:
        fallback(run, fallback_reason(exc), str(exc))
        return None
    reason = declines(read) if declines is not None else None
    if reason:
        fallback(run, "too_large", reason)
        return None
    run.count("computed_on_driver")
    return read


# Spark's own rendering of a size (``Utils.bytesToString``): "12.3 MiB", "8.0 EiB" (unknown),
# "1.2E+20 B" past the largest unit.
_SIZE = re.compile(r"sizeInBytes=([0-9.]+(?:E[+-]?[0-9]+)?)\s*(B|KiB|MiB|GiB|TiB|PiB|EiB)\b")
_UNITS = {"B": 0, "KiB": 10, "MiB": 20, "GiB": 30, "TiB": 40, "PiB": 50, "EiB": 60}


def estimated_bytes(frame: DataFrame) -> int | None:
    """Spark's estimate of ``frame``'s size, the statistic its broadcast threshold reads: the
    root of the optimized plan as ``explain(mode="cost")`` prints it (public API; the JVM
    objects behind it are not). None when the plan carries no size."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        frame.explain(mode="cost")
    found = _SIZE.search(text.getvalue().partition("== Optimized Logical Plan ==")[2])
    if found is None:
        return None
    return int(float(found.group(1)) * (1 << _UNITS[found.group(2)]))


def fits_on_driver(run: JobRun, *sources: DataFrame) -> bool:
    """Whether rows derived from ``sources`` (each output row from at most one input row, as an
    ingest's are) may be collected on a local master and committed from the driver (delta-rs,
    ``jobs.tables``). The decision is Spark's own estimate of the sources' size
    (``estimated_bytes``) against ``spark.driver_compute_mb``: taken on the sources, before any
    window or cache, where it follows the files' sizes; a source Spark cannot size (a Python
    one, say) estimates as unbounded and keeps the Spark writes."""
    limit = limit_bytes(run)
    if limit <= 0:
        fallback(run, "disabled", "the driver path is off")
        return False
    if not run.spark.sparkContext.master.startswith("local"):
        fallback(run, "cluster", "a cluster's executors write the rows")
        return False
    sizes = [estimated_bytes(frame) for frame in sources]
    if None in sizes:
        fallback(run, "no_estimate", "Spark gives no size estimate for an input")
        return False
    if sum(sizes) > limit:
        fallback(run, "too_large", f"Spark estimates its inputs at {sum(sizes) >> 20} MiB")
        return False
    return True
