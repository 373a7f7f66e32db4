"""The ``fuse`` job's two costs against plain single-process torch, in one run.

    python benchmarks/bench_fuse.py --items 200000 --dims 384,1280 --train-items 1682 --epochs 3

1. Training: ``udfs.fusion_training.train_fusion`` (what the job runs on the driver: sampling,
   leave-one-out user vectors, BPR, Adam, valid Recall@20 after every epoch, best-state copies,
   deterministic kernels) against a plain loop over the same model, data, batches and epochs
   (same sampling and loss, no validation, no determinism switches). Ratio: job / plain
   (the issue's target: at most 1.10). Data: ``--train-items`` items, ``--users`` users with
   ``--history`` train items each and one valid item, drawn from category preferences.
2. Apply: the job's ``apply_in_spark`` (parts joined on the item id in Spark, ``mapInArrow``
   with the model broadcast; ``local[2]``) over ``--items`` items read from a Delta
   ``item_embeddings`` table, forced with ``count()``, against a bare batched forward
   (``apply_fusion``, 8,192 rows a batch, all threads) over the same vectors already in memory.
   Ratio: bare time / Spark time (the issue's target: at least 0.8). The Spark side is timed
   on its second run (the first starts the Python workers).

Prints a table and writes ``benchmarks/results/fuse.json`` (with the CPU model).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from udfs.fusion_models import FusionSpec, build_model
from udfs.fusion_training import (
    TrainData, TrainSettings, _histories, _user_loss, apply_fusion, model_bytes, train_fusion,
)
from machine import cpu_model  # benchmarks/machine.py (the scripts run from their folder)

RESULTS = Path(__file__).resolve().parent / "results"


def training_data(n_items: int, dims: list[int], n_users: int, history: int, seed: int = 0) -> TrainData:
    rng = np.random.default_rng(seed)
    category = rng.integers(20, size=n_items)
    parts = []
    for d in dims:
        x = np.eye(20)[category] @ rng.normal(size=(20, d)) + rng.normal(size=(n_items, d))
        parts.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    users, items = [], []
    for u in range(n_users):
        w = np.where(category == rng.integers(20), 10.0, 1.0)
        chosen = rng.choice(n_items, size=history + 1, replace=False, p=w / w.sum())
        users.extend([u] * (history + 1))
        items.extend(chosen)
    users, items = np.array(users), np.array(items)
    valid = np.zeros(len(users), bool)
    valid[history::history + 1] = True
    return TrainData(parts, users[~valid], items[~valid], users[valid], items[valid])


def plain_loop(spec: FusionSpec, data: TrainData, settings: TrainSettings) -> float:
    """The same model, sampling, loss and optimiser steps, nothing else."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    n_users = int(data.train_users.max()) + 1
    ptr, hist = _histories(data.train_users, data.train_items, n_users)
    lengths = ptr[1:] - ptr[:-1]
    eligible = np.repeat(lengths >= 2, lengths)
    ex_users, ex_items = np.repeat(np.arange(n_users), lengths)[eligible], hist[eligible]
    parts_t = [torch.from_numpy(p) for p in data.parts]
    model = build_model(spec)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    started = time.perf_counter()
    for _ in range(settings.epochs):
        order = rng.permutation(len(ex_items))
        for start in range(0, len(order), settings.batch_size):
            chosen = order[start:start + settings.batch_size]
            negatives = rng.integers(0, data.n_items, size=(len(chosen), settings.negatives))
            loss = _user_loss(model, parts_t, None, ex_users[chosen], ex_items[chosen], negatives, ptr, hist, settings)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return time.perf_counter() - started


def bench_training(args) -> dict:
    dims = [int(d) for d in args.dims.split(",")]
    data = training_data(args.train_items, dims, args.users, args.history)
    spec = FusionSpec(args.method, tuple(dims), hidden=args.hidden, out_dim=args.hidden)
    # patience = epochs: every epoch runs in both, so the work is the same
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, patience=args.epochs + 1,
                             threads=args.threads)
    rows = []
    for _ in range(args.repeats):
        plain = plain_loop(spec, data, settings)
        started = time.perf_counter()
        train_fusion(spec, data, settings)
        job = time.perf_counter() - started
        rows.append({"plain_s": plain, "job_s": job, "ratio": job / plain})
        print(f"  training run {len(rows)}: plain {plain:.2f} s, fuse {job:.2f} s", flush=True)
    return {"items": args.train_items, "users": args.users, "history": args.history, "dims": dims,
            "method": args.method, "hidden": args.hidden, "epochs": args.epochs, "batch_size": args.batch_size,
            "threads": args.threads, "runs": rows,
            "ratio_median": float(np.median([r["ratio"] for r in rows]))}


def bench_apply(args) -> dict:
    from pyspark.sql import functions as F

    from jobs import fuse as fuse_job
    from jobs import tables
    from jobs.spark_session import build_spark
    from jobs.config import load_config
    from udfs.representations import parse_representation

    dims = [int(d) for d in args.dims.split(",")]
    rng = np.random.default_rng(1)
    parts = []
    for d in dims:
        x = rng.normal(size=(args.items, d)).astype(np.float32)
        parts.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    torch.manual_seed(0)
    spec = FusionSpec(args.method, tuple(dims), hidden=args.hidden, out_dim=args.hidden)
    model = build_model(spec).eval()
    blob = model_bytes(model, spec)

    started = time.perf_counter()
    apply_fusion(model, parts, threads=args.threads)
    bare = time.perf_counter() - started

    workdir = Path(tempfile.mkdtemp(prefix="bench_fuse_"))
    try:
        config = load_config(["base.yaml"], [f"warehouse={workdir / 'wh'}", "spark.master=local[2]",
                                             "log_level=WARNING"])
        spark = build_spark(config)
        wh = str(workdir / "wh")
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Written with pyarrow, then copied into Delta by Spark: nothing of this size goes
        # through the driver's JVM.
        ids = [f"i{i:07d}" for i in range(args.items)]
        for name, matrix in zip(("title", "visual"), parts):
            table = pa.table({"dataset": ["bench"] * args.items, "item_id": ids,
                              "representation": [name] * args.items, "encoder": ["bench"] * args.items,
                              "dim": pa.array([matrix.shape[1]] * args.items, pa.int32()),
                              "vector": pa.ListArray.from_arrays(
                                  pa.array(np.arange(0, matrix.size + 1, matrix.shape[1], dtype=np.int32)),
                                  pa.array(matrix.ravel()),
                                  type=pa.list_(pa.field("element", pa.float32(), nullable=False))),
                              "source_sha256": pa.array([None] * args.items, pa.string())})
            pq.write_table(table, workdir / f"{name}.parquet", row_group_size=20_000)
            frame = spark.read.parquet(str(workdir / f"{name}.parquet"))
            # parquet reads every list element as nullable; the table's vectors hold none
            frame = frame.withColumn("vector", F.transform("vector", lambda x: F.coalesce(x, F.lit(0.0).cast("float"))))
            tables.append(spark, wh, "item_embeddings", frame)
        rep = parse_representation(f"{args.method}:title+visual")
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            applied = fuse_job.apply_in_spark(spark, wh, "bench", rep, blob, 1, args.items, 50_000)
            n = applied.count()
            timings.append(time.perf_counter() - started)
        assert n == args.items, n
        spark.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"items": args.items, "dims": dims, "method": args.method, "hidden": args.hidden,
            "bare_s": bare, "spark_first_s": timings[0], "spark_s": timings[1], "ratio": bare / timings[1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dims", default="384,1280")
    parser.add_argument("--method", default="gating", choices=["attention", "gating", "crossmodal", "smore"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--train-items", type=int, default=1682)
    parser.add_argument("--users", type=int, default=943)
    parser.add_argument("--history", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-apply", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "fuse.json"))
    args = parser.parse_args()
    result = {"machine": {"cpu": cpu_model(), "cores": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__}, "training": bench_training(args)}
    t = result["training"]
    print(f"training ({t['method']}, {t['items']} items, {t['users']} users x {t['history']}, {t['epochs']} epochs):")
    print(f"  {'run':<5} {'plain loop s':>13} {'fuse training s':>16} {'job / plain':>12}")
    for i, r in enumerate(t["runs"]):
        print(f"  {i:<5} {r['plain_s']:>13.2f} {r['job_s']:>16.2f} {r['ratio']:>12.2f}")
    if not args.skip_apply:
        result["apply"] = a = bench_apply(args)
        print(f"apply ({a['method']}, {a['items']} items, dims {a['dims']}):")
        print(f"  bare batched forward {a['bare_s']:.2f} s; Spark mapInArrow {a['spark_s']:.2f} s "
              f"(first run {a['spark_first_s']:.2f} s); bare / Spark = {a['ratio']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
