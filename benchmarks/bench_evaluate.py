"""Evaluation on real MovieLens-100k: our jobs against the reference code's method, same numbers.

    python benchmarks/bench_evaluate.py [--ml100k ../shared/data/ml100k]

Builds a warehouse with the real jobs (``ingest`` -> ``embed`` title vectors with
all-MiniLM-L6-v2 -> ``profiles`` -> ``topk`` -> ``evaluate``), then recomputes the title
representation's metrics the way the paper's code does: a Python loop over users, pandas filters
for each user's history and test items, sklearn ``cosine_similarity`` between the mean history
vector and every candidate, a sort, and per-user metric formulas. Both sides use the same
candidate set, exclusions (train + valid) and tie rule (score, then item id), so the means must
agree within 1e-9: the benchmark asserts it.

Timed: the reference loop; the ``evaluate`` job alone; ``profiles + topk + evaluate`` (the
jobs that replace the loop); and the same arithmetic in one process with the ``udfs`` kernels
the executors run (no Spark). Prints a table with the ratios, writes
``benchmarks/results/evaluate.json`` with the machine.
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

import numpy as np
import pandas as pd

from udfs.evaluate.metrics import METRICS, hit_matrix, ranking_metrics
from udfs.rank.topk_udfs import pair_topk

KS = [5, 10, 20]
EXCLUDE = ("train", "valid")


def reference_method(interactions: pd.DataFrame, vectors: dict[str, np.ndarray], ks: list[int]) -> dict:
    """The reference code's loop: one user at a time, pandas filters, sklearn cosine_similarity."""
    from sklearn.metrics.pairwise import cosine_similarity

    candidates = np.array(sorted(vectors))
    matrix = np.stack([vectors[i] for i in candidates]).astype(np.float64)
    sums = {(m, k): 0.0 for m in METRICS for k in ks}
    n_users = 0
    for user in sorted(interactions["user_id"].unique()):
        rows = interactions[interactions["user_id"] == user]
        history = [vectors[i] for i in rows[rows["split"] == "train"]["item_id"] if i in vectors]
        if not history:
            continue
        seen = set(rows[rows["split"].isin(EXCLUDE)]["item_id"])
        relevant = set(rows[rows["split"] == "test"]["item_id"]) & set(candidates) - seen
        if not relevant:
            continue
        profile = np.mean(history, axis=0, keepdims=True)
        scores = cosine_similarity(profile, matrix)[0]
        order = sorted((-s, i) for s, i in zip(scores, candidates) if i not in seen)
        ranked = [i for _, i in order[:max(ks)]]
        n_users += 1
        for k in ks:
            hits = [1.0 if i in relevant else 0.0 for i in ranked[:k]]
            n_hits = sum(hits)
            first = next((r + 1 for r, h in enumerate(hits) if h), None)
            dcg = sum(h / np.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / np.log2(r + 2) for r in range(min(k, len(relevant))))
            ap = sum(h * sum(hits[:r + 1]) / (r + 1) for r, h in enumerate(hits)) / min(k, len(relevant))
            sums[("recall", k)] += n_hits / len(relevant)
            sums[("precision", k)] += n_hits / k
            sums[("hit_rate", k)] += float(n_hits > 0)
            sums[("mrr", k)] += 1 / first if first else 0.0
            sums[("ndcg", k)] += dcg / idcg
            sums[("map", k)] += ap
    return {key: value / n_users for key, value in sums.items()} | {"n_users": n_users}


def in_process(interactions: pd.DataFrame, vectors: dict[str, np.ndarray], ks: list[int]) -> dict:
    """The same evaluation with the udfs kernels, vectorised over users, in this process."""
    candidates = np.array(sorted(vectors))
    matrix = np.stack([vectors[i] for i in candidates]).astype(np.float32)
    position = pd.Series(np.arange(len(candidates)), index=candidates)
    train = interactions[(interactions["split"] == "train") & interactions["item_id"].isin(position.index)]
    users = np.array(sorted(train["user_id"].unique()))
    user_pos = pd.Series(np.arange(len(users)), index=users)
    sums = np.zeros((len(users), matrix.shape[1]), np.float32)
    np.add.at(sums, user_pos[train["user_id"]].to_numpy(), matrix[position[train["item_id"]].to_numpy()])
    profiles = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    excluded = interactions[interactions["split"].isin(EXCLUDE) & interactions["item_id"].isin(position.index)
                            & interactions["user_id"].isin(user_pos.index)]
    seen_rows = user_pos[excluded["user_id"]].to_numpy()
    seen_cols = position[excluded["item_id"]].to_numpy()
    import scipy.sparse

    seen = scipy.sparse.csr_matrix((np.ones(len(seen_rows), bool), (seen_rows, seen_cols)),
                                   shape=(len(users), len(candidates)))
    # One item block: the executors' block-pair kernel, whose lists are then already merged.
    _, ranked = pair_topk(users, profiles, seen, candidates, matrix, max(ks))
    test = interactions[(interactions["split"] == "test") & interactions["item_id"].isin(position.index)]
    seen_pairs = set(zip(excluded["user_id"], excluded["item_id"]))
    relevant_by_user = test[[p not in seen_pairs for p in zip(test["user_id"], test["item_id"])]] \
        .groupby("user_id")["item_id"].apply(set)
    keep = np.array([u in relevant_by_user.index for u in users])
    hits, n_relevant = hit_matrix(ranked[keep], [relevant_by_user[u] for u in users[keep]])
    values = ranking_metrics(hits, n_relevant, ks)
    return {key: float(v.mean()) for key, v in values.items()} | {"n_users": int(keep.sum())}


def quiet(main, argv: list[str], spark) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(argv, spark=spark) if "spark" in main.__code__.co_varnames else main(argv)
    assert code == 0, f"{main.__module__} {argv} exited {code}"
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ml100k", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/ml100k")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluate.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from jobs import embed, evaluate, ingest, profiles, tables, topk
    from jobs.config import load_config
    from jobs.spark_session import build_spark

    root = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    warehouse = root / "warehouse"
    common = ["--conf", "datasets/ml100k.yaml", "--set", f"warehouse={warehouse}", "--set", "log_level=WARNING",
              "--set", f"dataset.paths.root={args.ml100k.resolve()}", "--set", "spark.master=local[2]",
              "--set", "spark.shuffle_partitions=4", "--set", "experiment.representations=[title]",
              "--set", f"experiment.evaluate.ks={KS}", "--set", "experiment.evaluate.bootstrap_samples=1000"]
    config = load_config(["datasets/ml100k.yaml"], ["spark.master=local[2]", "spark.shuffle_partitions=4"])
    spark = build_spark(config, app_name="bench-evaluate")
    try:
        timings = {"ingest_s": quiet(ingest.main, common, spark), "embed_s": quiet(embed.main, common, spark)}
        timings["profiles_s"] = quiet(profiles.main, common + ["--run-id", "bench"], spark)
        timings["topk_s"] = quiet(topk.main, common + ["--run-id", "bench", "--baselines", ""], spark)
        timings["evaluate_s"] = quiet(evaluate.main, common + ["--run-id", "bench", "--baselines", ""], spark)
        ours = {(r["metric"], r["k"]): r["value"] for r in tables.read(spark, warehouse, "metrics")
                .filter("run_id = 'bench' AND representation = 'title'").collect()}
        n_ours = tables.read(spark, warehouse, "metrics").filter(
            "run_id = 'bench' AND representation = 'title'").first()["n_users"]
        inter = tables.read(spark, warehouse, "interactions").filter("dataset = 'ml100k'").select(
            "user_id", "item_id", "split").toPandas()
        vectors = {r["item_id"]: np.asarray(r["vector"], np.float32) for r in tables.read(
            spark, warehouse, "item_embeddings").filter("representation = 'title'").collect()}
    finally:
        spark.stop()
        shutil.rmtree(root, ignore_errors=True)

    start = time.perf_counter()
    reference = reference_method(inter, vectors, KS)
    reference_s = time.perf_counter() - start
    start = time.perf_counter()
    kernels = in_process(inter, vectors, KS)
    kernels_s = time.perf_counter() - start

    worst = max(abs(ours[key] - reference[key]) for key in ours)
    worst_kernels = max(abs(kernels[key] - reference[key]) for key in ours)
    assert n_ours == reference["n_users"] == kernels["n_users"], (n_ours, reference["n_users"], kernels["n_users"])
    assert worst <= 1e-9, f"the evaluate job and the reference method differ by {worst}"
    assert worst_kernels <= 1e-9, f"the in-process kernels and the reference method differ by {worst_kernels}"

    jobs_s = timings["profiles_s"] + timings["topk_s"] + timings["evaluate_s"]
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average_at_end": os.getloadavg(), "spark_master": "local[2]"},
        "dataset": "MovieLens-100k (real), title vectors all-MiniLM-L6-v2, temporal_ratio split",
        "users_evaluated": n_ours, "ks": KS, "max_abs_difference_jobs_vs_reference": worst,
        "max_abs_difference_kernels_vs_reference": worst_kernels,
        "reference_loop_s": reference_s, "in_process_kernels_s": kernels_s, **timings,
        "jobs_profiles_topk_evaluate_s": jobs_s,
        "speedup_kernels_vs_reference": reference_s / kernels_s,
        "speedup_evaluate_job_vs_reference": reference_s / timings["evaluate_s"],
        "speedup_jobs_vs_reference": reference_s / jobs_s,
        "metrics": {f"{m}@{k}": ours[(m, k)] for m, k in sorted(ours)},
    }
    print(f"machine: {result['machine']}")
    print(f"{result['dataset']}; {n_ours} users evaluated; max |ours - reference| = {worst:.2e}")
    print(f"{'method':<52}{'seconds':>10}{'vs reference':>14}")
    rows = [("reference loop (pandas filters + sklearn cosine)", reference_s),
            ("udfs kernels in one process (no Spark)", kernels_s),
            ("evaluate job (Spark local[2], Delta in/out)", timings["evaluate_s"]),
            ("profiles + topk + evaluate jobs", jobs_s)]
    for name, seconds in rows:
        print(f"{name:<52}{seconds:>10.2f}{reference_s / seconds:>13.1f}x")
    print("title metrics: " + ", ".join(f"{key}={value:.4f}" for key, value in result["metrics"].items()
                                        if key.endswith("@10")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
