"""The driver's py4j connections to the JVM outlive a forked child.

Ray starts its daemons from the driver with ``subprocess`` and a ``preexec_fn``, so each child runs
Python after the fork: CPython frees the other threads' state there, py4j's per-thread connection
finalizers run, and ``socket.shutdown`` on the inherited descriptor tore down the parent's live
TCP connection (the parent's next call got ``ConnectionResetError`` and a logged traceback).
"""
from __future__ import annotations

import logging
import subprocess
import sys
import threading

import pytest

pytestmark = pytest.mark.spark


def test_a_forked_child_leaves_the_drivers_jvm_connections_open(spark, caplog):
    client = spark.sparkContext._gateway._gateway_client
    jvm = spark.sparkContext._jvm
    connected, forked = threading.Event(), threading.Event()
    ports: dict[str, tuple] = {}

    def other_thread():
        # A thread other than the forking one owns a connection, as py4j's finalizer thread does.
        jvm.java.lang.System.nanoTime()
        # Only the port is kept: a reference to the connection would keep it alive in the child.
        ports["before"] = client.get_thread_connection().socket.getsockname()
        connected.set()
        forked.wait(120)
        jvm.java.lang.System.nanoTime()
        ports["after"] = client.get_thread_connection().socket.getsockname()

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert connected.wait(120)
        with caplog.at_level(logging.INFO):
            # A preexec_fn makes the child run Python between fork and exec, as Ray's does.
            subprocess.run([sys.executable, "-c", "pass"], preexec_fn=lambda: None, check=True)
            forked.set()
            thread.join(120)
    finally:
        forked.set()
        thread.join(120)
    # A connection shut down by the child is replaced, after a logged reset, by one on a new port.
    assert ports["after"] == ports["before"]
    assert not [r for r in caplog.records if r.exc_info or "Exception while sending" in r.getMessage()]


def _worker_environ(batches):
    import pandas as pd

    environ = open("/proc/self/environ", "rb").read().split(b"\0")
    for _ in batches:
        yield pd.DataFrame({"var": [v.decode() for v in environ if v.startswith(b"MALLOC_")]})


def test_python_workers_start_with_the_configured_malloc_tunables(spark):
    # /proc/self/environ is the environment the process was started with: what glibc read.
    from jobs.config import MALLOC_WORKER_ENV

    seen = set(spark.range(2).repartition(2).mapInPandas(_worker_environ, "var string").toPandas()["var"])
    assert seen == {f"{k}={v}" for k, v in MALLOC_WORKER_ENV.items()}


def _interpreter(batches):
    import sys

    import pandas as pd

    for _ in batches:
        yield pd.DataFrame({"python": [sys.executable]})


def test_executors_run_the_configured_python(spark, spark_config):
    from jobs.spark_session import executor_python

    seen = set(spark.range(2).repartition(2).mapInPandas(_interpreter, "python string").toPandas()["python"])
    assert seen == {executor_python(spark_config.spark)}


def test_executor_python_master_and_s3_settings_come_from_the_config(monkeypatch, tmp_path):
    import sys

    from jobs.config import load_config
    from jobs.spark_session import (ConnectorMissing, executor_python, s3_classpath, s3a_endpoint_settings,
                                    submitted_master, uses_s3a)

    monkeypatch.delenv("PYSPARK_PYTHON", raising=False)
    assert executor_python(load_config(None, []).spark) == sys.executable
    monkeypatch.setenv("PYSPARK_PYTHON", "/opt/env/bin/python")
    assert executor_python(load_config(None, []).spark) == "/opt/env/bin/python"
    assert executor_python(load_config(None, ["spark.python=./environment/bin/python"]).spark) == \
        "./environment/bin/python"
    # This process started its JVM itself (no spark-submit gateway): the config's master is used.
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    assert submitted_master() is None

    assert s3a_endpoint_settings({}) == {}
    assert s3a_endpoint_settings({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"}) == {
        "spark.hadoop.fs.s3a.endpoint": "http://127.0.0.1:9000", "spark.hadoop.fs.s3a.path.style.access": "true",
        "spark.hadoop.fs.s3a.connection.ssl.enabled": "false", "spark.hadoop.fs.s3a.endpoint.region": "eu-west-1"}

    local = load_config(None, [])
    assert not uses_s3a(local) and s3_classpath(local) == []
    on_s3 = load_config(None, ["warehouse=s3a://b/w", f"spark.jars_dir={tmp_path}"])
    assert uses_s3a(on_s3)
    with pytest.raises(ConnectorMissing, match=r"s3a://b/w.*vlm4rec setup --with s3"):
        s3_classpath(on_s3)
    assert uses_s3a(load_config(None, ["spark.extra={spark.checkpoint.dir: 's3a://b/ckpt'}"]))


def test_the_s3_connector_matches_pysparks_hadoop():
    from jobs.spark_session import hadoop_version, s3_packages

    assert hadoop_version().count(".") == 2
    assert s3_packages() == [f"org.apache.hadoop:hadoop-aws:{hadoop_version()}"]


SUBMITTED = """
from jobs.config import load_config
from jobs.spark_session import build_spark, submitted_master
spark = build_spark(load_config(None, ["spark.master=local[2]", "spark.driver_memory=1g", "log_level=WARNING"]))
print("MASTER", submitted_master(), spark.sparkContext.master, spark.range(3).count())
spark.stop()
"""


def test_spark_submits_master_wins_over_the_configs(tmp_path):
    """`spark-submit --master X` used to run silently in the config's local[*] (builder.master())."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pyspark

    script = tmp_path / "submitted.py"
    script.write_text(SUBMITTED)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("PYSPARK_PYTHON", None)
    spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    done = subprocess.run([str(spark_submit), "--master", "local[1]", "--conf", f"spark.pyspark.python={sys.executable}",
                           "--conf", "spark.ui.enabled=false", str(script)],
                          capture_output=True, text=True, cwd=repo, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MASTER local[1] local[1] 3" in done.stdout, done.stdout
