"""One slice commit of rows the driver holds: delta-rs (``jobs.tables`` on a local master) against
the Spark write it replaced, both through ``jobs.tables.replace_slice`` in the same run.

A ``recommendations`` slice of ``--rows`` rows (a run's top-K lists at ml100k: 943 users, K 100,
a dozen representations) is built as Arrow, as the driver paths of topk hold it, and committed
``--commits`` times per path, alternating, each commit to its own run id of one table per path
(the table grows as a real warehouse does). The Spark side is what the jobs did before: the
Arrow rows into a Spark frame, then the ``replaceWhere`` write. Every commit is checked by
reading its slice back. Prints medians and their ratio, writes JSON.

    python benchmarks/bench_driver_commits.py --rows 113160 --commits 6
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (the scripts run from their folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=113_160, help="rows per committed slice")
    parser.add_argument("--commits", type=int, default=6, help="timed commits per path")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args()

    import numpy as np
    import pyarrow as pa

    from jobs import tables
    from jobs.config import load_config
    from jobs.spark_session import build_spark
    from udfs.io.warehouse_reader import read_table

    work = Path(tempfile.mkdtemp(prefix="bench-driver-commits-"))
    spark = build_spark(load_config([], [f"warehouse={work}", "log_level=WARNING", "spark.master=local[2]"]),
                        app_name="bench-driver-commits")
    rng = np.random.default_rng(0)
    n = args.rows

    def ranks(run_id: str) -> pa.Table:
        return pa.table({"run_id": [run_id] * n, "user_id": (np.arange(n) % 943).astype(str),
                         "representation": ["text"] * n, "rank": (np.arange(n) % 120 + 1).astype(np.int32),
                         "item_id": (np.arange(n) % 1682).astype(str), "score": rng.random(n, dtype=np.float32),
                         "topk_id": ["bench"] * n})

    def by_spark(wh: Path, run_id: str) -> None:
        frame = spark.createDataFrame(ranks(run_id), schema=tables.SCHEMAS["recommendations"])
        tables.replace_slice(spark, wh, "recommendations", frame, {"run_id": run_id})

    def by_driver(wh: Path, run_id: str) -> None:
        tables.replace_slice(spark, wh, "recommendations", ranks(run_id), {"run_id": run_id})

    sides = {"spark": (by_spark, work / "spark"), "driver": (by_driver, work / "driver")}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for name, (commit, wh) in sides.items():  # untimed: each table created, Spark's writer warmed up
        commit(wh, "warm-up")
    for i in range(args.commits):
        for name, (commit, wh) in sides.items():
            start = time.perf_counter()
            commit(wh, f"run-{i}")
            seconds[name].append(time.perf_counter() - start)
            assert read_table(wh, "recommendations", equal={"run_id": f"run-{i}"}, columns=["rank"]).num_rows == n
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ratio = medians["spark"] / medians["driver"]
    print(f"{n:,} rows a commit, {args.commits} commits a path, alternating")
    for name in sides:
        print(f"{name:>7}: median {medians[name]:.3f} s  (all: {', '.join(f'{s:.2f}' for s in seconds[name])})")
    print(f"delta-rs commits {ratio:.1f}x faster than Spark's write")
    result = {"rows": n, "commits": args.commits, "seconds": seconds, "median_s": medians, "speedup": ratio,
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                          "load_average": os.getloadavg()}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
