"""``topk``: user profiles x item vectors -> the ``recommendations`` Delta table, blockwise.

For one profiles run (``--run-id``) and each representation, the exact top-K items by cosine
(the inner product of the stored L2-normalised vectors; the ``als`` reference by the dot
product of its unnormalised factors, ``udfs.rank.scorers.scorer_for``), the user's seen items
excluded. Small inputs are ranked on the driver (``jobs.driver_inputs``) by the same functions
(``udfs.rank.topk_udfs.rank_in_process``); large ones by Spark, blockwise:

1. Profiles (with each user's seen items, ``udfs.rank.topk_udfs.users_table``) and candidate items
   are grouped into buckets of about ``user_block`` / ``item_block`` rows (``jobs.spark_groups.bucket``),
   each bucket packed into blocks of at most that many rows, one Spark row of float32 bytes per
   block (``udfs.rank.topk_udfs.pack_table``), and persisted on disk.
2. The user blocks are cross-joined with the item blocks AT BLOCK GRANULARITY (a cartesian
   product of u_blocks x i_blocks rows; never users x items). Each task scores one user block
   against one item block with BLAS (``udfs.rank.topk.topk_block``), masks the seen items to -inf
   and keeps the top K per user.
3. ``groupBy(representation, user_block)`` merges a block's per-item-block lists
   (``udfs.rank.topk.merge_topk``) into ranks 1..K.

Memory per task depends on the block sizes only: one item block, one user block and one
(``score_rows`` x ``item_block``) float32 score matrix.

Settings: the run's plan (``jobs.plan``: the one stored under ``--run-id``, else resolved from
``experiment.topk`` and stored; a flag that disagrees with a stored plan exits 2) and this job's
block sizes; each flag is an alias of ``--set`` on its key. Candidates (``--candidates`` /
``experiment.topk.candidates``), by ``udfs.evaluate.protocol.candidate_items``: ``common`` (default) is
the set of items with a vector in EVERY configured representation, the same for all of them, as
the evaluation protocol requires; ``all`` gives each representation its own items (and the
baselines the whole catalog). The candidate set is stored in the ``candidates`` table under the
run id (every representation in one commit), and ``evaluate`` measures over it. Seen items
(``--exclude`` / ``experiment.topk.exclude``): the user's interactions in these splits,
``train,valid`` by default (test-time evaluation).

Baselines (``--baselines`` / ``experiment.topk.baselines``, default ``popularity,random``)
need no vectors: ``popularity`` ranks the candidates by their train interaction count (the
same blockwise path, the count carried as a one-dimensional item vector, scored by
``udfs.rank.scorers.PopularityScorer``); ``random`` gives each user an independent
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
import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, GroupedData, Observation, SparkSession
from pyspark.sql import functions as F

from udfs.evaluate import protocol
from udfs.rank import scorers, topk_udfs
from udfs.io import warehouse_writer
from udfs.representations import ALS
from udfs.spark import schemas

from . import driver_inputs, tables
from .config import ConfigError
from .facts import collect_facts
from .job_run import Job, JobParser, JobRun, NothingUsable, add_plan_arguments
from .plan import TOPK_FIELDS, ExperimentPlan, plan_for_run
from .spark_groups import bucket, n_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopkSettings:
    """The run's plan (what evaluate must agree with) and this job's own block sizes."""

    plan: ExperimentPlan
    run_id: str
    user_block: int
    item_block: int
    score_rows: int


@dataclass(frozen=True)
class Prepared:
    """What either path's first look at the inputs hands the ranking: the users (with train
    interactions, and their seen pairs), each representation's profiles under the run id, the
    (representation, item_id) pairs with a vector, the catalog's and the interactions' item ids
    (the candidate rule's inputs; empty when the rule does not read them) and the encoders of
    the ``als`` item factors."""

    users: int
    users_with_train: int
    seen_pairs_excluded: int
    profiles: dict[str, int]
    embedded: pd.DataFrame
    catalog: list[str]
    interacted: list[str]
    als_encoders: list[str]


@dataclass(frozen=True)
class Ranking:
    """The candidates (``protocol.CANDIDATE_COLUMNS``, as stored) and, per name that has both
    users and candidate items, their numbers (users, items)."""

    candidates: pd.DataFrame
    sizes: dict[str, tuple[int, int]]


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


def check_als_factors(found: list[str], run_id: str) -> None:
    """The ``als`` item factors (their encoders: ``found``) must come from the ALS whose user
    factors this run's profiles hold (the profiles job of ``run_id`` writes both): factors of two
    fits live in unrelated spaces, and a later run's profiles job replaces the dataset's item factors."""
    expected = f"spark-ml-als:{run_id}"
    if found and found != [expected]:
        raise NothingUsable(
            f"the als item factors in item_embeddings were trained by {', '.join(found)}, not by the profiles "
            f"of run id {run_id}: run `vlm4rec profiles --run-id {run_id}` again (it retrains them), then topk")


def choose(run: JobRun, settings: TopkSettings, prepared: Prepared) -> Ranking:
    """Count the users, the candidates (``udfs.evaluate.protocol.candidate_items``) and the profiles; the
    names with both users and candidate items. NothingUsable when there is nothing to rank."""
    plan = settings.plan
    for key in ("users", "users_with_train", "seen_pairs_excluded"):
        run.count(key, getattr(prepared, key))
    n_train_users = prepared.users_with_train
    run.count("users_without_train", prepared.users - n_train_users)
    if n_train_users == 0:
        raise NothingUsable(f"dataset '{plan.dataset}' has no train interactions in {run.warehouse}/interactions: "
                            "run `vlm4rec ingest` first")
    chosen = protocol.candidate_items(prepared.embedded, plan.representations, plan.baselines, prepared.catalog,
                                      plan.candidates, prepared.interacted)
    n_candidates = chosen.groupby("representation").size().to_dict()
    for name in plan.ranked:
        run.count(f"candidates_{name}", n_candidates.get(name, 0))
    if not any(n_candidates.values()):
        raise NothingUsable(
            f"no candidate item for {list(plan.ranked)} ({plan.candidates}): with "
            "'common', no item has a vector in every representation; run `vlm4rec embed` for them first")
    if ALS in plan.representations:
        check_als_factors(prepared.als_encoders, settings.run_id)
    sizes = {}
    for name in plan.ranked:
        n_users = prepared.profiles.get(name, 0) if name in plan.representations else n_train_users
        if name in plan.representations:
            run.count(f"users_without_profile_{name}", max(0, n_train_users - n_users))
            if n_users == 0:
                log.warning("representation %s: no profile under run id %s; run `vlm4rec profiles "
                            "--run-id %s` with this representation first", name, settings.run_id, settings.run_id)
        if n_users == 0 or n_candidates.get(name, 0) == 0:
            log.warning("representation %s: %d users and %d candidate items: nothing to rank", name, n_users,
                        n_candidates.get(name, 0))
        else:
            sizes[name] = (n_users, n_candidates[name])
    if not sizes:
        raise NothingUsable(f"run id {settings.run_id}: no representation had both users and candidate "
                            "items; run `vlm4rec profiles` (and `embed`) first")
    return Ranking(chosen, sizes)


def commit(run: JobRun, settings: TopkSettings, candidates: pa.Table | DataFrame,
           ranks: pa.Table | DataFrame) -> None:
    """The candidate set this ranking used (every representation in one commit: evaluate
    measures over it, whatever item_embeddings holds by then), then the lists: one atomic
    overwrite of this run's slice, so rows of a representation no longer ranked go with it and
    readers never see a half-replaced run. Both commits carry this job's run id: a topk killed
    between them leaves candidates and lists of two rankings, which evaluate then refuses."""
    keys = {"run_id": settings.run_id, "topk_id": run.run_id}

    def keyed(rows: pa.Table | DataFrame) -> pa.Table | DataFrame:
        if isinstance(rows, pa.Table):
            return warehouse_writer.with_constants(rows, keys)
        return rows.select("*", *[F.lit(value).alias(key) for key, value in keys.items()])

    tables.replace_slice(run.spark, run.warehouse, "candidates", keyed(candidates), {"run_id": settings.run_id})
    tables.replace_slice(run.spark, run.warehouse, "recommendations", keyed(ranks),
                         {"run_id": settings.run_id, "representation": list(settings.plan.ranked)})


def record_written(run: JobRun, settings: TopkSettings, counted: dict[str, tuple[int, int, int]]) -> None:
    """Per representation (rows, users with a list, users with a full list) as written."""
    for name in settings.plan.ranked:
        rows, users, full = counted.get(name, (0, 0, 0))
        short = users - full
        run.count(f"recommended_users_{name}", users)
        run.count(f"short_lists_{name}", short)
        run.count("rows_written", rows)
        if short:
            log.info("representation %s: %d users have fewer than %d unseen candidates", name, short, settings.plan.k)


def driver_slices(settings: TopkSettings) -> dict[str, driver_inputs.Slice]:
    """What the driver path reads: the dataset's interactions, the run's profiles and the
    dataset's item vectors of the representations, and the catalog when a rule needs it."""
    plan, reps = settings.plan, list(settings.plan.representations)
    slices = {"interactions": driver_inputs.Slice("interactions", {"dataset": plan.dataset},
                                                  columns=("user_id", "item_id", "split"))}
    if reps:
        slices["profiles"] = driver_inputs.Slice("user_profiles", {"run_id": settings.run_id},
                                                 {"representation": reps},
                                                 ("representation", "user_id", "vector"))
        slices["embeddings"] = driver_inputs.Slice("item_embeddings", {"dataset": plan.dataset},
                                                   {"representation": reps},
                                                   ("representation", "item_id", "vector", "encoder"))
    if protocol.needs_catalog(plan.representations, plan.baselines, plan.candidates):
        slices["items"] = driver_inputs.Slice("items", {"dataset": plan.dataset}, columns=("item_id",))
    return slices


def topk_on_driver(run: JobRun, settings: TopkSettings, read: dict[str, pa.Table]) -> None:
    """The job on the driver (``jobs.driver_inputs``): the same rules, counts, kernels
    (``udfs.rank.topk_udfs.rank_in_process``) and commits as the blockwise path below."""
    plan = settings.plan
    with run.stage("prepare"):
        interactions = read["interactions"].to_pandas()
        users = topk_udfs.users_seen(interactions, plan.exclude)
        profiles = (read["profiles"].to_pandas() if plan.representations
                    else pd.DataFrame(columns=["representation", "user_id", "vector"]))
        embeddings = (read["embeddings"].to_pandas() if plan.representations
                      else pd.DataFrame(columns=["representation", "item_id", "vector", "encoder"]))
        catalog = read["items"].column("item_id").to_pylist() if "items" in read else []
        ranking = choose(run, settings, Prepared(
            users=len(users), users_with_train=int(users["has_train"].sum()),
            seen_pairs_excluded=int(users["seen"].map(len).sum()),
            profiles=profiles.groupby("representation").size().to_dict(),
            embedded=embeddings[protocol.CANDIDATE_COLUMNS], catalog=catalog,
            interacted=list(interactions["item_id"]) if "items" in read and not catalog else [],
            als_encoders=sorted(set(embeddings.loc[embeddings["representation"] == ALS, "encoder"].fillna("")))))
    with run.stage("score_merge_and_write"):
        train = interactions.loc[interactions["split"] == protocol.TRAIN_SPLIT, "item_id"].value_counts()
        parts = []
        for name in ranking.sizes:
            these = ranking.candidates.loc[ranking.candidates["representation"] == name, "item_id"]
            if name in plan.representations:
                users_table = topk_udfs.users_table(users, profiles[profiles["representation"] == name])
                vectors = embeddings[(embeddings["representation"] == name) & embeddings["item_id"].isin(these)]
                items = pa.table({"item_id": pa.array(vectors["item_id"], pa.string()),
                                  "vector": pa.array(vectors["vector"], pa.list_(pa.float32()))})
            else:
                users_table = topk_udfs.users_table(users, None)
                items = topk_udfs.baseline_items(name, list(these), train)
            parts.append(topk_udfs.rank_in_process(name, users_table, items, plan.k, scorers.scorer_for(name),
                                                   plan.topk_seed, settings.score_rows, settings.item_block))
        ranks = pa.concat_tables(parts)
        commit(run, settings, pa.Table.from_pandas(ranking.candidates, preserve_index=False), ranks)
    frame = ranks.select(["representation", "rank"]).to_pandas()
    record_written(run, settings, {
        name: (int(len(g)), int((g["rank"] == 1).sum()), int((g["rank"] == plan.k).sum()))
        for name, g in frame.groupby("representation")})
    log.info("topk run_id=%s: top-%d over %s (on the driver)", settings.run_id, plan.k, list(plan.ranked))


def topk(run: JobRun, args: argparse.Namespace) -> None:
    settings = resolve_settings(run, args)
    read = driver_inputs.read_on_driver(run, driver_slices(settings))
    if read is not None:
        topk_on_driver(run, settings, read)
    else:
        topk_with_spark(run, settings)


@contextlib.contextmanager
def arrow_batch_rows(spark: SparkSession, rows: int) -> Iterator[None]:
    """Arrow batches of at most ``rows`` rows while the block frames run: a block pair row
    carries a whole item block, and the default (10,000 rows) would stack many in one batch."""
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    before = spark.conf.get(key)  # a SQL setting with a default: never unset
    spark.conf.set(key, str(rows))
    try:
        yield
    finally:
        spark.conf.set(key, before)


def by_block(frame: DataFrame, column: str, n_rows: int, block: int, min_blocks: int = 1) -> GroupedData:
    """``frame`` in buckets of about ``block`` rows of ``column``, one partition per bucket, so
    the cross join's tasks hold one block pair each."""
    n = max(1, min(n_rows, max(math.ceil(n_rows / block), min_blocks)))
    return frame.repartition(n, bucket(column, n)).groupBy(bucket(column, n))


def spark_facts(run: JobRun, settings: TopkSettings, users: DataFrame, profiles: DataFrame,
                embeddings: DataFrame, interactions: DataFrame) -> Prepared:
    """``Prepared`` from ONE Spark job over a union of small results (a job per question cost
    more than the questions on small data)."""
    plan, reps = settings.plan, list(settings.plan.representations)
    parts = [("users", users.agg(F.count(F.lit(1)).alias("users"), F.sum(F.col("has_train").cast("int")).alias("t"),
                                 F.sum(F.size("seen")).alias("seen")),
              {"a": F.col("users"), "b": F.col("t"), "c": F.col("seen")})]
    if reps:
        parts.append(("profiles", profiles.groupBy("representation").count(),
                      {"representation": F.col("representation"), "a": F.col("count")}))
        parts.append(("embedded", embeddings.filter(F.col("representation").isin(reps))
                      .select("representation", "item_id").distinct(),
                      {"representation": F.col("representation"), "item_id": F.col("item_id")}))
    if ALS in reps:
        parts.append(("als", embeddings.filter(F.col("representation") == ALS).select("encoder").distinct(),
                      {"item_id": F.col("encoder")}))
    if protocol.needs_catalog(plan.representations, plan.baselines, plan.candidates):
        listed = tables.read(run.spark, run.warehouse, "items").filter(F.col("dataset") == plan.dataset)
        parts += [(kind, frame.select("item_id").distinct(), {"item_id": F.col("item_id")})
                  for kind, frame in (("catalog", listed), ("interacted", interactions))]
    rows = collect_facts({"representation": "string", "item_id": "string", "a": "long", "b": "long", "c": "long"},
                         parts)
    counts = next(r for r in rows if r["kind"] == "users")

    def ids(kind: str) -> list[str]:
        return [r["item_id"] for r in rows if r["kind"] == kind]

    return Prepared(
        users=int(counts["a"] or 0), users_with_train=int(counts["b"] or 0), seen_pairs_excluded=int(counts["c"] or 0),
        profiles={r["representation"]: int(r["a"]) for r in rows if r["kind"] == "profiles"},
        embedded=pd.DataFrame([(r["representation"], r["item_id"]) for r in rows if r["kind"] == "embedded"],
                              columns=protocol.CANDIDATE_COLUMNS),
        catalog=ids("catalog"), interacted=ids("interacted"), als_encoders=sorted(i or "" for i in ids("als")))


def spark_blocks(run: JobRun, settings: TopkSettings, name: str, size: tuple[int, int],
                 frames: dict[str, DataFrame]) -> tuple[DataFrame, DataFrame]:
    """The user and item blocks of ``name``, persisted on disk (read once per block pair), by
    the same functions as the driver's tables applied per bucket."""
    n_users, n_items = size
    # Each item block is read once per user block, so user blocks are as large as allowed (a
    # user block is small: vectors and seen ids, no score matrix), yet numerous enough that
    # the block pairs keep every core busy.
    min_user_blocks = math.ceil(run.spark.sparkContext.defaultParallelism / math.ceil(n_items / settings.item_block))
    these = frames["candidates"].filter(F.col("representation") == name).select("item_id")
    if name in settings.plan.representations:
        mine = frames["profiles"].filter(F.col("representation") == name).select("user_id", "vector")
        users = by_block(mine, "user_id", n_users, settings.user_block, min_user_blocks).cogroup(
            by_block(frames["users"], "user_id", n_users, settings.user_block, min_user_blocks)).applyInArrow(
            topk_udfs.profile_user_blocks(settings.user_block), schemas.USER_BLOCK_DDL)
        vectors = (frames["embeddings"].filter(F.col("representation") == name).select("item_id", "vector")
                   .join(these, "item_id", "left_semi"))
        items = by_block(vectors, "item_id", n_items, settings.item_block).applyInArrow(
            topk_udfs.item_blocks(settings.item_block), schemas.BLOCK_DDL)
    else:
        users = by_block(frames["users"], "user_id", n_users, settings.user_block, min_user_blocks).applyInArrow(
            topk_udfs.baseline_user_blocks(settings.user_block), schemas.USER_BLOCK_DDL)
        items = by_block(these, "item_id", n_items, settings.item_block).cogroup(
            by_block(frames["train"], "item_id", n_items, settings.item_block)).applyInArrow(
            topk_udfs.baseline_item_blocks(name, settings.item_block), schemas.BLOCK_DDL)
    return users.persist(StorageLevel.DISK_ONLY), items.persist(StorageLevel.DISK_ONLY)


def block_pairs(users: DataFrame, items: DataFrame, settings: TopkSettings, name: str, threads: int) -> DataFrame:
    """Per block pair top-K lists (``PAIR_DDL``) of ``name``: a cartesian product of BLOCK rows."""
    left = users.select([F.col(c).alias(f"u_{c}") for c in users.columns])
    right = items.select([F.col(c).alias(f"i_{c}") for c in items.columns])
    # A broadcast would ship the whole catalog to every task; the replicated cartesian product
    # keeps one item block per task.
    joined = left.hint("shuffle_replicate_nl").crossJoin(right)
    plan = settings.plan
    return joined.mapInArrow(
        topk_udfs.pair_topk_batches(plan.k, scorers.scorer_for(name), plan.topk_seed, settings.score_rows, threads),
        schemas.PAIR_DDL).withColumn("representation", F.lit(name))


def topk_with_spark(run: JobRun, settings: TopkSettings) -> None:
    spark, wh, plan = run.spark, run.warehouse, settings.plan
    interactions = (tables.read(spark, wh, "interactions").filter(F.col("dataset") == plan.dataset)
                    .select("user_id", "item_id", "split"))
    n_seen_buckets = n_groups(spark, interactions.count())
    cached: list[DataFrame] = []  # every frame persisted here, released however the job ends
    try:
        with run.stage("prepare"):
            users = (interactions.groupBy(bucket("user_id", n_seen_buckets))
                     .applyInPandas(topk_udfs.seen_by_user(plan.exclude), schemas.USERS_SEEN_DDL)
                     .persist(StorageLevel.MEMORY_AND_DISK))
            cached.append(users)
            profiles = (tables.read(spark, wh, "user_profiles")
                        .filter((F.col("run_id") == settings.run_id)
                                & F.col("representation").isin(list(plan.representations))))
            embeddings = tables.read(spark, wh, "item_embeddings").filter(F.col("dataset") == plan.dataset)
            ranking = choose(run, settings, spark_facts(run, settings, users, profiles, embeddings, interactions))
            candidates = (spark.createDataFrame(ranking.candidates, "representation string, item_id string")
                          .persist(StorageLevel.MEMORY_AND_DISK))
            cached.append(candidates)
        frames = {"users": users, "profiles": profiles, "embeddings": embeddings, "candidates": candidates,
                  "train": interactions.filter(F.col("split") == protocol.TRAIN_SPLIT).groupBy("item_id")
                  .agg(F.count(F.lit(1)).alias("n"))}
        threads = max(1, int(spark.sparkContext.getConf().get("spark.task.cpus", "1")))
        # No action packs or scores ahead of the write: the write's one Spark job runs every
        # representation's packing stages side by side (independent stages of one job), then the
        # block pairs, then the merge; the packed blocks are persisted, so each is computed once.
        pairs = []
        for name, size in ranking.sizes.items():
            user_blocks, item_blocks = spark_blocks(run, settings, name, size, frames)
            cached += [user_blocks, item_blocks]
            pairs.append(block_pairs(user_blocks, item_blocks, settings, name, threads))
        names = list(plan.ranked)
        # Counted while the merged lists are written (one pass, no cache of the ranks): a user with
        # a list has a rank 1, and one whose list is full has a rank k.
        written = Observation("recommendations")
        rep, rank = F.col("representation"), F.col("rank")
        per_name = [agg for i, name in enumerate(names) for agg in (
            F.count(F.when(rep == name, 1)).alias(f"rows_{i}"),
            F.count(F.when((rep == name) & (rank == 1), 1)).alias(f"users_{i}"),
            F.count(F.when((rep == name) & (rank == plan.k), 1)).alias(f"full_{i}"))]
        with arrow_batch_rows(spark, 1), run.stage("score_merge_and_write"):
            ranks = (functools.reduce(DataFrame.unionByName, pairs).groupBy("representation", "user_block")
                     .applyInArrow(topk_udfs.merge_block_results(plan.k), schemas.RANKS_DDL)
                     .observe(written, *per_name))
            commit(run, settings, candidates, ranks)
        got = written.get
        record_written(run, settings, {name: (got[f"rows_{i}"], got[f"users_{i}"], got[f"full_{i}"])
                                       for i, name in enumerate(names)})
    finally:
        for frame in cached:
            frame.unpersist()
    log.info("topk run_id=%s: top-%d over %s", settings.run_id, plan.k, list(plan.ranked))


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
