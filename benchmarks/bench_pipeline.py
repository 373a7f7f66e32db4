"""Wall time per stage of the whole ``pipeline`` on MovieLens-100k with the CPU ``tags`` engine.

    python benchmarks/bench_pipeline.py [--ml100k ../shared/data/ml100k] [--master local[2]] [--rerun]

Runs ``vlm4rec pipeline --conf experiments/ml100k.yaml`` in a fresh temporary warehouse (so
nothing is cached: every poster is described, every vector encoded), in one process with
the Spark start timed apart, then reads the stage timings the pipeline keeps in its ``runs``
row (``ms_<stage>``) and the rows each table holds. The issue names no baseline for this
figure: it is the per-stage breakdown of one full run. ``--rerun`` runs it a second time on
the same warehouse, as a user changing an evaluation setting does: captions and vectors come
from the caches. Prints a table, writes
``benchmarks/results/pipeline.json`` with the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ml100k", type=Path, default=REPO.parent / "shared" / "data" / "ml100k")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pipeline.json")
    parser.add_argument("--rerun", action="store_true",
                        help="run the pipeline a second time on the same warehouse and time that too")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pyspark.sql import functions as F

    from jobs import pipeline, tables
    from jobs.config import load_config
    from jobs.spark_session import build_spark
    from jobs.pipeline import STAGES

    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    overrides = [f"warehouse={root / 'warehouse'}", f"spark.master={args.master}",
                 f"dataset.paths.root={args.ml100k.resolve()}", "log_level=WARNING"]
    load_before = os.getloadavg()
    start = time.perf_counter()
    spark = build_spark(load_config(["experiments/ml100k.yaml"], overrides), app_name="bench-pipeline")
    spark.range(1).count()
    startup_s = time.perf_counter() - start
    runs = []
    try:
        for _ in range(2 if args.rerun else 1):
            out = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stdout(out):
                code = pipeline.main(["--conf", "experiments/ml100k.yaml",
                                      *[a for o in overrides for a in ("--set", o)]])
            total_s = time.perf_counter() - start
            if code != 0:
                raise SystemExit(f"pipeline exited {code}:\n{out.getvalue()[-3000:]}")
            row = (tables.read(spark, root / "warehouse", "runs").filter(F.col("job") == "pipeline")
                   .orderBy(F.desc("started_at")).first())
            runs.append((total_s, dict(row["counts"])))
    finally:
        spark.stop()
        shutil.rmtree(root, ignore_errors=True)

    total_s, counts = runs[0]
    stages = {stage: counts[f"ms_{stage}"] / 1000 for stage in STAGES if f"ms_{stage}" in counts}
    result = {
        "benchmark": "pipeline",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "spark_master": args.master,
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "config": "experiments/ml100k.yaml (tags engine; lvlm, title, text, visual, naive, concat, "
                  "naive:lvlm+visual; popularity and random baselines)",
        "spark_startup_s": startup_s, "pipeline_s": total_s, "stage_s": stages,
        "rows": {k[len("rows_"):]: v for k, v in counts.items() if k.startswith("rows_")},
    }
    print(f"machine: {result['machine']}")
    print(f"{'stage':<12}{'seconds':>10}")
    for stage, seconds in stages.items():
        print(f"{stage:<12}{seconds:>10.1f}")
    print(f"{'total':<12}{total_s:>10.1f}   (Spark start-up with Delta, apart: {startup_s:.1f} s)")
    if args.rerun:
        rerun_s, rerun_counts = runs[1]
        result["rerun"] = {"pipeline_s": rerun_s, "stage_s": {
            stage: rerun_counts[f"ms_{stage}"] / 1000 for stage in STAGES if f"ms_{stage}" in rerun_counts}}
        print("the same pipeline again on the same warehouse (descriptions and vectors reused):")
        for stage, seconds in result["rerun"]["stage_s"].items():
            print(f"{stage:<12}{seconds:>10.1f}")
        print(f"{'total':<12}{rerun_s:>10.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
