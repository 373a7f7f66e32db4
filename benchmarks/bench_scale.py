"""How each stage's cost grows from 1x to 30x ml100k, on the default paths and on the
distributed path (issue 25).

    python benchmarks/bench_scale.py [--sizes 1,3,10,30] [--skewed 10,30] [--redo LABEL ...]
        [--work DIR] [--out benchmarks/results/scale.json] [--plots docs] [--master local[2]]

Each size is the README's configuration (``conf/experiments/ml100k.yaml``, ``als`` included) plus
one trained fusion (``attention``, so that ``fuse`` has work), on:

- ``Nx``: ml100k N times over, the copies ``bench_pipeline_vs_script.py --scale N`` writes (30x:
  50,460 items, 28,290 users, 3 million ratings). The copies share ml100k's distribution, so
  a second series skews it:
- ``zipfNx``: the same N copies of the items (titles, overviews, posters) with the ratings drawn
  again (``skew_ratings``): the same number of users and ratings, each user's history length and
  each item's popularity following a Zipf law (exponent 1.1 for items, history lengths from
  ml100k's minimum of 20 up to a long tail).

Per label the pipeline runs twice over one warehouse: ``default`` (every stage on its default
path; caption and embed do their work here), then ``distributed`` (``spark.driver_compute_mb=0``
and ``spark.driver.maxResultSize=32m``: every stage on its Spark path, and a catalog-sized collect
fails). In the second pass ingest rewrites the same rows and caption and embed find everything in
their caches, so their figures there are the cache-hit cost. Per stage and pass it records wall time
(the stage's ``runs`` row), the path (``computed_on_driver``, ``driver_fallback_*``), the stage's
``runs`` counts (rows in and out), the peak resident set of the Python driver and of the largest
other process (the Spark JVM, a Python or Ray worker; sampled every 0.2 s with psutil), bytes spilled
and shuffled (the Spark event log's task metrics, by task launch time), and the Delta files it
added; per table the file count after each pass. Work units per stage (``work``): images for
caption, texts and images for embed, train rows for profiles and fuse, users x candidates x
dimensions for top-k (summed over the ranked vector representations), test rows x the largest K
for evaluate, interactions for ingest.

Results go to ``--out`` (JSON, one entry per label; a label already there is skipped unless named
in ``--redo``: the whole series takes hours on 2 cores). After every label it refits
``t = a + b * work`` per stage, pass and series over the labels it has, and draws
``scale_time.png`` (time against work, log-log, one panel per stage) and ``scale_memory.png``
(peak resident sets against size) into ``--plots``. Records the CPU model, cores and the load
average around each pass: the machine must be otherwise idle for the figures to mean much.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipeline_vs_script as pvs  # noqa: E402

REPO = pvs.REPO
RESULTS = REPO / "benchmarks" / "results" / "scale.json"
# The stages with a unit of work to fit against (report's rows are in the results, not fitted).
STAGES = ("ingest", "caption", "embed", "fuse", "profiles", "topk", "evaluate")
PASSES = {
    "default": [],
    "distributed": ["spark.driver_compute_mb=0"],
}
REPRESENTATIONS = "[lvlm, title, text, visual, naive, concat, attention, 'naive:lvlm+visual', als]"


def skew_ratings(target: Path, seed: int = 25, item_exponent: float = 1.1) -> None:
    """Redraw ``target/u.data`` (a ``scale_data`` copy) with Zipf-shaped popularity and history
    lengths, keeping its number of users and ratings: user u's history length is proportional to
    ``1 / rank(u)`` (a random rank) floored at 20, items are drawn without replacement with
    probability proportional to ``1 / rank(i) ** item_exponent``; ratings keep ml100k's marginal;
    timestamps are a user's own increasing sequence."""
    rng = np.random.default_rng(seed)
    lines = (target / "u.data").read_bytes().splitlines()
    users = np.unique(np.array([int(line.split(b"\t", 1)[0]) for line in lines]))
    items = np.unique(np.array([int(line.split(b"\t")[1]) for line in lines]))
    ratings = np.array([int(line.split(b"\t")[2]) for line in lines])
    floor = 20
    weights = 1.0 / rng.permutation(np.arange(1, len(users) + 1))
    extra = len(lines) - floor * len(users)
    lengths = floor + np.floor(extra * weights / weights.sum()).astype(int)
    lengths = np.minimum(lengths, len(items))
    item_p = 1.0 / rng.permutation(np.arange(1, len(items) + 1)) ** item_exponent
    item_p /= item_p.sum()
    out = []
    for user, length in zip(users, lengths):
        chosen = rng.choice(items, size=int(length), replace=False, p=item_p)
        stamps = 880_000_000 + np.cumsum(rng.integers(1, 86_400, size=len(chosen)))
        for item, stamp in zip(chosen, stamps):
            out.append(f"{user}\t{item}\t{rng.choice(ratings)}\t{stamp}\n")
    (target / "u.data").write_text("".join(out))


def build_data(source: Path, work: Path, label: str, n_users: int | None, n_items: int | None) -> Path:
    target = work / "data" / label
    if n_users or n_items:
        subset = work / "data" / "subset"
        if not (subset / "u.data").exists():
            pvs.subset_data(source, subset, n_users, n_items)
        source = subset
    if (target / "u.data").exists() and (target / ".complete").exists():
        return target
    if target.exists():
        shutil.rmtree(target)
    factor = int(label.removeprefix("zipf").removesuffix("x"))
    pvs.scale_data(source, target, factor)
    if label.startswith("zipf"):
        skew_ratings(target)
    (target / ".complete").write_text("")
    return target


class Sampler:
    """Resident sets of the pipeline's process tree every ``interval`` seconds: the root (the
    Python driver) apart, and the largest of its descendants (JVM, Python workers, Ray)."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, float, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                driver = self.root.memory_info().rss
                largest, name = 0, ""
                for child in self.root.children(recursive=True):
                    try:
                        rss = child.memory_info().rss
                        if rss > largest:
                            largest, name = rss, child.name()
                    except psutil.Error:
                        continue
                self.samples.append((time.time(), driver / 2**20, largest / 2**20, name))
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def peaks(self, start: float, end: float) -> dict:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside:
            return {"driver_rss_mb": None, "worker_rss_mb": None, "worker": None}
        worker = max(inside, key=lambda s: s[2])
        return {"driver_rss_mb": round(max(s[1] for s in inside), 1), "worker_rss_mb": round(worker[2], 1),
                "worker": worker[3]}


def event_metrics(events: Path) -> list[dict]:
    """Per finished task: launch time (s) and bytes spilled (memory, disk) and shuffled (written,
    read), from the Spark event logs under ``events``."""
    tasks = []
    for log in sorted(events.rglob("*")):
        if not log.is_file() or log.name.startswith((".", "appstatus")):
            continue
        with open(log) as lines:
            for line in lines:
                if '"SparkListenerTaskEnd"' not in line:
                    continue
                event = json.loads(line)
                metrics = event.get("Task Metrics") or {}
                write = metrics.get("Shuffle Write Metrics") or {}
                read = metrics.get("Shuffle Read Metrics") or {}
                tasks.append({
                    "at": event["Task Info"]["Launch Time"] / 1000,
                    "spilled_memory": metrics.get("Memory Bytes Spilled", 0),
                    "spilled_disk": metrics.get("Disk Bytes Spilled", 0),
                    "shuffle_written": write.get("Shuffle Bytes Written", 0),
                    "shuffle_read": read.get("Remote Bytes Read", 0) + read.get("Local Bytes Read", 0),
                })
    return tasks


def delta_adds(warehouse: Path) -> list[tuple[float, str, int]]:
    """(commit time s, table, files added) for every commit of every table under ``warehouse``."""
    out = []
    for log in sorted(warehouse.glob("*/_delta_log")):
        for commit in sorted(log.glob("*.json")):
            at, added = None, 0
            for line in commit.read_text().splitlines():
                action = json.loads(line)
                if "commitInfo" in action:
                    at = action["commitInfo"].get("timestamp", 0) / 1000
                added += "add" in action
            out.append((at or commit.stat().st_mtime, log.parent.name, added))
    return out


def table_files(warehouse: Path) -> dict[str, int]:
    from deltalake import DeltaTable

    return {log.parent.name: len(DeltaTable(str(log.parent)).file_uris())
            for log in sorted(warehouse.glob("*/_delta_log"))}


def stage_rows(warehouse: Path, since: float) -> dict[str, dict]:
    """Each stage's ``runs`` row of the pipeline run that started after ``since``."""
    runs = pvs.read_delta(warehouse / "runs")
    rows = {}
    for _, row in runs.sort_values("started_at").iterrows():
        started = row["started_at"].timestamp()
        if started < since - 1 or row["job"] == "pipeline":
            continue
        rows[row["job"]] = {"started": started, "finished": row["finished_at"].timestamp(),
                            "status": row["status"], "counts": dict(row["counts"] or [])}
    return rows


def work_units(warehouse: Path, ks: int) -> dict[str, float]:
    """The unit of work per stage, read from the tables the run wrote (see the module text)."""
    items = pvs.read_delta(warehouse / "items")
    inter = pvs.read_delta(warehouse / "interactions")
    train = int((inter["split"] == "train").sum())
    test = int((inter["split"] == "test").sum())
    texts = sum(int(items[c].fillna("").astype(str).str.strip().ne("").sum())
                for c in ("title", "text") if c in items)
    images = int(items["image_sha256"].notna().sum()) if "image_sha256" in items else len(items)
    dims = pvs.read_delta(warehouse / "item_embeddings").groupby("representation")["dim"].first()
    candidates = pvs.read_delta(warehouse / "candidates")
    # Both passes rank the same candidates: one run's are the work of either.
    candidates = candidates[candidates["run_id"] == candidates["run_id"].iloc[0]]
    per_representation = candidates.groupby("representation").size()
    scored = sum(int(n) * int(dims.get(rep, 0)) for rep, n in per_representation.items())
    users = int(inter.loc[inter["split"] == "test", "user_id"].nunique())
    return {"caption": images, "embed": texts + 2 * images, "fuse": train, "profiles": train,
            "topk": float(users) * scored, "evaluate": test * ks, "ingest": len(inter)}


def run_pass(data: Path, warehouse: Path, events: Path, sets: list[str], master: str) -> dict:
    events.mkdir(parents=True, exist_ok=True)
    # Plain JSON lines, one file per application: Spark 4 compresses (zstd) and rolls its event logs
    # into a folder per application by default.
    extra = {"spark.eventLog.enabled": "true", "spark.eventLog.dir": events.as_uri(),
             "spark.eventLog.compress": "false", "spark.eventLog.rolling.enabled": "false"}
    if "spark.driver_compute_mb=0" in sets:
        extra["spark.driver.maxResultSize"] = "32m"
    sets = [f"warehouse={warehouse}", f"dataset.paths.root={data}", f"spark.master={master}",
            f"experiment.representations={REPRESENTATIONS}", f"spark.extra={json.dumps(extra)}", *sets]
    command = [sys.executable, "-m", "jobs.cli", "pipeline", "--conf", pvs.CONF,
               *[a for s in sets for a in ("--set", s)]]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    load = os.getloadavg()
    start = time.time()
    log = warehouse.parent / f"{events.name}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        with Sampler(process.pid) as sampler:
            code = process.wait()
    end = time.time()
    if code:
        raise SystemExit(f"pipeline exited {code}; log: {log}")
    stages = stage_rows(warehouse, start)
    tasks = event_metrics(events)
    adds = delta_adds(warehouse)
    for row in stages.values():
        inside = [t for t in tasks if row["started"] <= t["at"] <= row["finished"]]
        row.update(sampler.peaks(row["started"], row["finished"]))
        row["wall_s"] = round(row["finished"] - row["started"], 2)
        row["on_driver"] = bool(row["counts"].get("computed_on_driver"))
        row["fallbacks"] = sorted(k for k in row["counts"] if k.startswith("driver_fallback_"))
        for key in ("spilled_memory", "spilled_disk", "shuffle_written", "shuffle_read"):
            row[key] = int(sum(t[key] for t in inside))
        row["delta_files_added"] = int(sum(n for at, _, n in adds if row["started"] <= at <= row["finished"] + 1))
    return {"wall_s": round(end - start, 1), "load_before": load, "load_after": os.getloadavg(),
            "stages": stages, "table_files": table_files(warehouse), **sampler.peaks(start, end)}


def fit(results: dict) -> dict:
    """``t = a + b * work`` per series (scaled, zipf), pass and stage, by least squares, and the
    per-unit cost ``t / work`` at each label."""
    fits = {}
    for series in ("scaled", "zipf"):
        labels = sorted((label for label in results if label.startswith("zipf") == (series == "zipf")),
                        key=lambda label: int(label.removeprefix("zipf").removesuffix("x")))
        for name in PASSES:
            for stage in STAGES:
                points = [(results[label]["work"].get(stage), results[label][name]["stages"][stage]["wall_s"], label)
                          for label in labels
                          if name in results[label] and stage in results[label][name]["stages"]]
                points = [p for p in points if p[0]]
                if not points:
                    continue
                entry = {"per_unit": {label: t / w for w, t, label in points}}
                if len(points) >= 2:
                    b, a = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
                    entry.update(a=float(a), b=float(b))
                fits.setdefault(series, {}).setdefault(name, {})[stage] = entry
    return fits


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(2, 4, figsize=(16, 7))
    axes.ravel()[-1].axis("off")
    for axis, stage in zip(axes.ravel(), STAGES):
        for name, marker in (("default", "o"), ("distributed", "s")):
            for series, style in (("scaled", "-"), ("zipf", "--")):
                points = sorted((r["work"][stage], r[name]["stages"][stage]["wall_s"])
                                for label, r in results.items()
                                if label.startswith("zipf") == (series == "zipf") and name in r
                                and stage in r[name]["stages"] and r["work"].get(stage))
                if points:
                    axis.loglog(*zip(*points), style, marker=marker, label=f"{name} {series}")
        axis.set_title(stage)
        axis.set_xlabel("work")
        axis.set_ylabel("s")
    axes.ravel()[0].legend(fontsize=7)
    figure.tight_layout()
    time_png = out / "scale_time.png"
    figure.savefig(time_png, dpi=90)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name in PASSES:
        for key in ("driver_rss_mb", "worker_rss_mb"):
            points = sorted((int(label.removeprefix("zipf").removesuffix("x")), r[name][key])
                            for label, r in results.items() if not label.startswith("zipf") and name in r)
            if points:
                axis.plot(*zip(*points), marker="o", label=f"{name}: {key}")
    axis.set_xscale("log")
    axis.set_xlabel("size (x ml100k)")
    axis.set_ylabel("peak resident set, MiB")
    axis.legend(fontsize=8)
    figure.tight_layout()
    memory_png = out / "scale_memory.png"
    figure.savefig(memory_png, dpi=90)
    plt.close(figure)
    return [time_png, memory_png]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ml100k", type=Path, default=REPO.parent / "shared" / "data" / "ml100k")
    parser.add_argument("--sizes", default="1,3,10,30", help="scaled copies of ml100k (comma-separated)")
    parser.add_argument("--skewed", default="10,30", help="Zipf-skewed series sizes ('' for none)")
    parser.add_argument("--redo", nargs="*", default=[], metavar="LABEL", help="rerun these labels (e.g. 3x zipf10x)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlm4rec-scale"),
                        help="data copies and warehouses (kept: tens of GB at 30x)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--n-users", type=int, default=None, help="only users 1..N (quick checks; default all)")
    parser.add_argument("--n-items", type=int, default=None, help="only items 1..N (quick checks; default all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plots", type=Path, default=REPO / "docs")
    args = parser.parse_args()

    labels = [f"{n}x" for n in args.sizes.split(",") if n] + [f"zipf{n}x" for n in args.skewed.split(",") if n]
    results = json.loads(args.out.read_text()).get("labels", {}) if args.out.exists() else {}
    for label in labels:
        if label in results and label not in args.redo:
            print(f"{label}: in {args.out}, skipped (--redo {label} to run it again)")
            continue
        data = build_data(args.ml100k, args.work, label, args.n_users, args.n_items)
        warehouse = args.work / label / "warehouse"
        if warehouse.exists():
            shutil.rmtree(warehouse.parent)
        warehouse.parent.mkdir(parents=True)
        entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for name, sets in PASSES.items():
            print(f"{label}: {name} pass ...", flush=True)
            entry[name] = run_pass(data, warehouse, args.work / label / name, sets, args.master)
            print(f"{label}: {name} {entry[name]['wall_s']} s: " + ", ".join(
                f"{s} {r['wall_s']} s{' (driver)' if r['on_driver'] else ''}" for s, r in entry[name]["stages"].items()),
                flush=True)
        entry["work"] = work_units(warehouse, ks=20)
        results[label] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "cpu": pvs.cpu_model(), "cores": os.cpu_count(), "master": args.master,
            "labels": results, "fits": fit(results)}, indent=1, default=str))
        print(f"{label}: written to {args.out}; plots {[str(p) for p in plot(results, args.plots)]}", flush=True)


if __name__ == "__main__":
    main()
