"""What a cluster costs on one machine: the synthetic pipeline's stage times in local mode against a
localhost cluster (Spark standalone master + worker, Ray head + worker node, moto S3), and the
caption stage with one Ray worker node against two.

Both pipeline runs read the same images from the same S3 server and write their warehouse to it,
so the ratio is what the cluster adds: executor JVMs, the network between driver, executors and
Ray nodes, serialisation. On one machine the second Ray node adds processes, not cores: the
caption comparison measures overhead, not scaling.

    .venv/bin/python benchmarks/bench_cluster.py [--items 40 --users 30]

Prints a table and writes benchmarks/results/cluster.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import local_cluster as lc  # noqa: E402 - the tests' own cluster, started for real
from machine import cpu_model  # benchmarks/machine.py (the scripts run from their folder)

BIN = Path(sys.executable).parent
STAGES = ("ingest", "caption", "embed", "profiles", "topk", "evaluate", "report")


def run(cluster: lc.LocalCluster, *argv: str) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "vlm4rec"), *argv], capture_output=True, text=True, cwd=REPO,
                          env=cluster.env, timeout=3600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"vlm4rec {argv[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["counts"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--users", type=int, default=30)
    args = parser.parse_args()

    import boto3
    import pandas as pd

    from udfs.synth import generate

    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    cluster = lc.LocalCluster(root, lc.base_env(root))
    try:
        lc.start_s3(cluster)
        lc.start_spark(cluster)
        lc.start_ray(cluster)
        s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                          aws_access_key_id=cluster.env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=cluster.env["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket=cluster.bucket)
        data = root / "data"
        generate(data, seed=3, n_items=args.items, n_users=args.users)
        items = pd.read_csv(data / "items.csv")
        for relative in items["image_path"]:
            s3.upload_file(str(data / relative), cluster.bucket, f"images/{relative}")
        items.assign(image_path=[f"s3a://{cluster.bucket}/images/{p}" for p in items["image_path"]]) \
            .to_csv(data / "items.csv", index=False)
        common = ["--conf", "experiments/synthetic.yaml", "--set", f"dataset.paths.root={data}",
                  "--set", "experiment.representations=[lvlm, title, visual]", "--set", "log_level=WARNING",
                  "--set", "experiment.evaluate.bootstrap_samples=100", "--set", "spark.driver_memory=1g",
                  "--set", "spark.shuffle_partitions=2"]
        on_cluster = ["--set", f"spark.master={cluster.spark_master}", "--set", f"ray.address={cluster.ray_address}",
                      "--set", "spark.extra={spark.executor.memory: 1g, spark.cores.max: '2'}"]
        local = ["--set", "spark.master=local[2]", "--set", "ray.num_cpus=2", "--set", "ray.object_store_memory_mb=100"]
        results = {}
        for name, extra, warehouse in (("local", local, "wh-local"), ("cluster", on_cluster, "wh-cluster")):
            counts, seconds = run(cluster, "pipeline", *common, *extra, "--set",
                                  f"warehouse=s3a://{cluster.bucket}/{warehouse}")
            results[name] = {"total_s": seconds, **{s: counts.get(f"ms_{s}", 0) / 1000 for s in STAGES}}

        # Caption alone, forced, on the cluster: one worker node, then a second one joined.
        caption = ["caption", *common, *on_cluster, "--force", "--set", "experiment.caption.num_workers=2",
                   "--set", f"warehouse=s3a://{cluster.bucket}/wh-cluster"]
        counts, _ = run(cluster, *caption)
        one = counts["to_describe"] / (counts["describe_ms"] / 1000)
        lc.add_ray_worker(cluster, "ray-worker-2")
        counts, _ = run(cluster, *caption)
        two = counts["to_describe"] / (counts["describe_ms"] / 1000)
    finally:
        cluster.stop()

    print(f"\nsynthetic pipeline, {args.items} items, {args.users} users; {cpu_model()}")
    print(f"{'stage':<10} {'local s':>9} {'cluster s':>10} {'cluster/local':>14}")
    for stage in (*STAGES, "total_s"):
        a, b = results["local"][stage], results["cluster"][stage]
        print(f"{stage:<10} {a:>9.1f} {b:>10.1f} {b / a if a else float('nan'):>14.2f}")
    print(f"caption images/s: one Ray worker node {one:.2f}, two nodes {two:.2f} (ratio {two / one:.2f})")
    print("All of it on one machine: the cluster/local ratios and the one-node/two-node caption ratio "
          "measure the overhead of the cluster's processes, network and serialisation, not scaling.")
    out = REPO / "benchmarks" / "results" / "cluster.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"items": args.items, "users": args.users, "cpu": cpu_model(), "stages": results,
                               "caption_images_per_s": {"one_node": one, "two_nodes": two},
                               "note": "one machine: overhead, not scaling"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
