"""The whole distributed job against a plain single-process script doing the same work (issue 9).

    python benchmarks/bench_pipeline_vs_script.py [--order pipeline-first|script-first]
        [--ml100k ../shared/data/ml100k] [--master local[2]] [--n-users N] [--n-items N] [--scale N]
        [--pipeline-set KEY=VALUE ...] [--skip-pipeline] [--skip-script] [--out FILE]

Both sides run ``conf/experiments/ml100k.yaml``, the README's own configuration with its ``als``
reference (``--without-als`` leaves it out of both, as the figures before issue 24 did), on the
real MovieLens-100k, each in its own fresh process, one after the other, on the same machine:

- pipeline: ``vlm4rec pipeline --conf experiments/ml100k.yaml`` on a fresh temporary warehouse
  (nothing cached: every poster described, every vector encoded). Its stage times are the
  ``stage wall times: ...`` line it prints (the ``ms_<stage>`` of its ``runs`` row).
- script: this file with ``--reference``: pandas for the files, then the project's own ``udfs``
  kernels called in-process, in one Python process: the adapter's reading rules (u.data,
  u.item, the TMDB overviews, the suspect-content rule), the image checks and hashes, the
  ``temporal_ratio`` split, the ``tags`` descriptions of the unique posters (decoded as the
  caption job decodes them, with ``load_one``), MiniLM vectors of titles, overviews and
  descriptions, EfficientNet-Lite0 vectors, the fusions, mean-of-history profiles (fusions of
  the parts' profiles, as the profiles job does), the ``als`` reference fitted by the same Spark ML
  ALS (``udfs.spark.als.train_als``, a plain local-mode Spark session started for it: what a
  script fitting Spark's ALS pays), exact top-K with seen items masked over the
  common candidate set plus the popularity and random baselines, the six metrics at each K
  with bootstrap CIs, and the paired comparisons. The numerics are the same functions; what
  differs is the orchestration (Spark actions, Delta commits, Ray, Arrow shipping).

The ratio without ``als`` comes from the same run: each side's wall time less what ``als`` cost it
(the pipeline: its ``ms_train_als``, the fit inside ``profiles``; the script: its ``als`` step,
Spark's start included); ``--without-als`` measures that configuration itself instead.

Prints a table stage by stage with pipeline / script, the whole-process ratio, and how many of
the pipeline's metric and comparison values the script reproduces (equal to 1e-9; the max abs
difference of the rest: tied scores among identical descriptions may order differently).
The pipeline's ``metrics`` and ``comparisons`` rows are read from its Delta tables' Parquet
files through the Delta log (no Spark, no deltalake package). Records the CPU model, cores and
load average before and after; the machine must be otherwise idle for the figures to mean much.
Writes JSON (``--out``, default ``benchmarks/results/pipeline_vs_script.json``), with the path
each pipeline stage took (``paths``: computed on the driver or not, and which engine committed
each of its tables) and the largest resident set of its processes (``peak_rss_mb``).

``--n-users`` / ``--n-items`` run both sides on a subset (the first users / items by id, the
files rewritten into a temporary folder, posters linked) for quick checks; the default is the
full ml100k. ``--scale N`` runs both sides on ml100k N times over (issue 9's second target is
N = 10), written into the temporary folder before either side starts, in the same layout
(``scale_data``): copy k of item i is item ``i + k * 1682`` (the largest item id) with
``" [copy k]"`` after its title, ``" (copy k)"`` after its overview and its own poster (the
original decoded, a corner of pixels set from k, re-encoded: distinct bytes, so nothing is a
cache hit), and user ``u + k * 943`` (the largest user id) rates it as u rates i (N = 10:
16,820 items, 9,430 users, 1,000,000 ratings). With ``--n-users`` / ``--n-items`` the subset is
taken first, then scaled. ``--pipeline-set`` passes a ``--set`` to the pipeline (e.g.
``spark.worker_env={}`` to measure it without the malloc tunables). The script starts with
glibc's malloc defaults, as a plain script would; ``--script-worker-env`` starts it with the
workers' tunables (``jobs.config.MALLOC_WORKER_ENV``), which leaves the allocator out of the ratio.

``--floor`` adds a third side after the pipeline: its fixed costs with none of its work
(``floor``): in a fresh process, Spark started, Ray started with one block through one Ray Data
actor, and the pipeline's own commits replayed in its order, each as the pipeline makes it (its
rows, read beforehand from its warehouse and not timed, as Arrow rows held by the driver,
which a local master commits with delta-rs, as the pipeline does at this size;
the plan; every stage's two ``runs`` commits through the real job wrapper). It reads no table and runs no model, so it is a lower bound of what this design (Spark
jobs writing Delta tables, captions through Ray Data) costs on this machine beyond the work
itself; ``script / (script + floor)`` is the best pipeline/script ratio the machine allows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "pipeline_vs_script.json"
CONF = "experiments/ml100k.yaml"


def without_als() -> str:
    """``--set`` of CONF's representations minus ``als`` (``--without-als``, both sides)."""
    from jobs.config import load_config

    names = [n for n in load_config([CONF]).experiment.representations if n != "als"]
    return "experiment.representations=[" + ", ".join(json.dumps(n) for n in names) + "]"


def script_als(config, train, catalog) -> tuple:
    """The ``als`` reference as a script fits it: Spark ML's implicit ALS in a local session
    (``udfs.spark.als.train_als``, the pipeline's own call), then (user factors with
    ``n_history``, item factors of every catalog item, zeros without one), as ``profiles`` stores
    them. The factors are Spark ML's for this input partitioning, which differs from the
    pipeline's Delta read, so ``als``' values are compared apart from the rest."""
    import numpy as np
    import pandas as pd
    from pyspark.sql import SparkSession

    from udfs.rank.profile_inputs import als_item_rows, als_user_rows
    from udfs.spark.als import AlsSettings, train_als

    conf = config.experiment.profiles.als
    spark = (SparkSession.builder.master(config.spark.master).appName("bench-script-als")
             .config("spark.ui.enabled", "false")
             .config("spark.sql.shuffle.partitions", str(config.spark.shuffle_partitions))
             .config("spark.driver.memory", config.spark.driver_memory).getOrCreate())
    try:
        frame = spark.createDataFrame(train[["user_id", "item_id"]].astype(str))
        users, items = train_als(frame, AlsSettings(conf.rank, conf.reg_param, conf.alpha, conf.max_iter, conf.seed))
        users, items = users.toPandas(), items.toPandas()
    finally:
        spark.stop()
    # The profiles job's own rules for the rows it stores.
    users = als_user_rows(users, train)
    users["vector"] = [np.asarray(v, np.float32) for v in users["vector"]]
    items = als_item_rows("", conf.rank, "")(pd.DataFrame({"item_id": list(catalog)}), items)
    return users[["user_id", "vector", "n_history"]], items[["item_id", "vector"]]
STAGES = ("ingest", "caption", "embed", "profiles", "topk", "evaluate")
TOLERANCE = 1e-9
STAGE_LINE = re.compile(r"stage wall times: (.*) \(total ([0-9.]+) s\)")


# --- the reference: one process, pandas + the project's udfs ---------------------------------

class Stopwatch:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        watch = self

        class _Timed:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                watch.seconds[name] = time.perf_counter() - self.start

        return _Timed()


def _norm_title(title: object) -> str:
    return " ".join(str(title).lower().split()) if isinstance(title, str) else ""


def read_movielens(root: Path, counts: dict[str, int]):
    """items (item_id, title, text, image_uri, image_sha256) and interactions (user_id,
    item_id, rating, ts), by the rules of ``jobs/adapters/movielens.py`` and ``jobs/ingest.py``
    (that module imports pyspark, so its pandas steps are restated here, not imported)."""
    import pandas as pd

    from udfs.io.images import ImageError, ReadLimits, check_image, read_image_file, sha256_bytes

    raw = pd.read_csv(root / "u.item", sep="|", header=None, encoding="latin-1", dtype=str,
                      keep_default_na=False, quoting=3)
    items = pd.DataFrame({"item_id": raw[0].str.strip(), "title": raw[1].str.strip()})
    tmdb = pd.read_csv(root / "items_tmdb.csv", dtype={"movie_id": str})
    tmdb["movie_id"] = tmdb["movie_id"].str.strip()
    titles = dict(zip(items["item_id"], items["title"].map(_norm_title)))
    tmdb["_match"] = [titles.get(i) == _norm_title(t) for i, t in zip(tmdb["movie_id"], tmdb["title"])]
    tmdb["_order"] = range(len(tmdb))
    best = tmdb.sort_values(["movie_id", "_match", "_order"], ascending=[True, False, True]).drop_duplicates("movie_id")
    overviews = best[["movie_id", "overview"]].rename(columns={"movie_id": "item_id"})
    overviews["overview"] = overviews["overview"].where(
        overviews["overview"].notna() & (overviews["overview"].astype(str).str.strip() != ""))
    items = items.merge(overviews, on="item_id", how="left")
    posters = root / "posters"
    items["image_uri"] = [str(posters / f"{i}.jpg") if (posters / f"{i}.jpg").exists() else None
                          for i in items["item_id"]]

    def poster_hash(uri):
        if not isinstance(uri, str):
            return None
        try:
            return sha256_bytes(read_image_file(uri))
        except ImageError:
            return None

    # The suspect-content rule: an overview or poster shared by differently titled items is dropped.
    items["_poster"] = items["image_uri"].map(poster_hash)
    suspect: set[str] = set()
    for key in ("overview", "_poster"):
        for _, group in items.dropna(subset=[key]).groupby(key):
            if len(group) > 1 and group["title"].map(_norm_title).nunique() > 1:
                suspect.update(group["item_id"])
    mask = items["item_id"].isin(list(suspect))
    items.loc[mask, "overview"] = None
    items.loc[mask, "image_uri"] = None
    counts["tmdb_suspect_items"] = len(suspect)
    items = items.drop(columns=["_poster"]).rename(columns={"overview": "text"})
    items["text"] = items["text"].where(items["text"].notna(), None)
    items = items.drop_duplicates("item_id", keep="first").reset_index(drop=True)

    # ingest: every local image confined to the posters folder, read within the default limits,
    # decoded and hashed (an unusable one leaves the item without a hash).
    limits, images_root = ReadLimits(), str(posters.resolve())
    hashes = []
    for uri in items["image_uri"]:
        if not isinstance(uri, str):
            hashes.append(None)
            continue
        digest, _ = check_image(uri, limits=limits, name=uri, images_root=images_root, confine=True)
        hashes.append(digest)
    items["image_sha256"] = hashes

    ratings = pd.read_csv(root / "u.data", sep="\t", header=None, names=["user_id", "item_id", "rating", "ts"],
                          dtype={"user_id": str, "item_id": str, "rating": float, "ts": "int64"})
    ratings = ratings[ratings["item_id"].isin(set(items["item_id"]))]
    ratings = (ratings.sort_values(["user_id", "item_id", "ts", "rating"], ascending=[True, True, True, False])
               .drop_duplicates(["user_id", "item_id", "ts"], keep="first"))
    counts["items"], counts["interactions"] = len(items), len(ratings)
    return items, ratings.reset_index(drop=True)


def temporal_ratio_split(df, ratios, min_user_interactions: int):
    """``udfs.evaluate.splits``' ``temporal_ratio`` in pandas: per user by (ts, item_id), the last
    ``ratios[2]`` share test, the ``ratios[1]`` share before it valid."""
    import numpy as np

    _, valid, test = ratios
    df = df.sort_values(["user_id", "ts", "item_id"], kind="stable").reset_index(drop=True)
    by_user = df.groupby("user_id", sort=False)
    n = by_user["item_id"].transform("size").to_numpy()
    from_end = n - (by_user.cumcount().to_numpy() + 1)
    n_test = np.maximum(np.floor(n * test), 1 if test > 0 else 0)
    n_valid = np.maximum(np.floor(n * valid), 1 if valid > 0 else 0)
    eligible = (n >= max(min_user_interactions, 1)) & (n - n_test - n_valid >= 1)
    split = np.where(~eligible, "train", np.where(from_end < n_test, "test",
                                                  np.where(from_end < n_test + n_valid, "valid", "train")))
    return df.assign(split=split)


def expand_lvlm(names: list[str], full: str) -> list[str]:
    from udfs.representations import FUSIONS, fusion_name, validate_representations

    out = []
    for name in names:
        head, _, parts = name.partition(":")
        if name == "lvlm":
            name = full
        elif head in FUSIONS and "lvlm" in parts.split("+"):
            name = fusion_name(head, [full if p == "lvlm" else p for p in parts.split("+")])
        out.append(name)
    return validate_representations(out)


def reference(root: Path, overrides: list[str]) -> dict:
    """The plain script: returns stage seconds, counts, the metric and comparison rows."""
    watch = Stopwatch()
    counts: dict[str, int] = {}
    with watch("ingest"):
        import numpy as np
        import pandas as pd

        from jobs.config import load_config

        config = load_config([CONF], overrides)
        experiment, dataset = config.experiment, config.dataset
        items, interactions = read_movielens(root, counts)
        interactions = temporal_ratio_split(interactions, dataset.split.ratios, dataset.split.min_user_interactions)

    with watch("caption"):
        from udfs.caption import describe_isolated, make_engine
        from udfs.caption.kinds import KINDS
        from udfs.caption.caption_udfs import load_one
        from udfs.io.images import ReadLimits
        from udfs.representations import lvlm_name

        cap = experiment.caption
        engine = make_engine(cap.engine, cap.model or "efficientnet-lite0", cap.prompt, cap.batch_size,
                             cap.max_new_tokens, cap.engine_options())
        full_lvlm = lvlm_name(engine.name, engine.model, engine.prompt_id)
        unique = items.dropna(subset=["image_sha256"]).drop_duplicates("image_sha256")
        limits = ReadLimits(dataset.images.max_bytes, dataset.images.read_timeout_s)
        descriptions: dict[str, str] = {}
        rows = list(zip(unique["image_uri"], unique["image_sha256"]))
        for start in range(0, len(rows), cap.batch_size):
            loaded = [(sha, load_one(uri, sha, KINDS[engine.name].max_side, limits)) for uri, sha in
                      rows[start:start + cap.batch_size]]
            ok = [(sha, img) for sha, (img, error) in loaded if error is None]
            for (sha, _), result in zip(ok, describe_isolated(engine, [img for _, img in ok])):
                if not isinstance(result, Exception):
                    descriptions[sha] = result.text
        counts["described"] = len(descriptions)
        del engine

    with watch("embed"):
        from udfs.encode import embedding_udfs
        from udfs.representations import parse_representation, required_base_representations

        names = expand_lvlm(list(experiment.representations), full_lvlm)
        base = [parse_representation(n) for n in required_base_representations(names)]
        fusions = [p for p in (parse_representation(n) for n in names) if p.is_fusion]
        text_frames = []
        for rep in base:
            if rep.kind in ("title", "text"):
                text = items[rep.kind]
            elif rep.kind == "lvlm":
                text = items["image_sha256"].map(lambda s: descriptions.get(s) if isinstance(s, str) else None)
            else:
                continue
            text_frames.append(pd.DataFrame({"representation": rep.name, "item_id": items["item_id"],
                                             "text": text, "pre_status": None}))
        vectors: dict[str, pd.DataFrame] = {}
        encoded = []
        if text_frames:
            encode = embedding_udfs.text_vector_batches(experiment.text_encoder, experiment.embed.text_batch_size, 0)
            encoded += list(encode(iter([pd.concat(text_frames, ignore_index=True)])))
        if any(rep.kind == "visual" for rep in base):
            encode = embedding_udfs.image_vector_batches(experiment.image_encoder, experiment.embed.image_batch_size, 0)
            frame = pd.DataFrame({"representation": "visual", "item_id": items["item_id"],
                                  "image_uri": items["image_uri"], "pre_status": None})
            encoded += list(encode(iter([frame])))
        encoded = pd.concat(encoded, ignore_index=True)
        encoded = encoded[encoded["status"] == embedding_udfs.OK]
        for name, group in encoded.groupby("representation"):
            vectors[name] = group[["item_id", "vector"]].reset_index(drop=True)
        weights = experiment.embed.concat_weights

        def fusion_weights(rep):
            chosen = {p: float(w) for p, w in weights.items() if p in rep.parts}
            return chosen or None if rep.kind == "concat" else None

        def fused(rep, parts: dict[str, pd.DataFrame], key: str):
            joined = None
            for j, part in enumerate(rep.parts):
                frame = parts[part].rename(columns={"vector": f"part_{j}", "n_history": f"_n_{j}"})
                joined = frame if joined is None else joined.merge(frame, on=key)
            if "_n_0" in joined.columns:
                joined["n_history"] = joined[[f"_n_{j}" for j in range(len(rep.parts))]].min(axis=1)
            out = pd.concat(list(embedding_udfs.fused_vector_batches(rep.kind, rep.parts, fusion_weights(rep), key)(
                iter([joined]))), ignore_index=True)
            return out[out["status"] == embedding_udfs.OK].drop(columns=["status"]).reset_index(drop=True)

        for rep in fusions:
            vectors[rep.name] = fused(rep, vectors, "item_id")
        counts["vectors"] = sum(len(v) for v in vectors.values())

    with watch("profiles"):
        train = interactions[interactions["split"] == "train"]
        profile_of = embedding_udfs.profile_groups(experiment.profiles.half_life_days)
        profiles: dict[str, pd.DataFrame] = {}
        for rep in base:
            history = train.merge(vectors[rep.name], on="item_id")[["user_id", "vector", "ts"]]
            profiles[rep.name] = profile_of((rep.name,), history).drop(columns=["representation"])
        for rep in fusions:
            profiles[rep.name] = fused(rep, profiles, "user_id")
        if "als" in names:
            with watch("als"):
                profiles["als"], vectors["als"] = script_als(config, train, items["item_id"])
        counts["profiles"] = sum(len(p) for p in profiles.values())

    with watch("topk"):
        from udfs.rank import topk as topk_kernels
        from udfs.rank import topk_udfs
        from udfs.rank.scorers import scorer_for

        settings = experiment.topk
        k = settings.k or max(experiment.evaluate.ks)
        baselines = list(dict.fromkeys([*settings.baselines, *(n for n in names if n in ("popularity", "random"))]))
        vector_names = [n for n in names if n not in baselines]
        order = vector_names + baselines
        if settings.candidates != "common":
            raise SystemExit("the reference implements the 'common' candidate policy only")
        common = set.intersection(*[set(vectors[n]["item_id"]) for n in vector_names])
        candidates = np.array(sorted(common), dtype=object)
        seen_rows = interactions[interactions["split"].isin(list(settings.exclude))].drop_duplicates(["user_id", "item_id"])
        seen = seen_rows.groupby("user_id")["item_id"].agg(list).to_dict()
        train_users = np.array(sorted(train["user_id"].unique()), dtype=object)
        popularity = train.groupby("item_id").size()
        lists: dict[str, dict[str, list[str]]] = {}

        def rank(name, user_ids, user_vectors, item_ids, item_vectors, scorer):
            user_seen = [seen.get(u, []) for u in user_ids]
            mask = topk_udfs.seen_mask([len(s) for s in user_seen], [i for s in user_seen for i in s], item_ids)
            scores, ids = topk_udfs.pair_topk(user_ids, user_vectors, mask, item_ids, item_vectors, k, scorer,
                                              settings.seed, settings.score_rows)
            merged_scores, merged_ids = topk_kernels.merge_topk([(scores, ids)], k, None)
            keep = ~np.isneginf(merged_scores)
            lists[name] = {u: list(merged_ids[i][keep[i]]) for i, u in enumerate(user_ids) if keep[i].any()}

        for name in vector_names:
            items_of = vectors[name][vectors[name]["item_id"].isin(common)]
            rank(name, profiles[name]["user_id"].to_numpy(dtype=object),
                 embedding_udfs.stack_vectors(profiles[name]["vector"]), items_of["item_id"].to_numpy(dtype=object),
                 embedding_udfs.stack_vectors(items_of["vector"]), scorer_for(name))
        ones = np.ones((len(train_users), 1), np.float32)
        for name in baselines:
            if name == "popularity":
                item_vectors = popularity.reindex(candidates).fillna(0).to_numpy(np.float32)[:, None]
                rank(name, train_users, ones, candidates, item_vectors, topk_udfs.COSINE)
            else:
                rank(name, train_users, ones, candidates, np.zeros((len(candidates), 1), np.float32),
                     topk_udfs.RANDOM)

    with watch("evaluate"):
        from udfs.evaluate import evaluate_udfs

        ks = sorted(set(experiment.evaluate.ks))
        n_samples, seed = experiment.evaluate.bootstrap_samples, experiment.evaluate.seed
        test = interactions[interactions["split"] == "test"].drop_duplicates(["user_id", "item_id"])
        excluded = set(zip(seen_rows["user_id"], seen_rows["item_id"]))
        relevant_rows = test[test["item_id"].isin(common)
                             & ~pd.Series(list(zip(test["user_id"], test["item_id"])), index=test.index).isin(excluded)]
        relevant = relevant_rows.groupby("user_id")["item_id"].agg(list)
        values = []
        for name in order:
            users = [u for u in relevant.index if u in lists[name]]
            frame = pd.DataFrame({"user_id": users, "relevant": [relevant[u] for u in users],
                                  "recommended": [lists[name][u] for u in users]})
            per_user = evaluate_udfs.user_metrics(frame, ks)
            per_user.insert(0, "representation", name)
            values.append(per_user)
        values = pd.concat(values, ignore_index=True)
        summarise = evaluate_udfs.metric_summary(n_samples, seed)
        metrics = pd.concat([summarise(key, group) for key, group in values.groupby(["representation", "metric", "k"])],
                            ignore_index=True)
        compare = evaluate_udfs.comparison_groups(order, n_samples, seed, experiment.evaluate.test)
        comparisons = pd.concat([compare(key, group[["representation", "user_id", "value"]])
                                 for key, group in values.groupby(["metric", "k"])], ignore_index=True)
    return {"stage_s": watch.seconds, "counts": counts,
            "metrics": metrics.to_dict(orient="records"), "comparisons": comparisons.to_dict(orient="records")}


# --- the pipeline's tables, read without Spark -------------------------------------------------

def read_delta(path: Path):
    """The live rows of a Delta table: its JSON commits (and checkpoint, if any) replayed for
    add/remove actions, then the Parquet files, with partition values as columns."""
    import pandas as pd
    import pyarrow.parquet as pq

    log = path / "_delta_log"
    live: dict[str, dict] = {}
    start = -1
    last = log / "_last_checkpoint"
    if last.exists():
        version = json.loads(last.read_text())["version"]
        checkpoint = pq.read_table(log / f"{version:020d}.checkpoint.parquet").to_pylist()
        for action in checkpoint:
            if action.get("add"):
                live[action["add"]["path"]] = action["add"].get("partitionValues") or {}
        start = version
    for commit in sorted(log.glob("*.json")):
        if int(commit.stem) <= start:
            continue
        for line in commit.read_text().splitlines():
            action = json.loads(line)
            if "add" in action:
                live[action["add"]["path"]] = action["add"].get("partitionValues") or {}
            elif "remove" in action:
                live.pop(action["remove"]["path"], None)
    frames = []
    for file, partition in live.items():
        frame = pq.read_table(path / file).to_pandas()
        for key, value in (dict(partition) if not isinstance(partition, dict) else partition).items():
            frame[key] = value
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def compare_values(pipeline_rows, script_rows, key: list[str], columns: list[str]) -> dict:
    """How many (row, column) values agree within TOLERANCE, and the largest difference."""
    import pandas as pd

    merged = pd.DataFrame(pipeline_rows).merge(pd.DataFrame(script_rows), on=key, how="outer",
                                               suffixes=("_pipeline", "_script"), indicator=True)
    both = merged[merged["_merge"] == "both"]
    equal, total, worst, worst_at = 0, 0, 0.0, None
    # A column the table does not keep (comparisons has no n_users) is not compared.
    for column in [c for c in columns if f"{c}_pipeline" in merged.columns and f"{c}_script" in merged.columns]:
        a, b = both[f"{column}_pipeline"].astype(float), both[f"{column}_script"].astype(float)
        diff = (a - b).abs().where(~(a.isna() & b.isna()), 0.0).fillna(math.inf)
        equal += int((diff <= TOLERANCE).sum())
        total += len(diff)
        if len(diff) and diff.max() > worst:
            worst, row = float(diff.max()), both.loc[diff.idxmax()]
            worst_at = {**{c: row[c] for c in key}, "column": column}
    return {"values": total, "equal_1e-9": equal, "max_abs_diff": worst, "max_abs_diff_at": worst_at,
            "only_in_pipeline": int((merged["_merge"] == "left_only").sum()),
            "only_in_script": int((merged["_merge"] == "right_only").sum())}


# --- the driver --------------------------------------------------------------------------------

def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def subset_data(source: Path, target: Path, n_users: int | None, n_items: int | None) -> Path:
    """The first ``n_items`` items and ``n_users`` users (by numeric id) of ml100k, posters linked."""
    target.mkdir(parents=True)
    item_lines = (source / "u.item").read_bytes().splitlines(keepends=True)
    keep_items = {line.split(b"|", 1)[0] for line in item_lines}
    if n_items:
        keep_items = {i for i in keep_items if int(i) <= n_items}
        item_lines = [line for line in item_lines if line.split(b"|", 1)[0] in keep_items]
    (target / "u.item").write_bytes(b"".join(item_lines))
    rows = [line for line in (source / "u.data").read_bytes().splitlines(keepends=True)
            if line.split(b"\t")[1] in keep_items and (not n_users or int(line.split(b"\t")[0]) <= n_users)]
    (target / "u.data").write_bytes(b"".join(rows))
    shutil.copy(source / "items_tmdb.csv", target / "items_tmdb.csv")
    (target / "posters").symlink_to((source / "posters").resolve())
    return target


def copy_poster(source: Path, target: Path, copy: int) -> None:
    """``source`` decoded, a 4x4 corner set to a colour of ``copy`` and re-encoded: its own bytes
    (the caption cache keys on the image's sha256) with real pixels. A JPEG keeps its own
    quantisation tables and chroma sampling (``quality="keep"``: the copy decodes to the
    original's pixels within ~1 level and has about its size); anything else is saved as an
    RGB JPEG at quality 90 without chroma subsampling. Deterministic, so posters that are equal
    in the original (a film MovieLens lists twice) stay equal within a copy."""
    from PIL import Image

    colour = ((copy * 67) % 256, (copy * 131) % 256, (copy * 29 + 13) % 256)
    with Image.open(source) as image:
        image.load()
        keep = image.format == "JPEG" and image.mode in ("RGB", "L")
        if not keep:
            image = image.convert("RGB")
        for x in range(min(4, image.width)):
            for y in range(min(4, image.height)):
                image.putpixel((x, y), colour if image.mode == "RGB" else colour[0])
        if keep:
            image.save(target, "JPEG", quality="keep")
        else:
            image.save(target, "JPEG", quality=90, subsampling=0)


def scale_data(source: Path, target: Path, factor: int) -> Path:
    """ml100k ``factor`` times over, in its layout: copy 0 is ``source``; copy k (1..factor-1)
    has item ``i + k * max_item_id`` titled ``"<title> [copy k]"`` (other u.item fields as they
    are) with the overview ``"<overview> (copy k)"`` and its own poster (``copy_poster``), and
    user ``u + k * max_user_id`` with every rating of ``u``, same rating and timestamp. Titles,
    overviews and posters differ between copies, so the ingest's suspect-content rule (an overview
    or poster shared by differently titled items is dropped) sees each copy as the original.
    ``items_tmdb.csv`` keeps only the rows of items in ``u.item`` (a subset's other rows would
    carry a copy's id)."""
    import pandas as pd

    target.mkdir(parents=True)
    item_lines = (source / "u.item").read_bytes().splitlines()
    item_ids = [line.split(b"|", 1)[0].strip() for line in item_lines]
    max_item = max(int(i) for i in item_ids)
    rating_lines = (source / "u.data").read_bytes().splitlines()
    max_user = max(int(line.split(b"\t", 1)[0]) for line in rating_lines)

    items, ratings = [], []
    for k in range(factor):
        for line in item_lines:
            fields = line.split(b"|")
            if k:
                fields[0] = str(int(fields[0]) + k * max_item).encode()
                fields[1] = fields[1].strip() + f" [copy {k}]".encode()
            items.append(b"|".join(fields) + b"\n")
        for line in rating_lines:
            user, item, rest = line.split(b"\t", 2)
            ratings.append(b"\t".join([str(int(user) + k * max_user).encode(),
                                        str(int(item) + k * max_item).encode(), rest]) + b"\n")
    (target / "u.item").write_bytes(b"".join(items))
    (target / "u.data").write_bytes(b"".join(ratings))

    # Every field as read (strings, empty kept empty) so that copy 0's rows are written unchanged.
    tmdb = pd.read_csv(source / "items_tmdb.csv", dtype=str, keep_default_na=False)
    tmdb = tmdb[tmdb["movie_id"].str.strip().isin({i.decode() for i in item_ids})]
    copies = [tmdb]
    for k in range(1, factor):
        copy = tmdb.copy()
        copy["movie_id"] = (copy["movie_id"].str.strip().astype(int) + k * max_item).astype(str)
        for column in ("title", "cleaned_title"):
            if column in copy.columns:
                copy[column] = copy[column].str.strip() + f" [copy {k}]"
        copy["overview"] = copy["overview"].where(copy["overview"].str.strip() == "", copy["overview"] + f" (copy {k})")
        copies.append(copy)
    pd.concat(copies, ignore_index=True).to_csv(target / "items_tmdb.csv", index=False)

    # Copy 0's posters are copied, not linked: ingest confines every image to the posters folder
    # after resolving links, and a link would resolve outside it.
    (target / "posters").mkdir()
    for item in item_ids:
        poster = source / "posters" / f"{item.decode()}.jpg"
        if not poster.exists():
            continue
        shutil.copyfile(poster, target / "posters" / poster.name)
        for k in range(1, factor):
            copy_poster(poster, target / "posters" / f"{int(item) + k * max_item}.jpg", k)
    return target


def als_sets(without: bool) -> list[str]:
    return [without_als()] if without else []


def als_fit_s(warehouse: Path) -> float | None:
    """The ``als`` fit's seconds in the pipeline's ``profiles`` (its ``runs`` row's
    ``ms_train_als``); None when no fit ran."""
    runs = read_delta(warehouse / "runs")
    fits = [dict(c)["ms_train_als"] for c in runs["counts"] if c is not None and "ms_train_als" in dict(c)]
    return fits[-1] / 1000 if fits else None


def run_pipeline(root: Path, work: Path, master: str, extra_sets: list[str], tree: Path = REPO,
                 without: bool = False) -> dict:
    """The pipeline of the checkout ``tree`` (this one by default; another commit's worktree to
    compare two commits, e.g. the issue's reference d20bdfa) on a fresh warehouse."""
    warehouse = work / "warehouse"
    sets = [f"warehouse={warehouse}", f"dataset.paths.root={root}", f"spark.master={master}",
            *als_sets(without), *extra_sets]
    command = [sys.executable, "-m", "jobs.cli", "pipeline", "--conf", CONF,
               *[a for s in sets for a in ("--set", s)]]
    # PYTHONPATH: the Spark and Ray workers import that tree too, not whichever one is installed.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(tree))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (work / "pipeline.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    match = next((STAGE_LINE.search(line) for line in reversed(done.stdout.splitlines()) if STAGE_LINE.search(line)),
                 None)
    if done.returncode or not match:
        raise SystemExit(f"pipeline exited {done.returncode}; log: {work / 'pipeline.log'}\n{done.stdout[-2000:]}"
                         f"\n{done.stderr[-2000:]}")
    stages = {}
    for part in match.group(1).split(", "):
        stage, seconds, _ = part.split(" ")
        stages[stage] = float(seconds)
    metrics = read_delta(warehouse / "metrics")
    comparisons = read_delta(warehouse / "comparisons")
    return {"wall_s": wall, "stage_s": stages, "stages_total_s": float(match.group(2)),
            "als_s": als_fit_s(warehouse), "paths": stage_paths(warehouse), "peak_rss_mb": peak_rss_mb(),
            "metrics": metrics.drop(columns=["run_id"]).to_dict(orient="records"),
            "comparisons": comparisons.drop(columns=["run_id"]).to_dict(orient="records")}


def last_committer(table: Path) -> str:
    """``delta-rs`` or ``spark``: the engine of ``table``'s latest commit (its commitInfo);
    ``absent`` for a table the run never wrote."""
    commits = sorted((table / "_delta_log").glob("*.json"))
    if not commits:
        return "absent"
    for line in commits[-1].read_text().splitlines():
        info = json.loads(line).get("commitInfo")
        if info is not None:
            engine = str(info.get("engineInfo") or info.get("clientVersion") or "")
            return "delta-rs" if "delta-rs" in engine else "spark" if engine else "unknown"
    return "unknown"


# Stages with a driver path of their computation (``jobs.driver_inputs.read_on_driver``).
DRIVER_PATHS = {"embed", "profiles", "topk", "evaluate"}


def stage_paths(warehouse: Path) -> dict[str, dict]:
    """Which path each stage took: ``on_driver`` from its ``runs`` row (``computed_on_driver``:
    its inputs within ``spark.driver_compute_mb``), and the engine that committed each of its
    tables last. Ratios at different sizes differ mostly by these, so the result says them."""
    runs = read_delta(warehouse / "runs")
    out = {}
    for stage, writes in FLOOR_WRITES.items():
        row = runs[runs["job"] == stage].sort_values("started_at") if "job" in runs else runs.iloc[0:0]
        counts = dict(row["counts"].iloc[-1]) if len(row) and row["counts"].iloc[-1] is not None else {}
        # ingest computes with Spark and caption with Ray at every size: only commits can move.
        out[stage] = {"on_driver": bool(counts.get("computed_on_driver")) if stage in DRIVER_PATHS else None,
                      "committed_by": {table: last_committer(warehouse / table) for table, _ in writes}}
    return out


def peak_rss_mb() -> float:
    """The largest resident set of any finished child process (Linux ru_maxrss, KiB): the
    pipeline's driver, its Spark JVM or a Ray worker, whichever peaked highest (with ``--order
    script-first`` the script's process too: the maximum cannot be taken apart)."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# The tables the pipeline writes, stage by stage, in its order, with the keys of each commit's
# slice (``None``: the caption job's MERGE into the cache). ``run_id`` slices are the floor's own run.
FLOOR_WRITES = {
    "ingest": [("interactions", ("dataset",)), ("rejects", ("dataset",)), ("items", ("dataset",))],
    "caption": [("descriptions", None)],
    "embed": [("item_embeddings", ("dataset", "representation"))],
    "profiles": [("user_profiles", ("run_id", "representation"))],
    "topk": [("candidates", ("run_id",)), ("recommendations", ("run_id", "representation"))],
    "evaluate": [("user_metrics", ("run_id", "representation")), ("metrics", ("run_id", "representation")),
                 ("comparisons", ("run_id", "representation_a"))],
    "report": [],
}


# Stages whose rows the pipeline holds on the driver at ml100k and commits as Arrow (delta-rs on
# a local master): a small ingest's collected tables (``driver_inputs.fits_on_driver``), caption's
# merge of its staged files, and the driver paths of the later stages. (Where a stage's inputs
# exceed ``spark.driver_compute_mb`` Spark commits its tables: the floor stays a lower bound;
# the pipeline's ``paths`` in the JSON say which stages did.)
DRIVER_COMMITS = {"ingest", "caption", "embed", "profiles", "topk", "evaluate"}


class _FloorActor:
    """A Ray Data actor that passes its batch through: the caption stage's Ray, with no work."""

    def __call__(self, batch):
        return batch


def floor(source: Path, root: Path, master: str, out: Path, without: bool) -> None:
    """The pipeline's fixed costs with none of its work, in one fresh process as the pipeline:
    start Spark (the Delta connector) and Ray (the caption job's settings, one block through one
    Ray Data actor), then every commit the pipeline makes, in its order, each of the pipeline's
    own rows (read first from ``source``, its finished warehouse: not timed), inside the real
    job wrapper (``jobs.job_run.execute``: each stage's two ``runs`` commits) and the stored plan.
    No read of a table, no Spark job besides the writes, no model: a lower bound of what any
    pipeline of this design pays on this machine beyond the script's own work."""
    start = time.perf_counter()
    from udfs.io.warehouse_reader import read_table

    rows = {name: read_table(source, name) for stage in FLOOR_WRITES.values() for name, _ in stage}
    preload_s = time.perf_counter() - start
    start = time.perf_counter()
    from types import SimpleNamespace

    import pyarrow as pa
    from jobs import tables
    from jobs.config import load_config
    from jobs.job_run import Job, execute
    from jobs.plan import ExperimentPlan, store_plan
    from jobs.ray_session import ray_session
    from jobs.spark_session import build_spark
    from pyspark.sql import functions as F

    warehouse = out.parent / "floor-warehouse"
    config = load_config([CONF], [f"warehouse={warehouse}", f"dataset.paths.root={root}", f"spark.master={master}",
                                  *als_sets(without), "log_level=WARNING"])
    spark = build_spark(config, app_name="vlm4rec-floor")
    spark_s = time.perf_counter() - start
    seconds: dict[str, float] = {}

    def commits(stage: str, run_id: str):
        def body(run, _args):
            if stage == "caption":
                with ray_session(config.ray) as ray:
                    ray.data.from_arrow([pa.table({"x": [1]})]).map_batches(
                        _FloorActor, compute=ray.data.ActorPoolStrategy(size=1), batch_format="pandas").take_all()
            for name, keys in FLOOR_WRITES[stage]:
                if stage in DRIVER_COMMITS:
                    # Rows the pipeline holds on the driver: committed as it commits them (Arrow,
                    # through delta-rs on a local master).
                    frame = rows[name]
                    if keys is not None and "run_id" in keys:
                        frame = frame.set_column(frame.schema.get_field_index("run_id"), "run_id",
                                                 pa.array([run_id] * frame.num_rows, pa.string()))
                else:
                    frame = spark.createDataFrame(rows[name], schema=tables.SCHEMAS[name])
                if keys is None:
                    tables.merge(spark, warehouse, name, frame)
                    continue
                if "run_id" in keys and stage not in DRIVER_COMMITS:
                    frame = frame.withColumn("run_id", F.lit(run_id))
                values = rows[name].to_pandas()
                where = {k: (run_id if k == "run_id" else sorted(values[k].unique()) if k != "dataset"
                             else config.dataset.name) for k in keys}
                tables.replace_slice(spark, warehouse, name, frame, where)
        return body

    def pipeline(run, _args):
        store_plan(spark, warehouse, run.run_id, ExperimentPlan.resolve(config))
        for stage in FLOOR_WRITES:
            begun = time.perf_counter()
            assert execute(Job(stage, "", commits(stage, run.run_id)), config, spark, SimpleNamespace(run_id=None)) == 0
            seconds[stage] = time.perf_counter() - begun

    assert execute(Job("pipeline", "", pipeline), config, spark, SimpleNamespace()) == 0
    # No spark.stop(): the pipeline's process ends without one too.
    out.write_text(json.dumps({"preload_s": preload_s, "spark_start_s": spark_s, "stage_s": seconds,
                               "inside_s": time.perf_counter() - start}))


def run_floor(source: Path, root: Path, work: Path, master: str, without: bool) -> dict:
    out = work / "floor.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--floor-run", str(source), "--ml100k", str(root),
               "--master", master, "--floor-out", str(out), *(["--without-als"] if without else [])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (work / "floor.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode:
        raise SystemExit(f"floor exited {done.returncode}; log: {work / 'floor.log'}\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    # The process as the pipeline's is timed (interpreter, imports, JVM), less the untimed preload.
    return {"wall_s": wall - result["preload_s"], **result}


def run_script(root: Path, work: Path, worker_env: bool, without: bool) -> dict:
    out = work / "script.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--reference", "--ml100k", str(root),
               "--reference-out", str(out), *(["--without-als"] if without else [])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    if worker_env:
        from jobs.config import MALLOC_WORKER_ENV

        env.update(MALLOC_WORKER_ENV)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (work / "script.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode:
        raise SystemExit(f"script exited {done.returncode}; log: {work / 'script.log'}\n{done.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(out.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ml100k", type=Path, default=REPO.parent / "shared" / "data" / "ml100k")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--order", choices=["pipeline-first", "script-first"], default="pipeline-first")
    parser.add_argument("--n-users", type=int, default=None, help="only users 1..N (quick checks; default all)")
    parser.add_argument("--n-items", type=int, default=None, help="only items 1..N (quick checks; default all)")
    parser.add_argument("--scale", type=int, default=1, metavar="N",
                        help="run both sides on ml100k N times over (scale_data: N copies of every item, user "
                             "and rating, each copy's posters re-encoded with their own bytes; after --n-users/"
                             "--n-items; default 1, the files as they are)")
    parser.add_argument("--pipeline-tree", type=Path, default=REPO, metavar="DIR",
                        help="run the pipeline of another checkout (e.g. `git worktree add /tmp/ref d20bdfa`: "
                             "the issue's reference commit), in this venv; default: this one")
    parser.add_argument("--pipeline-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra --set for the pipeline (repeatable)")
    parser.add_argument("--script-worker-env", action="store_true",
                        help="start the script with the workers' malloc tunables (jobs.config.MALLOC_WORKER_ENV) "
                             "instead of glibc's defaults, so that the ratio leaves the allocator out")
    parser.add_argument("--floor", action="store_true",
                        help="after the pipeline, measure its fixed costs with none of its work (floor(): Spark "
                             "and Ray started, the pipeline's own commits replayed in a fresh process) and print "
                             "the best ratio to the script they leave")
    parser.add_argument("--without-als", action="store_true",
                        help="leave the als reference out of both sides (the configuration measured before "
                             "issue 24); by default both run the README's configuration, als included")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-script", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (warehouse, logs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--floor-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--floor-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale < 1:
        parser.error(f"--scale must be a whole number >= 1 (1 = ml100k as it is), got {args.scale}")
    if args.floor and args.skip_pipeline:
        parser.error("--floor replays the pipeline's commits: it needs the pipeline side")
    root = args.ml100k.resolve()
    if args.floor_run:
        floor(args.floor_run, root, args.master, args.floor_out, args.without_als)
        return
    if args.reference:
        result = reference(root, [f"dataset.paths.root={root}", *als_sets(args.without_als)])
        args.reference_out.write_text(json.dumps(result, default=str))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-vs-script-"))
    if args.n_users or args.n_items:
        root = subset_data(root, work / "data", args.n_users, args.n_items)
    setup_s = None
    if args.scale > 1:
        start = time.perf_counter()
        root = scale_data(root, work / "scaled", args.scale)
        setup_s = time.perf_counter() - start
    n_items = sum(1 for _ in (root / "u.item").open("rb"))
    n_ratings = sum(1 for _ in (root / "u.data").open("rb"))
    print(f"pipeline vs script on ml100k x{args.scale}"
          + (f" (subset: users <= {args.n_users}, items <= {args.n_items})" if args.n_users or args.n_items else "")
          + f": {n_items} items, {n_ratings} ratings"
          + (f"; scaled data written in {setup_s:.1f} s (not timed)" if setup_s is not None else ""), flush=True)
    load_before = os.getloadavg()
    runs = {}
    sides = ["pipeline", "script"] if args.order == "pipeline-first" else ["script", "pipeline"]
    try:
        for side in sides:
            if side == "pipeline" and not args.skip_pipeline:
                runs["pipeline"] = run_pipeline(root, work, args.master, args.pipeline_set,
                                                args.pipeline_tree.resolve(), args.without_als)
                if args.floor:
                    runs["floor"] = run_floor(work / "warehouse", root, work, args.master, args.without_als)
                    print(f"floor done: {runs['floor']['wall_s']:.1f} s", flush=True)
            if side == "script" and not args.skip_script:
                runs["script"] = run_script(root, work, args.script_worker_env, args.without_als)
            print(f"{side} done: {runs[side]['wall_s']:.1f} s" if side in runs else f"{side} skipped", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    result = {
        "benchmark": "pipeline_vs_script",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "spark_master": args.master, "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in load_after]},
        "config": CONF, "order": args.order, "n_users": args.n_users, "n_items": args.n_items,
        "scale": args.scale, "scale_setup_s": setup_s, "data": {"items": n_items, "ratings": n_ratings},
        "pipeline_sets": args.pipeline_set, "pipeline_tree": str(args.pipeline_tree),
        "script_worker_env": args.script_worker_env, "without_als": args.without_als,
    }
    pipe, script = runs.get("pipeline"), runs.get("script")
    print(f"\nml100k x{args.scale}\n{'stage':<16}{'pipeline s':>12}{'script s':>12}{'pipeline/script':>17}")
    table = {}
    for stage in STAGES:
        p = pipe["stage_s"].get(stage) if pipe else None
        s = script["stage_s"].get(stage) if script else None
        ratio = p / s if p is not None and s else None
        table[stage] = {"pipeline_s": p, "script_s": s, "ratio": ratio}
        print(f"{stage:<16}{'-' if p is None else f'{p:.1f}':>12}{'-' if s is None else f'{s:.1f}':>12}"
              f"{'-' if ratio is None else f'{ratio:.2f}x':>17}")
    p, s = (pipe["wall_s"] if pipe else None), (script["wall_s"] if script else None)
    table["whole process"] = {"pipeline_s": p, "script_s": s, "ratio": p / s if p and s else None}
    print(f"{'whole process':<16}{'-' if p is None else f'{p:.1f}':>12}{'-' if s is None else f'{s:.1f}':>12}"
          f"{'-' if not (p and s) else f'{p / s:.2f}x':>17}")
    if p and s:
        print(f"the pipeline runs at {s / p:.2f}x the speed of the plain script (issue 24's targets, als included: "
              ">= 0.6x on ml100k, >= 0.9x at --scale 10)")
        p_als, s_als = pipe.get("als_s"), script["stage_s"].get("als")
        if p_als is not None and s_als is not None:
            ratio = (s - s_als) / (p - p_als)
            table["without als"] = {"pipeline_s": p - p_als, "script_s": s - s_als, "ratio": (p - p_als) / (s - s_als)}
            print(f"without als (each side less its als time: the pipeline's fit {p_als:.1f} s, the script's Spark "
                  f"start and fit {s_als:.1f} s): {ratio:.2f}x the speed of the plain script")
    if pipe and pipe.get("paths"):
        print("pipeline paths: " + "; ".join(
            f"{stage} {'' if path['on_driver'] is None else 'on the driver, ' if path['on_driver'] else 'on Spark, '}"
            "committed by "
            + ",".join(sorted(set(path["committed_by"].values())))
            for stage, path in pipe["paths"].items() if path["committed_by"])
            + f"; peak RSS of one process {pipe['peak_rss_mb']:.0f} MB")
    fl = runs.get("floor")
    if fl:
        print(f"floor (Spark + Ray started, the pipeline's {sum(len(w) for w in FLOOR_WRITES.values())} table commits, "
              f"its plan and runs commits, no work): {fl['wall_s']:.1f} s; by stage: "
              + ", ".join(f"{k} {v:.1f}" for k, v in fl["stage_s"].items()) + f"; Spark start {fl['spark_start_s']:.1f}")
        if s:
            print(f"best reachable: the script plus the floor, {s / (s + fl['wall_s']):.2f}x the script")
            result["best_reachable_ratio"] = s / (s + fl["wall_s"])
    result["stages"] = table
    if pipe and script:
        result["agreement"] = {
            "metrics": compare_values(pipe["metrics"], script["metrics"], ["representation", "metric", "k"],
                                      ["value", "ci_low", "ci_high", "n_users"]),
            "comparisons": compare_values(pipe["comparisons"], script["comparisons"],
                                          ["representation_a", "representation_b", "metric", "k"],
                                          ["mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "n_users"]),
        }
        for name, agreement in result["agreement"].items():
            print(f"{name}: {agreement['equal_1e-9']} of {agreement['values']} values equal to 1e-9, max abs diff "
                  f"{agreement['max_abs_diff']:.2e} at {agreement['max_abs_diff_at']}; rows only in pipeline "
                  f"{agreement['only_in_pipeline']}, only in script {agreement['only_in_script']}")
    if script:
        result["script_counts"] = script["counts"]
        recall = {r["representation"]: r["value"] for r in script["metrics"]
                  if r["metric"] == "recall" and r["k"] == 10}
        if recall:
            print("script recall@10: " + ", ".join(f"{n} {v:.4f}" for n, v in recall.items()))
    for side, run in runs.items():
        result[side] = {k: v for k, v in run.items() if k not in ("metrics", "comparisons")}
    print(f"machine: {result['machine']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
