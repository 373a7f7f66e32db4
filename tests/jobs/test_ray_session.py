"""Ray started inside a Spark driver: a clean ``vlm4rec caption`` run says nothing on stderr about
py4j (each Ray daemon forked from the driver used to reset one of its connections to the JVM)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import ingest

pytestmark = [pytest.mark.slow, pytest.mark.spark, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ingested(spark, tmp_path_factory):
    """(warehouse, data folder): a tiny synthetic catalog, ingested by this process's Spark."""
    from udfs.synth import generate

    root = tmp_path_factory.mktemp("ray-session-data")
    wh = tmp_path_factory.mktemp("ray-session-wh")
    generate(root, seed=3, n_items=6, n_users=4)
    assert ingest.main(["--conf", "datasets/synthetic.yaml", "--set", f"warehouse={wh}",
                        "--set", f"dataset.paths.root={root}", "--set", "log_level=WARNING"]) == 0
    return wh, root


def test_caption_cli_that_starts_ray_in_the_driver_prints_no_py4j_traceback(ingested):
    wh, root = ingested
    # The job must start its own Ray inside its Spark driver, not join one this process runs.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [BIN / "vlm4rec", "caption", "--conf", "experiments/synthetic.yaml", "--set", f"warehouse={wh}",
         "--set", f"dataset.paths.root={root}", "--set", "log_level=INFO", "--set", "spark.master=local[1]",
         "--set", "spark.driver_memory=1g", "--set", "ray.num_cpus=1", "--set", "ray.object_store_memory_mb=100"],
        capture_output=True, text=True, cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ray started on this machine" in done.stderr  # the path under test was taken
    counts = json.loads(done.stdout.strip().splitlines()[-1])["counts"]
    assert counts["described"] == 6 and counts["failed"] == 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "ConnectionResetError" not in done.stderr, done.stderr[-3000:]


def test_ray_workers_get_the_worker_env_locally_and_on_a_cluster():
    from jobs.config import MALLOC_WORKER_ENV, RayConf
    from jobs.ray_session import init_kwargs

    assert init_kwargs(RayConf())["runtime_env"]["env_vars"].items() >= MALLOC_WORKER_ENV.items()
    cluster = init_kwargs(RayConf(address="auto", worker_env={"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": ""}))
    assert cluster["runtime_env"]["env_vars"]["MALLOC_MMAP_MAX_"] == "0"
    assert "MALLOC_TRIM_THRESHOLD_" not in cluster["runtime_env"]["env_vars"]  # empty: left unset


def test_a_refused_token_is_reported_as_such_with_the_fix():
    from ray.exceptions import AuthenticationError

    from jobs.ray_session import connection_failure

    try:
        try:
            raise AuthenticationError("InvalidAuthToken: the token does not match the cluster's")
        except AuthenticationError as inner:
            raise ConnectionError("Failed to connect to GCS") from inner
    except ConnectionError as exc:
        message = connection_failure("127.0.0.1:6379", exc)
    assert "refused this driver's authentication" in message and "RAY_AUTH_MODE=token" in message
    assert "RAY_AUTH_TOKEN" in message and "127.0.0.1:6379" in message
    other = connection_failure("10.0.0.9:6379", ConnectionError("timed out"))
    assert "ConnectionError: timed out" in other and "ray status" in other
