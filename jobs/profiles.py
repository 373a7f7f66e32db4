"""``profiles``: train histories and item vectors -> the ``user_profiles`` Delta table.

A user's profile in a representation is the mean of the L2-normalised vectors of the items in
their TRAIN history (``interactions.split = 'train'``), re-normalised (``udfs.rank.profiles``); with
``experiment.profiles.half_life_days`` each item is weighted by recency (a half-life in days,
counted back from the user's latest train interaction). ``n_history`` is the number of train
rows whose item has a vector in that representation.

Trained fusions (``attention``, ``gating``, ``crossmodal``, ``smore``: item vectors that the
``fuse`` job wrote) are profiled like base representations: the mean of the fused item vectors,
which is the user vector they were trained for.
Fusions (``naive``, ``concat``...) are NOT profiles of fused item vectors: as ``udfs.fusion.fusion``
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

Two paths compute the same rows, counts, warnings and errors with the same functions
(``udfs.rank.profile_inputs``: the profile rows of a group of whole users, the ``als`` rows): while
the dataset's ``items``, ``interactions`` and ``item_embeddings`` slices are small
(``spark.driver_compute_mb``, ``jobs.driver_inputs``) they are read with delta-rs and the driver
calls the functions; otherwise Spark groups the rows by a bounded bucket of user (or item) ids
and calls them per group. What either path hands the checks is a ``ProfileFacts``. ``als`` does
not choose the path: on either one its fit is a Spark ML call on the train split read from the
Delta table as a Spark frame (the same frame on both paths, so the same factors to the bit); on
the driver path the factors then come back to the driver, which writes them as it writes the
profiles.
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, Observation
from pyspark.sql import functions as F

from udfs.rank import profile_inputs
from udfs.rank.profile_inputs import ProfileFacts
from udfs.representations import ALS, parse_representation
from udfs.spark.als import AlsSettings, train_als
from udfs.spark.schemas import PROFILE_SCHEMA

from . import tables
from .config import ConfigError
from .driver_inputs import Slice, read_on_driver
from .facts import collect_facts
from .job_run import Job, JobRun, NothingUsable, run_id_argument
from .plan import PROFILES_FIELDS, plan_for_run
from .spark_groups import ROWS_PER_GROUP, bucket, n_groups

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ProfileSettings:
    """What the job hands either path, resolved once from the run's plan."""

    dataset: str
    run_id: str  # the profiles' key
    base_names: list[str]  # base representations and trained fusions: profiled from item vectors
    rows: Callable[[pd.DataFrame], pd.DataFrame]  # ``udfs.rank.profile_inputs.profile_rows``, fusions included
    als: AlsSettings | None  # the ``als`` fit's settings, when ``als`` is ranked


def train_frame(spark, wh: str, dataset: str) -> DataFrame:
    """The dataset's train rows (user_id, item_id, ts) as a Spark frame read from the Delta table:
    what the ALS fit reads on both paths. Spark ML's ALS is deterministic for one seed and one
    input partitioning, so the driver path hands it the same frame the Spark path does (one read
    of a few MB) rather than a frame of the rows it holds, whose partitions would differ."""
    interactions = tables.read(spark, wh, "interactions").filter(F.col("dataset") == dataset)
    return interactions.filter(F.col("split") == "train").select("user_id", "item_id", "ts")


def fit_als(run: JobRun, dataset: str, train: DataFrame, settings: AlsSettings) -> tuple[DataFrame, DataFrame]:
    """The ``als`` fit (``ms_train_als``): (user factors, item factors), cached by Spark ML."""
    with run.stage("train_als"):
        user_factors, item_factors = train_als(train, settings)
    log.info("als %s: fitted with rank %d", dataset, settings.rank)
    return user_factors, item_factors


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


def on_driver(run: JobRun, settings: ProfileSettings, inputs: dict) -> tuple[int, dict[str, int], pa.Table]:
    """The driver path (``jobs.driver_inputs``): (users with train rows, rows per
    representation, the rows to write)."""
    interactions = inputs["interactions"].to_pandas()
    vectors = inputs["vectors"].to_pandas() if "vectors" in inputs else \
        pd.DataFrame({c: pd.Series([], dtype=object) for c in ("representation", "item_id", "vector")})
    history = profile_inputs.history_rows(interactions, vectors)
    facts = ProfileFacts.of(inputs["items"].column("ingest_id").to_pandas(), interactions, history)
    n_train_users = check_inputs(run, settings, facts)
    out = profile_inputs.in_user_groups(history, settings.rows, ROWS_PER_GROUP)
    if settings.als is not None:
        out = pd.concat([out, als_on_driver(run, settings, inputs, interactions)], ignore_index=True)
    written = {str(k): int(v) for k, v in out.groupby("representation").size().items()}
    return n_train_users, written, profile_inputs.profile_table(out, settings.run_id)


def on_spark(run: JobRun, settings: ProfileSettings, cached: list[DataFrame]) -> tuple[int, dict[str, int], DataFrame]:
    """The distributed path: Spark groups the rows by bounded buckets of user (or item) ids and
    calls the driver's functions per group. As ``on_driver``; the rows are cached (``cached``)."""
    spark, wh, dataset = run.spark, run.warehouse, settings.dataset
    train = train_frame(spark, wh, dataset).persist(StorageLevel.MEMORY_AND_DISK)
    cached.append(train)
    vectors = (tables.read(spark, wh, "item_embeddings")
               .filter((F.col("dataset") == dataset) & F.col("representation").isin(settings.base_names))
               .select("representation", "item_id", "vector"))
    history = train.join(vectors, "item_id").select("representation", "user_id", "item_id", "vector", "ts")
    facts = spark_facts(run, dataset, history)
    n_train_users = check_inputs(run, settings, facts)
    # A group holds whole users, about ROWS_PER_GROUP history rows of all representations.
    n_buckets = n_groups(spark, sum(facts.history_rows.values()))
    out = history.groupBy(bucket("user_id", n_buckets)).applyInPandas(settings.rows, PROFILE_SCHEMA)
    if settings.als is not None:
        out = out.unionByName(als_on_spark(run, settings, train, n_buckets))
    out = out.persist(StorageLevel.MEMORY_AND_DISK)
    cached.append(out)
    # Profiles per representation counted in one Spark job, which also fills the cache the write reads.
    written = {r["representation"]: int(r["count"]) for r in out.groupBy("representation").count().collect()}
    return n_train_users, written, out.withColumn("run_id", F.lit(settings.run_id))


def als_on_driver(run: JobRun, settings: ProfileSettings, inputs: dict, interactions: pd.DataFrame) -> pd.DataFrame:
    """Fit ``als``, write its item rows, and return its user rows; only the fit is Spark's: its
    factors (a few MB on a catalog this path takes) come back to the driver."""
    dataset = settings.dataset
    user_factors, item_factors = fit_als(run, dataset, train_frame(run.spark, run.warehouse, dataset), settings.als)
    users, items = user_factors.toPandas(), item_factors.toPandas()
    catalog = inputs["items"].select(["item_id"]).to_pandas()
    made = profile_inputs.als_item_rows(dataset, settings.als.rank, settings.run_id)(catalog, items)
    tables.replace_slice(run.spark, run.warehouse, "item_embeddings", pa.Table.from_pandas(made, preserve_index=False),
                         {"dataset": dataset, "representation": [ALS]})
    run.count("items_without_factor_als", len(made) - len(items))
    return profile_inputs.als_user_rows(users, interactions[interactions["split"] == "train"])


def als_on_spark(run: JobRun, settings: ProfileSettings, train: DataFrame, n_buckets: int) -> DataFrame:
    """As ``als_on_driver``, with the driver's functions applied per bucket of item (user) ids."""
    dataset = settings.dataset
    user_factors, item_factors = fit_als(run, dataset, train, settings.als)
    catalog = tables.read(run.spark, run.warehouse, "items").filter(F.col("dataset") == dataset).select("item_id")
    items = catalog.groupBy(bucket("item_id", n_buckets)).cogroup(
        item_factors.groupBy(bucket("item_id", n_buckets))).applyInPandas(
        profile_inputs.als_item_rows(dataset, settings.als.rank, settings.run_id), tables.SCHEMAS["item_embeddings"])
    written = Observation("als_items")  # counted while written (no pass of its own)
    tables.replace_slice(run.spark, run.warehouse, "item_embeddings", items.observe(written, F.count("*").alias("n")),
                         {"dataset": dataset, "representation": [ALS]})
    run.count("items_without_factor_als", int(written.get["n"]) - item_factors.count())
    return user_factors.groupBy(bucket("user_id", n_buckets)).cogroup(
        train.groupBy(bucket("user_id", n_buckets))).applyInPandas(profile_inputs.als_user_rows, PROFILE_SCHEMA)


def spark_facts(run: JobRun, dataset: str, history: DataFrame) -> ProfileFacts:
    """The ``ProfileFacts`` from one Spark job over a union of the three small aggregates (a job
    per question cost more than the questions on small data)."""
    interactions = tables.read(run.spark, run.warehouse, "interactions").filter(F.col("dataset") == dataset)
    totals = (interactions.groupBy("user_id").agg(F.count_if(F.col("split") == "train").alias("train_rows"))
              .agg(F.sum("train_rows").alias("rows"), F.count(F.lit(1)).alias("users"),
                   F.count_if(F.col("train_rows") > 0).alias("train_users")))
    rows = collect_facts(
        {"name": "string", "low": "string", "high": "string", "n": "long", "tagged": "long",
         "rows": "long", "users": "long", "train_users": "long"},
        [("ingest", tables.ingest_id_summary(run.spark, run.warehouse, dataset),
          {c: F.col(c) for c in profile_inputs.INGEST_COLUMNS}),
         ("totals", totals, {c: F.col(c) for c in ("rows", "users", "train_users")}),
         ("history", history.groupBy("representation").count(),
          {"name": F.col("representation"), "n": F.col("count")})])
    t = next(r for r in rows if r["kind"] == "totals")
    return ProfileFacts([{c: r[c] for c in profile_inputs.INGEST_COLUMNS} for r in rows if r["kind"] == "ingest"],
                        int(t["rows"] or 0), int(t["users"]), int(t["train_users"]),
                        {r["name"]: int(r["n"]) for r in rows if r["kind"] == "history"})


def check_inputs(run: JobRun, settings: ProfileSettings, facts: ProfileFacts) -> int:
    """Count what the inputs hold and refuse what no profile can come from; the users with
    train interactions."""
    dataset = settings.dataset
    try:
        # Profiles are where interactions first meet what was built from items: a mix of two
        # ingests would pair one snapshot's histories with another's catalog.
        ingest_id = tables.same_ingest(facts.ingest, dataset)
    except tables.MixedIngest as exc:
        raise NothingUsable(str(exc)) from None
    if ingest_id:
        log.info("profiles %s: ingest %s", dataset, ingest_id)
    run.count("train_rows_read", facts.train_rows)
    run.count("users", facts.users)
    run.count("users_with_train", facts.train_users)
    run.count("users_without_train", facts.users - facts.train_users)
    if facts.train_rows == 0:
        raise NothingUsable(f"dataset '{dataset}' has no train interactions in {run.warehouse}/interactions: "
                            "run `vlm4rec ingest` first (and check the split settings)")
    for name in settings.base_names:
        n = facts.history_rows.get(name, 0)
        run.count(f"history_rows_{name}", n)
        run.count(f"history_rows_without_vector_{name}", facts.train_rows - n)
        if n == 0:
            log.warning("representation %s: no train item of dataset %s has a vector in item_embeddings; "
                        "run `vlm4rec embed` with this representation first", name, dataset)
    return facts.train_users


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
    dataset = run.config.dataset.name
    if not dataset:
        raise ConfigError("no dataset configured: pass --conf datasets/NAME.yaml (or --set dataset.name=...)")
    run_id = getattr(args, "run_id", None) or run.run_id
    # The run's plan (stored by the pipeline, or by the first job of the run id): the base
    # representations, the fusions built from them and their settings.
    plan = plan_for_run(run, run_id, PROFILES_FIELDS)
    # Trained fusions (``fuse``) have item vectors of their own: profiled like base ones.
    fusions = [parse_representation(n) for n in plan.parameter_free]
    settings = ProfileSettings(
        dataset, run_id, [parse_representation(n).name for n in plan.base + plan.trained],
        profile_inputs.profile_rows(plan.half_life_days, [
            (rep, plan.fusion_weights(rep.parts) if rep.kind == "concat" else None) for rep in fusions]),
        None if plan.als is None else AlsSettings(**dataclasses.asdict(plan.als)))
    names = settings.base_names + [r.name for r in fusions] + ([ALS] if settings.als else [])

    inputs = read_on_driver(run, driver_slices(dataset, settings.base_names))
    cached: list[DataFrame] = []
    try:
        n_train_users, written, out = (on_spark(run, settings, cached) if inputs is None
                                       else on_driver(run, settings, inputs))
        total = count_profiles(run, dataset, names, written, n_train_users)
        # One atomic commit replaces the run's profiles of these representations (stale users go).
        tables.replace_slice(run.spark, run.warehouse, "user_profiles", out,
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
