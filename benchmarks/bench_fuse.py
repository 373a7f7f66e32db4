"""The ``fuse`` job's two costs against plain single-process torch, in one run.

    python benchmarks/bench_fuse.py --items 200000 --dims 384,1280 --train-items 1682 --epochs 3

1. Training: ``udfs.fusion.fusion_training.train_fusion`` (what the job runs on the driver: sampling,
   leave-one-out user vectors, BPR, Adam, valid Recall@20 after every epoch, best-state copies,
   deterministic kernels) against a plain loop over the same model, data, batches and epochs
   (same sampling and loss, no validation, no determinism switches). Ratio: job / plain
   (the issue's target: at most 1.10). Data: ``--train-items`` items, ``--users`` users with
   ``--history`` train items each and one valid item, drawn from category preferences.
2. Apply, over ``--items`` items of a Delta ``item_embeddings`` table, four ways in one run:
   - ``spark``: the job's ``apply_in_spark`` (parts hash-partitioned on the item id and joined
     in Spark, ``mapInArrow`` with the model broadcast; ``local[2]``), forced with ``count()``;
     timed on its second run (the first starts the Python workers);
   - ``floor``: the same Spark read + join + ``mapInArrow``, with the same Arrow -> numpy
     conversion and an output of the same size, but no model: what any Spark job moving these
     vectors pays on this machine;
   - ``bare``: a batched forward (``apply_fusion``, 8,192 rows a batch, ``--threads``) over the
     same vectors already in memory as numpy;
   - ``script``: what one process would do for the same job: read the table's Parquet files
     with delta-rs + pyarrow (``udfs.io.warehouse_reader``), align the parts by item id, batched
     forward.
   Ratios: bare / spark (the issue's literal target: at least 0.8), script / spark, and
   (spark - floor) / bare: the model's share of the Spark time against the model alone.

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

from udfs.fusion.fusion_models import FusionSpec, build_model
from udfs.fusion.fusion_training import (
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


def floor_batches(out_dim: int):
    """A ``mapInArrow`` function doing what ``fusion_udfs.apply_batches`` does but the model: the
    same Arrow -> numpy conversion of every part, an output of the same shape (each row's first
    ``out_dim`` values of part 0)."""
    def run(batches):
        import pyarrow as pa

        from udfs.fusion import fusion_udfs

        for batch in batches:
            if batch.num_rows == 0:
                continue
            first = None
            for j in range(batch.num_columns - 1):
                column = batch.column(f"part_{j}")
                matrix, _ = fusion_udfs._matrix(column, len(column[0]))
                first = matrix if first is None else first
            vectors = np.ascontiguousarray(first[:, :out_dim])
            offsets = pa.array(np.arange(0, vectors.size + 1, out_dim, dtype=np.int32))
            yield pa.RecordBatch.from_arrays(
                [batch.column("item_id"), pa.ListArray.from_arrays(offsets, pa.array(vectors.ravel())),
                 pa.array(np.full(batch.num_rows, fusion_udfs.OK))], schema=fusion_udfs.OUTPUT)
    return run


def plain_script(wh: str, dataset: str, parts: list[str], model, threads: int) -> tuple[int, np.ndarray]:
    """One process, no Spark: the table's live Parquet files read with delta-rs + pyarrow, the
    parts aligned on the item id, a batched forward. Returns (items, first vector)."""
    import pyarrow.compute as pc

    from udfs.io import warehouse_reader

    table = warehouse_reader.read_table(wh, "item_embeddings", equal={"dataset": dataset},
                                        within={"representation": parts},
                                        columns=["item_id", "representation", "vector"])
    by_part = [table.filter(pc.equal(table["representation"], part)) for part in parts]
    common = None
    for t in by_part:
        ids = t["item_id"].to_numpy(zero_copy_only=False)
        common = ids if common is None else np.intersect1d(common, ids)
    common = np.sort(common)
    matrices = []
    for t in by_part:
        position = pc.index_in(pa_array(common), value_set=t["item_id"].combine_chunks())
        vectors = t["vector"].combine_chunks().take(position)
        dim = len(vectors[0])
        matrices.append(vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim))
    out = apply_fusion(model, matrices, threads=threads)
    return len(common), out[0]


def pa_array(values):
    import pyarrow as pa

    return pa.array(values, pa.string())


def exchanges(frame) -> int:
    """The shuffle exchanges in ``frame``'s physical plan."""
    plan = frame._jdf.queryExecution().executedPlan().toString()
    return sum(line.strip().lstrip("+- :").startswith("Exchange") for line in plan.splitlines())


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
        names = ("title", "visual")
        for name, matrix in zip(names, parts):
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
        rep = parse_representation(f"{args.method}:{'+'.join(names)}")
        threads = fuse_job.task_threads(spark)
        timings, floors = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            applied = fuse_job.apply_in_spark(spark, wh, "bench", rep, blob, threads, args.items, 50_000)
            n = applied.count()
            timings.append(time.perf_counter() - started)
            assert n == args.items, n
            started = time.perf_counter()
            floor = fuse_job.joined_parts(spark, wh, "bench", rep, args.items, 50_000).mapInArrow(
                floor_batches(args.hidden), fuse_job.APPLIED_SCHEMA)
            assert floor.count() == args.items
            floors.append(time.perf_counter() - started)
            print(f"  apply run {len(timings)}: spark {timings[-1]:.2f} s, floor {floors[-1]:.2f} s", flush=True)
        n_exchanges = exchanges(applied)
        spark.stop()
        started = time.perf_counter()
        n_script, first = plain_script(wh, "bench", list(names), model, args.threads)
        script = time.perf_counter() - started
        assert n_script == args.items
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    spark_s, floor_s = min(timings[1:] or timings), min(floors[1:] or floors)
    return {"items": args.items, "dims": dims, "method": args.method, "hidden": args.hidden,
            "threads_bare_and_script": args.threads, "threads_per_spark_task": threads,
            "bare_s": bare, "script_s": script, "spark_first_s": timings[0], "spark_s": spark_s,
            "spark_runs_s": timings, "floor_s": floor_s, "floor_runs_s": floors, "exchanges": n_exchanges,
            "ratio": bare / spark_s, "script_over_spark": script / spark_s,
            "model_share_over_bare": (spark_s - floor_s) / bare}


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
        print(f"apply ({a['method']}, {a['items']} items, dims {a['dims']}; Spark plan: {a['exchanges']} exchanges):")
        print(f"  {'side':<46} {'seconds':>8}")
        for label, key in (("bare: batched forward, vectors in numpy", "bare_s"),
                           ("script: delta-rs/pyarrow read + align + forward", "script_s"),
                           ("spark: apply_in_spark (best after the first)", "spark_s"),
                           ("spark, first run (starts the Python workers)", "spark_first_s"),
                           ("floor: Spark read + join + mapInArrow, no model", "floor_s")):
            print(f"  {label:<46} {a[key]:>8.2f}")
        print(f"  bare / spark = {a['ratio']:.2f} (target >= 0.8); script / spark = {a['script_over_spark']:.2f}; "
              f"(spark - floor) / bare = {a['model_share_over_bare']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
