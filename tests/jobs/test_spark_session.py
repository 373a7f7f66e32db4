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
