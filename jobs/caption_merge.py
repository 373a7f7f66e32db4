"""The caption job's staged files: the run's staging folder, the adoption of a killed run's
folder, and the merge of staged ``descriptions`` rows into the table (``jobs.caption``).

A staged file is complete once it has its final name; a killed run leaves its folder, which the
next run merges before planning and then removes. A folder is adopted only when its owner is gone
(same host and its process is dead, or older than a day for another host); the adopter claims it
by an atomic rename, so two runs never adopt the same folder.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path


from udfs.caption import caption_udfs as cu
from udfs.io import storage

from . import tables
from .job_run import JobRun
from .spark_groups import bucket, n_groups

log = logging.getLogger(__name__)

STAGING = ("_staging", "descriptions")
OWNER_FILE = "_OWNER.json"
ADOPTED_MARK = ".adopted-by-"
# A staging folder of another host whose owner is silent this long belongs to a dead run.
FOREIGN_STALE_SECONDS = 24 * 3600


def staging_root(warehouse: str | Path) -> str:
    """``{warehouse}/_staging/descriptions``: a local path or a URI, like the warehouse."""
    return storage.join(str(warehouse), *STAGING)


def write_owner(folder: str, run_id: str) -> None:
    storage.write_bytes(storage.join(folder, OWNER_FILE), json.dumps(
        {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode())


def owner_alive(folder: str, now: float | None = None) -> bool:
    """Whether the run that owns a staging folder may still be writing to it."""
    now = now or time.time()
    try:
        owner = json.loads(storage.read_bytes(storage.join(folder, OWNER_FILE)))
    except (OSError, ValueError):
        # No owner record: a folder whose owner died before writing one, unless it is brand new
        # (an object store has no folder times: its newest file's).
        local = storage.local_path_of(folder)
        newest = (os.stat(local).st_mtime if local is not None
                  else max((m for _, _, m in storage.list_entries(folder)), default=0.0))
        return now - newest < 60
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return now - float(owner.get("since", 0)) < FOREIGN_STALE_SECONDS


def staged_files(folder: str) -> list[str]:
    """The complete staged files of a folder (temporary files of a killed writer are ignored)."""
    return sorted(storage.join(folder, name) for name, is_dir, _ in storage.list_entries(folder)
                  if not is_dir and name.startswith(cu.STAGED_FILE_PREFIX) and name.endswith(".parquet"))


def claim_dead_folders(root: str, run_id: str) -> list[str]:
    """Rename every staging folder whose owner is dead to ``<name>.adopted-by-<run_id>``. On a
    local or HDFS file system the rename is atomic, so of two runs adopting at once each folder
    goes to exactly one; on an object store it is a copy and a delete, so two adopters may both
    merge a folder, which the ``MERGE`` on the key makes harmless."""
    claimed = []
    for name in sorted(name for name, is_dir, _ in storage.list_entries(root) if is_dir):
        folder = storage.join(root, name)
        if name == run_id or owner_alive(folder):
            continue
        target = storage.join(root, f"{name.split(ADOPTED_MARK)[0]}{ADOPTED_MARK}{run_id}")
        try:
            storage.move(folder, target)
        except OSError:
            continue  # another run claimed it first
        write_owner(target, run_id)
        claimed.append(target)
    return claimed


def merge_staged(run: JobRun, files: list[str]) -> int:
    """Merge staged ``descriptions`` files into the table; returns the rows that won.

    Within the files and against the table, for each key an ok row beats an error row and a
    newer row beats an older one of the same status; rows that lose are not written, so a
    stale folder adopted late never overwrites a later run's work.
    """
    if not files:
        return 0
    n = merge_on_driver(run, files)
    if n is not None:
        return n
    spark = run.spark
    schema, keys = tables.SCHEMAS["descriptions"], tables.KEYS["descriptions"]
    staged = spark.read.schema(schema).parquet(*files)
    current = tables.read(spark, run.warehouse, "descriptions").select(*keys, "status", "created_at")
    # Buckets of image hash (every row of a key lands in one), enough of them that a bucket
    # stays small whatever the cache's size.
    buckets = n_groups(spark, staged.count() + current.count())

    def by_bucket(frame):
        return frame.withColumn("_bucket", bucket("image_sha256", buckets)).groupBy("_bucket")
    # The driver path's rule (``cu.staged_winners``), run on each bucket.
    winners = by_bucket(staged).cogroup(by_bucket(current)).applyInArrow(
        lambda rows, table: cu.staged_winners(rows.drop_columns(["_bucket"]), table.drop_columns(["_bucket"]), keys),
        schema).persist()
    try:
        n = winners.count()
        if n:
            tables.merge(spark, run.warehouse, "descriptions", winners)
    finally:
        winners.unpersist()
    return n


def merge_on_driver(run: JobRun, files: list[str]) -> int | None:
    """``merge_staged`` on the driver (the same winners, ``cu.staged_winners``; the same MERGE,
    committed by delta-rs on a local master, ``jobs.tables``) while the staged files and the
    table's rows of their images are small (``jobs.driver_inputs.read_on_driver``: its reasons
    to decline are counted); None: the Spark path merges them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .driver_inputs import Slice, fallback, limit_bytes, read_on_driver

    local = [storage.local_path_of(f) for f in files]
    if not run.spark.sparkContext.master.startswith("local") or None in local:
        fallback(run, "cluster", "the staged captions are merged by a cluster or lie in an object store")
        return None
    size = sum(os.path.getsize(f) for f in local)
    if size > limit_bytes(run):
        fallback(run, "disabled" if limit_bytes(run) <= 0 else "too_large",
                 f"the staged captions hold {size} bytes")
        return None
    keys = tables.KEYS["descriptions"]
    staged = pa.concat_tables([pq.read_table(f, schema=tables.arrow_schema("descriptions")) for f in local])
    read = read_on_driver(run, {"current": Slice(
        "descriptions", within={"image_sha256": sorted(set(staged.column("image_sha256").to_pylist()))},
        columns=[*keys, "status", "created_at"], optional=True)})
    if read is None:
        return None
    winners = cu.staged_winners(staged, read["current"], keys)
    if winners.num_rows:
        tables.merge(run.spark, run.warehouse, "descriptions", winners)
    return winners.num_rows


def adopt_dead_runs(run: JobRun) -> None:
    """Merge what killed runs staged, then remove their folders."""
    for folder in claim_dead_folders(staging_root(run.warehouse), run.run_id):
        files = staged_files(folder)
        n = merge_staged(run, files)
        log.warning("adopted %d staged description rows (%d files) of a killed caption run from %s",
                    n, len(files), folder)
        run.counts.update({"adopted_rows": n, "adopted_files": len(files)})
        storage.delete_dir(folder)


def salvage(run: JobRun, folder: str) -> None:
    """After a failed Ray stage, keep what was described: merge the staged files. When the store
    or Delta refuses that too, the folder stays for the next run to adopt, and the Ray stage's
    error is the one the job reports (any other error of the merge is raised, with it as context)."""
    try:
        n = merge_staged(run, staged_files(folder))
    except (*tables.SPARK_ERRORS, OSError) as exc:
        log.error("could not merge the staged descriptions in %s (%s); the next run adopts them", folder, exc)
        return
    log.warning("the caption run failed; %d descriptions it had finished were merged", n)
    storage.delete_dir(folder)
