"""The caption job's overhead with the CPU ``tags`` engine: images/s through the whole Ray job
against the bare model on the same images in the same run, and the cache's speed-up.

Steps, in one process (Spark and Ray started once, as a pipeline would):
1. a CSV catalog of N real MovieLens posters (``../shared/data/ml100k/posters``) is ingested;
2. ``caption`` runs cold (first run: Ray actor start, model load, every image described);
3. ``caption`` runs again: every image is cached (the cache ratio is its time / the first's);
4. ``caption --force`` runs warm: Ray is up, every image is described again; its Ray stage time
   (``describe_ms``) gives the job's images/s;
5. baselines on the same images, same process: ``load_image`` + ``TagsEngine.describe`` (the
   engine alone) and ``load_image`` + the EfficientNet-Lite0 forward pass alone.

Ratios: job images/s / baseline images/s (target >= 0.7 once warm); rerun time / first-run
time (target < 0.1). Prints a table, writes ``benchmarks/results/caption_tags.json``.

    python benchmarks/bench_caption_tags.py --n 300
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POSTERS = REPO.parent / "shared" / "data" / "ml100k" / "posters"
RESULTS = REPO / "benchmarks" / "results" / "caption_tags.json"


def write_catalog(folder: Path, n: int) -> Path:
    """items.csv + interactions.csv over the first ``n`` posters, and a dataset YAML for them."""
    posters = sorted(POSTERS.glob("*.jpg"), key=lambda p: int(p.stem))[:n]
    if len(posters) < n:
        raise SystemExit(f"only {len(posters)} posters in {POSTERS}, asked for {n}")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.csv", "w") as f:
        f.write("item_id,title,image_path\n")
        for p in posters:
            f.write(f"m{p.stem},Movie {p.stem},{p}\n")
    with open(folder / "interactions.csv", "w") as f:
        f.write("user_id,item_id,rating,timestamp\n")
        for i, p in enumerate(posters):
            for user in range(3):
                f.write(f"u{user},m{p.stem},4,{1000 + 10 * i + user}\n")
    conf = folder / "posters.yaml"
    conf.write_text(
        "dataset:\n  name: bench_posters\n  adapter: csv\n  paths:\n    root: " + str(folder) + "\n"
        "  options:\n    items: items.csv\n    interactions: interactions.csv\n    item_id: item_id\n"
        "    user_id: user_id\n    title: title\n    image: image_path\n    rating: rating\n"
        "    timestamp: timestamp\n  split:\n    protocol: random_ratio\n"
        # The posters stay in the shared data folder, outside this catalog's root.
        "  images:\n    allow_outside_root: true\n"
    )
    return conf


def run_job(main, argv: list[str]) -> tuple[float, dict]:
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{main.__module__} {argv} exited {code}:\n{out.getvalue()}")
    return seconds, json.loads(out.getvalue().strip().splitlines()[-1])["counts"]


def baselines(paths: list[str], batch_size: int, threads: int) -> dict[str, float]:
    """images/s of load_image + the tags engine, and of load_image + the Lite0 forward pass."""
    import torch

    from udfs.caption import make_engine
    from udfs.caption.kinds import KINDS
    from udfs.encode.image_encoder import lite0_pixels, load_efficientnet_lite0
    from udfs.io.images import load_image

    torch.set_num_threads(threads)
    engine = make_engine("tags", batch_size=batch_size)
    model = load_efficientnet_lite0()
    side = KINDS["tags"].max_side

    def engine_pass():
        for start in range(0, len(paths), batch_size):
            engine.describe([load_image(p, max_side=side) for p in paths[start:start + batch_size]])

    def forward_pass():
        with torch.inference_mode():
            for start in range(0, len(paths), batch_size):
                model(lite0_pixels([load_image(p, max_side=side) for p in paths[start:start + batch_size]]))

    forward_pass()  # warm-up: first-call allocations, page cache
    rates = {}
    for name, fn in (("engine", engine_pass), ("forward", forward_pass)):
        start = time.perf_counter()
        fn()
        rates[name] = len(paths) / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="posters to caption")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs (the bare baselines use as many threads)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from jobs import caption, ingest
    from jobs.config import RayConf, load_config
    from jobs.ray_session import init_kwargs
    from jobs.spark_session import build_spark

    work = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    conf = write_catalog(work / "data", args.n)
    common = ["--conf", str(conf), "--set", f"warehouse={work / 'wh'}", "--set", "log_level=WARNING",
              "--set", f"spark.master=local[{args.cpus}]", "--set", f"experiment.caption.batch_size={args.batch_size}"]
    build_spark(load_config(None, [f"spark.master=local[{args.cpus}]", "spark.shuffle_partitions=2",
                                   "log_level=WARNING"]), app_name="bench-caption")
    # The job's own ray.init arguments (worker_env included), with this benchmark's sizes.
    ray.init(**init_kwargs(RayConf(num_cpus=args.cpus, object_store_memory_mb=300)))
    load_before = os.getloadavg()
    _, ingested = run_job(ingest.main, common)
    first_s, first = run_job(caption.main, common)
    rerun_s, rerun = run_job(caption.main, common)
    forced_s, forced = run_job(caption.main, common + ["--force"])
    ray.shutdown()
    paths = [line.split(",")[2].strip() for line in (work / "data" / "items.csv").read_text().splitlines()[1:]]
    bare = baselines(paths, args.batch_size, args.cpus)

    images = forced["to_describe"]
    job_rate = images / (forced["describe_ms"] / 1000)
    job_rate_whole = images / forced_s
    result = {
        "benchmark": "caption_tags",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus_visible": os.cpu_count(), "ray_cpus": args.cpus,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "n_images": images, "batch_size": args.batch_size, "items_ingested": ingested["items"],
        "first_run": {"seconds": round(first_s, 2), "describe_seconds": first["describe_ms"] / 1000,
                      "described": first["described"], "failed": first["failed"]},
        "rerun_cached": {"seconds": round(rerun_s, 2), "cached": rerun["cached"], "described": rerun["described"]},
        "forced_warm": {"seconds": round(forced_s, 2), "describe_seconds": forced["describe_ms"] / 1000,
                        "described": forced["described"]},
        "images_per_s": {"job_ray_stage_warm": round(job_rate, 2), "job_whole_warm": round(job_rate_whole, 2),
                         "bare_engine": round(bare["engine"], 2), "bare_forward": round(bare["forward"], 2)},
        "ratio_job_to_bare_forward": round(job_rate / bare["forward"], 3),
        "ratio_job_to_bare_engine": round(job_rate / bare["engine"], 3),
        "ratio_whole_job_to_bare_forward": round(job_rate_whole / bare["forward"], 3),
        "cache_ratio_rerun_to_first": round(rerun_s / first_s, 3),
        "targets": {"ratio_job_to_bare_forward": ">= 0.7", "cache_ratio_rerun_to_first": "< 0.1"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("job, Ray stage (warm, --force)", result["images_per_s"]["job_ray_stage_warm"]),
        ("job, whole (warm, --force)", result["images_per_s"]["job_whole_warm"]),
        ("bare load + tags engine", result["images_per_s"]["bare_engine"]),
        ("bare load + Lite0 forward", result["images_per_s"]["bare_forward"]),
    ]
    print(f"{'path':36} {'images/s':>9}")
    for name, rate in rows:
        print(f"{name:36} {rate:9.2f}")
    print(f"ratio job / bare forward: {result['ratio_job_to_bare_forward']} (target >= 0.7); "
          f"job / bare engine: {result['ratio_job_to_bare_engine']}")
    print(f"cache: rerun {rerun_s:.1f} s / first {first_s:.1f} s = {result['cache_ratio_rerun_to_first']} (target < 0.1)")
    print(f"machine: {result['machine']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
