"""glibc malloc tunables for the workers: page faults, system time, speed and peak memory of the
CPU models the pipeline runs (the ``tags`` caption engine, EfficientNet-Lite0 features, MiniLM),
each variant in a fresh child process started with that environment.

    python benchmarks/bench_malloc_env.py [--n 480] [--batch-size 32] [--threads 2]

Why a fresh process: glibc reads ``MALLOC_*`` tunables once, when the process starts, so they
must be in the environment of the worker before it is spawned (``spark.worker_env`` /
``ray.worker_env``); setting ``os.environ`` inside a running worker does nothing.

Variants: ``none`` (glibc's defaults: buffers above a dynamic threshold, at most 32 MiB, are
``mmap``-ed and handed back to the OS on ``free``, and the heap top is trimmed above 128 KiB, so
every batch faults its buffers in again), ``mmap_max_0`` (``MALLOC_MMAP_MAX_=0``: no ``mmap``,
all from the heap), ``mmap_max_0+trim`` (and ``MALLOC_TRIM_THRESHOLD_`` 1 GiB: the heap top is
kept), ``threshold+trim`` (a fixed ``MALLOC_MMAP_THRESHOLD_`` of 32 MiB, glibc's maximum, and the
same trim threshold: buffers above 32 MiB are still ``mmap``-ed). The baseline is ``none`` in the
same run: each row's ratio is its images/s over ``none``'s. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POSTERS = REPO.parent / "shared" / "data" / "ml100k" / "posters"
RESULTS = REPO / "benchmarks" / "results" / "malloc_env.json"
GIB = str(1 << 30)
VARIANTS: dict[str, dict[str, str]] = {
    "none": {},
    "mmap_max_0": {"MALLOC_MMAP_MAX_": "0"},
    "mmap_max_0+trim": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": GIB},
    "threshold+trim": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": GIB},
}
MALLOC_KEYS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
               "MALLOC_TOP_PAD_")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def child(n: int, batch_size: int, threads: int) -> dict:
    """Runs in the fresh process: the three models over ``n`` posters, timed and counted apart."""
    import torch

    from udfs.caption import make_engine
    from udfs.caption.kinds import KINDS
    from udfs.encode.embedding_udfs import IMAGE_MAX_SIDE
    from udfs.encode.image_encoder import encode_images
    from udfs.io.images import load_image
    from udfs.encode.text_encoder import encode_texts, load_text_encoder

    torch.set_num_threads(threads)
    paths = [str(p) for p in sorted(POSTERS.glob("*.jpg"), key=lambda p: int(p.stem))[:n]]
    engine = make_engine("tags", batch_size=batch_size)
    load_text_encoder("all-MiniLM-L6-v2")
    phases = {}

    def timed(name, fn):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = fn()
        after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
        phases[name] = {"seconds": round(seconds, 3), "per_s": round(len(paths) / seconds, 2),
                        "minor_faults": after.ru_minflt - before.ru_minflt,
                        "system_s": round(after.ru_stime - before.ru_stime, 3),
                        "user_s": round(after.ru_utime - before.ru_utime, 3)}
        return out

    captions = timed("caption_tags", lambda: [
        c.text for s in range(0, len(paths), batch_size)
        for c in engine.describe([load_image(p, max_side=KINDS["tags"].max_side) for p in paths[s:s + batch_size]])])
    timed("visual_lite0", lambda: encode_images([load_image(p, max_side=IMAGE_MAX_SIDE) for p in paths], batch_size))
    timed("text_minilm", lambda: encode_texts(captions, "all-MiniLM-L6-v2", 64))
    return {"phases": phases, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=480, help="posters per phase")
    parser.add_argument("--batch-size", type=int, default=32, help="the ml100k experiment's caption batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, among " + ",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.n, args.batch_size, args.threads)))
        return

    load_before = os.getloadavg()
    results = {}
    for name in args.variants.split(","):
        env = {k: v for k, v in os.environ.items() if k not in MALLOC_KEYS}
        env.update(VARIANTS[name], HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
        out = subprocess.run([sys.executable, __file__, "--child", "--n", str(args.n), "--batch-size",
                              str(args.batch_size), "--threads", str(args.threads)],
                             env=env, capture_output=True, text=True, cwd=REPO)
        if out.returncode:
            raise SystemExit(f"variant {name} failed:\n{out.stderr[-3000:]}")
        results[name] = {"env": VARIANTS[name], **json.loads(out.stdout.strip().splitlines()[-1])}
    result = {
        "benchmark": "malloc_env",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "n_images": args.n, "batch_size": args.batch_size, "threads": args.threads, "variants": results,
    }
    base = results.get("none")
    print(f"{'variant':<17}{'phase':<14}{'items/s':>9}{'x none':>8}{'faults':>12}{'sys s':>8}{'peak RSS MB':>13}")
    for name, r in results.items():
        for phase, p in r["phases"].items():
            ratio = p["per_s"] / base["phases"][phase]["per_s"] if base else float("nan")
            p["ratio_to_none"] = round(ratio, 3)
            print(f"{name:<17}{phase:<14}{p['per_s']:>9.1f}{ratio:>8.2f}{p['minor_faults']:>12,}"
                  f"{p['system_s']:>8.1f}{r['peak_rss_mb']:>13.0f}")
    print(f"machine: {result['machine']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
