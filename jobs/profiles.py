"""``profiles``: train histories and item vectors -> the ``user_profiles`` Delta table.

A user's profile in a representation is the mean of the L2-normalised vectors of the items in
their TRAIN history (``interactions.split = 'train'``), re-normalised (``udfs.profiles``); with
``experiment.profiles.half_life_days`` each item is weighted by recency (a half-life in days,
counted back from the user's latest train interaction). ``n_history`` is the number of train
rows whose item has a vector in that representation.

Trained fusions (``attention``, ``gating``, ``crossmodal``, ``smore``: item vectors that the
``fuse`` job wrote) are profiled like base representations: the mean of the fused item vectors,
which is the user vector they were trained for.
Fusions (``naive``, ``concat``...) are NOT profiles of fused item vectors: as ``udfs.fusion``
prescribes, the per-modality profiles are fused, so the fused score stays the fixed weighted
average of the per-modality cosines for every user. A fused profile exists for users who have
a profile in every part; its ``n_history`` is the smallest of the parts'.

The collaborative-filtering reference ``als`` (when it is a representation) is trained here,
because it is what this job makes: user vectors from the train interactions. Spark ML's
implicit ALS (``udfs.spark.als``, settings ``experiment.profiles.als``) is fitted on the train
split only (valid and test are never read); its user factors become the users' ``als`` rows of
``user_profiles`` (``n_history``: the user's train rows) and its item factors the dataset's
``als`` rows of ``item_embeddings``, UNNORMALISED (``topk`` ranks them by dot product, the
model's own score), with ``encoder = 'spark-ml-als:<run id>'`` so that ``topk`` can refuse
item factors that another run's ALS wrote. Every catalog item gets a row: an item without a
train interaction has no factor and gets the zero vector (score 0, the model's prediction for
an item it has no evidence about), counted as ``items_without_factor_als``, so ``als`` never
shrinks the common candidate set. ``ms_train_als`` is the fit's time.

Rows are keyed by ``run_id``: the pipeline's (``--run-id``), else this job's own run id. The
representations, fusions, half-life and concat weights come from the run's plan (``jobs.plan``:
the one stored under the run id, else this config's, stored); a config that disagrees with a
stored plan exits 2 naming the setting and both values.
Nothing is dropped silently: ``users_without_train`` (users of the dataset with no train
interaction), ``users_without_profile_<rep>`` (users with train interactions but no train item
with a vector in <rep>, or whose vectors cancel out), ``history_rows_without_vector_<rep>``.
Rerunning with the same run id gives the same rows: the run's slice for these representations
is replaced in one atomic commit (``replaceWhere``).

Two paths compute the same rows, counts, warnings and errors (``jobs.driver_inputs``): while the
dataset's ``items``, ``interactions`` and ``item_embeddings`` slices are small
(``spark.driver_compute_mb``), they are read with delta-rs and the profiles are built on the
driver with the table rules of ``udfs.profile_inputs`` and the kernels the Spark tasks run;
otherwise Spark computes them. ``als`` does not choose the path: on either one its fit is a
Spark ML call on the train split read from the Delta table as a Spark frame (the same frame on
both paths, so the same factors to the bit); on the driver path the factors then come back to
the driver, which writes the item factors and the profiles as it writes the others.
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import json
import logging
import math

import pandas as pd
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, Observation
from pyspark.sql import functions as F

from udfs import embedding_udfs, profile_inputs
from udfs.spark.als import AlsSettings, train_als
from udfs.spark.schemas import FUSED_PROFILE_SCHEMA, PROFILE_SCHEMA
from udfs.representations import ALS, Representation, parse_representation

from . import tables
from .config import ConfigError
from .driver_inputs import Slice, read_on_driver
from .facts import collect_facts
from .job_run import Job, JobRun, NothingUsable, run_id_argument
from .plan import PROFILES_FIELDS, plan_for_run

log = logging.getLogger(__name__)

# History rows per applyInPandas group: a group is one pandas frame in one Python worker.
ROWS_PER_GROUP = 200_000


def base_profiles(history: DataFrame, half_life_days: float | None, n_buckets: int) -> DataFrame:
    """``PROFILE_SCHEMA`` rows from history rows (representation, user_id, vector, ts)."""
    bucketed = history.withColumn("_bucket", F.pmod(F.xxhash64("user_id"), F.lit(n_buckets)))
    return bucketed.groupBy("representation", "_bucket").applyInPandas(
        embedding_udfs.profile_groups(half_life_days), PROFILE_SCHEMA)


def fuse_profiles(profiles: DataFrame, rep: Representation, weights: dict[str, float] | None) -> DataFrame:
    """Fused profiles (user_id, vector, status, n_history) of the users with every part."""
    joined = None
    for j, part in enumerate(rep.parts):
        frame = profiles.filter(F.col("representation") == part).select(
            "user_id", F.col("vector").alias(f"part_{j}"), F.col("n_history").alias(f"_n_{j}"))
        joined = frame if joined is None else joined.join(frame, "user_id")
    n_history = F.least(*[F.col(f"_n_{j}") for j in range(len(rep.parts))]) if len(rep.parts) > 1 \
        else F.col("_n_0")
    joined = joined.withColumn("n_history", n_history.cast("int"))
    return joined.select("user_id", *[f"part_{j}" for j in range(len(rep.parts))], "n_history").mapInPandas(
        embedding_udfs.fused_vector_batches(rep.kind, rep.parts, None if rep.kind != "concat" else weights,
                                            key="user_id"),
        FUSED_PROFILE_SCHEMA)


def train_frame(spark, wh: str, dataset: str) -> DataFrame:
    """The dataset's train rows (user_id, item_id, ts) as a Spark frame read from the Delta table:
    what the ALS fit reads on both paths. Spark ML's ALS is deterministic for one seed and one
    input partitioning, so the driver path hands it the same frame the Spark path does (one read
    of a few MB) rather than a frame of the rows it holds, whose partitions would differ."""
    interactions = tables.read(spark, wh, "interactions").filter(F.col("dataset") == dataset)
    return interactions.filter(F.col("split") == "train").select("user_id", "item_id", "ts")


def als_encoder(run_id: str) -> str:
    return f"spark-ml-als:{run_id}"


def fit_als(run: JobRun, dataset: str, train: DataFrame, settings: AlsSettings) -> tuple[DataFrame, DataFrame]:
    """The ``als`` fit (``ms_train_als``): (user factors, item factors), cached by Spark ML."""
    with run.stage("train_als"):
        user_factors, item_factors = train_als(train, settings)
    log.info("als %s: fitted with rank %d", dataset, settings.rank)
    return user_factors, item_factors


def als_profiles(run: JobRun, dataset: str, train: DataFrame, settings: AlsSettings, run_id: str) -> DataFrame:
    """Train the ``als`` reference on ``train``, write its item factors to ``item_embeddings``
    (every catalog item; zeros without a factor) and return its user factors as
    (user_id, representation, vector, n_history) rows."""
    spark, wh = run.spark, run.warehouse
    user_factors, item_factors = fit_als(run, dataset, train, settings)
    catalog = tables.read(spark, wh, "items").filter(F.col("dataset") == dataset).select("item_id")
    # Items interacted with but missing from ``items`` (an older ingest) still get their factor.
    catalog = catalog.unionByName(item_factors.select("item_id")).distinct()
    zeros = F.array_repeat(F.lit(0.0).cast("float"), settings.rank)
    items = (catalog.join(item_factors.withColumn("_factor", F.lit(1)), "item_id", "left")
             .select(F.lit(dataset).alias("dataset"), "item_id", F.lit(ALS).alias("representation"),
                     F.lit(als_encoder(run_id)).alias("encoder"), F.lit(settings.rank).alias("dim"),
                     F.coalesce("vector", zeros).alias("vector"),
                     F.lit(None).cast("string").alias("source_sha256"), "_factor"))
    # Counted while written (no pass of its own).
    written = Observation("als_items")
    items = items.observe(written, F.count(F.lit(1)).alias("n"), F.count("_factor").alias("factors")).drop("_factor")
    tables.replace_slice(spark, wh, "item_embeddings", items, {"dataset": dataset, "representation": [ALS]})
    run.count("items_without_factor_als", int(written.get["n"]) - int(written.get["factors"]))
    n_history = train.groupBy("user_id").agg(F.count(F.lit(1)).cast("int").alias("n_history"))
    return (user_factors.join(n_history, "user_id")
            .select("user_id", F.lit(ALS).alias("representation"), "vector", "n_history"))


def first_facts(spark, wh: str, dataset: str, interactions: DataFrame, history: DataFrame):
    """(``tables.ingest_id_summary`` rows, the totals row: rows / users / train_users, history
    rows per representation), from one Spark job over a union of the three small aggregates."""
    ingest = tables.ingest_id_summary(spark, wh, dataset)
    totals = (interactions.groupBy("user_id").agg(F.count_if(F.col("split") == "train").alias("train_rows"))
              .agg(F.sum("train_rows").alias("rows"), F.count(F.lit(1)).alias("users"),
                   F.count_if(F.col("train_rows") > 0).alias("train_users")))
    by_rep = history.groupBy("representation").count()
    rows = collect_facts(
        {"name": "string", "low": "string", "high": "string", "n": "long", "tagged": "long",
         "rows": "long", "users": "long", "train_users": "long"},
        [("ingest", ingest, {c: F.col(c) for c in ("name", "low", "high", "n", "tagged")}),
         ("totals", totals, {c: F.col(c) for c in ("rows", "users", "train_users")}),
         ("history", by_rep, {"name": F.col("representation"), "n": F.col("count")})])
    ingest_rows = [{c: r[c] for c in ("name", "low", "high", "n", "tagged")} for r in rows if r["kind"] == "ingest"]
    t = next(r for r in rows if r["kind"] == "totals")
    totals_row = {"rows": t["rows"], "users": t["users"], "train_users": t["train_users"]}
    return ingest_rows, totals_row, {r["name"]: int(r["n"]) for r in rows if r["kind"] == "history"}


def driver_slices(dataset: str, base_names: list[str]) -> dict[str, Slice]:
    """What the driver path reads: the ingest ids of both tables (the ingest check), the
    catalog's item ids (the ``als`` item rows), the dataset's interactions and its item vectors
    of the base representations."""
    slices = {
        "items": Slice("items", equal={"dataset": dataset}, columns=["item_id", "ingest_id"]),
        "interactions": Slice("interactions", equal={"dataset": dataset},
                              columns=["user_id", "item_id", "ts", "split", "ingest_id"]),
    }
    if base_names:  # a plan of ``als`` alone profiles no item vectors
        slices["vectors"] = Slice("item_embeddings", equal={"dataset": dataset}, within={"representation": base_names},
                                  columns=["representation", "item_id", "vector"])
    return slices


class SparkProfiles:
    """The distributed path: the inputs stay Spark frames, profiles are built in Spark tasks."""

    def __init__(self, run: JobRun, dataset: str, base_names: list[str], cached: list[DataFrame]):
        spark, wh = run.spark, run.warehouse
        self.spark, self.cached = spark, cached
        interactions = tables.read(spark, wh, "interactions").filter(F.col("dataset") == dataset)
        self.train = train_frame(spark, wh, dataset).persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(self.train)
        vectors = (tables.read(spark, wh, "item_embeddings")
                   .filter((F.col("dataset") == dataset) & F.col("representation").isin(base_names))
                   .select("representation", "item_id", "vector"))
        self.history = self.train.join(vectors, "item_id").select("representation", "user_id", "vector", "ts")
        # One Spark job answers the ingest check, the three totals and the history rows per
        # representation (a job per question cost more than the questions on small data).
        self.facts = first_facts(spark, wh, dataset, interactions, self.history)

    def profiles(self, plan, half_life_days, fusions: list[Representation]) -> tuple[dict[str, int], DataFrame]:
        """(profiles written per representation, the rows: user_id, representation, vector, n_history)."""
        rows_by_rep = self.facts[2]
        n_buckets = max(self.spark.sparkContext.defaultParallelism,
                        math.ceil(max(rows_by_rep.values(), default=0) / ROWS_PER_GROUP))
        made = base_profiles(self.history, half_life_days, n_buckets).persist(StorageLevel.MEMORY_AND_DISK)
        self.cached.append(made)
        out = made.select("user_id", "representation", "vector", "n_history")
        # Profiles per representation, base and fused, counted in one Spark job (which also fills
        # the caches the write then reads).
        counted = made.groupBy("representation").agg(F.count(F.lit(1)).alias("n"))
        for rep in fusions:
            weights = plan.fusion_weights(rep.parts) if rep.kind == "concat" else None
            fused = fuse_profiles(made, rep, weights).persist(StorageLevel.MEMORY_AND_DISK)
            self.cached.append(fused)
            counted = counted.unionByName(fused.agg(F.count_if(F.col("status") == embedding_udfs.OK).alias("n"))
                                          .select(F.lit(rep.name).alias("representation"), "n"))
            out = out.unionByName(fused.filter(F.col("status") == embedding_udfs.OK)
                                  .select("user_id", F.lit(rep.name).alias("representation"), "vector", "n_history"))
        return {row["representation"]: int(row["n"]) for row in counted.collect()}, out

    def with_als(self, run: JobRun, dataset: str, settings: AlsSettings, run_id: str,
                 out: DataFrame) -> tuple[int, DataFrame]:
        """(users with an ``als`` profile, ``out`` with their rows)."""
        factors = als_profiles(run, dataset, self.train, settings, run_id).persist(StorageLevel.MEMORY_AND_DISK)
        self.cached.append(factors)
        return factors.count(), out.unionByName(factors)

    def keyed(self, out: DataFrame, run_id: str) -> DataFrame:
        return out.withColumn("run_id", F.lit(run_id))


class DriverProfiles:
    """The driver path (``jobs.driver_inputs``): the inputs read with delta-rs, the same rules in
    pandas (``udfs.profile_inputs``) and the same kernels the Spark tasks call."""

    def __init__(self, run: JobRun, dataset: str, inputs: dict):
        self.spark = run.spark
        interactions = inputs["interactions"].to_pandas()
        self.interactions, self.catalog = interactions, inputs["items"].column("item_id").to_pylist()
        ingest_rows = [profile_inputs.ingest_summary("items", inputs["items"].column("ingest_id").to_pandas()),
                       profile_inputs.ingest_summary("interactions", interactions["ingest_id"])]
        vectors = inputs["vectors"].to_pandas() if "vectors" in inputs else \
            pd.DataFrame({c: pd.Series([], dtype=object) for c in ("representation", "item_id", "vector")})
        self.history = profile_inputs.history_rows(interactions, vectors)
        rows_by_rep = {str(k): int(v) for k, v in self.history.groupby("representation").size().items()}
        self.facts = (ingest_rows, profile_inputs.train_totals(interactions), rows_by_rep)

    def profiles(self, plan, half_life_days, fusions: list[Representation]) -> tuple[dict[str, int], pd.DataFrame]:
        made = profile_inputs.base_profiles(self.history, half_life_days, ROWS_PER_GROUP)
        written = {str(k): int(v) for k, v in made.groupby("representation").size().items()}
        frames = [made]
        for rep in fusions:
            weights = plan.fusion_weights(rep.parts) if rep.kind == "concat" else None
            fused = profile_inputs.fused_profiles(made, rep.kind, rep.parts, weights)
            written[rep.name] = int((fused["status"] == embedding_udfs.OK).sum())
            frames.append(profile_inputs.usable(fused, rep.name))
        return written, pd.concat(frames, ignore_index=True)

    def with_als(self, run: JobRun, dataset: str, settings: AlsSettings, run_id: str,
                 out: pd.DataFrame) -> tuple[int, pd.DataFrame]:
        """Only the fit is Spark's; its factors (a few MB on a catalog this path takes) come back
        to the driver, which writes the item factors and adds the user factors' rows to ``out``."""
        spark, wh = run.spark, run.warehouse
        user_factors, item_factors = fit_als(run, dataset, train_frame(spark, wh, dataset), settings)
        users, items = user_factors.toPandas(), item_factors.toPandas()
        rows = profile_inputs.als_item_rows(dataset, self.catalog, items, settings.rank, ALS, als_encoder(run_id))
        tables.replace_slice(spark, wh, "item_embeddings", rows, {"dataset": dataset, "representation": [ALS]})
        run.count("items_without_factor_als", rows.num_rows - len(items))
        made = profile_inputs.als_user_rows(users, profile_inputs.train_rows_per_user(self.interactions), ALS)
        return len(made), pd.concat([out, made], ignore_index=True)

    def keyed(self, out: pd.DataFrame, run_id: str) -> pa.Table:
        return profile_inputs.profile_table(out, run_id)


def check_inputs(run: JobRun, dataset: str, facts, base_names: list[str]) -> int:
    """Count what the inputs hold and refuse what no profile can come from; the users with
    train interactions."""
    ingest_rows, totals, rows_by_rep = facts
    try:
        # Profiles are where interactions first meet what was built from items: a mix of two
        # ingests would pair one snapshot's histories with another's catalog.
        ingest_id = tables.same_ingest(ingest_rows, dataset)
    except tables.MixedIngest as exc:
        raise NothingUsable(str(exc)) from None
    if ingest_id:
        log.info("profiles %s: ingest %s", dataset, ingest_id)
    n_train, n_users, n_train_users = (int(totals[k] or 0) for k in ("rows", "users", "train_users"))
    run.count("train_rows_read", n_train)
    run.count("users", n_users)
    run.count("users_with_train", n_train_users)
    run.count("users_without_train", n_users - n_train_users)
    if n_train == 0:
        raise NothingUsable(f"dataset '{dataset}' has no train interactions in {run.warehouse}/interactions: "
                            "run `vlm4rec ingest` first (and check the split settings)")
    for name in base_names:
        run.count(f"history_rows_{name}", rows_by_rep.get(name, 0))
        run.count(f"history_rows_without_vector_{name}", n_train - rows_by_rep.get(name, 0))
        if rows_by_rep.get(name, 0) == 0:
            log.warning("representation %s: no train item of dataset %s has a vector in item_embeddings; "
                        "run `vlm4rec embed` with this representation first", name, dataset)
    return n_train_users


def count_profiles(run: JobRun, dataset: str, names: list[str], written: dict[str, int], n_train_users: int) -> int:
    """Count the profiles per representation (and the users left without one); refuse a run
    that made none. The rows to write."""
    for name in names:
        n = written.get(name, 0)
        run.count(f"profiles_{name}", n)
        run.count(f"users_without_profile_{name}", n_train_users - n)
        if n_train_users - n:
            log.warning("representation %s: %d of %d users with train interactions have no profile "
                        "(no train item with a vector)", name, n_train_users - n, n_train_users)
    total = sum(written.get(name, 0) for name in names)
    run.count("rows_written", total)
    if total == 0:
        raise NothingUsable(f"dataset '{dataset}': no user has a profile in any of {names}; "
                            "run `vlm4rec embed` for these representations first")
    return total


def profiles(run: JobRun, args: argparse.Namespace | None = None) -> None:
    spark, wh = run.spark, run.warehouse
    dataset = run.config.dataset.name
    if not dataset:
        raise ConfigError("no dataset configured: pass --conf datasets/NAME.yaml (or --set dataset.name=...)")
    run_id = getattr(args, "run_id", None) or run.run_id
    # The run's plan (stored by the pipeline, or by the first job of the run id): the base
    # representations, the fusions built from them and their settings.
    plan = plan_for_run(run, run_id, PROFILES_FIELDS)
    # Trained fusions (``fuse``) have item vectors of their own: profiled like base ones.
    base = [parse_representation(n) for n in plan.base + plan.trained]
    fusions = [parse_representation(n) for n in plan.parameter_free]
    base_names = [r.name for r in base]

    # Small inputs are computed on the driver; ``als`` adds one Spark ML fit on either path.
    inputs = read_on_driver(run, driver_slices(dataset, base_names))
    cached: list[DataFrame] = []
    try:
        path = SparkProfiles(run, dataset, base_names, cached) if inputs is None \
            else DriverProfiles(run, dataset, inputs)
        n_train_users = check_inputs(run, dataset, path.facts, base_names)
        written, out = path.profiles(plan, plan.half_life_days, fusions)
        names = base_names + [r.name for r in fusions]
        if ALS in plan.representations:
            written[ALS], out = path.with_als(run, dataset, AlsSettings(**json.loads(plan.als)), run_id, out)
            names.append(ALS)
        total = count_profiles(run, dataset, names, written, n_train_users)
        # One atomic commit replaces the run's profiles of these representations (stale users go).
        tables.replace_slice(spark, wh, "user_profiles", path.keyed(out, run_id),
                             {"run_id": run_id, "representation": names})
    finally:
        for frame in cached:
            frame.unpersist()
    log.info("profiles %s: run_id=%s, %d profiles over %s", dataset, run_id, total, names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", default=None, type=run_id_argument,
                        help="key the profiles by this run id (the pipeline's); default: this job's run id")


JOB = Job("profiles", __doc__.splitlines()[0], profiles, add_arguments)


def main(argv: list[str] | None = None) -> int:
    return JOB.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
