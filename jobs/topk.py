"""``topk``: user profiles x item vectors -> the ``recommendations`` Delta table, blockwise.

For one profiles run (``--run-id``) and each representation, the exact top-K items by cosine
(the inner product of the stored L2-normalised vectors; the ``als`` reference by the dot
product of its unnormalised factors, ``udfs.scorers.vector_scorer``), the user's seen items
excluded:

1. Profiles (with each user's seen items) and candidate items are packed into blocks of at
   most ``user_block`` / ``item_block`` rows, one Spark row of float32 bytes per block
   (``udfs.topk_udfs.pack_blocks``), and persisted on disk.
2. The user blocks are cross-joined with the item blocks AT BLOCK GRANULARITY (a cartesian
   product of u_blocks x i_blocks rows; never users x items). Each task scores one user block
   against one item block with BLAS (``udfs.topk.topk_block``), masks the seen items to -inf
   and keeps the top K per user.
3. ``groupBy(representation, user_block)`` merges a block's per-item-block lists
   (``udfs.topk.merge_topk``) into ranks 1..K.

Memory per task depends on the block sizes only: one item block, one user block and one
(``score_rows`` x ``item_block``) float32 score matrix.

Settings: the run's plan (``jobs.plan``: the one stored under ``--run-id``, else resolved from
``experiment.topk`` and stored; a flag that disagrees with a stored plan exits 2) and this job's
block sizes; each flag is an alias of ``--set`` on its key. Candidates (``--candidates`` /
``experiment.topk.candidates``), by ``udfs.protocol.candidate_items``: ``common`` (default) is
the set of items with a vector in EVERY configured representation, the same for all of them, as
the evaluation protocol requires; ``all`` gives each representation its own items (and the
baselines the whole catalog). The candidate set is stored in the ``candidates`` table under the
run id (every representation in one commit), and ``evaluate`` measures over it. Seen items
(``--exclude`` / ``experiment.topk.exclude``): the user's interactions in these splits,
``train,valid`` by default (test-time evaluation).

Baselines (``--baselines`` / ``experiment.topk.baselines``, default ``popularity,random``)
need no vectors: ``popularity`` ranks the candidates by their train interaction count (the
same blockwise path, the count carried as a one-dimensional item vector, scored by
``udfs.scorers.PopularityScorer``); ``random`` gives each user an independent
order from a hash of (``experiment.topk.seed``, user id, item id). Both serve every user with
train interactions.

Ties break by item id (ascending), so the output is deterministic. A list is shorter than K
only when the user's unseen candidates run out (``short_lists_<rep>``). Users without a
profile (``users_without_profile_<rep>``) or without train history (``users_without_train``)
are counted. Rows are keyed by the profiles' run id; a rerun replaces the run's rows for these
representations in one atomic commit (``replaceWhere`` on run id and representation).
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from udfs import protocol, scorers, topk_udfs, warehouse_writer
from udfs.representations import ALS
from udfs.spark import schemas

from . import driver_inputs, tables
from .config import POPULARITY, ConfigError
from .facts import collect_facts
from .job_run import Job, JobParser, JobRun, NothingUsable, add_plan_arguments
from .plan import TOPK_FIELDS, ExperimentPlan, plan_for_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopkSettings:
    """The run's plan (what evaluate must agree with) and this job's own block sizes."""

    plan: ExperimentPlan
    run_id: str
    user_block: int
    item_block: int
    score_rows: int

    @property
    def dataset(self) -> str:
        return self.plan.dataset

    @property
    def representations(self) -> tuple[str, ...]:
        return self.plan.representations

    @property
    def baselines(self) -> tuple[str, ...]:
        return self.plan.baselines

    @property
    def all_representations(self) -> tuple[str, ...]:
        return self.plan.ranked

    @property
    def k(self) -> int:
        return self.plan.k

    @property
    def exclude(self) -> tuple[str, ...]:
        return self.plan.exclude

    @property
    def candidates(self) -> str:
        return self.plan.candidates

    @property
    def seed(self) -> int:
        return self.plan.topk_seed


def resolve_settings(run: JobRun, args: argparse.Namespace) -> TopkSettings:
    """The plan stored under ``--run-id`` (``jobs.plan.plan_for_run``: refused when this job's
    config disagrees with it) and ``experiment.topk``'s block sizes (ranges checked by the config)."""
    if not args.run_id:
        raise ConfigError("--run-id is required: pass the run id the profiles job keyed user_profiles by")
    plan = plan_for_run(run, args.run_id, TOPK_FIELDS)
    if not plan.ranked:
        raise ConfigError("no representation to rank: configure experiment.representations or "
                          "experiment.topk.baselines")
    conf = run.config.experiment.topk
    return TopkSettings(plan=plan, run_id=args.run_id, user_block=conf.user_block, item_block=conf.item_block,
                        score_rows=conf.score_rows)


def catalog_items(spark: SparkSession, warehouse: str, dataset: str) -> list[str]:
    """The item ids of the dataset's catalog: the ``items`` table, else the items interacted with."""
    items = tables.read(spark, warehouse, "items").filter(F.col("dataset") == dataset).select("item_id")
    if not items.limit(1).count():
        items = tables.read(spark, warehouse, "interactions").filter(F.col("dataset") == dataset).select("item_id")
    return [r[0] for r in items.distinct().collect()]


def candidate_items(spark: SparkSession, warehouse: str, settings: TopkSettings,
                    embedded: pd.DataFrame) -> pd.DataFrame:
    """(representation, item_id): the items each representation ranks, by the candidate rule
    (``udfs.protocol.candidate_items``) applied on the driver to the ids with a vector
    (``embedded``, ids only: tens of MB at a million items), so the rule has one definition."""
    plan = settings.plan
    needs_catalog = bool(plan.baselines) if plan.candidates == protocol.ALL else not plan.representations
    catalog = catalog_items(spark, warehouse, plan.dataset) if needs_catalog else []
    return protocol.candidate_items(embedded, plan.representations, plan.baselines, catalog, plan.candidates)


def prepare_facts(users_seen: DataFrame, profiles: DataFrame, embeddings: DataFrame,
                  settings: TopkSettings) -> dict:
    """What the ranking needs to know first, from ONE Spark job over a union of small results (a
    job per question cost more than the questions on small data): ``users`` (users,
    users_with_train, seen_pairs_excluded of ``per_user``'s frame), ``profiles`` (representation
    -> profiles under the run id), ``embedded`` ((representation, item_id) with a vector, as
    pandas) and ``als_encoders`` (the encoders of the ``als`` item factors)."""
    reps = list(settings.representations)
    parts = [("users", users_seen.agg(F.count(F.lit(1)).alias("users"), F.sum("has_train").alias("with_train"),
                                      F.sum(F.size("seen")).alias("seen")),
              {"a": F.col("users"), "b": F.col("with_train"), "c": F.col("seen")})]
    if reps:
        parts.append(("profiles", profiles.groupBy("representation").count(),
                      {"representation": F.col("representation"), "a": F.col("count")}))
        parts.append(("embedded", embeddings.filter(F.col("representation").isin(reps))
                      .select("representation", "item_id").distinct(),
                      {"representation": F.col("representation"), "item_id": F.col("item_id")}))
    if ALS in reps:
        parts.append(("als", embeddings.filter(F.col("representation") == ALS).select("encoder").distinct(),
                      {"item_id": F.col("encoder")}))
    rows = collect_facts({"representation": "string", "item_id": "string", "a": "long", "b": "long", "c": "long"},
                         parts)
    users = next(r for r in rows if r["kind"] == "users")
    return {
        "users": {"users": int(users["a"] or 0), "users_with_train": int(users["b"] or 0),
                  "seen_pairs_excluded": int(users["c"] or 0)},
        "profiles": {r["representation"]: int(r["a"]) for r in rows if r["kind"] == "profiles"},
        "embedded": pd.DataFrame([(r["representation"], r["item_id"]) for r in rows if r["kind"] == "embedded"],
                                 columns=protocol.CANDIDATE_COLUMNS),
        "als_encoders": sorted(r["item_id"] or "" for r in rows if r["kind"] == "als"),
    }


def per_user(interactions: DataFrame, exclude: Sequence[str]) -> DataFrame:
    """(user_id, has_train, seen array<string>): whether the user has train history, and the
    distinct items of their excluded splits. One shuffle serves the counts, the seen masks and
    the baselines' users."""
    return interactions.groupBy("user_id").agg(
        F.max((F.col("split") == protocol.TRAIN_SPLIT).cast("int")).alias("has_train"),
        F.array_distinct(F.collect_list(F.when(F.col("split").isin(list(protocol.seen_splits(exclude))),
                                               F.col("item_id"))))
        .alias("seen"))


@contextlib.contextmanager
def arrow_batch_rows(spark: SparkSession, rows: int) -> Iterator[None]:
    """Arrow batches of at most ``rows`` rows while the block frames run: a block pair row
    carries a whole item block, and the default (10,000 rows) would stack many in one batch."""
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    before = spark.conf.get(key, None)
    spark.conf.set(key, str(rows))
    try:
        yield
    finally:
        if before is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, before)


def pack(frame: DataFrame, n_rows: int, block: int, with_seen: bool, min_blocks: int) -> DataFrame:
    """Block rows of ``frame`` (id, vector[, seen]), persisted on disk (they are read once per
    block pair). One hash partition per block, so the cross join's tasks hold one pair each."""
    n_parts = max(1, min(n_rows, max(math.ceil(n_rows / block), min_blocks)))
    ddl = schemas.USER_BLOCK_DDL if with_seen else schemas.BLOCK_DDL
    packed = (frame.repartition(n_parts, frame.columns[0])
              .mapInArrow(topk_udfs.pack_blocks(block, with_seen), ddl)
              .persist(StorageLevel.DISK_ONLY))
    return packed


def block_pairs(users: DataFrame, items: DataFrame, settings: TopkSettings, scorer: str,
                threads: int) -> DataFrame:
    """Per block pair top-K lists (``PAIR_DDL``): a cartesian product of BLOCK rows."""
    left = users.select([F.col(c).alias(f"u_{c}") for c in users.columns])
    right = items.select([F.col(c).alias(f"i_{c}") for c in items.columns])
    # A broadcast would ship the whole catalog to every task; the replicated cartesian product
    # keeps one item block per task.
    joined = left.hint("shuffle_replicate_nl").crossJoin(right)
    return joined.mapInArrow(
        topk_udfs.pair_topk_batches(settings.k, scorer, settings.seed, settings.score_rows, threads),
        schemas.PAIR_DDL)


def rank_representation(run: JobRun, name: str, users: DataFrame, items: DataFrame, n_users: int, n_items: int,
                        settings: TopkSettings, scorer: str, blocks: list[DataFrame]) -> DataFrame | None:
    """Pair lists of one representation, or None when it has no user or no item to rank."""
    spark = run.spark
    if n_users == 0 or n_items == 0:
        log.warning("representation %s: %d users and %d candidate items: nothing to rank", name, n_users, n_items)
        return None
    parallelism = spark.sparkContext.defaultParallelism
    threads = max(1, int(spark.sparkContext.getConf().get("spark.task.cpus", "1")))
    # Each item block is read once per user block, so user blocks are as large as allowed (a
    # user block is small: vectors and seen ids, no score matrix), yet numerous enough that
    # the block pairs keep every core busy.
    min_user_blocks = math.ceil(parallelism / math.ceil(n_items / settings.item_block))
    user_blocks = pack(users, n_users, settings.user_block, True, min_user_blocks)
    item_blocks = pack(items, n_items, settings.item_block, False, 1)
    blocks += [user_blocks, item_blocks]
    return block_pairs(user_blocks, item_blocks, settings, scorer, threads).withColumn(
        "representation", F.lit(name))


def check_als_factors(found: list[str], run_id: str) -> None:
    """The ``als`` item factors (their encoders: ``found``) must come from the ALS whose user
    factors this run's profiles hold (the profiles job of ``run_id`` writes both): factors of two
    fits live in unrelated spaces, and a later run's profiles job replaces the dataset's item factors."""
    expected = f"spark-ml-als:{run_id}"
    if found and found != [expected]:
        raise NothingUsable(
            f"the als item factors in item_embeddings were trained by {', '.join(found)}, not by the profiles "
            f"of run id {run_id}: run `vlm4rec profiles --run-id {run_id}` again (it retrains them), then topk")


def record_users(run: JobRun, settings: TopkSettings, counts: dict[str, int]) -> int:
    """Count the users; the users with train interactions, or NothingUsable when there are none."""
    for key, value in counts.items():
        run.count(key, value)
    n_train_users = counts["users_with_train"]
    run.count("users_without_train", counts["users"] - n_train_users)
    if n_train_users == 0:
        raise NothingUsable(f"dataset '{settings.dataset}' has no train interactions in {run.warehouse}/interactions: "
                            "run `vlm4rec ingest` first")
    return n_train_users


def record_candidates(run: JobRun, settings: TopkSettings, chosen: pd.DataFrame) -> dict[str, int]:
    """Count each representation's candidates; NothingUsable when no representation has one."""
    n_candidates = chosen.groupby("representation").size().to_dict()
    for name in settings.all_representations:
        run.count(f"candidates_{name}", n_candidates.get(name, 0))
    if not any(n_candidates.values()):
        raise NothingUsable(
            f"no candidate item for {list(settings.all_representations)} ({settings.candidates}): with "
            "'common', no item has a vector in every representation; run `vlm4rec embed` for them first")
    return n_candidates


def record_profiles(run: JobRun, settings: TopkSettings, name: str, n_users: int, n_train_users: int) -> None:
    run.count(f"users_without_profile_{name}", max(0, n_train_users - n_users))
    if n_users == 0:
        log.warning("representation %s: no profile under run id %s; run `vlm4rec profiles "
                    "--run-id %s` with this representation first", name, settings.run_id, settings.run_id)


def record_written(run: JobRun, settings: TopkSettings, counted: dict[str, tuple[int, int, int]]) -> None:
    """Per representation (rows, users with a list, users with a full list) as written."""
    for name in settings.all_representations:
        rows, users, full = counted.get(name, (0, 0, 0))
        short = users - full
        run.count(f"recommended_users_{name}", users)
        run.count(f"short_lists_{name}", short)
        run.count("rows_written", rows)
        if short:
            log.info("representation %s: %d users have fewer than %d unseen candidates", name, short, settings.k)


def driver_slices(settings: TopkSettings) -> dict[str, driver_inputs.Slice]:
    """What the driver path reads: the dataset's interactions, the run's profiles and the
    dataset's item vectors of the representations, and the catalog when a rule needs it."""
    plan, reps = settings.plan, list(settings.representations)
    slices = {"interactions": driver_inputs.Slice("interactions", {"dataset": plan.dataset},
                                                  columns=("user_id", "item_id", "split"))}
    if reps:
        slices["profiles"] = driver_inputs.Slice("user_profiles", {"run_id": settings.run_id},
                                                 {"representation": reps},
                                                 ("representation", "user_id", "vector"))
        slices["embeddings"] = driver_inputs.Slice("item_embeddings", {"dataset": plan.dataset},
                                                   {"representation": reps},
                                                   ("representation", "item_id", "vector", "encoder"))
    if bool(plan.baselines) if plan.candidates == protocol.ALL else not plan.representations:
        slices["items"] = driver_inputs.Slice("items", {"dataset": plan.dataset}, columns=("item_id",))
    return slices


def topk_on_driver(run: JobRun, settings: TopkSettings, read: dict[str, pa.Table]) -> None:
    """The job on the driver (``jobs.driver_inputs``): the same rules, counts, kernels
    (``udfs.topk_udfs.rank_in_process``) and commits as the blockwise path below."""
    spark, wh = run.spark, run.warehouse
    reps = list(settings.representations)
    with run.stage("prepare"):
        interactions = read["interactions"].to_pandas()
        seen = protocol.seen_items(interactions, settings.exclude)
        users = interactions["user_id"].unique()
        train = interactions[interactions["split"] == protocol.TRAIN_SPLIT]
        train_users = train["user_id"].unique()
        n_train_users = record_users(run, settings, {
            "users": len(users), "users_with_train": len(train_users),
            "seen_pairs_excluded": sum(len(s) for s in seen.values())})
        profiles = read["profiles"].to_pandas() if reps else pd.DataFrame(columns=["representation", "user_id",
                                                                                   "vector"])
        embeddings = (read["embeddings"].to_pandas() if reps
                      else pd.DataFrame(columns=["representation", "item_id", "vector", "encoder"]))
        catalog: list[str] = []
        if "items" in read:
            catalog = read["items"].column("item_id").to_pylist()
            if not catalog:  # as catalog_items: the items interacted with
                catalog = list(interactions["item_id"])
            catalog = sorted(set(catalog))
        chosen = protocol.candidate_items(embeddings[["representation", "item_id"]], reps, settings.baselines,
                                          catalog, settings.candidates)
        n_candidates = record_candidates(run, settings, chosen)
        n_profiles = profiles.groupby("representation").size().to_dict()
        if ALS in settings.representations:
            check_als_factors(sorted(set(embeddings.loc[embeddings["representation"] == ALS, "encoder"].fillna(""))),
                              settings.run_id)
    with run.stage("score_merge_and_write"):
        parts = []
        train_ids = np.asarray(sorted(train_users), dtype=object)
        for name in settings.all_representations:
            these = chosen.loc[chosen["representation"] == name, "item_id"]
            if name in settings.representations:
                mine = profiles[profiles["representation"] == name]
                record_profiles(run, settings, name, n_profiles.get(name, 0), n_train_users)
                user_table = pa.table({"user_id": pa.array(mine["user_id"], pa.string()),
                                       "vector": pa.array(mine["vector"], pa.list_(pa.float32())),
                                       "seen": pa.array([sorted(seen.get(u, ())) for u in mine["user_id"]],
                                                        pa.list_(pa.string()))})
                vectors = embeddings[(embeddings["representation"] == name) & embeddings["item_id"].isin(these)]
                item_table = pa.table({"item_id": pa.array(vectors["item_id"], pa.string()),
                                       "vector": pa.array(vectors["vector"], pa.list_(pa.float32()))})
                scorer = scorers.vector_scorer(name)
            else:
                user_table = pa.table({"user_id": pa.array(train_ids, pa.string()),
                                       "vector": pa.array([[1.0]] * len(train_ids), pa.list_(pa.float32())),
                                       "seen": pa.array([sorted(seen.get(u, ())) for u in train_ids],
                                                        pa.list_(pa.string()))})
                item_ids = list(these)
                if name == POPULARITY:
                    by_item = train.groupby("item_id").size()
                    values = [[float(by_item.get(i, 0))] for i in item_ids]
                    scorer = topk_udfs.POPULARITY
                else:
                    values = [[0.0]] * len(item_ids)
                    scorer = topk_udfs.RANDOM
                item_table = pa.table({"item_id": pa.array(item_ids, pa.string()),
                                       "vector": pa.array(values, pa.list_(pa.float32()))})
            if user_table.num_rows == 0 or n_candidates.get(name, 0) == 0:
                log.warning("representation %s: %d users and %d candidate items: nothing to rank", name,
                            user_table.num_rows, n_candidates.get(name, 0))
                continue
            parts.append(topk_udfs.rank_in_process(name, user_table, item_table, settings.k, scorer,
                                                   settings.seed, settings.score_rows, settings.item_block))
        if not parts:
            raise NothingUsable(f"run id {settings.run_id}: no representation had both users and candidate "
                                "items; run `vlm4rec profiles` (and `embed`) first")
        ranks = pa.concat_tables(parts)
        keys = {"run_id": settings.run_id, "topk_id": run.run_id}
        chosen_table = pa.Table.from_pandas(chosen[["representation", "item_id"]], preserve_index=False)
        tables.replace_slice(spark, wh, "candidates", warehouse_writer.with_constants(chosen_table, keys),
                             {"run_id": settings.run_id})
        tables.replace_slice(spark, wh, "recommendations", warehouse_writer.with_constants(ranks, keys),
                             {"run_id": settings.run_id, "representation": list(settings.all_representations)})
    frame = ranks.select(["representation", "rank"]).to_pandas()
    counted = {name: (int(len(g)), int((g["rank"] == 1).sum()), int((g["rank"] == settings.k).sum()))
               for name, g in frame.groupby("representation")}
    record_written(run, settings, counted)
    log.info("topk run_id=%s: top-%d over %s (on the driver)", settings.run_id, settings.k,
             list(settings.all_representations))


def topk(run: JobRun, args: argparse.Namespace) -> None:
    settings = resolve_settings(run, args)
    read = driver_inputs.read_on_driver(run, driver_slices(settings))
    if read is not None:
        topk_on_driver(run, settings, read)
    else:
        topk_with_spark(run, settings)


def topk_with_spark(run: JobRun, settings: TopkSettings) -> None:
    spark, wh = run.spark, run.warehouse
    interactions = (tables.read(spark, wh, "interactions").filter(F.col("dataset") == settings.dataset)
                    .select("user_id", "item_id", "split"))
    with run.stage("prepare"):
        users_seen = per_user(interactions, settings.exclude).persist(StorageLevel.MEMORY_AND_DISK)
        profiles = (tables.read(spark, wh, "user_profiles")
                    .filter((F.col("run_id") == settings.run_id)
                            & F.col("representation").isin(list(settings.representations))))
        embeddings = tables.read(spark, wh, "item_embeddings").filter(F.col("dataset") == settings.dataset)
        facts = prepare_facts(users_seen, profiles, embeddings, settings)
        try:
            n_train_users = record_users(run, settings, facts["users"])
            seen = users_seen.select("user_id", "seen")
            chosen = candidate_items(spark, wh, settings, facts["embedded"])
            n_candidates = record_candidates(run, settings, chosen)
        except NothingUsable:
            users_seen.unpersist()
            raise
        candidates = (spark.createDataFrame(chosen, "representation string, item_id string")
                      .persist(StorageLevel.MEMORY_AND_DISK))
        train = interactions.filter(F.col("split") == protocol.TRAIN_SPLIT)
        n_profiles = facts["profiles"]
        if ALS in settings.representations:
            check_als_factors(facts["als_encoders"], settings.run_id)
    blocks: list[DataFrame] = []  # every representation's packed user and item blocks, persisted
    parts: list[DataFrame] = []
    for name in settings.all_representations:
        these = candidates.filter(F.col("representation") == name).select("item_id")
        if name in settings.representations:
            users = (profiles.filter(F.col("representation") == name)
                     .select("user_id", "vector").join(seen, "user_id", "left"))
            items = (embeddings.filter(F.col("representation") == name).select("item_id", "vector")
                     .join(these, "item_id", "left_semi"))
            scorer = scorers.vector_scorer(name)
            n_users = n_profiles.get(name, 0)
            record_profiles(run, settings, name, n_users, n_train_users)
        else:
            one = F.array(F.lit(1.0).cast("float"))
            users = users_seen.filter(F.col("has_train") == 1).select("user_id", one.alias("vector"), "seen")
            n_users = n_train_users
            if name == POPULARITY:
                counts_by_item = train.groupBy("item_id").agg(F.count(F.lit(1)).cast("float").alias("_n"))
                items = these.join(counts_by_item, "item_id", "left").select(
                    "item_id", F.array(F.coalesce("_n", F.lit(0.0).cast("float"))).alias("vector"))
                scorer = topk_udfs.POPULARITY
            else:
                items = these.select("item_id", F.array(F.lit(0.0).cast("float")).alias("vector"))
                scorer = topk_udfs.RANDOM
        part = rank_representation(run, name, users, items, n_users, n_candidates.get(name, 0), settings,
                                   scorer, blocks)
        if part is not None:
            parts.append(part)
    cached: list[DataFrame] = [candidates, users_seen, *blocks]
    if not parts:
        for frame in cached:
            frame.unpersist()
        raise NothingUsable(f"run id {settings.run_id}: no representation had both users and candidate "
                            "items; run `vlm4rec profiles` (and `embed`) first")
    # No action packs or scores ahead of the write: the write's one Spark job runs every
    # representation's packing stages side by side (independent stages of one job), then the
    # block pairs, then the merge; the packed blocks are persisted, so each is computed once.
    pairs = parts[0]
    for part in parts[1:]:
        pairs = pairs.unionByName(part)
    names = list(settings.all_representations)
    # Counted while the merged lists are written (one pass, no cache of the ranks): a user with
    # a list has a rank 1, and one whose list is full has a rank k.
    written = Observation("recommendations")
    rep, rank = F.col("representation"), F.col("rank")
    per_name = [agg for i, name in enumerate(names) for agg in (
        F.count(F.when(rep == name, 1)).alias(f"rows_{i}"),
        F.count(F.when((rep == name) & (rank == 1), 1)).alias(f"users_{i}"),
        F.count(F.when((rep == name) & (rank == settings.k), 1)).alias(f"full_{i}"))]
    with arrow_batch_rows(spark, 1), run.stage("score_merge_and_write"):
        # The candidate set this ranking used, every representation in one commit: evaluate
        # measures over it, whatever item_embeddings holds by then.
        tables.replace_slice(spark, wh, "candidates", candidates.withColumn("run_id", F.lit(settings.run_id))
                             .withColumn("topk_id", F.lit(run.run_id)), {"run_id": settings.run_id})
        ranks = (pairs.groupBy("representation", "user_block")
                 .applyInArrow(topk_udfs.merge_block_results(settings.k), schemas.RANKS_DDL)
                 .observe(written, *per_name))
        # One atomic overwrite of this run's slice: rows of a representation no longer ranked
        # go with it, and readers never see a half-replaced run.
        # Both commits carry this job's run id: a topk killed between them leaves candidates
        # and lists of two rankings, which evaluate then refuses.
        tables.replace_slice(spark, wh, "recommendations", ranks.withColumn("run_id", F.lit(settings.run_id))
                             .withColumn("topk_id", F.lit(run.run_id)),
                             {"run_id": settings.run_id, "representation": names})
    got = written.get
    record_written(run, settings, {name: (got[f"rows_{i}"], got[f"users_{i}"], got[f"full_{i}"])
                                   for i, name in enumerate(names)})
    for frame in cached:
        frame.unpersist()
    log.info("topk run_id=%s: top-%d over %s", settings.run_id, settings.k, list(settings.all_representations))


def add_arguments(parser: JobParser) -> None:
    add_plan_arguments(parser)
    parser.add_setting("--k", "experiment.topk.k", type=int, help="list length (default: max(experiment.evaluate.ks))")
    parser.add_setting("--user-block", "experiment.topk.user_block", type=int, help="profiles per block (default 16384)")
    parser.add_setting("--item-block", "experiment.topk.item_block", type=int, help="items per block (default 32768)")


JOB = Job("topk", __doc__.splitlines()[0], topk, add_arguments)


def main(argv: list[str] | None = None, spark=None) -> int:
    return JOB.main(argv, spark=spark)


if __name__ == "__main__":
    raise SystemExit(main())
