"""The same code on a real cluster: a Spark standalone master and worker, a two-node Ray cluster with
token authentication, and an S3 server, all on 127.0.0.1 (``tests/local_cluster.py``).

The synthetic pipeline runs with ``vlm4rec pipeline --conf <cluster conf>``, the warehouse and the
images in the object store; the Spark master's JSON API must show the application on the cluster's
executors, Ray's state API the caption actors on the non-head node, and the tables must equal
those of a local run (local Spark, Ray started in the driver) of the same config.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import local_cluster as lc

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.spark, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    running = lc.LocalCluster(root, lc.base_env(root))
    try:
        lc.start_s3(running)
        lc.start_spark(running)
        lc.start_ray(running)
    except BaseException:
        print(running.log_tail())
        running.stop()
        raise
    yield running
    running.stop()


def s3_client(cluster: lc.LocalCluster):
    import boto3

    return boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=cluster.env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=cluster.env["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="module")
def catalog(cluster, tmp_path_factory):
    """A tiny synthetic catalog whose items.csv names its images in the bucket (s3a:// URIs)."""
    import pandas as pd

    from udfs.synth import generate

    data = tmp_path_factory.mktemp("cluster-data")
    generate(data, seed=11, n_items=10, n_users=8)
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket=cluster.bucket)
    items = pd.read_csv(data / "items.csv")
    uris = []
    for relative in items["image_path"]:
        key = f"images/{relative}"
        s3.upload_file(str(data / relative), cluster.bucket, key)
        uris.append(f"s3a://{cluster.bucket}/{key}")
    items.assign(image_path=uris).to_csv(data / "items.csv", index=False)
    return data


def cluster_conf(cluster: lc.LocalCluster, path: Path, events: Path) -> Path:
    events.mkdir(exist_ok=True)
    path.write_text(json.dumps({  # JSON is YAML
        "warehouse": f"s3a://{cluster.bucket}/warehouse",
        "spark": {"master": cluster.spark_master, "driver_memory": "1g", "shuffle_partitions": 2,
                  "extra": {"spark.executor.memory": "1g", "spark.cores.max": "2",
                            # Where each task ran, for the assertions (the UI ends with the app).
                            "spark.eventLog.enabled": "true", "spark.eventLog.dir": f"file://{events}",
                            "spark.eventLog.compress": "false", "spark.eventLog.rolling.enabled": "false"}},
        "ray": {"address": cluster.ray_address},
    }))
    return path


def run_cli(cluster: lc.LocalCluster, *argv: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vlm4rec"), *argv], capture_output=True, text=True, cwd=REPO,
                          env=cluster.env, timeout=timeout)


# The report stage is skipped for time only: it reads and writes an object-store warehouse
# (tests/jobs/test_report.py::test_report_on_an_object_store_warehouse, against moto).
EXPERIMENT = ["--conf", "experiments/synthetic.yaml", "--set", "experiment.representations=[lvlm, title, visual]",
              "--set", "experiment.evaluate.bootstrap_samples=20", "--set", "log_level=INFO", "--skip", "report"]


def test_pipeline_on_the_cluster_equals_a_local_run(cluster, catalog, tmp_path):
    events = tmp_path / "spark-events"
    conf = cluster_conf(cluster, tmp_path / "cluster.yaml", events)
    data = ["--set", f"dataset.paths.root={catalog}"]
    done = run_cli(cluster, "pipeline", *EXPERIMENT, "--conf", str(conf), *data)
    assert done.returncode == 0, done.stderr[-4000:] + cluster.log_tail()
    print(done.stdout[-3000:])
    counts = json.loads(done.stdout.strip().splitlines()[-1])["counts"]
    assert counts["rows_descriptions"] == 10 and counts["rows_metrics"] > 0

    # Spark: the master ran the application, and every one of its tasks ran on an executor of the
    # worker (a local-mode run has only the "driver" executor).
    state = lc.http_json(f"{cluster.spark_ui}/json/")
    apps = [a for a in state["completedapps"] + state["activeapps"] if a["name"] == "vlm4rec-pipeline"]
    assert len(apps) == 1 and apps[0]["cores"] > 0, state
    tasks = [json.loads(line)["Task Info"] for log in events.glob(f"*{apps[0]['id']}*") if log.is_file()
             for line in open(log) if '"Event":"SparkListenerTaskEnd"' in line]
    assert tasks and {t["Executor ID"] for t in tasks} != {"driver"}
    assert all(t["Executor ID"] != "driver" and t["Host"] == "127.0.0.1" for t in tasks)

    # Ray: every caption actor ran on the worker node (the head has no CPUs for them).
    nodes = lc.alive_ray_nodes(cluster)
    head = {n["node_id"] for n in nodes if n["is_head_node"]}
    captioners = [a for a in lc.ray_actors(cluster) if "CaptionActor" in (a.get("class_name") or "")
                  or "CaptionActor" in json.dumps(a.get("repr_name") or "")]
    assert captioners, [a.get("class_name") for a in lc.ray_actors(cluster)]
    assert all(a["node_id"] not in head for a in captioners), captioners

    # The warehouse is in the bucket, not in a folder named "s3a:" under the working directory.
    listed = s3_client(cluster).list_objects_v2(Bucket=cluster.bucket, Prefix="warehouse/descriptions/_delta_log/")
    assert listed.get("KeyCount", 0) > 0
    assert not (REPO / "s3a:").exists()

    # The same config run locally (local Spark, Ray inside the driver) writes the same tables: the
    # distributed stages (ingest's image hashing, caption, embed), whose inputs decide the rest.
    local_wh = f"s3a://{cluster.bucket}/warehouse-local"
    done = run_cli(cluster, "pipeline", *EXPERIMENT, "--conf", str(conf), *data, "--set", f"warehouse={local_wh}",
                   "--skip", "profiles", "--skip", "topk", "--skip", "evaluate",
                   "--set", "spark.master=local[2]", "--set", "ray.address=", "--set", "ray.num_cpus=2",
                   "--set", "ray.object_store_memory_mb=100")
    assert done.returncode == 0, done.stderr[-4000:]
    print(done.stdout[-3000:])
    snap = subprocess.run([sys.executable, "-m", "tests.local_cluster", f"s3a://{cluster.bucket}/warehouse",
                           local_wh], capture_output=True, text=True, cwd=REPO, env=cluster.env, timeout=300)
    assert snap.returncode == 0, snap.stderr[-3000:]
    on_cluster, local = json.loads(snap.stdout.strip().splitlines()[-1]).values()
    assert len(on_cluster["descriptions"]) == 10 and {r[-1] for r in on_cluster["descriptions"]} == {"ok"}
    assert all(uri.startswith(f"s3a://{cluster.bucket}/images/") for uri in (r[4] for r in on_cluster["items"]))
    for name in lc.SNAPSHOT_COLUMNS:
        assert on_cluster[name] == local[name], name


def test_a_missing_bucket_stops_the_job_before_spark_starts(cluster, tmp_path):
    done = run_cli(cluster, "ingest", "--conf", "datasets/synthetic.yaml", "--set", "warehouse=s3a://no-such-bucket/w",
                   "--set", f"dataset.paths.root={tmp_path}", timeout=120)
    assert done.returncode == 2
    assert "'s3a://no-such-bucket/w'" in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr and "SparkContext" not in done.stderr


def test_a_wrong_ray_token_is_reported_as_an_authentication_failure(cluster):
    code = ("from jobs.config import RayConf\nfrom jobs.ray_session import ray_session\n"
            f"with ray_session(RayConf(address='{cluster.ray_address}')):\n    pass\n")
    env = {**cluster.env, "RAY_AUTH_TOKEN": "0" * 32}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    assert done.returncode != 0
    assert "refused this driver's authentication" in done.stderr and "RAY_AUTH_TOKEN" in done.stderr, done.stderr[-3000:]
