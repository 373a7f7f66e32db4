"""A Spark session with the Delta Lake connector, local by default, a cluster by config.

The connector's JARs are resolved once from Maven Central by ``vlm4rec setup`` into a local
folder; afterwards sessions start offline from that folder.

The driver's py4j connections to the JVM are made fork-safe (``keep_gateway_connections_across_fork``):
Ray starts its daemons from the driver with ``subprocess`` and a ``preexec_fn``, and without this each
such child shut down one of the parent's connections (a ``ConnectionResetError`` traceback on stderr).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .config import Config, SparkConf

log = logging.getLogger(__name__)

DELTA_VERSION = "4.0.0"
SCALA_VERSION = "2.13"
DELTA_PACKAGES = [f"io.delta:delta-spark_{SCALA_VERSION}:{DELTA_VERSION}"]


class ConnectorMissing(RuntimeError):
    pass


def jars_dir(conf: SparkConf | None = None) -> Path:
    if conf is not None and conf.jars_dir:
        return Path(conf.jars_dir).expanduser()
    return Path(os.environ.get("VLM4REC_JARS", "~/.cache/vlm4rec/jars")).expanduser()


def resolved_jars(conf: SparkConf | None = None) -> list[Path]:
    folder = jars_dir(conf)
    jars = sorted(folder.glob("*.jar")) if folder.is_dir() else []
    if not any(j.name.startswith(f"io.delta_delta-spark_{SCALA_VERSION}-{DELTA_VERSION}") for j in jars):
        return []
    return jars


def resolve_connector(conf: SparkConf | None = None) -> list[Path]:
    """Download the Delta connector and its dependencies (Ivy, Maven Central) into ``jars_dir``."""
    from pyspark.sql import SparkSession

    target = jars_dir(conf)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vlm4rec-ivy-") as ivy:
        spark = (
            SparkSession.builder.master("local[1]")
            .appName("vlm4rec-setup")
            .config("spark.jars.packages", ",".join(DELTA_PACKAGES))
            .config("spark.jars.ivy", ivy)
            .config("spark.ui.enabled", "false")
            .getOrCreate()
        )
        spark.stop()
        for jar in (Path(ivy) / "jars").glob("*.jar"):
            shutil.copy2(jar, target / jar.name)
    jars = resolved_jars(conf)
    if not jars:
        raise ConnectorMissing(f"resolving {DELTA_PACKAGES} left no Delta JAR in {target}")
    return jars


def build_spark(config: Config, app_name: str | None = None):
    """Create (or return the running) Spark session with Delta enabled."""
    from pyspark.sql import SparkSession

    sc = config.spark
    jars = resolved_jars(sc)
    if not jars:
        raise ConnectorMissing(
            f"the Delta Lake connector JARs are not in {jars_dir(sc)}: run `vlm4rec setup` once "
            "(it fetches them from Maven Central) or point spark.jars_dir / VLM4REC_JARS at them"
        )
    builder = (
        SparkSession.builder.master(sc.master)
        .appName(app_name or sc.app_name)
        .config("spark.jars", ",".join(str(j) for j in jars))
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.driver.memory", sc.driver_memory)
        .config("spark.sql.shuffle.partitions", str(sc.shuffle_partitions))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.session.timeZone", "UTC")
        # Delta's log replay defaults to 50 partitions: pure overhead on small tables.
        .config("spark.databricks.delta.snapshotPartitions", str(max(1, sc.shuffle_partitions)))
        .config("spark.databricks.delta.schema.autoMerge.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
    )
    if sc.master.startswith("local"):
        builder = builder.config("spark.ui.enabled", "false")
        # Workers must run the interpreter that has our packages, not whatever `python3` is.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # spark.executorEnv.* reaches the Python workers in local mode too (pyspark.daemon is started
    # with it), and before they start, which is when glibc reads its malloc tunables.
    for key, value in sc.worker_env.items():
        if value != "":
            builder = builder.config(f"spark.executorEnv.{key}", str(value))
    for key, value in sc.extra.items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    keep_gateway_connections_across_fork()
    return spark


# The gateway's connections of the forking process, referenced from just before a fork until its
# child has let go of its copies; empty otherwise.
_HELD_ACROSS_FORK: list = []
_FORK_HOOKS_REGISTERED = False


def keep_gateway_connections_across_fork() -> None:
    """Stop a forked child from closing the driver's py4j connections to the JVM (idempotent).

    A child that runs Python after the fork (``subprocess`` with a ``preexec_fn``, as Ray's
    ``start_ray_process`` does for every daemon; ``multiprocessing``'s fork) frees the state of
    the parent's other threads, py4j's thread-local connections among them (pinned thread mode,
    PySpark's default: its finalizer thread owns one). py4j closes a freed connection with
    ``socket.shutdown``, which acts on the TCP connection the parent still uses, not just on the
    child's descriptor: the parent's next call fails with ``ConnectionResetError``, is retried on
    a new connection and leaves a logged traceback. CPython frees those thread states before it
    runs the ``after_in_child`` hooks, so the connections are referenced from just before the
    fork; the child then closes only its own descriptors, which leaves the TCP connections open.
    """
    global _FORK_HOOKS_REGISTERED
    if _FORK_HOOKS_REGISTERED or not hasattr(os, "register_at_fork"):
        return
    from pyspark import SparkContext

    def hold() -> None:
        client = getattr(SparkContext._gateway, "_gateway_client", None)
        # The idle connections of every thread; a connection in use sits in its thread's frame,
        # which the child never frees.
        _HELD_ACROSS_FORK[:] = list(getattr(client, "deque", ()))

    def release_in_child() -> None:
        for connection in _HELD_ACROSS_FORK:
            for name in ("stream", "socket"):
                handle = getattr(connection, name, None)
                try:
                    if handle is not None:
                        handle.close()
                except OSError:
                    pass
                # py4j's close() then returns early instead of shutting the socket down.
                setattr(connection, name, None)
            connection.is_connected = False
        _HELD_ACROSS_FORK.clear()

    os.register_at_fork(before=hold, after_in_parent=_HELD_ACROSS_FORK.clear, after_in_child=release_in_child)
    _FORK_HOOKS_REGISTERED = True
