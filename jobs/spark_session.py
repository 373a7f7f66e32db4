"""A Spark session with the Delta Lake connector, local by default, a cluster by config.

The connector's JARs are resolved once from Maven Central by ``vlm4rec setup`` into a local
folder; afterwards sessions start offline from that folder.

The driver's py4j connections to the JVM are made fork-safe (``keep_gateway_connections_across_fork``):
Ray starts its daemons from the driver with ``subprocess`` and a ``preexec_fn``, and without this each
such child shut down one of the parent's connections (a ``ConnectionResetError`` traceback on stderr).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from udfs.io.storage import s3_endpoint_and_region

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
    return jars if any(j.name.startswith(f"io.delta_delta-spark_{SCALA_VERSION}-{DELTA_VERSION}")
                       for j in jars) else []


def hadoop_version() -> str:
    """The Hadoop version PySpark ships (its ``hadoop-client-api`` JAR): ``hadoop-aws`` must match it."""
    import pyspark

    found = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    if not found:
        raise ConnectorMissing("this pyspark has no hadoop-client-api JAR to read the Hadoop version from")
    return found[0].name[len("hadoop-client-api-"):-len(".jar")]


def s3_packages() -> list[str]:
    """The S3A connector for this PySpark's Hadoop; Ivy adds the AWS SDK bundle it was built with."""
    return [f"org.apache.hadoop:hadoop-aws:{hadoop_version()}"]


# Run in a child process: a JVM resolves ``spark.jars.packages`` only when it starts, so a
# second resolution in the process that made the first would reuse the first's JVM, resolve
# nothing and look for the first's JARs in its deleted Ivy folder.
_RESOLVE_IN_CHILD = """
import sys
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master("local[1]").appName("vlm4rec-setup")
         .config("spark.jars.packages", sys.argv[1]).config("spark.jars.ivy", sys.argv[2])
         .config("spark.ui.enabled", "false").getOrCreate())
spark.stop()
"""


def _resolve(packages: list[str], target: Path) -> list[Path]:
    """Download ``packages`` and their dependencies (Ivy, Maven Central) into ``target``."""
    import subprocess

    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vlm4rec-ivy-") as ivy:
        done = subprocess.run([sys.executable, "-c", _RESOLVE_IN_CHILD, ",".join(packages), ivy],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            lines = [line for line in done.stdout.splitlines() if not line.startswith(("\tat ", "        at "))]
            raise ConnectorMissing(f"Ivy could not resolve {packages}:\n" + "\n".join(lines[-15:]))
        jars = list((Path(ivy) / "jars").glob("*.jar"))
        for jar in jars:
            shutil.copy2(jar, target / jar.name)
    return [target / jar.name for jar in jars]


def resolve_connector(conf: SparkConf | None = None) -> list[Path]:
    """Download the Delta connector and its dependencies (Ivy, Maven Central) into ``jars_dir``."""
    target = jars_dir(conf)
    _resolve(DELTA_PACKAGES, target)
    jars = resolved_jars(conf)
    if not jars:
        raise ConnectorMissing(f"resolving {DELTA_PACKAGES} left no Delta JAR in {target}")
    return jars


def resolve_s3_connector(conf: SparkConf | None = None) -> list[Path]:
    """Download ``hadoop-aws`` (matching PySpark's Hadoop) and the AWS SDK into ``s3_jars_dir``,
    which every session then puts on the driver's and executors' class path."""
    jars = _resolve(s3_packages(), s3_jars_dir(conf))
    if not any(j.name.startswith("org.apache.hadoop_hadoop-aws-") for j in jars):
        raise ConnectorMissing(f"resolving {s3_packages()} left no hadoop-aws JAR in {s3_jars_dir(conf)}")
    return sorted(jars)


# Passed to the executors' Python workers (spark.executorEnv.*) and to Ray's workers (their
# runtime_env) when set on the driver: models load offline on every node, and Python code there
# finds the same object store. Secrets are not forwarded: workers take credentials from their own
# node (environment, instance role).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "VLM4REC_JARS",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def s3_jars_dir(conf: SparkConf | None = None) -> Path:
    """Where ``vlm4rec setup --with s3`` puts hadoop-aws and the AWS SDK bundle."""
    return jars_dir(conf) / "s3"


def submitted_master() -> str | None:
    """The master ``spark-submit`` (or another launcher that started the JVM first) already
    chose for this driver, or ``None`` when this process starts the JVM itself."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return None
    from pyspark import SparkConf as JavaBackedConf, SparkContext

    # Connect to the launcher's JVM first: before that, SparkConf() is a Python-only dict and
    # cannot see the master spark-submit put into the JVM's system properties.
    SparkContext._ensure_initialized()
    return JavaBackedConf().get("spark.master", None) or None


def uses_s3a(config: Config) -> bool:
    """Whether the JVM needs the S3A connector: the warehouse or a Spark setting (checkpoints,
    archives) names an ``s3a://`` URI. Images on S3 are read by Python (pyarrow), not the JVM."""
    return any(v.strip().lower().startswith(("s3a://", "s3://", "s3n://"))
               for v in [config.warehouse, *map(str, config.spark.extra.values())])


def s3_classpath(config: Config) -> list[Path]:
    """The S3A connector's JARs when this config needs them (``ConnectorMissing`` if not fetched),
    else none: the 560 MB AWS SDK stays off the class path of every other session."""
    if not uses_s3a(config):
        return []
    folder = s3_jars_dir(config.spark)
    jars = sorted(folder.glob("*.jar")) if folder.is_dir() else []
    if not any(j.name.startswith("org.apache.hadoop_hadoop-aws-") for j in jars):
        raise ConnectorMissing(f"warehouse '{config.warehouse}' (or a spark.extra setting) is on S3 but the S3A "
                               f"connector JARs are not in {folder}: run `vlm4rec setup --with s3` once")
    return jars


def s3a_endpoint_settings(environ) -> dict[str, str]:
    """Hadoop S3A settings for a non-AWS S3 endpoint (MinIO, a local server) named by the same
    variable that pyarrow's side reads (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``), so one
    setting points Spark and the Python readers at one store; ``spark.extra`` overrides each."""
    endpoint, region = s3_endpoint_and_region(environ)
    if not endpoint:
        return {}
    settings = {"spark.hadoop.fs.s3a.endpoint": endpoint,
                # A custom endpoint rarely serves virtual-host buckets (bucket.host:port).
                "spark.hadoop.fs.s3a.path.style.access": "true",
                "spark.hadoop.fs.s3a.connection.ssl.enabled": str(endpoint.startswith("https://")).lower()}
    if region:
        settings["spark.hadoop.fs.s3a.endpoint.region"] = region
    return settings


def executor_python(conf: SparkConf) -> str:
    """The interpreter the executors run: ``spark.python``, else $PYSPARK_PYTHON, else ours."""
    return conf.python or os.environ.get("PYSPARK_PYTHON") or sys.executable


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
    launched = submitted_master()
    master = launched or sc.master or "local[*]"
    if launched is not None and sc.master and sc.master != launched:
        log.info("spark.master %r in the config ignored: spark-submit chose %r", sc.master, launched)
    # Every master: the executors' Python workers run this interpreter. PySpark reads
    # PYSPARK_PYTHON from the driver's environment when the context starts and sends it with
    # every Python function (spark.pyspark.python is read only by spark-submit).
    python = executor_python(sc)
    os.environ["PYSPARK_PYTHON"] = python
    if launched is None:
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    settings = {
        "spark.jars": ",".join(str(j) for j in jars),
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.driver.memory": sc.driver_memory,
        "spark.sql.shuffle.partitions": str(sc.shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.session.timeZone": "UTC",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        # Delta replays a table's log into this many partitions at every read and after every
        # commit (its default is 50). A local master's logs are small, and one partition saves
        # 0.3-0.5 s per commit over eight on two cores; a cluster's logs may hold millions of files.
        "spark.databricks.delta.snapshotPartitions": str(
            sc.snapshot_partitions or (1 if master.startswith("local") else max(1, sc.shuffle_partitions))),
        "spark.pyspark.python": python,
    }
    if master.startswith("local"):
        settings["spark.ui.enabled"] = "false"
    # spark.executorEnv.* reaches the Python workers in local mode too (pyspark.daemon is started
    # with it), and before they start, which is when glibc reads its malloc tunables.
    settings.update({f"spark.executorEnv.{k}": os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    settings.update({f"spark.executorEnv.{k}": str(v) for k, v in sc.worker_env.items() if v != ""})
    # spark.extra overrides every setting above, the S3A endpoint's among them.
    settings.update(s3a_endpoint_settings(os.environ))
    settings.update({key: str(value) for key, value in sc.extra.items()})
    # The S3 connector, when fetched: on the class path of the driver and of every executor, at
    # the same path (no copy of the 500 MB AWS SDK into every executor's folder).
    s3_jars = s3_classpath(config)
    if s3_jars:
        classpath = os.pathsep.join(str(j) for j in s3_jars)
        for key in ("spark.driver.extraClassPath", "spark.executor.extraClassPath"):
            given = sc.extra.get(key)
            settings[key] = f"{given}{os.pathsep}{classpath}" if given else classpath
    builder = SparkSession.builder.appName(app_name or sc.app_name)
    if launched is None:
        builder = builder.master(master)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    keep_gateway_connections_across_fork()
    return spark


# The gateway's connections of the forking process, referenced from just before a fork until its
# child has let go of its copies; empty otherwise.
_HELD_ACROSS_FORK: list = []


@functools.cache  # the hooks are registered once per process
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
                with contextlib.suppress(OSError):
                    if handle is not None:
                        handle.close()
                # py4j's close() then returns early instead of shutting the socket down.
                setattr(connection, name, None)
            connection.is_connected = False
        _HELD_ACROSS_FORK.clear()

    os.register_at_fork(before=hold, after_in_parent=_HELD_ACROSS_FORK.clear, after_in_child=release_in_child)
