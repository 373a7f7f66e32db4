"""``recommend`` serving speed: one user's top-K against N items x D after load (p50/p99 over many
calls), and batched throughput, each against the floor of one numpy matmul + argpartition of the
same shapes measured in the same run.

The warehouse is written here with delta-rs (``deltalake.write_deltalake``): ``plans``,
``candidates``, ``item_embeddings``, ``user_profiles`` and ``interactions`` for one run, random
unit vectors, every user with ``--seen`` train items. ``Recommender.load`` reads it (timed), then

- latency: ``recommend(users=[u], k)`` for ``--calls`` users in turn, against the floor
  ``argpartition(profile @ items.T, -k)`` + a sort of the k (no seen mask, no tie rule, no ids);
- throughput: ``recommend(users=batch, k)`` with ``--batch`` users per call, against the same
  floor on the (batch x N) score matrix.

Floor and ours alternate in rounds of 100 calls so that a busy spell on a shared machine hits
both. Prints a table and writes JSON (machine, versions, ratios).

Cold start (``--cold-warehouse W``, a warehouse holding a completed pipeline run): the console
script answering one user from a fresh process, ``vlm4rec recommend --set warehouse=W --user U``
(no ``--run-id``: the latest completed run is found, as a person would call it), ``--cold-runs``
times; wall time, and CPU time (user + system) from ``resource.getrusage(RUSAGE_CHILDREN)``
deltas. Its floor, alternated with it: a fresh interpreter importing only what recommend must
read with (numpy, pandas, pyarrow's dataset, deltalake). ``--cold-before-tree DIR`` (a copy of an
older commit, ``git archive REV | tar -x -C DIR``) adds that code's answer to the same request in
the same rounds, ``python -m jobs.cli recommend`` with ``PYTHONPATH=DIR`` and the run's id (older
code needs ``--run-id``). Medians and spreads.

    python benchmarks/bench_recommend.py --items 100000 --dim 384 --calls 1000 --batch 256
    python benchmarks/bench_recommend.py --cold-only --cold-warehouse /tmp/rec-ml100k --cold-runs 5 \
        --cold-before-tree /tmp/rec-base
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from machine import cpu_model  # benchmarks/machine.py (the scripts run from their folder)


def unit_rows(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def vector_column(matrix: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1]).cast(
        pa.list_(pa.float32()))


def write_warehouse(warehouse: Path, run_id: str, rep: str, items: np.ndarray, profiles: np.ndarray,
                    seen: int, k: int, rng) -> None:
    from deltalake import write_deltalake

    n_items, n_users = len(items), len(profiles)
    item_ids = [f"i{j:07d}" for j in range(n_items)]
    user_ids = [f"u{u:06d}" for u in range(n_users)]
    plan = {"dataset": "bench", "representations": [rep], "baselines": [], "exclude": ["train", "valid"],
            "k": k, "half_life_days": None, "concat_weights": []}
    write_deltalake(str(warehouse / "plans"), pa.table({"run_id": [run_id], "plan": [json.dumps(plan)],
                                                        "plan_hash": ["bench"]}))
    write_deltalake(str(warehouse / "candidates"), pa.table(
        {"run_id": [run_id] * n_items, "representation": [rep] * n_items, "item_id": item_ids}))
    write_deltalake(str(warehouse / "item_embeddings"), pa.table(
        {"dataset": ["bench"] * n_items, "item_id": item_ids, "representation": [rep] * n_items,
         "vector": vector_column(items)}), partition_by=None)
    write_deltalake(str(warehouse / "user_profiles"), pa.table(
        {"run_id": [run_id] * n_users, "user_id": user_ids, "representation": [rep] * n_users,
         "vector": vector_column(profiles)}))
    history = rng.integers(0, n_items, size=(n_users, seen))
    write_deltalake(str(warehouse / "interactions"), pa.table(
        {"dataset": ["bench"] * (n_users * seen), "user_id": np.repeat(user_ids, seen).tolist(),
         "item_id": [item_ids[j] for j in history.reshape(-1)], "ts": np.zeros(n_users * seen, np.int64),
         "split": ["train"] * (n_users * seen)}))


def floor(profiles: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    scores = profiles @ items.T
    picked = np.argpartition(scores, -k, axis=1)[:, -k:]
    order = np.argsort(-np.take_along_axis(scores, picked, axis=1), axis=1)
    return np.take_along_axis(picked, order, axis=1)


FLOOR_IMPORTS = "import numpy, pandas, pyarrow.dataset, deltalake"


def timed_child(argv: list[str], cwd: Path | None = None) -> tuple[float, float]:
    """(wall s, CPU s of user + system) of one child process run to its end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cold_start(warehouse: Path, runs: int, user: str | None, k: int, before_tree: Path | None = None) -> dict:
    """The console script answering one user from a cold process, against its floor (module doc)."""
    script = shutil.which("vlm4rec", path=str(Path(sys.executable).parent)) or shutil.which("vlm4rec")
    if script is None:
        raise SystemExit("the vlm4rec console script is not installed next to this Python: pip install -e .")
    from udfs.recommender import latest_pipeline_run
    from udfs.io.warehouse_reader import read_table

    run_id = latest_pipeline_run(warehouse).run_id
    if user is None:
        user = min(read_table(warehouse, "user_profiles", equal={"run_id": run_id},
                              columns=["user_id"]).column("user_id").to_pylist())
    ours_argv = [script, "recommend", "--set", f"warehouse={warehouse}", "--set", "log_level=WARNING",
                 "--user", user, "--k", str(k)]
    floor_argv = [sys.executable, "-c", FLOOR_IMPORTS]
    before_argv = None if before_tree is None else [
        "env", f"PYTHONPATH={before_tree}", sys.executable, "-m", "jobs.cli", "recommend", "--set",
        f"warehouse={warehouse}", "--set", "log_level=WARNING", "--run-id", run_id, "--user", user, "--k", str(k)]
    ours, floor_, before = [], [], []
    for _ in range(runs):
        floor_.append(timed_child(floor_argv))
        ours.append(timed_child(ours_argv))
        if before_argv is not None:
            # From its own folder: `-m` puts the working directory first on the path.
            before.append(timed_child(before_argv, cwd=before_tree))

    def summary(pairs: list[tuple[float, float]]) -> dict:
        wall, cpu = [w for w, _ in pairs], [c for _, c in pairs]
        return {"wall_median_s": float(np.median(wall)), "wall_min_s": min(wall), "wall_max_s": max(wall),
                "cpu_median_s": float(np.median(cpu)), "cpu_min_s": min(cpu), "cpu_max_s": max(cpu),
                "wall_s": wall, "cpu_s": cpu}

    return {"command": " ".join(ours_argv), "floor_command": f"python -c '{FLOOR_IMPORTS}'", "runs": runs,
            "user": user, "ours": summary(ours), "floor": summary(floor_),
            "before": summary(before) if before else None,
            "before_command": None if before_argv is None else " ".join(before_argv),
            "load_average_1min_at_end": os.getloadavg()[0]}


def print_cold(cold: dict) -> None:
    print(f"cold start, {cold['runs']} runs each: {cold['command']}")
    print(f"{'':<10}{'wall p50':>10}{'wall min-max':>16}{'CPU p50':>10}{'CPU min-max':>16}")
    for name in ("ours", "floor", "before"):
        row = cold[name]
        if row is None:
            continue
        print(f"{name:<10}{row['wall_median_s']:>10.2f}{row['wall_min_s']:>8.2f}-{row['wall_max_s']:<7.2f}"
              f"{row['cpu_median_s']:>10.2f}{row['cpu_min_s']:>8.2f}-{row['cpu_max_s']:<7.2f}")
    print(f"ours / floor (wall p50): {cold['ours']['wall_median_s'] / cold['floor']['wall_median_s']:.2f}; "
          f"1-minute load average at the end: {cold['load_average_1min_at_end']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--seen", type=int, default=20, help="train items per user (masked)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recommend.json"))
    parser.add_argument("--cold-warehouse", type=Path, default=None,
                        help="measure the console script's cold start against this warehouse's latest completed run")
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--cold-user", default=None, help="the user to ask for (default: the run's first)")
    parser.add_argument("--cold-only", action="store_true", help="only the cold start (needs --cold-warehouse)")
    parser.add_argument("--cold-before-tree", type=Path, default=None,
                        help="a copy of older code: its answer to the same request, in the same rounds")
    args = parser.parse_args()
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "numpy": np.__version__}
    cold = None
    if args.cold_warehouse is not None:
        cold = cold_start(args.cold_warehouse.resolve(), args.cold_runs, args.cold_user, args.k,
                          args.cold_before_tree)
        print_cold(cold)
    if args.cold_only:
        if cold is None:
            parser.error("--cold-only needs --cold-warehouse")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "cold_start": cold}, indent=2) + "\n")
        print(f"wrote {args.out}")
        return

    from udfs.recommender import Recommender

    rng = np.random.default_rng(0)
    items, profiles = unit_rows(rng, args.items, args.dim), unit_rows(rng, args.users, args.dim)
    with tempfile.TemporaryDirectory(prefix="bench-recommend-") as tmp:
        warehouse = Path(tmp)
        start = time.perf_counter()
        write_warehouse(warehouse, "bench-run", "title", items, profiles, args.seen, args.k, rng)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        recommender = Recommender.load(warehouse, "bench-run", "title")
        load_s = time.perf_counter() - start
    users = sorted(recommender.profiles)
    matrix = recommender.block.items  # the candidates' vectors, as loaded, for the floor
    by_user = {u: recommender.profiles[u][None, :] for u in users}

    ours_ms, floor_ms = [], []
    for round_start in range(0, args.calls, 100):
        chunk = [users[i % len(users)] for i in range(round_start, min(args.calls, round_start + 100))]
        for u in chunk:
            t = time.perf_counter()
            floor(by_user[u], matrix, args.k)
            floor_ms.append((time.perf_counter() - t) * 1000)
        for u in chunk:
            t = time.perf_counter()
            recommender.recommend(users=[u], k=args.k)
            ours_ms.append((time.perf_counter() - t) * 1000)

    ours_batch_s, floor_batch_s = [], []
    for b in range(args.batches):
        batch = [users[(b * args.batch + i) % len(users)] for i in range(args.batch)]
        stacked = np.stack([recommender.profiles[u] for u in batch])
        t = time.perf_counter()
        floor(stacked, matrix, args.k)
        floor_batch_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        recommender.recommend(users=batch, k=args.k)
        ours_batch_s.append(time.perf_counter() - t)

    p = lambda values, q: float(np.percentile(values, q))  # noqa: E731
    ours_tput, floor_tput = args.batch / np.median(ours_batch_s), args.batch / np.median(floor_batch_s)
    result = {
        "machine": machine, "cold_start": cold,
        "shape": {"items": args.items, "dim": args.dim, "users": args.users, "seen": args.seen, "k": args.k},
        "write_tables_s": round(write_s, 2), "load_s": round(load_s, 2),
        "one_user": {"calls": args.calls, "ours_p50_ms": p(ours_ms, 50), "ours_p99_ms": p(ours_ms, 99),
                     "floor_p50_ms": p(floor_ms, 50), "floor_p99_ms": p(floor_ms, 99),
                     "p50_ratio_to_floor": p(ours_ms, 50) / p(floor_ms, 50)},
        "batched": {"batch": args.batch, "batches": args.batches, "ours_users_per_s": float(ours_tput),
                    "floor_users_per_s": float(floor_tput), "ratio_to_floor": float(ours_tput / floor_tput)},
    }
    print(f"recommend: {args.items:,} items x {args.dim}, k={args.k}, {args.seen} seen items per user; "
          f"load {load_s:.2f} s (tables written in {write_s:.2f} s)")
    print(f"{'':<28}{'ours':>12}{'floor':>12}{'ratio':>8}")
    one = result["one_user"]
    print(f"{'one user p50 (ms)':<28}{one['ours_p50_ms']:>12.2f}{one['floor_p50_ms']:>12.2f}"
          f"{one['p50_ratio_to_floor']:>8.2f}")
    print(f"{'one user p99 (ms)':<28}{one['ours_p99_ms']:>12.2f}{one['floor_p99_ms']:>12.2f}"
          f"{one['ours_p99_ms'] / one['floor_p99_ms']:>8.2f}")
    batched = result["batched"]
    print(f"{f'batch {args.batch} (users/s)':<28}{batched['ours_users_per_s']:>12.0f}"
          f"{batched['floor_users_per_s']:>12.0f}{batched['ratio_to_floor']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
