"""Text embedding inside Spark (the ``embed`` job's ``mapInPandas`` path) against
``SentenceTransformer.encode`` in one process, on the same texts, in the same run.

The Spark side runs ``udfs.encode.embedding_udfs.text_vector_batches`` (one model per Python worker, torch
threads = ``spark.task.cpus``) into Spark's ``noop`` sink, so it pays for the shuffle, Arrow
transfers and Python workers but not for a Delta commit. The plain side is one process with
the model already loaded, torch on every core. "cold" includes starting the Python workers and
loading the model in them; "warm" reuses them (Spark keeps its Python workers between tasks).

Overhead = (t_spark - t_plain) / t_plain; target: under 25% warm.

    python benchmarks/bench_embed.py --texts 5000 --source synthetic
    python benchmarks/bench_embed.py --source ml100k   # real plot overviews (longer texts)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
ML100K_ITEMS = REPO.parent / "shared" / "data" / "ml100k" / "items_tmdb.csv"
TARGET_OVERHEAD = 0.25


def synthetic_texts(n: int) -> list[str]:
    from udfs.synth import make_items

    return [f"{item.title}. {item.description}" for item in make_items(seed=0, n_items=n)]


def ml100k_texts(n: int) -> list[str]:
    if not ML100K_ITEMS.exists():
        raise SystemExit(f"--source ml100k needs {ML100K_ITEMS}: use --source synthetic")
    overviews = pd.read_csv(ML100K_ITEMS)["overview"].dropna().astype(str).tolist()
    # Repeated to n texts: throughput does not depend on whether a text was seen before.
    return [overviews[i % len(overviews)] for i in range(n)]


def machine() -> dict[str, object]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": model, "cores": affinity, "platform": platform.platform(),
            "python": platform.python_version(), "load_average_1m": os.getloadavg()[0]}


def versions() -> dict[str, str]:
    out = {}
    for package in ("pyspark", "torch", "sentence-transformers", "transformers", "pyarrow", "delta-spark"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=5000)
    parser.add_argument("--source", choices=("synthetic", "ml100k"), default="synthetic")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "embed.json")
    args = parser.parse_args()

    import torch

    from jobs.config import load_config
    from jobs.embed import task_threads
    from jobs.spark_session import build_spark
    from udfs.encode.embedding_udfs import text_vector_batches
    from udfs.encode.text_encoder import load_text_encoder

    texts = synthetic_texts(args.texts) if args.source == "synthetic" else ml100k_texts(args.texts)
    model = load_text_encoder(args.model)
    tokens = [len(ids) for ids in model.tokenizer(texts, truncation=True,
                                                  max_length=model.max_seq_length)["input_ids"]]

    def plain() -> np.ndarray:
        return model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)

    expected = plain()  # also warms torch's kernels, as the Spark workers' first batch does

    config = load_config(None, [f"spark.master={args.master}", "spark.shuffle_partitions=2",
                                "spark.driver_memory=2g", "log_level=WARNING"])
    spark = build_spark(config, app_name="vlm4rec-bench-embed")
    threads = task_threads(spark)
    partitions = spark.sparkContext.defaultParallelism
    frame = pd.DataFrame({"representation": "text", "item_id": [f"t{i}" for i in range(len(texts))],
                          "text": texts})
    rows = spark.createDataFrame(frame).persist()
    rows.count()

    def encode_texts_in_spark(frame):
        return frame.repartition(partitions).mapInPandas(
            text_vector_batches(args.model, args.batch_size, threads),
            "representation string, item_id string, vector array<float>, status string")

    def in_spark() -> None:
        (encode_texts_in_spark(rows)
         .write.format("noop").mode("overwrite").save())

    cold = timed(in_spark)
    # Interleaved, so that a change in the machine's load hits both sides alike.
    plain_times, warm_times = [], []
    for _ in range(args.repeats):
        plain_times.append(timed(plain))
        warm_times.append(timed(in_spark))
    got = (encode_texts_in_spark(rows)
           .select("item_id", "vector").toPandas())
    order = got["item_id"].str[1:].astype(int).to_numpy()
    vectors = np.zeros_like(expected)
    vectors[order] = np.stack(got["vector"].to_numpy())
    max_abs_diff = float(np.abs(vectors - expected).max())
    spark.stop()

    t_plain, t_warm = min(plain_times), min(warm_times)
    result = {
        "benchmark": "embed", "source": args.source, "texts": len(texts), "model": args.model,
        "batch_size": args.batch_size, "mean_tokens": float(np.mean(tokens)),
        "spark_master": args.master, "spark_partitions": partitions, "torch_threads_per_task": threads,
        "plain_torch_threads": torch.get_num_threads(),
        "plain_s": t_plain, "spark_cold_s": cold, "spark_warm_s": t_warm,
        "plain_texts_per_s": len(texts) / t_plain, "spark_cold_texts_per_s": len(texts) / cold,
        "spark_warm_texts_per_s": len(texts) / t_warm,
        "overhead_warm": (t_warm - t_plain) / t_plain, "overhead_cold": (cold - t_plain) / t_plain,
        "target_overhead": TARGET_OVERHEAD,
        "target_met_warm": (t_warm - t_plain) / t_plain < TARGET_OVERHEAD,
        "max_abs_diff_vs_plain": max_abs_diff,
        "all_times_s": {"plain": plain_times, "spark_warm": warm_times},
        "machine": machine(), "versions": versions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    m = result["machine"]
    print(f"machine: {m['cpu_model']}, {m['cores']} cores, load {m['load_average_1m']:.1f}; "
          f"{len(texts)} {args.source} texts, mean {result['mean_tokens']:.0f} tokens, {args.model}")
    print(f"{'path':<28} {'seconds':>8} {'texts/s':>9} {'overhead':>9}")
    print(f"{'SentenceTransformer.encode':<28} {t_plain:8.2f} {len(texts) / t_plain:9.1f} {'-':>9}")
    print(f"{'Spark ' + args.master + ' cold':<28} {cold:8.2f} {len(texts) / cold:9.1f} "
          f"{result['overhead_cold']:9.1%}")
    print(f"{'Spark ' + args.master + ' warm':<28} {t_warm:8.2f} {len(texts) / t_warm:9.1f} "
          f"{result['overhead_warm']:9.1%}")
    print(f"target: warm overhead < {TARGET_OVERHEAD:.0%}: {'met' if result['target_met_warm'] else 'NOT met'}; "
          f"max |spark - plain| = {max_abs_diff:.2e}; written {args.out}")


if __name__ == "__main__":
    main()
