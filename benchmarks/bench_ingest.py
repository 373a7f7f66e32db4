"""Ingest throughput: Spark ``ingest`` on local[2] vs a single-process pandas read + Parquet write.

Interactions are generated at 1x, 10x and 100x the size of MovieLens-100k (100k, 1M, 10M rows)
as a CSV (user_id,item_id,rating,timestamp) with a 10k-item catalog. For each size, in the same
run: the ``ingest`` job (csv adapter, temporal 8:1:1 split, Delta writes) and pandas
``read_csv`` + ``to_parquet`` of the same file, each in a fresh process whose peak resident
memory (the whole process tree: JVM and Python workers included) is sampled from /proc.
The Spark session's start-up (with Delta) is measured on its own and excluded from rows/s; the
same process then times Spark's floor on this machine (parse the CSV and write it to Delta with
no validation, deduplication or split) to show how much of the gap is the engine's own.

    python benchmarks/bench_ingest.py --sizes 100000 1000000 10000000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

SPARK_SCRIPT = r"""
import sys, time, json
t0 = time.time()
from jobs.config import load_config
from jobs.spark_session import build_spark
overrides = sys.argv[2:]
cfg = load_config(None, overrides)
spark = build_spark(cfg)
spark.range(1).count()
start = time.time() - t0
from jobs import ingest
t1 = time.time()
rc = ingest.main(["--set", "log_level=WARNING"] + [a for o in overrides for a in ("--set", o)])
job_s = time.time() - t1
# Spark's own floor on this machine: parse the same CSV and write it to Delta, nothing else
# (no validation, no dedup, no split, no shuffle).
root = [o.split("=", 1)[1] for o in overrides if o.startswith("dataset.paths.root=")][0]
t2 = time.time()
(spark.read.csv(root + "/interactions.csv", header=True,
                schema="user_id string, item_id string, rating double, timestamp long")
 .write.format("delta").mode("overwrite").save(root + "/_floor_delta"))
floor_s = time.time() - t2
print("BENCH " + json.dumps({"startup_s": start, "job_s": job_s, "floor_s": floor_s, "rc": rc}))
"""

PANDAS_SCRIPT = r"""
import sys, time, json
import pandas as pd
t = time.time()
df = pd.read_csv(sys.argv[1], dtype={"user_id": str, "item_id": str})
df.to_parquet(sys.argv[2])
print("BENCH " + json.dumps({"job_s": time.time() - t, "rows": len(df)}))
"""


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def generate(root: Path, rows: int, n_items: int = 10_000, seed: int = 0) -> None:
    """A MovieLens-like file: power-law item popularity, ~100 interactions per user."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)],
                  "title": [f"item {i}" for i in range(n_items)]}).to_csv(root / "items.csv", index=False)
    n_users = max(rows // 100, 1)
    chunk = 2_000_000
    with open(root / "interactions.csv", "w") as fh:
        fh.write("user_id,item_id,rating,timestamp\n")
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            users = rng.integers(0, n_users, n)
            items = np.minimum(rng.zipf(1.3, n) - 1, n_items - 1)
            ratings = rng.integers(1, 6, n)
            ts = 880_000_000 + start + np.arange(n)  # unique per row: no accidental duplicates
            pd.DataFrame({"u": users, "i": items, "r": ratings, "t": ts}).assign(
                u=lambda d: "u" + d.u.astype(str), i=lambda d: "i" + d.i.astype(str)
            ).to_csv(fh, header=False, index=False)


def run_measured(cmd: list[str], cwd: Path) -> tuple[dict, float]:
    """Run ``cmd``; return its BENCH json and the peak RSS (GiB) of its whole process tree."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0]
    done = threading.Event()

    def tree_rss() -> int:
        pids, total = {proc.pid}, 0
        try:
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if int(stat[1]) in pids or int(entry.name) in pids:
                        pids.add(int(entry.name))
                except OSError:
                    continue
            # Second pass: children found late (parents listed after children).
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                        if int(stat[1]) in pids:
                            pids.add(int(entry.name))
                    except OSError:
                        continue
            for pid in pids:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                except OSError:
                    continue
        except OSError:
            pass
        return total

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss())
            time.sleep(0.25)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    lines = [line for line in out.splitlines() if line.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{cmd[:3]} failed with exit code {proc.returncode}:\n{out[-2000:]}")
    return json.loads(lines[-1][6:]), peak[0] / 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="4g")
    parser.add_argument("--workdir", default="")
    args = parser.parse_args(argv)
    py = sys.executable
    results = []
    with tempfile.TemporaryDirectory(prefix="vlm4rec-bench-ingest-") as tmp:
        work = Path(args.workdir or tmp)
        for rows in args.sizes:
            data = work / f"data-{rows}"
            if not (data / "interactions.csv").exists():
                generate(data, rows)
            wh = work / f"wh-{rows}"
            overrides = [f"warehouse={wh}", f"spark.master={args.master}",
                         f"spark.driver_memory={args.driver_memory}", "spark.shuffle_partitions=8",
                         "dataset.name=bench", "dataset.adapter=csv", f"dataset.paths.root={data}",
                         "dataset.options={rating: rating, title: title}",
                         "dataset.split.protocol=temporal_ratio"]
            spark, spark_peak = run_measured([py, "-c", SPARK_SCRIPT, "x", *overrides], REPO)
            if spark["rc"] != 0:
                raise RuntimeError(f"ingest exited {spark['rc']} at {rows} rows")
            pandas, pandas_peak = run_measured([py, "-c", PANDAS_SCRIPT, str(data / "interactions.csv"),
                                                str(work / f"pandas-{rows}.parquet")], REPO)
            row = {"rows": rows, "spark_job_s": spark["job_s"], "spark_rows_per_s": rows / spark["job_s"],
                   "spark_peak_rss_gib": spark_peak, "spark_startup_s": spark["startup_s"],
                   "spark_floor_rows_per_s": rows / spark["floor_s"],
                   "pandas_s": pandas["job_s"], "pandas_rows_per_s": rows / pandas["job_s"],
                   "pandas_peak_rss_gib": pandas_peak}
            row["spark_over_pandas"] = row["spark_rows_per_s"] / row["pandas_rows_per_s"]
            results.append(row)
            print(f"{rows:>10,} rows  spark {row['spark_rows_per_s']:>10,.0f} rows/s "
                  f"(peak {spark_peak:.2f} GiB)  pandas {row['pandas_rows_per_s']:>10,.0f} rows/s "
                  f"(peak {pandas_peak:.2f} GiB)  ratio {row['spark_over_pandas']:.2f}  "
                  f"[spark start-up {spark['startup_s']:.1f} s; Spark parse+Delta-write floor "
                  f"{row['spark_floor_rows_per_s']:,.0f} rows/s]", flush=True)
    report = {"benchmark": "ingest", "machine": machine(), "master": args.master, "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
