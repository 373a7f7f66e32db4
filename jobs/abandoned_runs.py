"""Runs whose driver is gone: found by the next job that starts, and marked ``abandoned``.

A job killed with SIGKILL (or by the OOM killer, or a lost node) never writes its final
``runs`` row, so without this its row would say ``running`` forever. Every run row names its
driver: ``host``, ``pid`` and a ``driver_token`` (the boot id and the process's start time,
so a recycled pid is not mistaken for the same process). A long job also refreshes its
``heartbeat_at`` every ``heartbeat_s`` seconds.

At start, a job looks at every ``running`` row:
- same host: abandoned when no process with that pid and token exists any more (exact);
- another host (a cluster driver elsewhere): abandoned when its heartbeat is older than
  ``STALE_HEARTBEATS`` heartbeat periods of this job's config;
- a row with no host (written before these columns existed) is left alone: nothing tells.

The mark is a ``MERGE`` that changes a row only while it still says ``running``, so a run
that finishes at the same moment keeps its own final row.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from delta.tables import DeltaTable
from pyspark.sql import functions as F

from udfs.io.warehouse_reader import read_table

from . import tables

log = logging.getLogger(__name__)

ABANDONED = "abandoned"
RUNNING = "running"
# A heartbeat missed this many times over means the driver is gone (GC pauses and slow commits
# delay one beat, not three).
STALE_HEARTBEATS = 3


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_token(pid: int) -> str | None:
    """``boot_id:start_ticks`` of a live process, ``None`` when none has that pid. Where /proc is
    missing (not Linux), a live pid gives ``""``: alive, without telling recycled pids apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    # Field 22 (start time) counted after the command name, which may hold spaces and ')'.
    fields = stat.rpartition(")")[2].split()
    if fields and fields[0] == "Z":  # a zombie has exited; only its parent has not reaped it
        return None
    return f"{_boot_id()}:{fields[19]}" if len(fields) > 19 else ""


@dataclass(frozen=True)
class Driver:
    host: str
    pid: int
    token: str

    @classmethod
    def current(cls) -> "Driver":
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_token(pid) or "")


def is_gone(row, here: Driver, now: dt.datetime, heartbeat_s: float) -> str | None:
    """Why the run of a ``running`` row is abandoned, or ``None`` when it may still run."""
    host, pid, token = row["host"], row["pid"], row["driver_token"]
    if not host or pid is None:
        return None
    if host == here.host:
        current = process_token(int(pid))
        if current is None:
            return f"its driver (pid {pid} on {host}) no longer runs: it was killed or crashed"
        if token and current and current != token:
            return f"its driver (pid {pid} on {host}) ended; that pid now belongs to another process"
        return None
    beat = row["heartbeat_at"] or row["started_at"]
    if beat is not None and (now - beat).total_seconds() > STALE_HEARTBEATS * heartbeat_s:
        return (f"its driver on {host} sent no heartbeat since {beat:%Y-%m-%d %H:%M:%S} UTC "
                f"(more than {STALE_HEARTBEATS} x heartbeat_s={heartbeat_s:g} s)")
    return None


_LIVENESS = ("run_id", "host", "pid", "driver_token", "heartbeat_at", "started_at")


def running_rows(spark, warehouse: str, count=None) -> list[dict]:
    """The liveness columns of every ``running`` row, read with delta-rs, or with Spark where
    that fails (``jobs.tables.small_read``)."""
    rows = tables.small_read(
        spark, warehouse, "runs",
        lambda: read_table(warehouse, "runs", equal={"status": RUNNING}, columns=_LIVENESS).to_pylist(),
        lambda: [row.asDict() for row in tables.read(spark, warehouse, "runs")
                 .filter(F.col("status") == RUNNING).select(*_LIVENESS).collect()], count)
    for row in rows:
        for column in ("heartbeat_at", "started_at"):
            # Spark's naive UTC datetimes, whichever reader: delta-rs gives them tz-aware.
            if row[column] is not None and row[column].tzinfo is not None:
                row[column] = row[column].astimezone(dt.timezone.utc).replace(tzinfo=None)
    return rows


def mark_abandoned(spark, warehouse: str, here: Driver, now: dt.datetime, heartbeat_s: float,
                   count=None) -> list[str]:
    """Mark every ``running`` run whose driver is gone; returns their run ids. ``count`` as in
    ``jobs.tables.small_read``."""
    gone = {row["run_id"]: why for row in running_rows(spark, warehouse, count)
            if (why := is_gone(row, here, now, heartbeat_s))}
    if not gone:
        return []
    updates = spark.createDataFrame([(run_id, f"abandoned: {why}") for run_id, why in gone.items()],
                                    "run_id string, error string")

    def run():
        (DeltaTable.forPath(spark, tables.table_path(warehouse, "runs")).alias("t")
         .merge(updates.alias("s"), f"t.run_id = s.run_id AND t.status = '{RUNNING}'")
         .whenMatchedUpdate(set={"status": F.lit(ABANDONED), "error": F.col("s.error"),
                                 "finished_at": F.lit(now)})
         .execute())

    tables.retry_on_conflict(run, "runs")
    for run_id, why in gone.items():
        log.warning("run %s marked abandoned: %s", run_id, why)
    return sorted(gone)
