"""The ``als`` reference's training on MovieLens-100k: Spark ML's ALS (what ``profiles`` runs)
against a plain single-process numpy implicit ALS of the same model, in one run.

    python benchmarks/bench_als.py --warehouse WH [--ml100k ../shared/data/ml100k]

Reads the train split of ``ml100k`` from the warehouse (ingesting it first when the warehouse
has none), then times ``udfs.spark.als.train_als`` with ``experiment.profiles.als``'s defaults
(rank 64, 10 iterations, regParam 0.1, alpha 1; Spark ``local[2]``, each run until the factors
are collected) and the baseline: the same normal equations solved per user and per item with
numpy (confidence 1 + alpha * count, the regularisation scaled by each row's count as Spark's
ALS does). Also reports each model's NDCG@10 on the VALID split (train and seen items excluded)
so the two are seen to fit the same kind of model. Prints a table and writes
``benchmarks/results/als.json`` with the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def numpy_als(pairs: pd.DataFrame, rank: int, reg: float, alpha: float, iterations: int, seed: int):
    """Implicit ALS (Hu, Koren & Volinsky 2008) with Spark's per-row regularisation scaling."""
    users, u_idx = np.unique(pairs["user_id"], return_inverse=True)
    items, i_idx = np.unique(pairs["item_id"], return_inverse=True)
    counts = pairs["strength"].to_numpy(np.float64)
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.01, (len(users), rank))
    y = rng.normal(0, 0.01, (len(items), rank))

    def solve(fixed, rows, cols, n_rows):
        gram = fixed.T @ fixed
        order = np.argsort(rows, kind="stable")
        starts = np.searchsorted(rows[order], np.arange(n_rows + 1))
        out = np.zeros((n_rows, rank))
        for r in range(n_rows):
            sel = order[starts[r]:starts[r + 1]]
            if not len(sel):
                continue
            f = fixed[cols[sel]]
            c = 1 + alpha * counts[sel]
            a = gram + (f.T * (c - 1)) @ f + reg * len(sel) * np.eye(rank)
            out[r] = np.linalg.solve(a, f.T @ c)
        return out

    for _ in range(iterations):
        x = solve(y, u_idx, i_idx, len(users))
        y = solve(x, i_idx, u_idx, len(items))
    return dict(zip(users, x)), dict(zip(items, y))


def ndcg_at_10(users: dict, items: dict, train: pd.DataFrame, valid: pd.DataFrame) -> float:
    ids = np.array(sorted(items))
    matrix = np.stack([items[i] for i in ids])
    seen = train.groupby("user_id")["item_id"].apply(set).to_dict()
    target = valid.groupby("user_id")["item_id"].apply(set).to_dict()
    total, n = 0.0, 0
    for user, relevant in target.items():
        if user not in users:
            continue
        scores = matrix @ users[user]
        scores[np.isin(ids, list(seen.get(user, ())))] = -np.inf
        top = ids[np.argsort(-scores, kind="stable")[:10]]
        gains = sum(1 / np.log2(r + 2) for r, i in enumerate(top) if i in relevant)
        ideal = sum(1 / np.log2(r + 2) for r in range(min(10, len(relevant))))
        total, n = total + gains / ideal, n + 1
    return total / max(n, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", required=True)
    parser.add_argument("--ml100k", default=str(ROOT.parent / "shared" / "data" / "ml100k"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "als.json"))
    args = parser.parse_args()

    from pyspark.sql import functions as F

    from jobs import ingest, tables
    from jobs.config import load_config
    from jobs.spark_session import build_spark
    from udfs.spark.als import AlsSettings, train_als

    overrides = [f"warehouse={args.warehouse}", f"dataset.paths.root={args.ml100k}", "spark.master=local[2]",
                 "spark.shuffle_partitions=2", "log_level=WARNING"]
    config = load_config(["experiments/ml100k.yaml"], overrides)
    spark = build_spark(config, app_name="bench-als")
    if not (Path(args.warehouse) / "interactions").exists():
        ingest.main(["--conf", "experiments/ml100k.yaml", *[a for o in overrides for a in ("--set", o)]])
    interactions = (tables.read(spark, args.warehouse, "interactions").filter(F.col("dataset") == "ml100k")
                    .select("user_id", "item_id", "split").toPandas())
    train = interactions[interactions["split"] == "train"]
    valid = interactions[interactions["split"] == "valid"]
    als = config.experiment.profiles.als
    settings = AlsSettings(als.rank, als.reg_param, als.alpha, als.max_iter, als.seed)

    frame = spark.createDataFrame(train[["user_id", "item_id"]]).cache()
    frame.count()
    start = time.perf_counter()
    users, items = train_als(frame, settings)
    spark_users = {r.user_id: np.asarray(r.vector) for r in users.collect()}
    spark_items = {r.item_id: np.asarray(r.vector) for r in items.collect()}
    spark_s = time.perf_counter() - start

    pairs = train.groupby(["user_id", "item_id"]).size().rename("strength").reset_index()
    start = time.perf_counter()
    np_users, np_items = numpy_als(pairs, als.rank, als.reg_param, als.alpha, als.max_iter, als.seed)
    numpy_s = time.perf_counter() - start

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "")
    result = {
        "train_rows": len(train), "users": len(spark_users), "items": len(spark_items), "settings": vars(als),
        "spark_als_s": round(spark_s, 2), "numpy_als_s": round(numpy_s, 2), "spark_over_numpy": round(spark_s / numpy_s, 2),
        "valid_ndcg10_spark": round(ndcg_at_10(spark_users, spark_items, train, valid), 4),
        "valid_ndcg10_numpy": round(ndcg_at_10(np_users, np_items, train, valid), 4),
        "machine": {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()},
        "load_average_at_end": os.getloadavg(),
    }
    print(f"{'implementation':<28} {'seconds':>8} {'valid NDCG@10':>14}")
    print(f"{'Spark ML ALS (local[2])':<28} {spark_s:>8.1f} {result['valid_ndcg10_spark']:>14.4f}")
    print(f"{'numpy implicit ALS':<28} {numpy_s:>8.1f} {result['valid_ndcg10_numpy']:>14.4f}")
    print(f"Spark / numpy: {spark_s / numpy_s:.2f}x; {len(train):,} train rows, rank {als.rank}, "
          f"{als.max_iter} iterations; load average {os.getloadavg()[0]:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    spark.stop()


if __name__ == "__main__":
    main()
