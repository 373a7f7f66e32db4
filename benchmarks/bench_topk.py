"""The ``topk`` job (blockwise Spark join) against a Spark crossJoin + window-rank baseline and the
best single-process exact search, on synthetic vectors, plus the job's peak memory as the item
count doubles.

    python benchmarks/bench_topk.py --users 20000 --items 200000 --dim 384 --k 20

Three exact top-K computations over the same L2-normalised float32 vectors, each user's train
items excluded:
- ``topk job``: ``jobs.topk`` end to end on ``local[2]`` (Delta read, blocks, merge, Delta write), on
  its distributed path (``spark.driver_compute_mb=0``; ``--path default`` lets the job choose: these
  sizes fit on the driver), and the output says which path its ``runs`` row reports;
- ``crossJoin``: users x items as rows, a dot product per row, ``row_number`` over a window per
  user; run on ``--crossjoin-users`` users and extrapolated linearly to all users (stated);
- ``single process``: chunked float32 torch matmul + ``torch.topk`` with all cores, in this process.

The job is timed on its second run in the session (the first warms up the JVM and the
Python workers). Peak memory: the resident set of the job's processes (the JVM and the Spark
Python workers; not this benchmark's own Python, which holds the synthetic data it generated),
sampled from /proc every 50 ms while the job runs, at ``--items`` and at twice that. Prints a
table, writes JSON to ``benchmarks/results/topk.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from udfs.encode.vectors import l2_normalise


def tree_rss_bytes(root: int) -> int:
    """Resident bytes of all the descendants of ``root`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError):
            continue
    # The root (this benchmark's own Python, which built the synthetic tables) is left out: the
    # figure is the job's footprint, the JVM and its Python workers.
    total, stack = 0, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total


class PeakRss:
    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(os.getpid()))
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def synthetic(users: int, items: int, dim: int, history: int, seed: int):
    rng = np.random.default_rng(seed)
    item_vectors = l2_normalise(rng.standard_normal((items, dim), dtype=np.float32))[0]
    profiles = l2_normalise(rng.standard_normal((users, dim), dtype=np.float32))[0]
    item_ids = np.array([f"item{j:07d}" for j in range(items)])
    user_ids = np.array([f"user{j:06d}" for j in range(users)])
    seen = rng.integers(0, items, size=(users, history))
    return user_ids, profiles, item_ids, item_vectors, seen


def arrow_vectors(ids: np.ndarray, vectors: np.ndarray, extra: dict) -> pa.Table:
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]).cast(
        pa.list_(pa.float32()))
    return pa.table({**extra, "vector": column})


def write_tables(spark, warehouse: Path, data, run_id: str) -> None:
    from jobs import tables

    user_ids, profiles, item_ids, item_vectors, seen = data
    n_users, n_items = len(user_ids), len(item_ids)
    items = arrow_vectors(item_ids, item_vectors, {
        "dataset": ["bench"] * n_items, "item_id": item_ids, "representation": ["title"] * n_items,
        "encoder": ["synthetic"] * n_items, "dim": pa.array([item_vectors.shape[1]] * n_items, pa.int32())})
    items = items.append_column("source_sha256", pa.array([None] * n_items, pa.string()))
    profiles_table = arrow_vectors(user_ids, profiles, {
        "run_id": [run_id] * n_users, "user_id": user_ids, "representation": ["title"] * n_users})
    profiles_table = profiles_table.append_column("n_history", pa.array([seen.shape[1]] * n_users, pa.int32()))
    inter = pa.table({
        "dataset": ["bench"] * seen.size, "user_id": np.repeat(user_ids, seen.shape[1]),
        "item_id": item_ids[seen.ravel()], "ts": np.tile(np.arange(seen.shape[1], dtype=np.int64), n_users),
        "rating": np.ones(seen.size), "split": ["train"] * seen.size,
        "ingest_id": pa.array([None] * seen.size, pa.string())})
    for name, table in (("item_embeddings", items), ("user_profiles", profiles_table), ("interactions", inter)):
        frame = spark.createDataFrame(table.to_pandas(), schema=tables.SCHEMAS[name])
        tables.ensure(spark, warehouse, name)
        frame.write.format("delta").mode("append").save(tables.table_path(warehouse, name))


def run_topk_job(spark, warehouse: Path, run_id: str, k: int, user_block: int, item_block: int,
                 path: str = "distributed") -> tuple[float, int]:
    from jobs import topk

    # The distributed path is what this benchmark means: at 20k x 200k the inputs fit under the
    # default spark.driver_compute_mb, which would rank them on the driver instead.
    compute_mb = ["--set", "spark.driver_compute_mb=0"] if path == "distributed" else []
    argv = [*compute_mb, "--set", f"warehouse={warehouse}", "--set", "dataset.name=bench", "--set", "log_level=WARNING",
            "--set", "experiment.representations=[title]", "--set", f"experiment.evaluate.ks=[{k}]", "--baselines", "",
            "--run-id", run_id, "--k", str(k), "--user-block", str(user_block), "--item-block", str(item_block),
            "--exclude", "train"]
    with PeakRss() as peak, contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        assert topk.main(argv, spark=spark) == 0
        elapsed = time.perf_counter() - start
    return elapsed, peak.peak


def path_taken(spark, warehouse: Path) -> str:
    """``driver`` or ``distributed``: what the latest topk run's ``runs`` row says it computed on."""
    from pyspark.sql import functions as F

    row = (spark.read.format("delta").load(str(warehouse / "runs")).filter(F.col("job") == "topk")
           .orderBy(F.desc("started_at")).select("counts").first())
    return "driver" if dict(row["counts"] or {}).get("computed_on_driver") else "distributed"


def crossjoin_baseline(spark, warehouse: Path, run_id: str, k: int, n_users: int) -> float:
    """Spark SQL without blocks: users x items rows, a dot product per row, a window rank per user."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from jobs import tables

    users = (tables.read(spark, warehouse, "user_profiles").filter(F.col("run_id") == run_id)
             .orderBy("user_id").limit(n_users).select("user_id", F.col("vector").alias("u")))
    items = tables.read(spark, warehouse, "item_embeddings").select("item_id", F.col("vector").alias("v"))
    seen = (tables.read(spark, warehouse, "interactions").filter(F.col("split") == "train")
            .select("user_id", "item_id").distinct())
    scored = (users.crossJoin(items)
              .withColumn("score", F.aggregate(F.zip_with("u", "v", lambda a, b: a * b), F.lit(0.0).cast("float"),
                                               lambda acc, x: acc + x))
              .join(seen, ["user_id", "item_id"], "left_anti"))
    window = Window.partitionBy("user_id").orderBy(F.desc("score"), F.asc("item_id"))
    ranked = scored.withColumn("rank", F.row_number().over(window)).filter(F.col("rank") <= k)
    start = time.perf_counter()
    ranked.write.format("noop").mode("overwrite").save()
    return time.perf_counter() - start


def single_process(data, k: int, chunk: int = 1024) -> tuple[float, np.ndarray]:
    """Chunked float32 matmul + torch.topk over all items, seen items masked: the exact floor."""
    user_ids, profiles, item_ids, item_vectors, seen = data
    items_t = torch.from_numpy(item_vectors)
    out = np.empty((len(user_ids), k), np.int64)
    start = time.perf_counter()
    for u0 in range(0, len(user_ids), chunk):
        scores = torch.from_numpy(profiles[u0:u0 + chunk]) @ items_t.T
        rows = np.repeat(np.arange(scores.shape[0]), seen.shape[1])
        scores[rows, seen[u0:u0 + chunk].ravel()] = -np.inf
        out[u0:u0 + chunk] = torch.topk(scores, k, dim=1).indices.numpy()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--history", type=int, default=20, help="train items per user (masked)")
    parser.add_argument("--user-block", type=int, default=16384)
    parser.add_argument("--item-block", type=int, default=32768)
    parser.add_argument("--crossjoin-users", type=int, default=20,
                        help="users the crossJoin baseline runs on (extrapolated linearly to --users)")
    parser.add_argument("--skip-doubling", action="store_true", help="skip the 2x items memory run")
    parser.add_argument("--path", choices=["distributed", "default"], default="distributed",
                        help="distributed: spark.driver_compute_mb=0 (the blockwise Spark join); default: "
                             "whatever the job picks for these sizes (the driver when they fit)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/topk.json"))
    args = parser.parse_args()

    from jobs.config import load_config
    from jobs.spark_session import build_spark

    config = load_config(None, ["spark.master=local[2]", "spark.shuffle_partitions=4", "spark.driver_memory=4g",
                                "log_level=WARNING"])
    spark = build_spark(config, app_name="bench-topk")
    root = Path(tempfile.mkdtemp(prefix="bench-topk-"))
    results: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average_at_start": os.getloadavg(), "spark_master": "local[2]"},
        "versions": {"numpy": np.__version__, "torch": torch.__version__},
        "sizes_run": {"users": args.users, "items": args.items, "dim": args.dim, "k": args.k,
                      "history": args.history, "user_block": args.user_block, "item_block": args.item_block},
        "sizes_asked": {"users": 20_000, "items": 200_000, "dim": 384, "k": 20},
    }
    try:
        runs = {}
        for factor in (1,) if args.skip_doubling else (1, 2):
            data = synthetic(args.users, args.items * factor, args.dim, args.history, seed=factor)
            warehouse = root / f"warehouse-x{factor}"
            write_tables(spark, warehouse, data, "bench")
            if factor == 1:
                floor_s, floor_top = single_process(data, args.k)
                user_ids, top1 = data[0], data[2][floor_top[:, 0]]
            # The vectors leave this process before the job runs: the peak then measures the job.
            del data
            gc.collect()
            if factor == 1:
                # Warm-up: the first job in a session pays for JIT, Delta's classes and the Python workers.
                run_topk_job(spark, warehouse, "bench", args.k, args.user_block, args.item_block, args.path)
            job_s, peak = run_topk_job(spark, warehouse, "bench", args.k, args.user_block, args.item_block, args.path)
            runs[factor] = {"items": args.items * factor, "job_s": job_s, "peak_rss_mib": peak / 2**20,
                            "path": path_taken(spark, warehouse)}
            if factor == 1:
                cross_s = crossjoin_baseline(spark, warehouse, "bench", args.k, args.crossjoin_users)
                cross_full_s = cross_s * args.users / args.crossjoin_users
                recs = (spark.read.format("delta").load(str(warehouse / "recommendations"))
                        .filter("rank = 1").select("user_id", "item_id").toPandas())
                first = dict(zip(recs.user_id, recs.item_id))
                agree = np.mean([first.get(u) == t for u, t in zip(user_ids, top1)])
        base = runs[1]
        results.update({
            "topk_job_s": base["job_s"], "topk_job_users_per_s": args.users / base["job_s"],
            "single_process_s": floor_s, "single_process_users_per_s": args.users / floor_s,
            "crossjoin_s_measured": cross_s, "crossjoin_users_measured": args.crossjoin_users,
            "crossjoin_s_extrapolated": cross_full_s,
            "ratio_vs_single_process_throughput": floor_s / base["job_s"],
            "ratio_vs_crossjoin": cross_full_s / base["job_s"],
            "top1_agreement_with_single_process": float(agree),
            "memory": {f"x{f}": r for f, r in runs.items()},
        })
    finally:
        spark.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"machine: {results['machine']}")
    print(f"sizes run: {results['sizes_run']} (asked: {results['sizes_asked']})")
    print(f"{'method':<44}{'seconds':>10}{'users/s':>12}")
    print(f"{'topk job (' + results['memory']['x1']['path'] + ' path, local[2])':<44}{results['topk_job_s']:>10.1f}"
          f"{results['topk_job_users_per_s']:>12.0f}")
    print(f"{'single process (torch matmul + topk)':<44}{floor_s:>10.1f}{args.users / floor_s:>12.0f}")
    print(f"{f'crossJoin + window ({args.crossjoin_users} users, measured)':<44}{cross_s:>10.1f}"
          f"{args.crossjoin_users / cross_s:>12.1f}")
    print(f"{'crossJoin + window (extrapolated, all users)':<44}{cross_full_s:>10.1f}{args.users / cross_full_s:>12.1f}")
    print(f"throughput vs single process: {results['ratio_vs_single_process_throughput']:.2f}x (target >= 0.5x); "
          f"speed-up vs crossJoin: {results['ratio_vs_crossjoin']:.0f}x (target >= 20x)")
    print(f"top-1 agreement with the single-process search: {results['top1_agreement_with_single_process']:.3f}")
    for key, run in results["memory"].items():
        print(f"peak RSS of the JVM + Python workers, {run['items']} items: {run['peak_rss_mib']:.0f} MiB ({run['job_s']:.1f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
