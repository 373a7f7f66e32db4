"""The same code on a real cluster: a Spark standalone master and worker, a two-node Ray cluster with
token authentication, and an S3 server, all on 127.0.0.1 (``tests/local_cluster.py``).

The synthetic experiment runs with the warehouse and the images in the object store, launched the
three ways docs/CLUSTER.md gives a user: ``vlm4rec ingest``, ``ray job submit`` for ``caption``,
``spark-submit`` for ``embed``, then ``vlm4rec pipeline --conf <cluster conf>`` for the rest and
the report. The Spark master's JSON API and the event logs must show each application on the
cluster's executors, Ray's job and state APIs the caption job succeeded with its actors on the
non-head node, and the tables must equal those of a local run (local Spark, Ray started in the
driver) of the same config. Faults: an executor JVM killed mid-``embed``, a raylet killed
mid-``caption``, a warehouse without credentials, a missing bucket, a wrong Ray token.
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
        # driver_compute_mb 0: profiles, topk and evaluate take their distributed paths here, on
        # the cluster's executors, however small the catalog (their driver paths are proven equal
        # to those paths in the jobs' own tests).
        "spark": {"master": cluster.spark_master, "driver_memory": "1g", "shuffle_partitions": 2,
                  "driver_compute_mb": 0,
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


def last_line(done) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def spark_submit(cluster: lc.LocalCluster, script: str, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``spark-submit`` as docs/CLUSTER.md tells a user: the Delta JARs with ``--jars``, the S3A JARs
    on the driver's class path (its JVM starts before our code), the executors' Python by
    ``spark.pyspark.python``; the master on the command line, not in the config."""
    from jobs.spark_session import jars_dir

    delta = ",".join(str(j) for j in sorted(jars_dir().glob("*.jar")))
    s3 = ":".join(str(j) for j in sorted((jars_dir() / "s3").glob("*.jar")))
    return subprocess.run([str(BIN / "spark-submit"), "--master", cluster.spark_master,
                           "--conf", f"spark.pyspark.python={sys.executable}", "--jars", delta,
                           "--driver-class-path", s3, script, *argv],
                          capture_output=True, text=True, cwd=REPO, env=cluster.env, timeout=timeout)


def ray_job_submit(cluster: lc.LocalCluster, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``ray job submit`` to the head's dashboard, shipping the working directory; the driver runs on
    the head node (with the head's Python: this venv's, which the cluster's PATH does not have)."""
    import time

    for _ in range(60):
        done = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster.ray_dashboard,
                               "--working-dir", str(REPO), "--", sys.executable, *argv],
                              capture_output=True, text=True, cwd=REPO, env=cluster.env, timeout=timeout)
        # The head's job agent registers some time after the dashboard answers (minutes on a busy
        # machine); until then the submission is refused and no job is created.
        if "No available agent to submit job" not in done.stderr:
            return done
        time.sleep(5)
    return done


JOB_ARGS = ["--conf", "experiments/synthetic.yaml", "--set", "experiment.representations=[lvlm, title, visual]",
            "--set", "experiment.evaluate.bootstrap_samples=20", "--set", "log_level=INFO"]
LAUNCHED_APART = ("ingest", "caption", "embed")


@pytest.fixture(scope="module")
def cluster_run(cluster, catalog, tmp_path_factory):
    """The synthetic experiment on the cluster, launched the three ways a user would: ``ingest`` by
    ``vlm4rec``, ``caption`` by ``ray job submit`` (its driver on the head, ``ray.address=auto``),
    ``embed`` by ``spark-submit`` with the master on its command line (the config's master set
    empty: "whatever launched me"), then ``vlm4rec pipeline`` for the rest, report included."""
    root = tmp_path_factory.mktemp("cluster-run")
    events = root / "spark-events"
    conf = cluster_conf(cluster, root / "cluster.yaml", events)
    args = [*JOB_ARGS, "--conf", str(conf), "--set", f"dataset.paths.root={catalog}"]
    out = {"args": args, "events": events}
    out["ingest"] = done = run_cli(cluster, "ingest", *args)
    assert done.returncode == 0, done.stderr[-4000:] + cluster.log_tail()
    out["caption"] = done = ray_job_submit(cluster, "-m", "jobs.caption", *args, "--set", "ray.address=auto")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:] + cluster.log_tail()
    out["embed"] = done = spark_submit(cluster, "jobs/embed.py", *args, "--set", "spark.master=")
    assert done.returncode == 0, done.stderr[-6000:] + cluster.log_tail()
    out["pipeline"] = done = run_cli(cluster, "pipeline", *args, *(a for s in LAUNCHED_APART for a in ("--skip", s)))
    assert done.returncode == 0, done.stderr[-4000:] + cluster.log_tail()
    return out


def test_pipeline_launched_three_ways_on_the_cluster_equals_a_local_run(cluster, cluster_run):
    for name in ("ingest", "caption", "embed", "pipeline"):
        print(cluster_run[name].stdout[-1500:])
    counts = last_line(cluster_run["pipeline"])["counts"]
    assert counts["rows_descriptions"] == 10 and counts["rows_metrics"] > 0
    assert {f"skipped_stage_{s}" for s in LAUNCHED_APART} <= set(counts)
    # The report ran on the s3a:// warehouse and wrote its page into the bucket.
    run_id = last_line(cluster_run["pipeline"])["run_id"]
    page = s3_client(cluster).head_object(Bucket=cluster.bucket, Key=f"warehouse/reports/{run_id}/report.html")
    assert page["ContentLength"] > 0

    # Spark: each Spark application (ingest; caption's plan and merge; embed by spark-submit; the
    # pipeline) ran on the standalone master, and every task on an executor of the worker (a
    # local-mode run has only the "driver" executor).
    apps = {a["name"]: a for a in lc.spark_apps(cluster)}
    for name in ("vlm4rec-ingest", "vlm4rec-caption", "vlm4rec-embed", "vlm4rec-pipeline"):
        assert name in apps and apps[name]["cores"] > 0, sorted(apps)
        tasks = [e["Task Info"] for e in lc.spark_events(cluster_run["events"], apps[name]["id"])
                 if e["Event"] == "SparkListenerTaskEnd"]
        assert tasks, name
        assert all(t["Executor ID"] != "driver" and t["Host"] == "127.0.0.1" for t in tasks), name
    # spark-submit chose embed's master (the config's is empty) and launched its driver.
    environment = next(e for e in lc.spark_events(cluster_run["events"], apps["vlm4rec-embed"]["id"])
                       if e["Event"] == "SparkListenerEnvironmentUpdate")
    properties = dict(environment["Spark Properties"])
    assert properties["spark.master"] == cluster.spark_master
    assert properties.get("spark.submit.deployMode") == "client", properties

    # Ray: caption was a submitted job that succeeded, and every caption actor ran on the worker
    # node (the head has no CPUs for them).
    jobs = [j for j in lc.ray_jobs(cluster) if "jobs.caption" in j["entrypoint"]]
    assert [j["status"] for j in jobs] == ["SUCCEEDED"], jobs
    head = {n["node_id"] for n in lc.alive_ray_nodes(cluster) if n["is_head_node"]}
    captioners = lc.caption_actors(cluster)
    assert captioners, [a.get("class_name") for a in lc.ray_actors(cluster)]
    assert all(a["node_id"] not in head for a in captioners), captioners

    # The warehouse is in the bucket, not in a folder named "s3a:" under the working directory.
    listed = s3_client(cluster).list_objects_v2(Bucket=cluster.bucket, Prefix="warehouse/descriptions/_delta_log/")
    assert listed.get("KeyCount", 0) > 0
    assert not (REPO / "s3a:").exists()

    # The same config run locally (local Spark, Ray inside the driver) writes the same tables: the
    # distributed stages (ingest's image hashing, caption, embed), whose inputs decide the rest.
    local_wh = f"s3a://{cluster.bucket}/warehouse-local"
    done = run_cli(cluster, "pipeline", *cluster_run["args"], "--set", f"warehouse={local_wh}",
                   "--skip", "profiles", "--skip", "topk", "--skip", "evaluate", "--skip", "report",
                   "--set", "spark.master=local[2]", "--set", "ray.address=", "--set", "ray.num_cpus=2",
                   "--set", "ray.object_store_memory_mb=100")
    assert done.returncode == 0, done.stderr[-4000:]
    on_cluster, local = snapshot(cluster, f"s3a://{cluster.bucket}/warehouse", local_wh)
    assert len(on_cluster["descriptions"]) == 10 and {r[-1] for r in on_cluster["descriptions"]} == {"ok"}
    assert all(uri.startswith(f"s3a://{cluster.bucket}/images/") for uri in (r[4] for r in on_cluster["items"]))
    for name in lc.SNAPSHOT_COLUMNS:
        assert on_cluster[name] == local[name], name


def snapshot(cluster: lc.LocalCluster, *warehouses: str) -> list[dict]:
    """``lc.SNAPSHOT_COLUMNS`` of each warehouse, read in a subprocess (it needs the S3 connector)."""
    done = subprocess.run([sys.executable, "-m", "tests.local_cluster", *warehouses], capture_output=True,
                          text=True, cwd=REPO, env=cluster.env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return list(json.loads(done.stdout.strip().splitlines()[-1]).values())


def table_version(cluster: lc.LocalCluster, uri: str) -> int:
    """The Delta table's latest version, read from the bucket with delta-rs (no Spark)."""
    from deltalake import DeltaTable

    from udfs.io.storage import delta_location

    aws = {k: v for k, v in cluster.env.items() if k.startswith("AWS_")}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in aws.items():
            patch.setenv(key, value)
        location, options = delta_location(uri)
    return DeltaTable(location, storage_options=options).version()


def start_job(cluster: lc.LocalCluster, folder: Path, *argv: str) -> subprocess.Popen:
    """``vlm4rec *argv`` in the background, its output in files (a pipe nobody reads would fill)."""
    out, err = folder / f"{argv[0]}.out", folder / f"{argv[0]}.err"
    job = subprocess.Popen([str(BIN / "vlm4rec"), *argv], stdout=open(out, "w"), stderr=open(err, "w"),
                           cwd=REPO, env=cluster.env)
    job.out, job.err = out, err
    return job


def while_running(job: subprocess.Popen, what: str, check, timeout: float = 600):
    """Poll ``check`` until it returns something while ``job`` runs; fail if the job ends first."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.poll() is not None:
            raise AssertionError(f"the job ended (exit {job.returncode}) before {what} was seen: "
                                 f"{job.err.read_text()[-3000:]}")
        try:
            found = check()
        except Exception:  # noqa: BLE001 - a process that ended between listing and inspecting
            found = None
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout:.0f} s")


def kill_while_running(job: subprocess.Popen, what: str, find) -> tuple[str, str]:
    """SIGKILL what ``find`` returns once it appears while ``job`` runs, wait for the job to end
    (killing it if the test fails first) and return its (stdout, stderr)."""
    try:
        while_running(job, what, find).kill()
        job.wait(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    return job.out.read_text(), job.err.read_text()


def test_an_executor_killed_mid_embed_is_retried_and_the_table_written_once(cluster, cluster_run, tmp_path):
    """The worker's executor JVM is SIGKILLed while its Python worker runs a task of embed (which
    encodes every input again): Spark's task retry on a new executor completes the job, with
    one commit to the table."""
    worker = next(p for p in cluster.processes if "org.apache.spark.deploy.worker.Worker" in p.args)
    table = f"s3a://{cluster.bucket}/warehouse/item_embeddings"
    before = table_version(cluster, table)
    job = start_job(cluster, tmp_path, "embed", *cluster_run["args"], "--set", "experiment.embed.reuse_vectors=false")

    def busy_executor():
        for jvm in lc.executor_jvms(worker):
            # pyspark.daemon under the executor has forked a worker: a Python task is running
            if any(c.children() for c in jvm.children() if "pyspark.daemon" in " ".join(c.cmdline())):
                return jvm
        return None

    stdout, stderr = kill_while_running(job, "an executor running a Python task", busy_executor)
    assert job.returncode == 0, stderr[-4000:]
    app = [a for a in lc.spark_apps(cluster) if a["name"] == "vlm4rec-embed"][-1]
    events = lc.spark_events(cluster_run["events"], app["id"])
    lost = [e for e in events if e["Event"] == "SparkListenerTaskEnd"
            and e["Task End Reason"]["Reason"] == "ExecutorLostFailure"]
    assert lost, "the killed executor was running no task"
    assert len({e["Executor ID"] for e in events if e["Event"] == "SparkListenerExecutorAdded"}) >= 2
    # Written once: one new version of the table, one row per item and representation.
    assert table_version(cluster, table) == before + 1
    (wh,) = snapshot(cluster, f"s3a://{cluster.bucket}/warehouse")
    keys = [(r[1], r[2]) for r in wh["item_embeddings"]]
    assert len(keys) == len(set(keys)) == 10 * 3, stdout[-2000:]


def test_a_ray_node_lost_mid_caption_still_describes_every_image_once(cluster, cluster_run, tmp_path):
    """A second worker node joins; once a caption actor runs, its node's raylet is SIGKILLed. The job
    completes on the remaining node, or fails with a message and a rerun completes; either way
    every image is described exactly once."""
    import psutil

    lc.add_ray_worker(cluster, "ray-worker-2")
    caption = ["caption", *cluster_run["args"], "--force",
               "--set", "experiment.caption.batch_size=1", "--set", "experiment.caption.num_workers=2"]
    job = start_job(cluster, tmp_path, *caption)

    def raylet_of_a_captioner():
        for actor in lc.caption_actors(cluster):
            if actor["state"] == "ALIVE" and actor.get("pid"):
                for parent in psutil.Process(actor["pid"]).parents():
                    if parent.name() == "raylet":
                        return parent
        return None

    stdout, stderr = kill_while_running(job, "a running caption actor", raylet_of_a_captioner)
    print(stderr[-3000:])
    if job.returncode != 0:
        assert "Traceback" not in stderr.strip().splitlines()[-1], stderr[-3000:]
        done = run_cli(cluster, *caption, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
    assert len(lc.alive_ray_nodes(cluster)) == 2  # the head and the node that was left
    (wh,) = snapshot(cluster, f"s3a://{cluster.bucket}/warehouse")
    images = [r[0] for r in wh["descriptions"]]
    assert len(images) == len(set(images)) == 10
    assert {r[-1] for r in wh["descriptions"]} == {"ok"}


def test_a_warehouse_without_credentials_stops_before_any_work(tmp_path):
    """An S3 server that checks requests' signatures (moto with authentication on) and a driver
    with no AWS credentials anywhere: the job exits 2 naming the URI and the credentials to set,
    before Spark starts."""
    import os

    port = lc.free_port()
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lc.wait_for("moto S3 server", lambda: lc.port_open(port), timeout=60)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                    "AWS_CONFIG_FILE": str(tmp_path / "none")})
        done = subprocess.run([str(BIN / "vlm4rec"), "ingest", "--conf", "datasets/synthetic.yaml",
                               "--set", "warehouse=s3a://private-bucket/w", "--set", f"dataset.paths.root={tmp_path}"],
                              capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    finally:
        lc.terminate_trees([server])
    assert done.returncode == 2, done.stderr[-3000:]
    assert "'s3a://private-bucket/w'" in done.stderr and "AWS_ACCESS_KEY_ID" in done.stderr
    assert "no AWS credentials" in done.stderr
    assert "Traceback" not in done.stderr and "SparkContext" not in done.stderr


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
