"""The ``openai`` caption engine through Ray Data against a bare asyncio client, on the same real
server (llama.cpp's server with the tiny random LLaVA of ``tests/llama_server.py``), and the cost
of a cached rerun.

1. Throughput, for each ``max_concurrency`` in ``--concurrency`` (1, 2, 4, 8): the caption job's
   Ray Data stages (``jobs.caption.describe_with_ray``: one engine actor that reads, checks and
   sends each poster as it goes and writes the staged files; no Spark) over N real MovieLens
   posters, against a bare ``aiohttp`` client firing the very same request bodies (the files'
   own bytes, built beforehand: no file reading in the baseline) at the same server with the
   same number of requests in flight in total (one actor x ``max_concurrency``). Ratio = Ray
   images/s / bare images/s (target >= 0.9). The Ray side includes its fixed start (the Ray
   Data executor and the actor's process, about 1-3 s) and the Parquet write; ``ray.init`` is
   printed apart (the job pays it too, once). A third side measures this machine's floor for
   any client inside Ray Data: the bare client itself, run in a Ray Data actor over one block
   of the same bodies (``BareClientActor``); "floor ratio" = bare / that, and "engine/floor" =
   that / the engine's Ray side. ``--repeats`` runs of each side alternate and the best of each
   is kept, after one warm-up run that loads the workers' imports.
2. Cache: ``--cache-n`` posters (1,500) ingested, the whole ``caption`` job run against the
   server through a counting proxy (``tests/fault_proxy.py``), then again: the rerun's requests
   at the proxy (target 0) and its time / the first run's (target < 0.1).

Prints a table, writes ``benchmarks/results/caption_openai.json``.

    cd benchmarks && python bench_caption_openai.py --n 600 --max-new-tokens 8 --cache-n 1500
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from machine import cpu_model  # benchmarks/machine.py (the scripts run from their folder)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
POSTERS = REPO.parent / "shared" / "data" / "ml100k" / "posters"
RESULTS = REPO / "benchmarks" / "results" / "caption_openai.json"
PROMPT = "Describe this image."


def posters(n: int) -> list[Path]:
    found = sorted(POSTERS.glob("*.jpg"), key=lambda p: int(p.stem))[:n]
    if len(found) < n:
        raise SystemExit(f"only {len(found)} posters in {POSTERS}, asked for {n}")
    return found


def todo_table(paths: list[Path]):
    """What ``caption.plan`` hands to Ray: image_sha256, item_id, image_uri."""
    import pyarrow as pa

    from udfs.io.images import sha256_bytes

    return pa.table({"image_sha256": [sha256_bytes(p.read_bytes()) for p in paths],
                     "item_id": [f"m{p.stem}" for p in paths], "image_uri": [str(p) for p in paths]})


def spec_for(base_url: str, concurrency: int, max_new_tokens: int, batch_size: int):
    from jobs.caption import caption_spec
    from jobs.config import CaptionConf
    from udfs.caption.kinds import OpenaiOptions
    from tests.llama_server import MODEL_NAME

    return caption_spec(CaptionConf(engine="openai", model=MODEL_NAME, prompt=PROMPT, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, num_workers=1,
                                    openai=OpenaiOptions(base_url=base_url, max_concurrency=concurrency)))


def ray_run(ray, todo, spec, folder: Path) -> tuple[float, int]:
    from jobs.caption import describe_with_ray
    from udfs.io.images import ReadLimits

    start = time.perf_counter()
    summaries = describe_with_ray(ray, todo, spec, str(folder), ReadLimits())
    seconds = time.perf_counter() - start
    ok = sum(int(s["ok"]) for s in summaries)
    if ok != todo.num_rows:
        raise SystemExit(f"Ray run described {ok} of {todo.num_rows} images")
    return seconds, ok


class BareClientActor:
    """The bare client inside a Ray Data actor: the same prebuilt bodies fired by ``bare_client``
    over one block holding every image. What this costs above the bare client is Ray Data's own
    (the executor and the actor's process start, the Ray processes sharing the cores with the
    server): the floor of any client that runs through Ray Data on this machine."""

    def __init__(self, base_url: str, bodies: list, concurrency: int):
        import ray

        self.base_url, self.concurrency = base_url, concurrency
        self.bodies = ray.get(bodies[0])  # sha256 -> body, put in the object store once

    def __call__(self, batch):
        asyncio.run(bare_client(self.base_url, [self.bodies[s] for s in batch["image_sha256"]], self.concurrency))
        return batch[["image_sha256"]]


def ray_floor_run(ray, todo, bodies_ref, base_url: str, concurrency: int) -> float:
    """Seconds for ``BareClientActor`` to send every body through Ray Data."""
    import ray.data

    start = time.perf_counter()
    rows = (ray.data.from_arrow([todo])
            .map_batches(BareClientActor, fn_constructor_kwargs=dict(base_url=base_url, bodies=[bodies_ref],
                                                                     concurrency=concurrency),
                         compute=ray.data.ActorPoolStrategy(size=1), batch_size=None, batch_format="pandas",
                         num_cpus=0.25)
            .take_all())
    seconds = time.perf_counter() - start
    if len(rows) != todo.num_rows:
        raise SystemExit(f"Ray floor run answered {len(rows)} of {todo.num_rows} images")
    return seconds


def request_bodies(paths: list[Path], max_new_tokens: int) -> list[str]:
    """The engine's request bodies for these images, byte for byte what the Ray path sends
    (``file_data_url``: the posters are small JPEGs, so their own bytes)."""
    from tests.llama_server import MODEL_NAME
    from udfs.caption.openai_engine import file_data_url, request_body
    from udfs.caption.kinds import KINDS

    return [json.dumps(request_body(MODEL_NAME, PROMPT, file_data_url(p.read_bytes(), str(p), KINDS["openai"].max_side)[0],
                                    max_new_tokens, 0.0)) for p in paths]


async def bare_client(base_url: str, bodies: list[str], concurrency: int) -> float:
    """Seconds for a plain aiohttp client to get every body answered, ``concurrency`` in flight."""
    import aiohttp

    semaphore = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(headers={"Content-Type": "application/json"},
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def one(body: str) -> None:
            async with semaphore, session.post(base_url + "/v1/chat/completions", data=body) as response:
                if response.status != 200:
                    raise SystemExit(f"bare client: HTTP {response.status}: {await response.text()}")
                await response.read()

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - start


def write_catalog(folder: Path, paths: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.csv", "w") as f:
        f.write("item_id,title,image_path\n")
        for p in paths:
            f.write(f"m{p.stem},Movie {p.stem},{p}\n")
    with open(folder / "interactions.csv", "w") as f:
        f.write("user_id,item_id,rating,timestamp\n")
        for i, p in enumerate(paths):
            f.write(f"u{i % 7},m{p.stem},4,{1000 + i}\n")
    conf = folder / "posters.yaml"
    conf.write_text(
        "dataset:\n  name: bench_openai\n  adapter: csv\n  paths:\n    root: " + str(folder) + "\n"
        "  options:\n    items: items.csv\n    interactions: interactions.csv\n    item_id: item_id\n"
        "    user_id: user_id\n    title: title\n    image: image_path\n    rating: rating\n"
        "    timestamp: timestamp\n  split:\n    protocol: random_ratio\n"
        "  images:\n    allow_outside_root: true\n")
    return conf


def run_job(main, argv: list[str]) -> tuple[float, dict]:
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{main.__module__} exited {code}:\n{out.getvalue()[-3000:]}")
    return seconds, json.loads(out.getvalue().strip().splitlines()[-1])["counts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="images per throughput run")
    parser.add_argument("--cache-n", type=int, default=1500, help="images of the cache test (0: skip it)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each side per concurrency, alternating; the best of each is kept")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from tests.fault_proxy import FaultProxy
    from tests.llama_server import LlamaServer, MODEL_NAME

    work = Path(tempfile.mkdtemp(prefix="bench-openai-"))
    server = LlamaServer(work / "server", threads=args.server_threads).start()
    started = time.perf_counter()
    from jobs.config import RayConf
    from jobs.ray_session import init_kwargs

    # The job's own Ray settings (its workers' malloc tunables included), so that the Ray side
    # runs as the caption job runs it.
    ray.init(**init_kwargs(RayConf(num_cpus=os.cpu_count() or 1, object_store_memory_mb=300)), log_to_driver=False)
    ray_init_s = time.perf_counter() - started
    result: dict = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "n": args.n,
                    "max_new_tokens": args.max_new_tokens, "server_threads": args.server_threads,
                    "batch_size": args.batch_size, "repeats": args.repeats, "ray_init_s": ray_init_s,
                    "throughput": []}
    try:
        paths = posters(args.n)
        todo = todo_table(paths)
        bodies = request_bodies(paths, args.max_new_tokens)
        asyncio.run(bare_client(server.base_url, bodies[:8], 2))  # warm the server
        # Warm Ray's workers (imports) so that the first concurrency level does not pay for it.
        ray_run(ray, todo.slice(0, 8), spec_for(server.base_url, 2, args.max_new_tokens, args.batch_size),
                work / "staging-warm")
        bodies_ref = ray.put(dict(zip(todo.column("image_sha256").to_pylist(), bodies)))
        ray_floor_run(ray, todo.slice(0, 8), bodies_ref, server.base_url, 2)  # warm its worker too
        for c in args.concurrency:
            spec = spec_for(server.base_url, c, args.max_new_tokens, args.batch_size)
            ray_times, bare_times, floor_times = [], [], []
            for r in range(args.repeats):  # alternating, so that a load spike hits every side alike
                ray_times.append(ray_run(ray, todo, spec, work / f"staging-{c}-{r}")[0])
                floor_times.append(ray_floor_run(ray, todo, bodies_ref, server.base_url, c))
                bare_times.append(asyncio.run(bare_client(server.base_url, bodies, c)))
            ray_s, bare_s, floor_s = min(ray_times), min(bare_times), min(floor_times)
            row = {"max_concurrency": c, "ray_images_per_s": args.n / ray_s, "bare_images_per_s": args.n / bare_s,
                   "ratio": bare_s / ray_s, "ray_s": ray_s, "bare_s": bare_s,
                   "floor_images_per_s": args.n / floor_s, "floor_ratio": bare_s / floor_s,
                   "engine_vs_floor": floor_s / ray_s, "floor_s": floor_s,
                   "ray_s_all": ray_times, "bare_s_all": bare_times, "floor_s_all": floor_times}
            result["throughput"].append(row)
            print(f"c={c}: ray {row['ray_images_per_s']:.2f}/s, Ray Data floor {row['floor_images_per_s']:.2f}/s, "
                  f"bare {row['bare_images_per_s']:.2f}/s, ratio {row['ratio']:.2f} (floor {row['floor_ratio']:.2f})",
                  flush=True)

        if args.cache_n:
            from jobs import caption, ingest

            conf = write_catalog(work / "catalog", posters(args.cache_n))
            wh = work / "wh"
            with FaultProxy(server.base_url) as proxy:
                common = ["--conf", str(conf), "--set", f"warehouse={wh}", "--set", "log_level=WARNING",
                          "--set", "spark.master=local[2]", "--set", "spark.driver_memory=2g"]
                run_job(ingest.main, common)
                job = [*common, "--set", "experiment.caption.engine=openai",
                       "--set", f"experiment.caption.model={MODEL_NAME}", "--set", f"experiment.caption.prompt={PROMPT}",
                       "--set", f"experiment.caption.max_new_tokens={args.max_new_tokens}",
                       "--set", f"experiment.caption.batch_size={args.batch_size}",
                       "--set", f"experiment.caption.openai.base_url={proxy.base_url}",
                       "--set", "experiment.caption.openai.max_concurrency=4"]
                first_s, first = run_job(caption.main, job)
                first_requests = proxy.counts["requests"]
                second_s, second = run_job(caption.main, job)
                rerun_requests = proxy.counts["requests"] - first_requests
            stages = lambda counts: {k[3:]: v / 1000 for k, v in sorted(counts.items()) if k.startswith("ms_")}
            result["cache"] = {"images": args.cache_n, "first_s": first_s, "described": first["described"],
                               "rerun_s": second_s, "rerun_cached": second["cached"],
                               "rerun_requests": rerun_requests, "ratio": second_s / first_s,
                               "prompt_tokens": first["prompt_tokens"], "completion_tokens": first["completion_tokens"],
                               "first_stages_s": stages(first), "rerun_stages_s": stages(second)}
            for name, total in (("first", first_s), ("rerun", second_s)):
                # The job's own bookkeeping: the abandoned-runs check and the runs-table rows.
                result["cache"][f"{name}_stages_s"]["outside_stages"] = total - sum(result["cache"][f"{name}_stages_s"].values())
    finally:
        ray.shutdown()
        server.stop()

    print(f"\nmachine: {result['machine']['cpu']}, {result['machine']['cores']} cores; server: llama.cpp, "
          f"{args.server_threads} thread(s), tiny random LLaVA, {args.max_new_tokens} new tokens; "
          f"{args.n} images, best of {args.repeats} per side; ray.init {ray_init_s:.1f} s (not in the Ray times)")
    print(f"{'max_concurrency':>15} {'Ray images/s':>13} {'floor images/s':>15} {'bare images/s':>14} {'ratio':>6} "
          f"{'floor ratio':>12} {'engine/floor':>13}")
    for row in result["throughput"]:
        print(f"{row['max_concurrency']:>15} {row['ray_images_per_s']:>13.2f} {row['floor_images_per_s']:>15.2f} "
              f"{row['bare_images_per_s']:>14.2f} {row['ratio']:>6.2f} {row['floor_ratio']:>12.2f} "
              f"{row['engine_vs_floor']:>13.2f}")
    if "cache" in result:
        c = result["cache"]
        print(f"cache, {c['images']} images: first run {c['first_s']:.1f} s ({c['described']} described), "
              f"rerun {c['rerun_s']:.1f} s, {c['rerun_requests']} requests, ratio {c['ratio']:.3f}")
        for name in ("first", "rerun"):
            print(f"  {name} run stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in c[f"{name}_stages_s"].items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
