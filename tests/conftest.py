"""Shared fixtures: one real Spark session with the real Delta connector for the whole run,
a fresh warehouse folder per test, and the path of the real MovieLens data when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
ML100K = (REPO.parent / "shared" / "data" / "ml100k").resolve()


def pytest_configure(config):
    for marker, text in (("slow", "takes more than a few seconds"),
                         ("realdata", "reads ../shared/data/ml100k"),
                         ("spark", "starts the shared Spark session"),
                         ("ray", "starts Ray"),
                         ("faults", "kills jobs, runs them at once, or feeds them crafted input"),
                         ("cluster", "starts a Spark standalone master + worker, a 2-node Ray cluster and an S3 "
                                     "server on 127.0.0.1 (tests/local_cluster.py)"),
                         ("browser", "opens a page in the real headless Chromium (Debian's chromium)"),
                         ("server", "starts the real llama.cpp caption server (tests/llama_server.py)")):
        config.addinivalue_line("markers", f"{marker}: {text}")


@pytest.fixture(scope="session")
def spark_config():
    from jobs.config import load_config

    return load_config(None, ["spark.master=local[2]", "spark.shuffle_partitions=2",
                              "spark.driver_memory=2g", "log_level=WARNING"])


@pytest.fixture(scope="session")
def spark(spark_config):
    from jobs.spark_session import build_spark

    session = build_spark(spark_config, app_name="vlm4rec-tests")
    yield session
    session.stop()


@pytest.fixture
def warehouse(tmp_path) -> Path:
    path = tmp_path / "warehouse"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def ml100k() -> Path:
    if not (ML100K / "u.data").exists():
        pytest.fail(f"the real MovieLens data is expected at {ML100K} (../shared/data/ml100k beside the repo)")
    return ML100K


@pytest.fixture(scope="module")
def one_torch_thread():
    """The caller owns torch's thread count; on a shared 2-core machine one thread is fastest."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """The real OpenAI-compatible llama.cpp server with a tiny random LLaVA, started once for
    the run (about 2 s); tests that kill it start it again on the same port."""
    from tests.llama_server import LlamaServer

    server = LlamaServer(tmp_path_factory.mktemp("llama-server")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def synthetic_run(spark, tmp_path_factory):
    """ONE pipeline run (every stage, the report included) on a small synthetic catalog with
    captions, shared by the tests that read a finished run (pipeline, report, recommend, the
    browser test). Read-only: a test that changes tables works on a copy of ``warehouse``."""
    from types import SimpleNamespace

    from pyspark.sql import functions as F

    from jobs import pipeline
    from udfs.synth import generate

    root = tmp_path_factory.mktemp("synthetic-run")
    data, warehouse = root / "synth", root / "warehouse"
    generate(data, seed=5, n_items=30, n_users=20)
    argv = ["--conf", "experiments/synthetic.yaml", "--set", f"warehouse={warehouse}",
            "--set", f"dataset.paths.root={data}",
            "--set", "experiment.representations=[lvlm, title, visual, naive:lvlm+visual]",
            "--set", "spark.shuffle_partitions=2", "--set", "experiment.evaluate.bootstrap_samples=100",
            # No heartbeat on a slow machine either: a test counts the run's commits of ``runs``.
            "--set", "heartbeat_s=3600"]
    from jobs import job_run
    from jobs.plan import ExperimentPlan

    # How often the run parses its config and resolves its plan (once each: one process).
    calls = {"config_loads": 0, "plan_resolutions": 0}
    load, resolve = job_run.load_config, ExperimentPlan.resolve

    def counted(key, function):
        def call(*args, **kwargs):
            calls[key] += 1
            return function(*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(job_run, "load_config", counted("config_loads", load))
        patch.setattr(ExperimentPlan, "resolve", staticmethod(counted("plan_resolutions", resolve)))
        assert pipeline.main(argv) == 0
    row = (spark.read.format("delta").load(f"{warehouse}/runs")
           .filter((F.col("job") == "pipeline") & (F.col("status") == "succeeded")).first())
    return SimpleNamespace(warehouse=warehouse, data=data, argv=argv, run_id=row.run_id, counts=dict(row.counts),
                           **calls)


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size, read_only=False)``: a tmpfs of ``size`` (``"64k"``) mounted on a fresh
    folder, unmounted at the end. The tests run as root (CI too): a disk that fills, or refuses
    every write to root as well, needs a real file system, and a failed mount fails the test."""
    import subprocess

    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        assert done.returncode == 0, f"mounting a {size} tmpfs at {point} failed (the tests run as root): {done.stderr}"
        mounted.append(point)
        if read_only:
            (point / "warehouse").mkdir()
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)
