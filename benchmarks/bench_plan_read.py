"""Reading a run's stored plan at a job's start: delta-rs (``jobs.plan.stored_plan``'s fast path)
against the Spark read it replaced, both measured in the same run on the same table.

Every job of a pipeline (caption, embed, fuse, profiles, topk, evaluate) reads the plan stored
under its ``--run-id`` before its first stage. The ``plans`` table is written here by the real
writer (``jobs.plan.store_plan``, one Delta commit per run id, as ``--runs`` pipelines would leave
it); then ``--reads`` reads of one run's plan through each path, alternating so that a busy
spell on a shared machine hits both, every read checked to return the same plan. Prints a table
and writes JSON (machine, versions, medians, ratio).

    python benchmarks/bench_plan_read.py --runs 20 --reads 15
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
    parser.add_argument("--runs", type=int, default=20, help="run ids (plans, one commit each) in the table")
    parser.add_argument("--reads", type=int, default=15, help="timed reads per path")
    parser.add_argument("--conf", default="experiments/synthetic.yaml")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/plan_read.json"))
    args = parser.parse_args()

    import deltalake
    import pyspark

    from jobs.config import load_config
    from jobs.plan import ExperimentPlan, plan_texts_with_spark, plan_texts_without_spark, store_plan
    from jobs.spark_session import build_spark

    spark = build_spark(load_config(None, ["spark.master=local[2]", "spark.shuffle_partitions=2",
                                           "log_level=WARNING"]), app_name="bench-plan-read")
    warehouse = tempfile.mkdtemp(prefix="bench-plan-read-")
    started = time.perf_counter()
    plans = {}
    for i in range(args.runs):
        plan = ExperimentPlan.resolve(load_config([args.conf], [f"experiment.topk.seed={i}"]))
        plans[f"run-{i:04d}"] = plan
        store_plan(spark, warehouse, f"run-{i:04d}", plan)
    write_s = time.perf_counter() - started
    run_id = f"run-{args.runs // 2:04d}"
    expected = [plans[run_id].to_json()]

    readers = {"spark": lambda: plan_texts_with_spark(spark, warehouse, run_id),
               "delta-rs": lambda: plan_texts_without_spark(warehouse, run_id)}
    first_ms = {}
    for name, read in readers.items():  # the first read of each: Spark's first job on this table
        t = time.perf_counter()
        assert read() == expected, name
        first_ms[name] = round((time.perf_counter() - t) * 1000, 2)
    seconds: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(args.reads):
        for name, read in readers.items():
            t = time.perf_counter()
            texts = read()
            seconds[name].append(time.perf_counter() - t)
            assert texts == expected, name
    spark.stop()

    medians = {name: statistics.median(values) * 1000 for name, values in seconds.items()}
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "pyspark": pyspark.__version__, "deltalake": deltalake.__version__},
        "runs": args.runs, "reads": args.reads, "write_plans_s": round(write_s, 2),
        "first_read_ms": first_ms,
        "median_ms": {name: round(ms, 2) for name, ms in medians.items()},
        "max_ms": {name: round(max(values) * 1000, 2) for name, values in seconds.items()},
        "spark_over_delta_rs": round(medians["spark"] / medians["delta-rs"], 1),
    }
    print(f"plan read: one run's plan from a plans table of {args.runs} commits, {args.reads} reads per path "
          f"(table written in {write_s:.1f} s)")
    print(f"{'path':<12}{'first ms':>10}{'median ms':>12}{'max ms':>10}")
    for name in readers:
        print(f"{name:<12}{first_ms[name]:>10.1f}{medians[name]:>12.1f}{result['max_ms'][name]:>10.1f}")
    print(f"Spark / delta-rs: {result['spark_over_delta_rs']}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
